"""Checking a plan by simulating the noisy accelerator.

The model runs with noise of the profile's kind at every site of the plan at once,
normalization sites included, at σ/√n_i for site i with n_i executions (averaging n
Gaussian draws divides their σ by √n, so the simulation scales σ instead of repeating the
site). The plan, the uniform allocation of the same budget, and the clean model are each
measured over `repeats` noise draws. Draw r uses the same noise for every allocation,
scaled differently, so their comparison is not drowned in draw-to-draw noise.

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
from wnplan.data import Dataset, load_data
from wnplan.errors import DataError, ModelError, SettingsError
from wnplan.evaluate import evaluate_noisy
from wnplan.models import Model, load_model
from wnplan.noise import NoiseSpec, SiteNoise, derive_seed, site_noise
from wnplan.plan import uniform_counts

logger = logging.getLogger(__name__)

CONFIDENCE = 0.95


def load_profile_inputs(profile_record: Mapping[str, Any], model_path: str | Path | None = None) -> tuple[Model, Dataset]:
    """Reload the model and data a profile was measured on, and check they are unchanged."""
    model_info = profile_record["model"]
    path = Path(model_path or model_info["path"])
    data_info = profile_record["data"]
    preprocessing = data_info.get("preprocessing", {})
    normalize = preprocessing.get("normalize")
    dataset = load_data(
        data_info["name"],
        tuple(normalize) if normalize else None,
        preprocessing.get("limit"),
    )
    if dataset.sha256 != data_info["sha256"]:
        raise DataError(
            f"the data {data_info['name']!r} differs from the data the profile was measured on "
            "(hash mismatch); profile again with the current data"
        )
    model = load_model(path, sample=dataset.x[:2])
    if model.sha256 != model_info["sha256"]:
        raise ModelError(
            f"{path} differs from the model the profile was measured on (hash mismatch); "
            "profile the current model again"
        )
    return model, dataset


def site_levels(
    spec: NoiseSpec, sigma: float, executions: Mapping[int, int], scales: Mapping[int, float]
) -> dict[int, SiteNoise]:
    """Return absolute noise per site for σ/√n_i; sites with 0 executions are left clean."""
    return {
        index: site_noise(spec, sigma / math.sqrt(count), scales.get(index, 1.0))
        for index, count in executions.items()
        if count > 0
    }


def measure(
    model: Model,
    data: Dataset,
    levels: Mapping[int, SiteNoise],
    repeats: int,
    seed: int,
    progress: Callable[[], None] | None = None,
) -> list[float]:
    """Return the accuracy of each of `repeats` noise draws; draw r is seeded by (seed, r)."""
    accuracies = []
    for repeat in range(repeats):
        noise_seed = derive_seed(seed, {"check": repeat})
        accuracies.append(evaluate_noisy(model, data, levels, noise_seed) / len(data))
        if progress:
            progress()
    return accuracies


def summarize(accuracies: list[float], samples: int) -> dict[str, Any]:
    """Return the mean accuracy and its 95% confidence interval.

    Over several draws, the interval is Student's t over the draws. For a single draw (the
    clean model), it is the Wilson score interval of the binomial over the samples.
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
    sigma: float | None = None,
    repeats: int = 10,
    seed: int = 0,
    min_accuracy: float | None = None,
    plan_path: str | Path | None = None,
    progress: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Simulate the noisy accelerator for a plan and its uniform baseline.

    Args:
        plan: a plan record (see `wnplan.plan.allocate`).
        sigma: σ before averaging, in the profile's noise reference; None uses the profile's
            global midpoint.
        repeats: noise draws per allocation.
        seed: base seed of the draws.
        min_accuracy: the plan fails below this accuracy (fraction in [0, 1]).
        plan_path: where the plan was read from, recorded in the result.
        progress: called after every measured draw.

    Returns:
        The check record; `verdict.passed` is False when the plan misses its target.
    """
    if repeats < 1:
        raise SettingsError(f"invalid --repeats {repeats}: expected at least 1")
    if min_accuracy is not None and not 0.0 <= min_accuracy <= 1.0:
        raise SettingsError(f"invalid --min-accuracy {min_accuracy}: expected a fraction in [0, 1]")

    profile_record, base = _read_plan_profile(plan, plan_path)
    sigma, source = _check_sigma(profile_record, sigma)
    spec = NoiseSpec.from_dict(profile_record["noise"])
    model, data = load_profile_inputs(profile_record, _locate(profile_record["model"]["path"], base))
    scales = _scales(profile_record, spec.reference)

    planned = {site["index"]: site["executions"] for site in plan["sites"]}
    uniform = dict(zip(planned, uniform_counts(len(planned), sum(planned.values())), strict=True))
    results = {}
    for name, executions in (("plan", planned), ("uniform", uniform)):
        accuracies = measure(model, data, site_levels(spec, sigma, executions, scales), repeats, seed, progress)
        results[name] = summarize(accuracies, len(data)) | {"executions": list(executions.values())}
    results["plan"]["predicted_accuracy"] = plan.get("predicted_accuracy")
    results["clean"] = summarize(measure(model, data, {}, 1, seed), len(data)) | {"executions": None}

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
            "noise": spec.to_dict(),
            "repeats": repeats,
            "seed": seed,
            "samples": len(data),
            "confidence": CONFIDENCE,
            "min_accuracy": min_accuracy,
        },
        "results": results,
        "verdict": verdict(results, min_accuracy),
    }
    records.validate(record, "check")
    return record


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
            f"by more than the combined 95% interval ({margin:.4f})",
        }
    if min_accuracy is not None and plan["accuracy"] < min_accuracy:
        return {"passed": False, "reason": f"plan accuracy {plan['accuracy']:.4f} is below --min-accuracy {min_accuracy}"}
    return {"passed": True, "reason": "plan is not below uniform beyond the confidence intervals"}


def _read_plan_profile(plan: Mapping[str, Any], plan_path: str | Path | None) -> tuple[dict[str, Any], Path]:
    """Read the profile a plan names; relative paths are tried from the working directory,
    then from the plan's folder."""
    name = plan["profile"]["path"]
    if not name:
        raise SettingsError("the plan does not name the profile it came from; allocate again from a profile file")
    base = Path(plan_path).parent if plan_path else Path(".")
    path = _locate(name, base)
    profile_record = records.read_record(path, "profile")
    if records.record_sha256(profile_record) != plan["profile"]["sha256"]:
        raise SettingsError(f"{path} changed since the plan was made from it; run `wnplan allocate` again")
    return profile_record, path.parent


def _locate(name: str, base: Path) -> Path:
    path = Path(name)
    if path.is_absolute() or path.exists() or not (base / path).exists():
        return path
    return base / path


def _check_sigma(profile_record: Mapping[str, Any], sigma: float | None) -> tuple[float, str]:
    if sigma is not None:
        if not math.isfinite(sigma) or sigma < 0:
            raise SettingsError(f"invalid --sigma {sigma}: expected a finite σ ≥ 0")
        return float(sigma), "given"
    fit = (profile_record.get("global") or {}).get("fit") or {}
    if fit.get("midpoint") is None:
        raise SettingsError(
            "the profile has no global midpoint to check at; pass --sigma S, or profile with "
            "--scope both"
        )
    return float(fit["midpoint"]), "global midpoint of the profile"


def _scales(profile_record: Mapping[str, Any], reference: str) -> dict[int, float]:
    if reference == "absolute":
        return {}
    key = "rms" if reference == "rms" else "range"
    return {
        site["index"]: (site["statistics"][key] if site["statistics"][key] > 0 else 1.0)
        for site in profile_record["sites"]
    }
