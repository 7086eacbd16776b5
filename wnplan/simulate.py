"""Checking a plan by simulating the noisy accelerator.

The model runs with noise at every unshielded site of the plan at once, normalization sites
included, at σ/√n_i for site i with n_i executions. Averaging n Gaussian draws divides their
σ by √n, so the simulation scales σ instead of repeating the site. The noise is either
the accelerator's (`--accelerator`) or the profile's kind at the profile's global midpoint
(or `--sigma`). Shielded sites run clean.

The plan is measured beside the uniform allocation and the 1/µ rule of the same budget
(with the same shields), and beside the clean model. Each noisy allocation gets `repeats`
draws, and draw r uses the same underlying noise for all of them, scaled differently. So the
comparison is paired. A plan searched on half of the data is checked on the other half only.

`check()` is the Python entry point behind `wnplan check`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from wnplan import records
from wnplan._version import __version__
from wnplan.accelerator import Accelerator
from wnplan.data import Dataset, load_data
from wnplan.errors import DataError, ModelError, SettingsError
from wnplan.evaluate import evaluate_allocations, evaluate_noisy
from wnplan.models import Model, load_model
from wnplan.noise import NoiseSpec, SiteNoise, derive_seed, site_noise
from wnplan.quantize import Quantizer

logger = logging.getLogger(__name__)

CONFIDENCE = 0.95


def load_profile_inputs(profile_record: Mapping[str, Any], base: Path | None = None) -> tuple[Model, Dataset]:
    """Reload the model and data a profile was measured on, and check they are unchanged.

    A relative model path is tried from the working directory, then from `base` (the folder
    of the file that named the profile).
    """
    model_info = profile_record["model"]
    path = locate(model_info["path"], base or Path("."))
    data_info = profile_record["data"]
    preprocessing = data_info.get("preprocessing", {})
    normalize = preprocessing.get("normalize")
    dataset = load_data(data_info["name"], tuple(normalize) if normalize else None, preprocessing.get("limit"))
    if dataset.sha256 != data_info["sha256"]:
        raise DataError(
            f"the data {data_info['name']!r} differs from the data the profile was measured on "
            + "(hash mismatch); profile again with the current data"
        )
    model = load_model(path, sample=dataset.x[:2])
    if model.sha256 != model_info["sha256"]:
        raise ModelError(
            f"{path} differs from the model the profile was measured on (hash mismatch); "
            + "profile the current model again"
        )
    return model, dataset


def locate(name: str, base: Path) -> Path:
    """Return `name` as given if it exists (or is absolute), else relative to `base`."""
    path = Path(name)
    if path.is_absolute() or path.exists() or not (base / path).exists():
        return path
    return base / path


def measure(
    model: Model,
    data: Dataset,
    levels: Mapping[int, SiteNoise],
    repeats: int,
    seed: int,
    quantize: Mapping[int, Quantizer] | None = None,
    progress: Callable[[], None] | None = None,
) -> list[float]:
    """Return the accuracy of each of `repeats` noise draws; draw r is seeded by (seed, r)."""
    accuracies = []
    for repeat in range(repeats):
        noise_seed = derive_seed(seed, {"check": repeat})
        accuracies.append(evaluate_noisy(model, data, levels, noise_seed, quantize=quantize) / len(data))
        if progress:
            progress()
    return accuracies


def measure_allocations(
    model: Model,
    data: Dataset,
    level_sets: list[Mapping[int, SiteNoise]],
    repeats: int,
    seed: int,
    quantize: Mapping[int, Quantizer] | None = None,
    progress: Callable[[], None] | None = None,
) -> list[list[float]]:
    """Return, per noise setting, the accuracy of each draw; all settings share draw r's values."""
    accuracies: list[list[float]] = [[] for _ in level_sets]
    for repeat in range(repeats):
        noise_seed = derive_seed(seed, {"check": repeat})
        correct = evaluate_allocations(model, data, level_sets, noise_seed, quantize=quantize)
        for position, value in enumerate(correct):
            accuracies[position].append(value / len(data))
            if progress:
                progress()
    return accuracies


