"""Tests for execution budgets: the rounding rules (wnplan.allocation) and allocate() (wnplan.plan).

The rounding rules are checked as properties with hypothesis. allocate() runs on profiles
measured on the trained digits perceptron of conftest.py, with the "paper" and "uniform"
methods, which need no simulation.
"""

from __future__ import annotations

import copy
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wnplan.allocation import optimal_counts, proportional_counts, uniform_counts
from wnplan.errors import FileFormatError, SettingsError
from wnplan.plan import AllocationSettings, allocate, allocation_midpoint
from wnplan.profiler import ProfileSettings, profile
from wnplan.records import read_record, validate, write_record

# Examples are derived from the test's name, not drawn at random, so every run checks the same
# cases. There is no deadline because a loaded CI machine can be slow on the first example.
PROPERTIES = settings(derandomize=True, database=None, deadline=None)
EXTREME_PROPERTIES = settings(PROPERTIES, max_examples=200)

MIDPOINTS = st.floats(min_value=1e-4, max_value=1e4, allow_nan=False, allow_infinity=False)


@st.composite
def weights_and_budget(draw, weights=MIDPOINTS, max_sites: int = 30) -> tuple[list[float], int]:
    values = draw(st.lists(weights, min_size=1, max_size=max_sites))
    budget = draw(st.integers(min_value=len(values), max_value=len(values) * 40))
    return values, budget


# --- uniform_counts ---


@PROPERTIES
@given(sites=st.integers(1, 60), extra=st.integers(0, 2000))
def test_uniform_counts_properties(sites, extra):
    budget = sites + extra

    counts = uniform_counts(sites, budget)

    assert len(counts) == sites
    assert sum(counts) == budget
    assert min(counts) >= 1
    assert max(counts) - min(counts) <= 1
    assert counts == sorted(counts, reverse=True)  # the extra executions go to the first sites


@PROPERTIES
@given(sites=st.integers(1, 40), per_site=st.integers(1, 30))
def test_uniform_counts_multiple_of_sites(sites, per_site):
    assert uniform_counts(sites, sites * per_site) == [per_site] * sites


def test_uniform_counts_example():
    assert uniform_counts(4, 10) == [3, 3, 2, 2]


# --- proportional_counts ---


@PROPERTIES
@given(weights_and_budget())
def test_proportional_counts_sum_and_minimum(case):
    weights, budget = case

    counts = proportional_counts(weights, budget)

    assert len(counts) == len(weights)
    assert sum(counts) == budget
    assert min(counts) >= 1
    assert all(isinstance(count, int) for count in counts)


@PROPERTIES
@given(weights_and_budget(weights=MIDPOINTS))
def test_proportional_counts_follow_inverse_midpoint_order(case):
    midpoints, budget = case

    counts = proportional_counts([1.0 / midpoint for midpoint in midpoints], budget)

    for i, mu_i in enumerate(midpoints):
        for j, mu_j in enumerate(midpoints):
            if mu_i < mu_j:
                assert counts[i] >= counts[j], (midpoints, budget, counts)


@PROPERTIES
@given(weights_and_budget())
def test_proportional_counts_close_to_share_without_clamping(case):
    weights, budget = case
    shares = [budget * weight / sum(weights) for weight in weights]

    counts = proportional_counts(weights, budget)

    if min(shares) >= 1:
        for count, share in zip(counts, shares, strict=True):
            assert abs(count - share) < 1, (weights, budget, counts)


@PROPERTIES
@given(sites=st.integers(1, 30), extra=st.integers(0, 300), weight=MIDPOINTS)
def test_proportional_counts_equal_weights_are_uniform(sites, extra, weight):
    budget = sites + extra

    assert proportional_counts([weight] * sites, budget) == uniform_counts(sites, budget)


@EXTREME_PROPERTIES
@given(weights_and_budget(weights=st.floats(min_value=1e-12, max_value=1e12)))
def test_proportional_counts_extreme_weights(case):
    weights, budget = case

    counts = proportional_counts(weights, budget)

    assert sum(counts) == budget
    assert min(counts) >= 1


