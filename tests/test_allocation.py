"""Allocation rules, bit-width hints and shield selection on synthetic sites."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wnplan.allocation import optimal_counts, proportional_counts, uniform_counts
from wnplan.bits import bit_hint
from wnplan.errors import SettingsError
from wnplan.fit import CurvePoint, fit_curve
from wnplan.plan import AllocationSettings, allocate


def _brute_force(losses, budget, minimum, maximum):
    best, best_counts = math.inf, None
    for counts in itertools.product(range(minimum, maximum + 1), repeat=len(losses)):
        if sum(counts) != budget:
            continue
        value = sum(loss[count - minimum] for loss, count in zip(losses, counts, strict=True))
        if value < best - 1e-12:
            best, best_counts = value, counts
    return best, best_counts


@settings(max_examples=60, deadline=None)
@given(
    sites=st.integers(1, 4),
    extra=st.integers(0, 6),
    seed=st.integers(0, 10_000),
    maximum=st.integers(2, 5),
)
def test_optimal_counts_match_brute_force(sites, extra, seed, maximum):
    rng = np.random.default_rng(seed)
    minimum = 1
    budget = min(sites * minimum + extra, sites * maximum)
    # Arbitrary, even non-convex, loss tables: the dynamic programme must still be exact.
    losses = [list(rng.uniform(0, 1, maximum - minimum + 1)) for _ in range(sites)]
    counts = optimal_counts(losses, budget, minimum, maximum)
    best, _ = _brute_force(losses, budget, minimum, maximum)
    value = sum(loss[count - minimum] for loss, count in zip(losses, counts, strict=True))
    assert sum(counts) == budget
    assert all(minimum <= count <= maximum for count in counts)
    assert value == pytest.approx(best, abs=1e-12)


@settings(max_examples=100, deadline=None)
@given(weights=st.lists(st.floats(0.01, 100.0), min_size=1, max_size=12), spare=st.integers(0, 40))
def test_proportional_counts_keep_sum_and_minimum(weights, spare):
    budget = len(weights) + spare
    counts = proportional_counts(weights, budget)
    assert sum(counts) == budget
    assert min(counts) >= 1


def test_proportional_counts_respect_maximum():
    counts = proportional_counts([100.0, 1.0, 1.0], budget=9, minimum=1, maximum=4)
    assert counts[0] == 4
    assert sum(counts) == 9
    assert max(counts) <= 4


def test_proportional_counts_follow_weights():
    counts = proportional_counts([1 / 0.5, 1 / 1.0, 1 / 2.0], budget=14)
    assert counts == sorted(counts, reverse=True)
    assert sum(counts) == 14


def test_uniform_counts_extras_go_first():
    assert uniform_counts(4, 10) == [3, 3, 2, 2]
    assert uniform_counts(3, 9) == [3, 3, 3]


def test_bounds_reject_infeasible_budget():
    with pytest.raises(SettingsError, match="smaller than 1 execution"):
        optimal_counts([[0.0], [0.0]], budget=1, minimum=1, maximum=1)
    with pytest.raises(SettingsError, match="exceeds --max-executions 2"):
        optimal_counts([[0.0, 0.0], [0.0, 0.0]], budget=5, minimum=1, maximum=2)


def _logistic_fit(mu, slope=None, top=0.9, chance=0.1):
    slope = slope or mu / 6
    sigmas = np.geomspace(mu / 30, mu * 30, 25)
    points = [
        CurvePoint(float(sigma), chance + (top - chance) / (1 + math.exp((sigma - mu) / slope)), 0.002, 10_000, 5)
        for sigma in sigmas
    ]
    return fit_curve(points, chance=chance).to_dict()


def test_bit_hint_follows_quantization_rule():
    fit = _logistic_fit(mu=1.0, slope=0.15)
    widths = (2, 3, 4, 5, 6, 8, 10, 12, 16)
    hint = bit_hint(fit, allowed_drop=0.001, scale=1.0, value_range=6.0, widths=widths)
    # The tolerance is where the fitted curve has lost exactly the allowed drop.
    from wnplan.fit import FitResult, predict_accuracy

    fitted = FitResult.from_dict(fit)
    lost = predict_accuracy(fitted, 0.0) - predict_accuracy(fitted, hint["sigma_tolerance"])
    assert lost == pytest.approx(0.001, abs=1e-6)
    assert hint["step_limit"] == pytest.approx(math.sqrt(12) * hint["sigma_tolerance"])
    needed = math.ceil(math.log2(6.0 / hint["step_limit"] + 1))
    assert hint["bits_needed"] == needed
    assert hint["bits"] == min(width for width in widths if width >= needed)
    # The hinted step keeps quantization noise under the tolerance.
    step = 6.0 / (2 ** hint["bits"] - 1)
    assert step / math.sqrt(12) <= hint["sigma_tolerance"]


def test_bit_hint_scales_relative_sigma():
    fit = _logistic_fit(mu=1.0, slope=0.15)
    absolute = bit_hint(fit, 0.001, 1.0, 6.0, (16,))
    relative = bit_hint(fit, 0.001, 3.0, 6.0, (16,))
    assert relative["sigma_tolerance"] == pytest.approx(3.0 * absolute["sigma_tolerance"])


def test_bit_hint_reports_when_widths_are_too_narrow():
    fit = _logistic_fit(mu=0.01, slope=0.002)
    hint = bit_hint(fit, 1e-4, 1.0, 100.0, (2, 4))
    assert hint["bits"] is None
    assert "more than the widest offered" in hint["reason"]


def _synthetic_profile(midpoints, global_mu=1.0, clean=0.9, chance=0.1):
    sites = []
    for index, mu in enumerate(midpoints):
        fit = _logistic_fit(mu, top=clean, chance=chance)
        sites.append(
            {
                "index": index,
                "name": f"site{index}",
                "op": "Relu",
                "shape": [4],
                "parameters": 0,
                "normalization": False,
                "in_global": True,
                "statistics": {"rms": 1.0, "range": 4.0, "range_low": -2.0, "range_high": 2.0},
                "walking": {"points": [], "fit": fit},
            }
        )
    return {
        "kind": "profile",
        "noise": {"kind": "additive", "reference": "absolute"},
        "clean": {"accuracy": clean, "correct": 900, "samples": 1000},
        "chance": chance,
        "sites": sites,
        "global": {"fit": _logistic_fit(global_mu, top=clean, chance=chance), "points": [], "sites": []},
        "model": {"path": "model.onnx", "sha256": "0" * 64, "format": "onnx"},
        "data": {"name": "digits", "samples": 1000, "sha256": "0" * 64, "preprocessing": {}},
    }


def _plan(profile, **changes):
    settings_ = AllocationSettings(**({"budget": 12, "method": "optimal", "search_budget": 0} | changes))
    return allocate(profile, settings_)


def test_allocate_methods_keep_budget_and_bounds():
    profile = _synthetic_profile([0.3, 1.0, 3.0, 10.0])
    for method in ("uniform", "paper", "optimal"):
        plan = _plan(profile, method=method, max_executions=6)
        counts = [site["executions"] for site in plan["sites"]]
        assert sum(counts) == 12, method
        assert min(counts) >= 1, method
        assert max(counts) <= 6, method


def test_optimal_minimises_sum_of_site_losses():
    profile = _synthetic_profile([0.3, 1.0, 3.0, 10.0], global_mu=2.0)
    paper = _plan(profile, method="paper")
    optimal = _plan(profile, method="optimal")

    def total_loss(plan):
        return sum(profile["clean"]["accuracy"] - site["predicted_accuracy"] for site in plan["sites"])

    assert total_loss(optimal) <= total_loss(paper) + 1e-9


def test_shield_auto_takes_site_that_falls_to_chance():
    # Site 0 falls to chance far below the operating σ, even with every execution.
    profile = _synthetic_profile([0.001, 5.0, 8.0, 10.0], global_mu=2.0)
    plan = _plan(profile, shield="auto", max_executions=12)
    shielded = [site["index"] for site in plan["sites"] if site["shield"]]
    assert shielded == [0]
    assert plan["sites"][0]["executions"] == 0
    assert "falls to chance" in plan["sites"][0]["shield_reason"]
    assert sum(site["executions"] for site in plan["sites"]) == 12


def test_shield_auto_respects_max_shielded_and_min_accuracy():
    profile = _synthetic_profile([0.5, 0.6, 0.7, 10.0], global_mu=2.0)
    plan = _plan(profile, shield="auto", min_accuracy=0.89, max_shielded=2)
    shielded = [site for site in plan["sites"] if site["shield"]]
    assert len(shielded) == 2
    assert all("largest predicted loss" in site["shield_reason"] for site in shielded)


def test_shield_explicit_sites_and_cost():
    profile = _synthetic_profile([0.5, 1.0, 2.0])
    plan = _plan(profile, shield="site1", budget=6)
    assert [site["shield"] for site in plan["sites"]] == [False, True, False]
    assert plan["shielded"] == 1
    assert sum(site["executions"] for site in plan["sites"]) == 6


def test_allocate_rejects_budget_below_sites():
    profile = _synthetic_profile([0.5, 1.0, 2.0])
    with pytest.raises(SettingsError, match="--budget 2 is smaller than 1 execution"):
        _plan(profile, budget=2)
