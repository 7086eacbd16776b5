"""Tests for the logistic fit of accuracy-versus-σ curves (wnplan.fit).

Synthetic curves are drawn with numpy's default_rng and fixed seeds: every repeat measures
Binomial(n, F(σ)) / n, and the point's standard error is the standard deviation of the repeats
over √repeats, as the sweep reports it.
"""

from __future__ import annotations

import json
import math
import re
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wnplan.errors import DataError, FileFormatError, SettingsError
from wnplan.fit import (
    METHODS,
    STATUSES,
    CurvePoint,
    FitResult,
    fit_curve,
    floor_stderr,
    half_way_crossing,
    predict_accuracy,
    sigma_at_accuracy,
)

CHANCE = 0.1
LOG_GRID = np.concatenate([[0.0], np.logspace(-3, 1, 17)])  # σ = 0, then 1e-3 … 10
WIDE_LOG_GRID = np.concatenate([[0.0], np.logspace(-3, 2, 26)])
LINEAR_GRID = np.linspace(0.0, 1.5, 16)


def logistic_accuracy(
    sigma: np.ndarray, a_max: float, a_min: float, mu: float, s: float, space: str
) -> np.ndarray:
    """Return the true curve F(σ); in log space µ is a σ value and s is in decades."""
    sigma = np.asarray(sigma, dtype=float)
    if space == "linear":
        return a_min + (a_max - a_min) / (1 + np.exp((sigma - mu) / s))
    with np.errstate(divide="ignore"):
        u = np.log10(sigma)
    return a_min + (a_max - a_min) / (1 + np.exp((u - np.log10(mu)) / s))


def two_step_accuracy(sigma: np.ndarray, shelf: float, mu1: float, mu2: float) -> np.ndarray:
    """Return a curve falling from 0.9 to `shelf` at mu1, then to chance at mu2 (s = 0.15 dec)."""
    first = logistic_accuracy(sigma, 0.9, shelf, mu1, 0.15, "log")
    second = logistic_accuracy(sigma, shelf, CHANCE, mu2, 0.15, "log")
    return first + second - shelf


def sample_points(
    sigma: np.ndarray, accuracy: np.ndarray, seed: int, samples: int = 10_000, repeats: int = 5
) -> list[CurvePoint]:
    """Measure each accuracy `repeats` times with binomial sampling of `samples` samples."""
    rng = np.random.default_rng(seed)
    points = []
    for level, p in zip(sigma, accuracy, strict=True):
        measured = rng.binomial(samples, p, size=repeats) / samples
        stderr = float(measured.std(ddof=1) / math.sqrt(repeats))
        points.append(CurvePoint(float(level), float(measured.mean()), stderr, samples, repeats))
    return points


def exact_points(sigma, accuracy, stderr: float = 0.002) -> list[CurvePoint]:
    return [
        CurvePoint(float(level), float(y), stderr, 10_000, 5)
        for level, y in zip(sigma, accuracy, strict=True)
    ]


def assert_json_safe(result: FitResult) -> None:
    text = json.dumps(result.to_dict(), allow_nan=False)
    assert FitResult.from_dict(json.loads(text)) == result


# --- recovery of known midpoints ---


@pytest.mark.parametrize("seed", range(5))
def test_fit_curve_recovers_midpoint_linear(seed):
    true = logistic_accuracy(LINEAR_GRID, 0.9, CHANCE, mu=0.5, s=0.1, space="linear")
    result = fit_curve(sample_points(LINEAR_GRID, true, seed), CHANCE, "linear")

    assert result.status == "ok"
    assert result.method == "logistic"
    assert abs(result.midpoint - 0.5) <= 3 * result.midpoint_error
    assert result.midpoint == pytest.approx(0.5, rel=0.02)
    assert result.slope == pytest.approx(0.1, rel=0.1)
    assert result.a_min == CHANCE


@pytest.mark.parametrize("seed", range(5))
def test_fit_curve_recovers_midpoint_log(seed):
    true = logistic_accuracy(LOG_GRID, 0.9, CHANCE, mu=0.3, s=0.2, space="log")
    result = fit_curve(sample_points(LOG_GRID, true, seed), CHANCE, "log")

    assert result.status == "ok"
    assert result.method == "logistic"
    assert result.space == "log"
    assert abs(result.midpoint - 0.3) <= 3 * result.midpoint_error
    assert result.midpoint == pytest.approx(0.3, rel=0.03)
    assert result.slope == pytest.approx(0.2, rel=0.1)
    assert result.a_max == pytest.approx(0.9, abs=0.005)


