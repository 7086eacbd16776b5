"""Deployment plans: how many executions each site gets from a total budget.

Executing a site n times on a noisy accelerator and averaging the results divides its
noise σ by √n. A plan spreads a budget of executions over the profiled sites:

- `uniform`: counts differ by at most one; the extra executions go to the first sites.
- `paper`: the guided rule of the walking-noise research: n_i ∝ 1/µ_i, normalised to the
  budget, rounded by largest remainder so that the sum is kept and every n_i ≥ 1.
  Robust sites (µ > σ_max) count as µ = σ_max.

`allocate()` is the Python entry point behind `wnplan allocate`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wnplan import records
from wnplan._version import __version__
from wnplan.errors import SettingsError
from wnplan.fit import FitResult, predict_accuracy

logger = logging.getLogger(__name__)

METHODS = ("paper", "uniform")


def uniform_counts(sites: int, budget: int) -> list[int]:
    """Spread `budget` over `sites` as evenly as possible, extras to the first sites."""
    base, extra = divmod(budget, sites)
    return [base + (1 if position < extra else 0) for position in range(sites)]


def proportional_counts(weights: Sequence[float], budget: int, minimum: int = 1) -> list[int]:
    """Round `budget · w_i / Σw` to integers that sum to `budget`, each at least `minimum`.

    Sites whose share falls below the minimum get the minimum, and the rest of the budget is
    shared again among the others, until no share is below it. The remaining fractions are
    then rounded by largest remainder (ties go to the earlier site).
    """
    weights = np.asarray(weights, dtype=np.float64)
    count = len(weights)
    if count * minimum > budget:
        raise SettingsError(f"budget {budget} is below {minimum} execution(s) for each of {count} sites")
    if np.any(~np.isfinite(weights)) or np.any(weights <= 0):
        raise SettingsError("allocation weights must be positive and finite")

    fixed = np.zeros(count, dtype=bool)
    shares = np.zeros(count)
    while True:
        free_budget = budget - minimum * int(fixed.sum())
        free = ~fixed
        shares[free] = free_budget * weights[free] / weights[free].sum()
        below = free & (shares < minimum)
        if not below.any():
            break
        fixed |= below
    shares[fixed] = minimum

    counts = np.floor(shares).astype(int)
    remainders = shares - counts
    for position in sorted(range(count), key=lambda i: (-remainders[i], i))[: budget - int(counts.sum())]:
        counts[position] += 1
    return [int(value) for value in counts]


def allocation_midpoint(fit: dict[str, Any] | None, fallback: float) -> tuple[float, str]:
    """Return the µ that allocation uses for a site, and a note on where it came from."""
    if fit is None or fit.get("midpoint") is None:
        return fallback, "no midpoint could be measured; given the profile's smallest midpoint"
    if fit.get("lower_bound"):
        return float(fit["midpoint"]), "robust: µ above the largest σ tried, counted as σ_max"
    return float(fit["midpoint"]), ""


def allocate(
    profile: dict[str, Any],
    budget: int,
    method: str = "paper",
    profile_path: str | Path | None = None,
) -> dict[str, Any]:
    """Return a plan record: executions per profiled site under a total budget.

    Args:
        profile: a profile record (see `wnplan.profiler.profile`).
        budget: total executions over all profiled sites; at least one per site.
        method: "paper" (n ∝ 1/µ) or "uniform".
        profile_path: where the profile was read from, recorded in the plan.

    Raises:
        SettingsError: unknown method, no walking results, or a budget below one per site.
    """
    if method not in METHODS:
        raise SettingsError(f"invalid --method {method!r}: expected one of {', '.join(METHODS)}")
    sites = [site for site in profile["sites"] if site.get("walking")]
    if not sites:
        raise SettingsError(
            "the profile has no walking-noise results; run `wnplan profile MODEL --scope walking` "
            "(or --scope both) first"
        )
    if budget < len(sites):
        raise SettingsError(
            f"--budget {budget} is smaller than the number of profiled sites ({len(sites)}); every "
            f"site needs at least one execution, so pass --budget {len(sites)} or more"
        )

    measured = [site["walking"]["fit"]["midpoint"] for site in sites if site["walking"]["fit"]["midpoint"]]
    smallest = min(measured) if measured else 1.0
    midpoints = [allocation_midpoint(site["walking"]["fit"], smallest) for site in sites]

    if method == "uniform":
        counts = uniform_counts(len(sites), budget)
    else:
        counts = proportional_counts([1.0 / midpoint for midpoint, _ in midpoints], budget)

    sigma = _global_midpoint(profile)
    entries = []
    for site, count, (midpoint, note) in zip(sites, counts, midpoints, strict=True):
        entry = {
            "index": site["index"],
            "name": site["name"],
            "op": site["op"],
            "executions": count,
            "midpoint": midpoint,
            "shield": False,
            "note": note,
        }
        if sigma is not None:
            entry["predicted_accuracy"] = _predict(site["walking"]["fit"], sigma / math.sqrt(count))
        entries.append(entry)

    plan = {
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
        "method": method,
        "budget": budget,
        "total_executions": int(sum(counts)),
        "prediction_sigma": sigma,
        "predicted_accuracy": _predict_model(profile, entries) if sigma is not None else None,
        "sites": entries,
    }
    records.validate(plan, "plan")
    return plan


def _global_midpoint(profile: dict[str, Any]) -> float | None:
    fit = (profile.get("global") or {}).get("fit") or {}
    return fit.get("midpoint")


def _predict(fit_record: dict[str, Any], sigma: float) -> float:
    fit = FitResult.from_dict(fit_record)
    return float(np.clip(predict_accuracy(fit, sigma), 0.0, 1.0))


def _predict_model(profile: dict[str, Any], entries: list[dict[str, Any]]) -> float:
    """Predict whole-model accuracy by adding the per-site predicted losses.

    This first-order estimate ignores interactions between noisy sites, so it is optimistic
    when many sites are noisy at once.
    """
    clean = profile["clean"]["accuracy"]
    loss = sum(max(0.0, clean - entry["predicted_accuracy"]) for entry in entries)
    return float(max(profile["chance"], clean - loss))