def test_proportional_counts_example():
    # Shares 6.4, 3.2, 0.4 → the last site is raised to 1, the rest shared again: 6, 3, 1.
    assert proportional_counts([16.0, 8.0, 1.0], 10) == [6, 3, 1]


@pytest.mark.parametrize(
    ("weights", "budget", "minimum", "maximum", "expected"),
    [
        ([1.0, 3.0], 10, 3, 5, [5, 5]),
        ([1.0, 4.0], 12, 3, 6, [6, 6]),
    ],
)
def test_proportional_counts_both_bounds_binding(weights, budget, minimum, maximum, expected):
    counts = proportional_counts(weights, budget, minimum, maximum)

    assert sum(counts) == budget
    assert max(counts) <= maximum
    assert counts == expected


def test_proportional_counts_weights_seventy_decades_apart():
    counts = proportional_counts([1.0, 1e70], 10)

    assert sum(counts) == 10
    assert counts == [1, 9]


@PROPERTIES
@given(weights_and_budget(max_sites=12), st.integers(0, 3), st.integers(0, 20))
def test_proportional_counts_within_bounds(case, minimum, slack):
    weights, budget = case
    budget = max(budget, minimum * len(weights))
    maximum = -(-budget // len(weights)) + slack  # at least the mean, so the budget fits

    counts = proportional_counts(weights, budget, minimum, maximum)

    assert sum(counts) == budget
    assert min(counts) >= minimum
    assert max(counts) <= maximum
    for i, weight_i in enumerate(weights):
        for j, weight_j in enumerate(weights):
            if weight_i > weight_j:
                assert counts[i] >= counts[j], (weights, budget, minimum, maximum, counts)


def test_proportional_counts_budget_below_sites_raises():
    with pytest.raises(SettingsError, match="budget 2") as raised:
        proportional_counts([1.0, 2.0, 3.0], 2)

    assert "3 unshielded sites" in str(raised.value)


@pytest.mark.parametrize("weights", [[1.0, 0.0], [1.0, -2.0], [1.0, float("nan")], [float("inf"), 1.0]])
def test_proportional_counts_invalid_weights_raise(weights):
    with pytest.raises(SettingsError, match="positive and finite"):
        proportional_counts(weights, 5)


# --- optimal_counts ---


@PROPERTIES
@given(st.integers(1, 4), st.integers(0, 2), st.integers(0, 3), st.integers(0, 8), st.data())
def test_optimal_counts_matches_exhaustive_search(sites, minimum, span, extra, data):
    maximum = minimum + span
    budget = min(sites * minimum + extra, sites * maximum)
    losses = [data.draw(st.lists(st.floats(0.0, 1.0), min_size=span + 1, max_size=span + 1)) for _ in range(sites)]

    counts = optimal_counts(losses, budget, minimum, maximum)

    def total_loss(candidate) -> float:
        return sum(losses[site][count - minimum] for site, count in enumerate(candidate))

    feasible = [
        candidate
        for candidate in itertools.product(range(minimum, maximum + 1), repeat=sites)
        if sum(candidate) == budget
    ]
    assert sum(counts) == budget
    assert all(minimum <= count <= maximum for count in counts)
    assert total_loss(counts) <= min(total_loss(candidate) for candidate in feasible) + 1e-9


# --- allocate on real profiles ---


@pytest.fixture(scope="module")
def robust_profile(digits_mlp) -> dict:
    """A walking profile with σ up to 3 only: the input site falls, the three others are robust.

    Grid 0.1, 1, 3 (absolute additive σ), 2 repeats, 200 digits samples, seed 0, no store.
    """
    settings = ProfileSettings(scope="walking", repeats=2, sigmas=(0.1, 1.0, 3.0), seed=0)
    return profile(digits_mlp.onnx, "digits", settings, limit=200, store=None)


def test_allocate_budget_below_sites_raises(digits_profile):
    sites = len(digits_profile["sites"])

    with pytest.raises(SettingsError) as raised:
        allocate(digits_profile, AllocationSettings(budget=sites - 1, method="paper"))

    message = str(raised.value)
    assert f"--budget {sites - 1} is smaller" in message
    assert f"each of the {sites} unshielded sites" in message
    assert f"--budget {sites} or more" in message


def test_allocate_robust_sites_count_as_sigma_max(robust_profile):
    fits = [site["walking"]["fit"] for site in robust_profile["sites"]]
    robust = [index for index, fit in enumerate(fits) if fit["status"] == "robust"]
    assert robust == [1, 2, 3], [fit["status"] for fit in fits]
    assert fits[0]["midpoint"] < 3.0

    plan = allocate(robust_profile, AllocationSettings(budget=8, method="paper"))

    for index in robust:
        entry = plan["sites"][index]
        assert entry["midpoint"] == 3.0  # σ_max of the grid
        assert "robust" in entry["note"]
    assert plan["sites"][0]["midpoint"] == pytest.approx(fits[0]["midpoint"])
    assert "robust" not in plan["sites"][0].get("note", "")


def test_allocate_paper_gives_more_to_sensitive_sites(robust_profile):
    plan = allocate(robust_profile, AllocationSettings(budget=8, method="paper"))

    counts = [entry["executions"] for entry in plan["sites"]]
    midpoints = [entry["midpoint"] for entry in plan["sites"]]
    weights = [1.0 / midpoint for midpoint in midpoints]

    assert counts == proportional_counts(weights, 8)
    assert sum(counts) == 8
    assert plan["total_executions"] == 8
    assert counts[0] == max(counts)
    assert counts[0] > counts[1]


def test_allocate_uniform_method(digits_profile):
    plan = allocate(digits_profile, AllocationSettings(budget=10, method="uniform"))

    assert [entry["executions"] for entry in plan["sites"]] == uniform_counts(4, 10)
    assert plan["method"] == "uniform"


def test_allocate_predicts_accuracy_with_global_midpoint(digits_profile, robust_profile):
    with_global = allocate(digits_profile, AllocationSettings(budget=8, method="paper"))
    without_global = allocate(robust_profile, AllocationSettings(budget=8, method="paper"))

    assert with_global["operating_point"]["sigma"] == digits_profile["global"]["fit"]["midpoint"]
    assert 0.0 <= with_global["predicted_accuracy"] <= 1.0
    assert all(0.0 <= entry["predicted_accuracy"] <= 1.0 for entry in with_global["sites"])
    assert without_global["predicted_accuracy"] is None
    assert all(entry["predicted_accuracy"] is None for entry in without_global["sites"])


def test_allocation_settings_unknown_method_raises():
    with pytest.raises(SettingsError, match="'greedy'"):
        AllocationSettings(budget=8, method="greedy")


def test_allocate_without_walking_results_raises(digits_profile):
    global_only = copy.deepcopy(digits_profile)
    for site in global_only["sites"]:
        site["walking"] = None

    with pytest.raises(SettingsError, match="no walking-noise results"):
        allocate(global_only, AllocationSettings(budget=8, method="paper"))


def test_allocate_does_not_modify_profile(digits_profile):
    before = copy.deepcopy(digits_profile)

    allocate(digits_profile, AllocationSettings(budget=9, method="paper"))

    assert digits_profile == before


def test_allocate_plan_round_trips_through_file(digits_profile, tmp_path):
    settings = AllocationSettings(budget=9, method="paper")
    plan = allocate(digits_profile, settings, profile_path=tmp_path / "profile.json")
    path = write_record(plan, "plan", tmp_path / "plan.json")

    assert read_record(path, "plan") == plan
    assert plan["profile"]["path"] == str(tmp_path / "profile.json")
    assert len(plan["profile"]["sha256"]) == 64


def test_plan_schema_names_invalid_field(digits_profile):
    plan = allocate(digits_profile, AllocationSettings(budget=9, method="paper"))
    plan["sites"][0]["executions"] = "many"

    with pytest.raises(FileFormatError, match="sites/0/executions"):
        validate(plan, "plan")


def test_allocation_midpoint_without_fit_uses_fallback():
    midpoint, note = allocation_midpoint(None, 0.25)

    assert midpoint == 0.25
    assert "smallest midpoint" in note