def test_fit_curve_log_error_uses_delta_method():
    true = logistic_accuracy(LOG_GRID, 0.9, CHANCE, mu=0.3, s=0.2, space="log")
    result = fit_curve(sample_points(LOG_GRID, true, seed=11), CHANCE, "log")

    mu_u = math.log10(result.midpoint)
    assert result.params["mu"] == pytest.approx(mu_u, rel=1e-12)
    # The standard error of µ_u, recovered from the reported σ error, is a fraction of a decade.
    assert result.midpoint_error / (math.log(10) * result.midpoint) < 0.05


@pytest.mark.parametrize("seed", range(3))
def test_fit_curve_recovers_free_min_plateau(seed):
    true = logistic_accuracy(LOG_GRID, 0.9, 0.55, mu=0.3, s=0.2, space="log")
    result = fit_curve(sample_points(LOG_GRID, true, seed), CHANCE, "log")

    assert result.status == "ok"
    assert result.method == "logistic-free-min"
    assert result.a_min == pytest.approx(0.55, abs=0.01)
    assert abs(result.midpoint - 0.3) <= 3 * result.midpoint_error
    assert result.midpoint == pytest.approx(0.3, rel=0.05)


@pytest.mark.parametrize("seed", range(3))
def test_fit_curve_recognises_two_steps(seed):
    # The first step (0.9 → 0.45) is larger than the second (0.45 → 0.1), so µ1 is the midpoint.
    true = two_step_accuracy(WIDE_LOG_GRID, shelf=0.45, mu1=0.05, mu2=5.0)
    result = fit_curve(sample_points(WIDE_LOG_GRID, true, seed), CHANCE, "log")

    assert result.status == "ok"
    assert result.method == "two-logistic"
    assert result.midpoint == pytest.approx(0.05, rel=0.05)
    assert result.second_midpoint == pytest.approx(5.0, rel=0.05)
    assert abs(result.midpoint - 0.05) <= 3 * result.midpoint_error
    assert abs(result.second_midpoint - 5.0) <= 3 * result.second_midpoint_error


def test_fit_curve_two_step_midpoint_is_larger_step():
    # Here the second step (0.65 → 0.1) is larger, so the half-way crossing lies in it.
    true = two_step_accuracy(WIDE_LOG_GRID, shelf=0.65, mu1=0.05, mu2=5.0)
    result = fit_curve(sample_points(WIDE_LOG_GRID, true, seed=7), CHANCE, "log")

    assert result.method == "two-logistic"
    assert result.midpoint == pytest.approx(5.0, rel=0.05)
    assert result.second_midpoint == pytest.approx(0.05, rel=0.05)


@pytest.mark.parametrize("seed", range(5))
def test_fit_curve_keeps_one_step_for_asymmetric_drop(seed):
    # A Gompertz-shaped single drop is not a logistic, but it has no shelf: no second step.
    u = np.log10(WIDE_LOG_GRID[1:])
    true = np.concatenate([[0.9], CHANCE + 0.8 * np.exp(-np.exp((u + 0.5) / 0.3))])
    result = fit_curve(sample_points(WIDE_LOG_GRID, true, seed), CHANCE, "log")

    assert result.status == "ok"
    assert result.method == "logistic"
    assert result.second_midpoint is None


def test_fit_error_scale_exact_logistic():
    # Binomial scatter around a true logistic: χ²/dof is about 1, so the scale stays small.
    true = logistic_accuracy(LOG_GRID, 0.9, CHANCE, mu=0.3, s=0.2, space="log")
    scales = [fit_curve(sample_points(LOG_GRID, true, seed), CHANCE, "log").error_scale for seed in range(5)]

    assert all(scale >= 1.0 for scale in scales)
    assert np.median(scales) < 1.6


