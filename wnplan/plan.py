"""Deployment plans: executions per site, bit-width hints, and shielded sites.

Executing a site n times on a noisy accelerator and averaging the results divides its
noise σ by √n. A plan spreads a budget of executions over the profiled sites:

- `uniform`: counts differ by at most one; the extra executions go to the first sites.
- `paper`: the guided rule of the walking-noise research. It makes n_i ∝ 1/µ_i, normalised to
  the budget and rounded by largest remainder. Robust sites (µ > σ_max) count as µ = σ_max.
- `optimal`: counts that minimise the sum of the per-site losses predicted by the fitted
  curves at σ/√n. They are then refined with the accelerator simulator on a search half of
  the data (see `wnplan.search`) and are never ranked below `paper` there.

Shielded sites run noise-free on a precise (digital) unit. They take no executions from the
budget and cost the accelerator's digital cost instead.

`allocate()` is the Python entry point behind `wnplan allocate`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wnplan import records
from wnplan._version import __version__
from wnplan.accelerator import Accelerator
from wnplan.allocation import check_bounds, optimal_counts, proportional_counts, uniform_counts
from wnplan.bits import bit_hint
from wnplan.calibrate import reference_scales
from wnplan.errors import SettingsError
from wnplan.fit import FitResult, predict_accuracy
from wnplan.noise import NoiseSpec, SiteNoise, site_noise
from wnplan.sites import select_sites

logger = logging.getLogger(__name__)

METHODS = ("optimal", "paper", "uniform")
DEFAULT_WIDTHS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16)
CHANCE_MARGIN = 0.02  # a site "falls to chance" when its predicted accuracy is within this of chance


@dataclass(frozen=True)
class AllocationSettings:
    """How to build a plan.

    Attributes:
        budget: total executions over the unshielded sites.
        method: "optimal", "paper" or "uniform".
        accelerator: the accelerator to plan for; None plans for the profile's own noise at its
            global midpoint σ.
        max_drop: the whole model's accepted accuracy drop for bit-width hints (fraction).
        shield: "none", "auto", or a comma-separated site selection to shield.
        max_shielded: the most sites `auto` may shield.
        min_accuracy: the predicted accuracy `auto` shielding aims for (fraction), or None.
        min_executions, max_executions: bounds of each unshielded site's count; None for
            max_executions means the budget.
        search_budget: seconds for the simulator search of `optimal`; 0 skips the search.
        search_repeats: noise draws per allocation measured in the search.
        seed: base seed of the search's draws.
    """

    budget: int
    method: str = "optimal"
    accelerator: Accelerator | None = None
    max_drop: float = 0.01
    shield: str = "none"
    max_shielded: int = 2
    min_accuracy: float | None = None
    min_executions: int = 1
    max_executions: int | None = None
    search_budget: float = 60.0
    search_repeats: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise SettingsError(f"invalid --method {self.method!r}: expected one of {', '.join(METHODS)}")
        if self.budget < 1:
            raise SettingsError(f"invalid --budget {self.budget}: expected a positive number of executions")
        if not 0.0 < self.max_drop < 1.0:
            raise SettingsError(f"invalid --max-drop {self.max_drop}: expected a fraction in (0, 1), such as 0.01")
        if self.max_shielded < 0:
            raise SettingsError(f"invalid --max-shielded {self.max_shielded}: expected 0 or more")
        if self.min_accuracy is not None and not 0.0 <= self.min_accuracy <= 1.0:
            raise SettingsError(f"invalid --min-accuracy {self.min_accuracy}: expected a fraction in [0, 1]")
        if self.search_budget < 0 or not math.isfinite(self.search_budget):
            raise SettingsError(f"invalid --search-budget {self.search_budget}: expected seconds ≥ 0")
        if self.min_executions < 1:
            raise SettingsError(
                f"invalid --min-executions {self.min_executions}: every unshielded site runs at least once; "
                + "shield a site (--shield) to keep it off the accelerator"
            )
        if self.search_repeats < 1:
            raise SettingsError(f"invalid --search-repeats {self.search_repeats}: expected at least 1")

    @property
    def upper(self) -> int:
        return self.budget if self.max_executions is None else self.max_executions


@dataclass(frozen=True)
class OperatingPoint:
    """The noise each site sees before averaging, for predictions and simulation.

    Attributes:
        profile_sigma: per site, σ on the profile's own axis (its reference and kind), used to
            read the fitted curves.
        levels: per site, a function of the executions giving the absolute noise levels.
        description: how σ was chosen, recorded in the plan.
    """

    profile_sigma: dict[int, float]
    levels: dict[int, Callable[[int], SiteNoise]]
    description: dict[str, Any]


def operating_point(profile: dict[str, Any], accelerator: Accelerator | None) -> OperatingPoint:
    """Return the noise per site: the accelerator's, or the profile's at its global midpoint."""
    spec = NoiseSpec.from_dict(profile["noise"])
    scales = profile_scales(profile, spec.reference)
    sites = [site["index"] for site in profile["sites"]]

    if accelerator is None:
        sigma = global_midpoint(profile)
        if sigma is None:
            raise SettingsError(
                "the profile has no global midpoint to plan for; profile with --scope both, or pass "
                + "--accelerator NAME|FILE"
            )
        levels = {index: _scaled(spec, sigma, scales[index]) for index in sites}
        return OperatingPoint(
            {index: sigma for index in sites}, levels, {"source": "global midpoint of the profile", "sigma": sigma}
        )

    if accelerator.kind != spec.kind:
        logger.warning(
            "the accelerator's noise is %s but the profile measured %s noise; the plan was derived from other noise",
            accelerator.kind,
            spec.kind,
        )
    accelerator_scales = profile_scales(profile, accelerator.reference)
    profile_sigma = {
        index: _profile_axis_sigma(spec, accelerator, accelerator_scales[index], scales[index]) for index in sites
    }
    levels = {index: _accelerator_levels(accelerator, accelerator_scales[index]) for index in sites}
    return OperatingPoint(profile_sigma, levels, {"source": "accelerator", "accelerator": accelerator.name})


def _scaled(spec: NoiseSpec, sigma: float, scale: float) -> Callable[[int], SiteNoise]:
    return lambda executions: site_noise(spec, sigma / math.sqrt(executions), scale)


def _accelerator_levels(accelerator: Accelerator, scale: float) -> Callable[[int], SiteNoise]:
    return lambda executions: accelerator.site_levels(scale, executions)


def _profile_axis_sigma(
    spec: NoiseSpec, accelerator: Accelerator, accelerator_scale: float, profile_scale: float
) -> float:
    """Express the accelerator's noise as σ on the profile's axis (an approximation across kinds)."""
    additive = accelerator.sigma_add * accelerator_scale / profile_scale
    multiplicative = accelerator.sigma_mul
    if spec.kind == "additive":
        return additive if additive > 0 else multiplicative
    if spec.kind == "multiplicative":
        return multiplicative if multiplicative > 0 else additive
    # Mixed noise on one axis: σ_add = A·r and σ_mul = A·(1 − r); take the larger amplitude.
    candidates = []
    if spec.mix_ratio > 0:
        candidates.append(additive / spec.mix_ratio)
    if spec.mix_ratio < 1:
        candidates.append(multiplicative / (1 - spec.mix_ratio))
    return max(candidates)


def profile_scales(profile: dict[str, Any], reference: str) -> dict[int, float]:
    """Return each site's σ scale for a reference: 1 for absolute, else its RMS or range."""
    scales = reference_scales([site["statistics"] for site in profile["sites"]], reference)
    return {site["index"]: scales[position] for position, site in enumerate(profile["sites"])}