def summarize(accuracies: list[float], samples: int) -> dict[str, Any]:
    """Return the mean accuracy and its 95% confidence interval.

    Over several draws that differ, the interval is Student's t over the draws. Otherwise
    (one draw, or a noise-free model) it is the Wilson score interval of the binomial over
    the samples.
    """
    values = np.asarray(accuracies)
    mean = float(values.mean())
    if len(values) > 1 and values.std(ddof=1) > 0:
        half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))
        low, high = mean - half, mean + half
    else:
        low, high = _wilson(mean, samples)
    return {
        "accuracy": mean,
        "ci_low": float(max(0.0, low)),
        "ci_high": float(min(1.0, high)),
        "repeats": len(values),
        "accuracies": [float(value) for value in values],
    }


def _wilson(p: float, n: int) -> tuple[float, float]:
    z = stats.norm.ppf(0.5 + CONFIDENCE / 2)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def check(
    plan: dict[str, Any],
    *,
    accelerator: Accelerator | None = None,
    sigma: float | None = None,
    quantize: bool = False,
    repeats: int = 10,
    seed: int = 0,
    min_accuracy: float | None = None,
    plan_path: str | Path | None = None,
    progress: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Simulate the noisy accelerator for a plan and its baselines.

    Args:
        plan: a plan record (see `wnplan.plan.allocate`).
        accelerator: the accelerator to simulate; None uses the plan's accelerator if it has
            one, else the profile's noise kind at `sigma`.
        sigma: without an accelerator, σ before averaging, in the profile's noise reference;
            None uses the profile's global midpoint. With an accelerator, it must be None.
        quantize: fake-quantize each unshielded site at its hinted bit width.
        repeats: noise draws per allocation.
        seed: base seed of the draws.
        min_accuracy: the plan fails below this accuracy (fraction in [0, 1]).
        plan_path: where the plan was read from; relative paths in the plan are resolved
            from its folder if not found from the working directory.
        progress: called after every measured draw.

    Returns:
        The check record; `verdict.passed` is False when the plan misses its target.
    """
    _check_settings(repeats, min_accuracy, accelerator, sigma)
    if accelerator is None and sigma is None and plan.get("accelerator"):
        # A plan made for an accelerator is checked against it unless told otherwise.
        accelerator = Accelerator.from_dict(plan["accelerator"])
    profile_record, base = read_plan_profile(plan, plan_path)
    model, data = load_profile_inputs(profile_record, base)
    half = (plan.get("search") or {}).get("performed") and "odd"
    if half:
        from wnplan.search import HOLDOUT_HALF, split_half

        data = split_half(data, HOLDOUT_HALF)

    from wnplan.plan import AllocationSettings, allocate, operating_point

    if accelerator is None and sigma is not None:
        point = _fixed_sigma_point(profile_record, sigma)
        source = "given"
    else:
        point = operating_point(profile_record, accelerator)
        source = point.description["source"]
        sigma = point.description.get("sigma")
    quantizers = _quantizers(plan) if quantize else {}

    allocations = {"plan": _executions(plan)}
    baseline = AllocationSettings(
        budget=plan["budget"],
        method="uniform",
        shield=_shield_selection(plan),
        min_executions=plan["bounds"]["min_executions"],
        max_executions=plan["bounds"]["max_executions"],
        accelerator=accelerator,
        max_drop=plan.get("max_drop", 0.01),
    )
    for method in ("uniform", "paper"):
        other = allocate(profile_record, _replace(baseline, method=method), profile_path=None)
        allocations[method] = _executions(other)

    level_sets = [
        {index: point.levels[index](count) for index, count in executions.items() if count > 0}
        for executions in allocations.values()
    ]
    per_allocation = measure_allocations(model, data, level_sets, repeats, seed, quantizers, progress)
    results = {}
    for (name, executions), accuracies in zip(allocations.items(), per_allocation, strict=True):
        results[name] = summarize(accuracies, len(data)) | {"executions": list(executions.values())}
    results["plan"]["predicted_accuracy"] = plan.get("predicted_accuracy")
    # The clean model runs without quantization, so --quantize --sigma 0 shows what quantization costs.
    clean = measure(model, data, {}, 1, seed)
    results["clean"] = summarize(clean, len(data)) | {"executions": None}

    record = {
        "kind": "check",
        "schema_version": records.SCHEMA_VERSION,
        "wnplan_version": __version__,
        "plan": {
            "path": str(plan_path or ""),
            "sha256": records.record_sha256(plan),
            "method": plan["method"],
            "budget": plan["budget"],
        },
        "settings": {
            "sigma": sigma,
            "sigma_source": source,
            "accelerator": accelerator.to_dict() if accelerator else None,
            "noise": profile_record["noise"] if accelerator is None else accelerator.noise_spec().to_dict(),
            "quantize": quantize,
            "repeats": repeats,
            "seed": seed,
            "samples": len(data),
            "data_half": half or "all",
            "confidence": CONFIDENCE,
            "min_accuracy": min_accuracy,
        },
        "results": results,
        "verdict": verdict(results, min_accuracy),
    }
    records.validate(record, "check")
    return record


def _check_settings(repeats, min_accuracy, accelerator, sigma) -> None:
    if repeats < 1:
        raise SettingsError(f"invalid --repeats {repeats}: expected at least 1")
    if min_accuracy is not None and not 0.0 <= min_accuracy <= 1.0:
        raise SettingsError(f"invalid --min-accuracy {min_accuracy}: expected a fraction in [0, 1]")
    if sigma is not None and (not math.isfinite(sigma) or sigma < 0):
        raise SettingsError(f"invalid --sigma {sigma}: expected a finite σ ≥ 0")
    if accelerator is not None and sigma is not None:
        raise SettingsError("--sigma and --accelerator exclude each other: the accelerator file sets the noise")


def _fixed_sigma_point(profile_record, sigma):
    from wnplan.plan import OperatingPoint, profile_scales

    spec = NoiseSpec.from_dict(profile_record["noise"])
    scales = profile_scales(profile_record, spec.reference)

    def levels_at(scale: float) -> Callable[[int], SiteNoise]:
        return lambda executions: site_noise(spec, sigma / math.sqrt(executions), scale)

    return OperatingPoint(
        {index: sigma for index in scales},
        {index: levels_at(scale) for index, scale in scales.items()},
        {"source": "given", "sigma": sigma},
    )


def _executions(plan: Mapping[str, Any]) -> dict[int, int]:
    return {site["index"]: (0 if site["shield"] else site["executions"]) for site in plan["sites"]}


def _shield_selection(plan: Mapping[str, Any]) -> str:
    shielded = [str(site["index"]) for site in plan["sites"] if site["shield"]]
    return ",".join(shielded) if shielded else "none"


def _replace(settings, **changes):
    from dataclasses import replace

    return replace(settings, **changes)


def _quantizers(plan: Mapping[str, Any]) -> dict[int, Quantizer]:
    quantizers = {}
    for site in plan["sites"]:
        bits = site.get("bits") or {}
        low, high = bits.get("range_low"), bits.get("range_high")
        if site["shield"] or bits.get("bits") is None or low is None or high is None or high <= low:
            continue
        quantizers[site["index"]] = Quantizer(float(low), float(high), int(bits["bits"]))
    return quantizers


def verdict(results: Mapping[str, Mapping[str, Any]], min_accuracy: float | None) -> dict[str, Any]:
    """Decide whether the plan meets its target.

    The plan fails when its accuracy is below uniform's by more than the sum of the two
    95% interval half-widths, or below `min_accuracy`.
    """
    plan, uniform = results["plan"], results["uniform"]
    margin = (plan["ci_high"] - plan["ci_low"]) / 2 + (uniform["ci_high"] - uniform["ci_low"]) / 2
    if uniform["accuracy"] - plan["accuracy"] > margin:
        return {
            "passed": False,
            "reason": f"plan accuracy {plan['accuracy']:.4f} is below uniform {uniform['accuracy']:.4f} "
            + f"by more than the combined 95% interval ({margin:.4f})",
        }
    if min_accuracy is not None and plan["accuracy"] < min_accuracy:
        return {
            "passed": False,
            "reason": f"plan accuracy {plan['accuracy']:.4f} is below --min-accuracy {min_accuracy}",
        }
    return {"passed": True, "reason": "plan is not below uniform beyond the confidence intervals"}


def read_plan_profile(plan: Mapping[str, Any], plan_path: str | Path | None) -> tuple[dict[str, Any], Path]:
    """Read the profile a plan names, and return it with its folder."""
    name = plan["profile"]["path"]
    if not name:
        raise SettingsError("the plan does not name the profile it came from; allocate again from a profile file")
    base = Path(plan_path).parent if plan_path else Path(".")
    path = locate(name, base)
    profile_record = records.read_record(path, "profile")
    if records.record_sha256(profile_record) != plan["profile"]["sha256"]:
        raise SettingsError(f"{path} changed since the plan was made from it; run `wnplan allocate` again")
    return profile_record, path.parent