def test_fit_error_scale_on_misfit():
    # A Gompertz-shaped drop measured exactly is further from any logistic than errors of
    # 0.006 allow (above the binomial floor of 10,000 samples, so no point is floored).
    u = np.log10(WIDE_LOG_GRID[1:])
    true = np.concatenate([[0.9], CHANCE + 0.8 * np.exp(-np.exp((u + 0.5) / 0.3))])
    result = fit_curve(exact_points(WIDE_LOG_GRID, true, stderr=0.006), CHANCE, "log")

    assert result.status == "ok"
    assert result.error_scale > 1.5
    assert result.statistical_error == pytest.approx(result.midpoint_error / result.error_scale)
    # The same points with errors as large as the misfit need no scaling, and their
    # covariance error is as large as the scaled one.
    loose = fit_curve(exact_points(WIDE_LOG_GRID, true, stderr=0.006 * result.error_scale), CHANCE, "log")
    assert loose.error_scale == pytest.approx(1.0, abs=1e-6)
    assert loose.midpoint_error == pytest.approx(result.midpoint_error, rel=1e-4)


def test_fit_result_error_scale_round_trip_and_validation():
    u = np.log10(WIDE_LOG_GRID[1:])
    true = np.concatenate([[0.9], CHANCE + 0.8 * np.exp(-np.exp((u + 0.5) / 0.3))])
    result = fit_curve(exact_points(WIDE_LOG_GRID, true), CHANCE, "log")
    record = json.loads(json.dumps(result.to_dict()))

    assert record["error_scale"] == result.error_scale
    assert FitResult.from_dict(record) == result
    old = {key: value for key, value in record.items() if key != "error_scale"}
    assert FitResult.from_dict(old).error_scale == 1.0
    with pytest.raises(FileFormatError, match="error_scale"):
        FitResult.from_dict({**record, "error_scale": 0.5})


def test_fit_curve_two_separate_points_are_no_plateau():
    # 0.62 and 0.39 on 100 samples differ by 4.2 combined standard errors: a fall, not a shelf.
    points = [CurvePoint(0.0, 0.9, 0.0, 100, 1), CurvePoint(1.0, 0.62, 0.0, 100, 1), CurvePoint(2.0, 0.39, 0.0, 100, 1)]
    result = fit_curve(points, CHANCE, "log")

    assert result.status != "sensitive"
    assert result.a_min == CHANCE
    assert 1.0 < result.midpoint < 2.0


# --- curves without a fitted midpoint ---


def test_fit_curve_robust_curve_is_lower_bound():
    grid = np.logspace(-3, 0, 10)
    true = logistic_accuracy(grid, 0.9, CHANCE, mu=100.0, s=0.2, space="log")
    result = fit_curve(sample_points(grid, true, seed=5), CHANCE, "log")

    assert result.status == "robust"
    assert result.lower_bound is True
    assert result.midpoint == 1.0
    assert result.midpoint_error is None
    assert "µ > 1" in result.reason


def test_fit_curve_flat_curve_near_clean_is_robust():
    result = fit_curve(sample_points(LOG_GRID, np.full(LOG_GRID.size, 0.9), seed=3), CHANCE, "log")

    assert result.status == "robust"
    assert result.midpoint == LOG_GRID[-1]
    assert result.lower_bound is True


def test_fit_curve_small_plateau_is_robust():
    # A loss of 0.15 out of 0.8 to chance is below the quarter needed for a step.
    true = logistic_accuracy(LOG_GRID, 0.9, 0.75, mu=0.3, s=0.2, space="log")
    result = fit_curve(sample_points(LOG_GRID, true, seed=3), CHANCE, "log")

    assert result.status == "robust"
    assert result.a_min == CHANCE


def test_fit_curve_flat_at_chance_fails():
    result = fit_curve(sample_points(LOG_GRID, np.full(LOG_GRID.size, CHANCE), seed=3), CHANCE)

    assert result.status == "failed"
    assert result.midpoint is None
    assert result.midpoint_error is None
    assert "does not measurably beat chance" in result.reason


def test_fit_curve_chance_without_zero_sigma():
    grid = LOG_GRID[1:]
    result = fit_curve(sample_points(grid, np.full(grid.size, CHANCE), seed=3), CHANCE, "log")

    assert result.status == "failed"
    assert result.midpoint is None
    assert "Add σ=0" in result.reason