def global_midpoint(profile: dict[str, Any]) -> float | None:
    fit = (profile.get("global") or {}).get("fit") or {}
    return fit.get("midpoint")


def allocation_midpoint(fit: dict[str, Any] | None, fallback: float) -> tuple[float, str]:
    """Return the µ that the 1/µ rule uses for a site, and a note on where it came from."""
    if fit is None or fit.get("midpoint") is None:
        return fallback, "no midpoint could be measured; given the profile's smallest midpoint"
    if fit.get("lower_bound"):
        return float(fit["midpoint"]), "robust: µ above the largest σ tried, counted as σ_max"
    return float(fit["midpoint"]), ""


def allocate(
    profile: dict[str, Any],
    settings: AllocationSettings,
    profile_path: str | Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Return a plan record for a profile.

    Args:
        profile: a profile record (see `wnplan.profiler.profile`).
        settings: budget, method, accelerator, shielding and search settings.
        profile_path: where the profile was read from; recorded in the plan, and needed to
            reload the model and data for the `optimal` search.
        progress: called with the number of allocations the search has measured.

    Raises:
        SettingsError: invalid settings, no walking results, or an infeasible budget.
    """
    sites = [site for site in profile["sites"] if site.get("walking")]
    if not sites:
        raise SettingsError("the profile has no walking-noise results; run `wnplan profile MODEL --scope both` first")
    point = _operating_point_for(profile, settings)
    fits = {site["index"]: FitResult.from_dict(site["walking"]["fit"]) for site in sites}
    losses = {}
    if point is not None:
        losses = {
            site["index"]: _loss_table(
                fits[site["index"]], point.profile_sigma[site["index"]], settings.min_executions, settings.upper
            )
            for site in sites
        }

    shields = _choose_shields(profile, sites, settings, point, fits, losses)
    active = [site for site in sites if site["index"] not in shields]
    if not active:
        raise SettingsError("every profiled site is shielded; shield fewer sites or use --shield none")
    check_bounds(len(active), settings.budget, settings.min_executions, settings.upper)

    counts, search = _counts(profile, active, settings, point, losses, profile_path, progress)
    plan = _plan_record(profile, sites, shields, counts, settings, point, fits, profile_path)
    if search is not None:
        plan["search"] = search
    records.validate(plan, "plan")
    return plan


def _operating_point_for(profile: dict[str, Any], settings: AllocationSettings) -> OperatingPoint | None:
    """Return the operating point, or None when the rule needs no predictions and none exist."""
    needs_predictions = settings.method == "optimal" or settings.shield == "auto"
    if settings.accelerator is None and global_midpoint(profile) is None and not needs_predictions:
        return None
    return operating_point(profile, settings.accelerator)


def _loss_table(fit: FitResult, sigma: float, minimum: int, maximum: int) -> list[float]:
    """Return the predicted loss F(0) − F(σ/√n) for n = minimum … maximum (0 executions: σ)."""
    top = float(predict_accuracy(fit, 0.0))
    counts = np.arange(minimum, maximum + 1, dtype=np.float64)
    sigmas = sigma / np.sqrt(np.maximum(counts, 1.0))
    return [max(0.0, top - float(value)) for value in np.atleast_1d(predict_accuracy(fit, sigmas))]


def _choose_shields(profile, sites, settings, point, fits, losses) -> dict[int, str]:
    """Return the shielded sites with the reason for each."""
    if settings.shield == "none":
        return {}
    if settings.shield != "auto":
        chosen = select_sites(_site_views(profile), settings.shield)
        profiled = {site["index"] for site in sites}
        return {index: "requested with --shield" for index in chosen if index in profiled}

    shields: dict[int, str] = {}
    chance = profile["chance"]
    upper = settings.upper
    for site in sites:
        index = site["index"]
        sigma = point.profile_sigma[index] / math.sqrt(upper)
        if (
            float(predict_accuracy(fits[index], sigma)) <= chance + CHANCE_MARGIN
            and len(shields) < settings.max_shielded
        ):
            shields[index] = f"falls to chance under the accelerator's noise even at {upper} executions"

    if settings.min_accuracy is None:
        return shields
    while len(shields) < settings.max_shielded:
        active = [site["index"] for site in sites if site["index"] not in shields]
        if len(active) <= 1:
            break
        counts = _predicted_counts(active, losses, settings)
        per_site = {
            index: losses[index][count - settings.min_executions] for index, count in zip(active, counts, strict=True)
        }
        if profile["clean"]["accuracy"] - sum(per_site.values()) >= settings.min_accuracy:
            break
        worst = max(per_site, key=lambda index: (per_site[index], -index))
        shields[worst] = (
            f"largest predicted loss ({per_site[worst]:.3f}) while the plan was predicted below --min-accuracy"
        )
    return shields


def _site_views(profile: dict[str, Any]):
    from wnplan.models.base import Site

    return [
        Site(site["index"], site["name"], site["op"], tuple(site["shape"]), site["parameters"], site.get("module", ""))
        for site in profile["sites"]
    ]


def _predicted_counts(active: Sequence[int], losses, settings: AllocationSettings) -> list[int]:
    return optimal_counts([losses[index] for index in active], settings.budget, settings.min_executions, settings.upper)


def _counts(profile, active, settings, point, losses, profile_path, progress) -> tuple[list[int], dict | None]:
    indices = [site["index"] for site in active]
    if settings.method == "uniform":
        return uniform_counts(len(active), settings.budget), None

    measured = [site["walking"]["fit"]["midpoint"] for site in active if site["walking"]["fit"]["midpoint"]]
    smallest = min(measured) if measured else 1.0
    midpoints = [allocation_midpoint(site["walking"]["fit"], smallest)[0] for site in active]
    paper = proportional_counts(
        [1.0 / mu for mu in midpoints], settings.budget, settings.min_executions, settings.upper
    )
    if settings.method == "paper":
        return paper, None

    predicted = _predicted_counts(indices, losses, settings)
    if settings.search_budget <= 0:
        return predicted, {"performed": False, "reason": "--search-budget 0"}
    # The effective-σ model's optimum, n_i ∝ σ_i/µ_i, is a third start; with the same σ at
    # every site it is the 1/µ rule.
    ratios = [point.profile_sigma[index] / mu for index, mu in zip(indices, midpoints, strict=True)]
    variance = proportional_counts(ratios, settings.budget, settings.min_executions, settings.upper)
    starts = {"paper": paper, "predicted": predicted, "variance": variance}
    return _search(profile, indices, settings, point, losses, starts, profile_path, progress)


def _search(profile, indices, settings, point, losses, starts, profile_path, progress):
    from wnplan.search import SEARCH_HALF, AllocationSimulator, refine, split_half
    from wnplan.simulate import load_profile_inputs

    model, data = load_profile_inputs(profile, base=Path(profile_path).parent if profile_path else None)
    search_data = split_half(data, SEARCH_HALF)
    simulator = AllocationSimulator(
        model,
        search_data,
        indices,
        lambda position, executions: point.levels[indices[position]](executions),
        settings.search_repeats,
        settings.seed,
    )
    result = refine(
        simulator,
        starts,
        [losses[index] for index in indices],
        settings.min_executions,
        settings.upper,
        settings.search_budget,
        progress,
    )
    record = {"performed": True, "half": SEARCH_HALF, "samples": len(search_data), "repeats": settings.search_repeats}
    return result.counts, record | result.to_dict(indices)


def _plan_record(profile, sites, shields, counts, settings, point, fits, profile_path) -> dict[str, Any]:
    active = [site["index"] for site in sites if site["index"] not in shields]
    executions = dict(zip(active, counts, strict=True))
    accelerator = settings.accelerator
    widths = accelerator.bit_widths if accelerator else DEFAULT_WIDTHS
    spec = NoiseSpec.from_dict(profile["noise"])
    scales = profile_scales(profile, spec.reference)
    share = settings.max_drop / len(sites)
    fitted = measured_midpoints(sites)

    entries = []
    for site in sites:
        index = site["index"]
        count = executions.get(index, 0)
        fit = fits[index]
        entry = {
            "index": index,
            "name": site["name"],
            "op": site["op"],
            "executions": count,
            "midpoint": allocation_midpoint(site["walking"]["fit"], fitted)[0],
            "shield": index in shields,
            "predicted_accuracy": _site_prediction(profile, fit, point, index, count, index in shields),
            "bits": _bits(site, spec, share, scales[index], widths),
        }
        if index in shields:
            entry["shield_reason"] = shields[index]
        note = allocation_midpoint(site["walking"]["fit"], fitted)[1]
        if note:
            entry["note"] = note
        entries.append(entry)

    predicted, prediction_method = (None, None) if point is None else predict_model(profile, entries, point)
    costs = {
        "execution": accelerator.execution_cost if accelerator else 1.0,
        "shielded": accelerator.shielded_cost if accelerator else None,
    }
    return {
        "kind": "plan",
        "schema_version": records.SCHEMA_VERSION,
        "wnplan_version": __version__,
        "profile": {
            "path": str(profile_path) if profile_path is not None else "",
            "sha256": records.record_sha256(profile),
            "model": profile["model"],
            "data": profile["data"],
            "noise": profile["noise"],
        },
        "method": settings.method,
        "budget": settings.budget,
        "bounds": {"min_executions": settings.min_executions, "max_executions": settings.upper},
        "total_executions": int(sum(counts)),
        "accelerator": accelerator.to_dict() if accelerator else None,
        "operating_point": point.description if point else {"source": "none: the profile has no global midpoint"},
        "max_drop": settings.max_drop,
        "shielded": len(shields),
        "cost": {
            "per_execution": costs["execution"],
            "per_shielded_site": costs["shielded"],
            "total": None
            if costs["shielded"] is None and shields
            else costs["execution"] * int(sum(counts)) + (costs["shielded"] or 0.0) * len(shields),
        },
        "predicted_accuracy": predicted,
        "prediction_method": prediction_method,
        "sites": entries,
    }


def predict_model(
    profile: dict[str, Any], entries: Sequence[dict[str, Any]], point: OperatingPoint
) -> tuple[float, str]:
    """Predict the whole model's accuracy under a plan, and name the model used.

    With a global curve, the noise of all sites is folded into one effective global σ. To
    second order, a site's accuracy loss grows as (σ_i/µ_i)², and such losses add up, so
    s_eff² = Σ σ_i²/(n_i µ_i²) / Σ_global 1/µ_i², and the prediction is the global curve at s_eff.
    The first sum runs over the noisy sites of the plan, the second over the sites the global
    curve covered, so noise at normalization sites (left clean in global noise) counts as extra.
    With the same σ at the global sites and one execution each, s_eff = σ and the prediction is
    the measured global accuracy. Shielded sites add no noise. Without a global curve, the
    per-site losses are added, which overstates the loss when many sites are noisy.
    """
    global_fit = (profile.get("global") or {}).get("fit")
    in_global = {site["index"] for site in profile["sites"] if site.get("in_global")}
    if global_fit is not None and global_fit.get("status") != "failed" and in_global:
        numerator = denominator = 0.0
        for entry in entries:
            weight = 1.0 / entry["midpoint"] ** 2
            if entry["index"] in in_global:
                denominator += weight
            if not entry["shield"]:
                numerator += weight * point.profile_sigma[entry["index"]] ** 2 / max(entry["executions"], 1)
        effective = math.sqrt(numerator / denominator)
        return float(predict_accuracy(FitResult.from_dict(global_fit), effective)), "effective global sigma"

    clean = profile["clean"]["accuracy"]
    loss = sum(max(0.0, clean - entry["predicted_accuracy"]) for entry in entries if not entry["shield"])
    return float(max(profile["chance"], clean - loss)), "sum of site losses"


def _site_prediction(profile, fit: FitResult, point: OperatingPoint | None, index: int, count: int, shielded: bool):
    """Return the site's predicted accuracy with its noise averaged over `count` executions."""
    if shielded:
        return float(profile["clean"]["accuracy"])
    if point is None:
        return None
    return float(predict_accuracy(fit, point.profile_sigma[index] / math.sqrt(max(count, 1))))


def measured_midpoints(sites: Sequence[dict[str, Any]]) -> float:
    values = [site["walking"]["fit"]["midpoint"] for site in sites if site["walking"]["fit"]["midpoint"]]
    return min(values) if values else 1.0


def _bits(site: dict[str, Any], spec: NoiseSpec, share: float, scale: float, widths: Sequence[int]) -> dict[str, Any]:
    statistics = site["statistics"]
    value_range = float(statistics["range"])
    if spec.kind == "multiplicative":
        return {
            "bits": None,
            "range": value_range,
            "reason": "a multiplicative profile gives no additive tolerance, so no width can be derived; "
            + "profile with --noise additive for bit-width hints",
        }
    if spec.kind == "mixed":
        # On the mixed axis σ_add = A·r, so the additive tolerance is r times the amplitude.
        scale *= spec.mix_ratio
    # NOTE: sites that self-binarize after noise-aware training could take 1–2 bits; hints
    # here come from inference-only curves and never go below what the curve supports.
    hint = bit_hint(site["walking"]["fit"], share, scale, value_range, widths)
    hint["range_low"] = statistics.get("range_low")
    hint["range_high"] = statistics.get("range_high")
    return hint