def test_fit_curve_fallen_before_first_sigma():
    true = np.concatenate([[0.9], np.full(LOG_GRID.size - 1, CHANCE)])
    result = fit_curve(sample_points(LOG_GRID, true, seed=2), CHANCE, "log")

    assert result.status == "sensitive"
    assert result.upper_bound is True
    assert result.midpoint == LOG_GRID[1]
    assert result.midpoint_error is None


@pytest.mark.parametrize(("space", "error"), [("linear", 0.05), ("log", None)])
def test_fit_curve_single_step_falls_back(space, error):
    sigma = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
    result = fit_curve(exact_points(sigma, [0.9, 0.9, 0.9, 0.9, 0.1, 0.1, 0.1]), CHANCE, space)

    assert result.status == "fallback"
    assert result.method == "interpolated"
    assert "single-step drop between σ=0.1 and σ=0.2" in result.reason
    assert 0.1 < result.midpoint < 0.2
    assert result.midpoint == pytest.approx(math.sqrt(0.1 * 0.2), rel=1e-9)  # log-midway
    # Half the bracket width: 0.05 in σ, or half a log10(2) decade through the delta method.
    expected = error if error is not None else math.log(10) * result.midpoint * math.log10(2) / 2
    assert result.midpoint_error == pytest.approx(expected, rel=1e-9)


def test_fit_curve_large_rise_falls_back():
    sigma = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    result = fit_curve(exact_points(sigma, [0.9, 0.9, 0.3, 0.8, 0.1, 0.1, 0.1]), CHANCE)

    assert result.status == "fallback"
    assert "rises from 0.3 at σ=0.2 to 0.8 at σ=0.3" in result.reason
    assert 0.1 < result.midpoint < 0.2


def test_fit_curve_unresolved_last_step_falls_back():
    sigma = np.logspace(-2, 0, 9)
    result = fit_curve(exact_points(sigma, [0.9] * 8 + [0.45]), CHANCE, "log")

    assert result.status == "fallback"
    assert sigma[-2] < result.midpoint < sigma[-1]


def test_fit_curve_too_few_points_falls_back():
    result = fit_curve(exact_points([0.1, 0.2], [0.9, 0.1]), CHANCE, "log")

    assert result.status == "fallback"
    assert "too few" in result.reason
    assert 0.1 < result.midpoint < 0.2


@pytest.mark.parametrize("seed", range(20))
def test_fit_curve_noisy_points_give_status(seed):
    rng = np.random.default_rng(seed)
    points = exact_points(LOG_GRID[:11], rng.uniform(0.0, 1.0, 11), stderr=0.01)
    for space in ("linear", "log"):
        result = fit_curve(points, CHANCE, space)
        assert result.status in STATUSES
        assert result.midpoint is None or 0 < result.midpoint <= LOG_GRID[10]
        assert_json_safe(result)


def test_fit_curve_zero_stderr_uses_binomial_floor():
    true = logistic_accuracy(LOG_GRID, 0.9, CHANCE, mu=0.05, s=0.3, space="log").round(3)
    points = [
        CurvePoint(float(s), float(y), 0.0, 1000, 3) for s, y in zip(LOG_GRID, true, strict=True)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for space in ("linear", "log"):
            result = fit_curve(points, CHANCE, space)
            assert result.status == "ok"
            assert math.isfinite(result.midpoint_error)
            assert_json_safe(result)
    assert result.midpoint == pytest.approx(0.05, rel=0.02)


def test_fit_curve_pools_points_at_one_sigma():
    true = logistic_accuracy(LOG_GRID, 0.9, CHANCE, mu=0.3, s=0.2, space="log")
    points = sample_points(LOG_GRID, true, seed=1) + sample_points(LOG_GRID, true, seed=2)
    result = fit_curve(points, CHANCE, "log")

    assert result.status == "ok"
    assert result.midpoint == pytest.approx(0.3, rel=0.03)
    assert sum(1 for name in fit_curve(points[:3], CHANCE).params if name.startswith("sigma_")) == 3


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(
    st.lists(
        st.tuples(
            st.floats(0.0, 100.0),
            st.floats(0.0, 1.0),
            st.floats(0.0, 0.2),
            st.integers(1, 10_000),
        ),
        min_size=1,
        max_size=12,
    ).filter(lambda rows: any(row[0] > 0 for row in rows)),
    st.sampled_from(["linear", "log"]),
)
def test_fit_curve_any_points_json_safe(rows, space):
    points = [CurvePoint(s, a, e, n, 3) for s, a, e, n in rows]
    result = fit_curve(points, CHANCE, space)

    assert result.status in STATUSES
    assert result.method in METHODS
    assert_json_safe(result)
    assert np.all(np.isfinite(predict_accuracy(result, np.array([0.0, 1e-3, 1.0, 1e3]))))


# --- floor, crossing, predictions ---


def test_floor_stderr_values():
    assert floor_stderr(0.5, 0.0, 100) == pytest.approx(0.05)
    assert floor_stderr(1.0, 0.0, 100) == pytest.approx(math.sqrt(0.99 * 0.01 / 100))
    assert floor_stderr(0.0, 0.0, 100) == pytest.approx(math.sqrt(0.99 * 0.01 / 100))
    assert floor_stderr(0.5, 0.2, 100) == 0.2
    assert floor_stderr(1.0, 0.0, 1) == 0.5


def test_half_way_crossing_interpolates_in_log_sigma():
    points = exact_points([0.1, 1.0], [0.9, 0.1])
    assert half_way_crossing(points) == pytest.approx(10**-0.5)
    assert half_way_crossing(points, level=0.7) == pytest.approx(10**-0.75)


def test_half_way_crossing_is_linear_after_zero():
    points = exact_points([0.0, 0.2, 1.0], [0.9, 0.1, 0.1])
    assert half_way_crossing(points) == pytest.approx(0.1)


def test_half_way_crossing_flat_curve_is_none():
    assert half_way_crossing(exact_points([0.1, 1.0], [0.5, 0.5])) is None


@pytest.mark.parametrize("space", ["linear", "log"])
def test_predict_accuracy_at_midpoint_is_half_way(space):
    grid = LINEAR_GRID if space == "linear" else LOG_GRID
    mu, s = (0.5, 0.1) if space == "linear" else (0.3, 0.2)
    result = fit_curve(
        sample_points(grid, logistic_accuracy(grid, 0.9, CHANCE, mu, s, space), 0), CHANCE, space
    )

    half_way = result.a_min + (result.a_max - result.a_min) / 2
    assert predict_accuracy(result, result.midpoint) == pytest.approx(half_way, abs=1e-9)
    assert isinstance(predict_accuracy(result, 0.1), float)
    assert predict_accuracy(result, np.array([0.1, 0.2])).shape == (2,)


def fits_of_every_kind() -> dict[str, FitResult]:
    """Return one fit per prediction method, from fixed-seed synthetic curves."""
    linear_true = logistic_accuracy(LINEAR_GRID, 0.9, CHANCE, 0.5, 0.1, "linear")
    log_true = logistic_accuracy(LOG_GRID, 0.9, CHANCE, 0.3, 0.2, "log")
    plateau_true = logistic_accuracy(LOG_GRID, 0.9, 0.55, 0.3, 0.2, "log")
    two_true = two_step_accuracy(WIDE_LOG_GRID, 0.45, 0.05, 5.0)
    step = [0.9, 0.9, 0.9, 0.9, 0.1, 0.1, 0.1]
    return {
        "linear": fit_curve(sample_points(LINEAR_GRID, linear_true, 0), CHANCE, "linear"),
        "log": fit_curve(sample_points(LOG_GRID, log_true, 0), CHANCE, "log"),
        "free-min": fit_curve(sample_points(LOG_GRID, plateau_true, 0), CHANCE, "log"),
        "two-step": fit_curve(sample_points(WIDE_LOG_GRID, two_true, 0), CHANCE, "log"),
        "interpolated": fit_curve(
            exact_points([0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0], [0.9, *step]), CHANCE, "log"
        ),
    }


def test_sigma_at_accuracy_inverts_predict_accuracy():
    for name, result in fits_of_every_kind().items():
        for sigma in (0.005, 0.03, 0.12, 0.15, 0.3, 0.6, 2.0, 8.0):
            accuracy = predict_accuracy(result, sigma)
            if result.a_min < accuracy < predict_accuracy(result, 0.0):
                found = sigma_at_accuracy(result, accuracy)
                assert found == pytest.approx(sigma, rel=1e-6), name


def test_sigma_at_accuracy_outside_curve():
    for name, result in fits_of_every_kind().items():
        assert sigma_at_accuracy(result, 0.95) == 0.0, name
        assert sigma_at_accuracy(result, result.a_min - 0.01) is None, name


def test_sigma_at_accuracy_robust_curve_within_range():
    grid = np.logspace(-3, 0, 10)
    accuracy = [0.9, 0.9, 0.9, 0.9, 0.9, 0.89, 0.88, 0.86, 0.84, 0.8]
    result = fit_curve(exact_points(grid, accuracy), CHANCE, "log")

    assert result.status == "robust"
    assert sigma_at_accuracy(result, 0.87) == pytest.approx(10 ** (-3 + 6.5 / 3))
    assert sigma_at_accuracy(result, 0.7) is None


# --- serialization and input checks ---


def test_fit_result_round_trip_every_status():
    results = list(fits_of_every_kind().values())
    results.append(fit_curve(exact_points(LOG_GRID, np.full(LOG_GRID.size, 0.9)), CHANCE, "log"))
    results.append(fit_curve(exact_points(LOG_GRID, np.full(LOG_GRID.size, CHANCE)), CHANCE))
    results.append(fit_curve(exact_points(LOG_GRID, [0.9] + [CHANCE] * 17), CHANCE, "log"))
    statuses = {result.status for result in results}

    assert statuses == set(STATUSES)
    for result in results:
        assert_json_safe(result)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"midpoint": float("nan")}, "finite"),
        ({"status": "great"}, "status='great'"),
        ({"colour": "red"}, "unknown keys ['colour']"),
        ({"lower_bound": "yes"}, "lower_bound='yes'"),
        ({"params": {"mu": "x"}}, "expected a number"),
    ],
)
def test_fit_result_from_dict_rejects_invalid(change, message):
    record = fits_of_every_kind()["log"].to_dict()
    with pytest.raises(FileFormatError, match=re.escape(message)):
        FitResult.from_dict({**record, **change})


def test_fit_result_from_dict_rejects_missing_key():
    record = fits_of_every_kind()["log"].to_dict()
    del record["a_max"]
    with pytest.raises(FileFormatError, match=r"missing keys \['a_max'\]"):
        FitResult.from_dict(record)


def test_predict_accuracy_rejects_missing_params():
    result = FitResult("ok", "logistic", "log", 0.3, 0.01, 0.2, 0.9, 0.1)
    with pytest.raises(FileFormatError, match="lacks the parameters"):
        predict_accuracy(result, 0.1)


def test_predict_accuracy_rejects_negative_sigma():
    with pytest.raises(SettingsError, match=re.escape("sigma=-1.0")):
        predict_accuracy(fits_of_every_kind()["log"], -1.0)


@pytest.mark.parametrize(
    ("chance", "space", "message"),
    [(0.0, "log", "chance=0.0"), (1.5, "log", "chance=1.5"), (0.1, "ln", "space='ln'")],
)
def test_fit_curve_rejects_bad_settings(chance, space, message):
    points = exact_points([0.1, 1.0], [0.9, 0.1])
    with pytest.raises(SettingsError, match=re.escape(message)):
        fit_curve(points, chance, space)


def test_fit_curve_rejects_no_positive_sigma():
    with pytest.raises(DataError, match="no point with σ > 0"):
        fit_curve(exact_points([0.0], [0.9]), CHANCE)
    with pytest.raises(DataError, match="0 points"):
        fit_curve([], CHANCE)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"sigma": -1.0}, "sigma=-1.0"),
        ({"accuracy": 1.5}, "accuracy=1.5"),
        ({"accuracy": float("nan")}, "accuracy=nan"),
        ({"stderr": float("inf")}, "stderr=inf"),
        ({"samples": 0}, "samples=0"),
        ({"repeats": 0}, "repeats=0"),
    ],
)
def test_curve_point_rejects_invalid(values, message):
    fields = {"sigma": 0.1, "accuracy": 0.5, "stderr": 0.01, "samples": 100, "repeats": 3}
    with pytest.raises(DataError, match=re.escape(message)):
        CurvePoint(**{**fields, **values})


def test_sigma_at_accuracy_rejects_bad_accuracy():
    with pytest.raises(SettingsError, match=re.escape("accuracy=1.2")):
        sigma_at_accuracy(fits_of_every_kind()["log"], 1.2)
