"""Fit the midpoint noise level µ to an accuracy-versus-σ curve.

The model is the scaled logistic

    F(σ) = a_min + (a_max − a_min) / (1 + exp((σ − µ)/s)),

fitted by weighted least squares in σ (`space="linear"`) or in u = log10 σ (`space="log"`, where
µ and s are in decades and the reported midpoint is 10**µ_u). F(µ) = (a_max + a_min)/2, so µ is
the noise level at which the accuracy has fallen half-way from its best to its worst value.

Each point is weighted by its standard error, floored at the binomial standard error
√(p(1−p)/n) for the n samples of one repeat. Repeats usually reuse one evaluation set, so
averaging over repeats does not shrink the sampling error of that set. In log space a σ = 0
point has u = −∞, where F equals a_max, so it constrains a_max only.

`fit_curve` decides in this order ("significant" means more than 3 standard errors):

1. failed: the best accuracy is not significantly above chance. No midpoint is given.
2. a_min is chance (1/K) unless the curve ends on a plateau. A plateau is two or more trailing
   points that agree within their errors and are each significantly above chance, after the
   curve has lost at least a quarter of the way from a_max to chance. Then a_min is free
   (`logistic-free-min`). A smaller loss is not a step, so such a curve is judged against chance.
3. robust: no point reaches the half-way level (a_max + a_min)/2, flat curves included. The
   midpoint is σ_max, a lower bound.
4. sensitive: σ = 0 is above half-way, but the smallest σ > 0 is already at or below it. The
   midpoint is that σ, an upper bound.
5. fallback, without fitting, in any of these cases:
   - there are too few σ values for the free parameters;
   - accuracy rises significantly, and by more than 10 % of the drop (a non-monotone curve);
   - no point is significantly between a_max and a_min. The whole drop then happens between
     two adjacent σ, so s cannot be identified.
6. ok: a one-step logistic and, given at least two more points than parameters, two stacked
   logistics. Two steps win when the BIC drops by more than 10, each step carries at least
   20 % of the drop, and the steps do not overlap (µ2 − µ1 > 2(s1 + s2)). The midpoint is the
   µ of the larger step, where the whole curve crosses half-way, and the other µ is the
   second midpoint.
   The standard errors come from the fit covariance. When the logistic describes the points
   worse than their errors allow (χ² per degree of freedom above 1), the errors of µ are
   multiplied by √(χ²/dof), the Birge ratio, kept as `error_scale`. Measured curves are
   rarely exact logistics: with 10,000 samples the misfit, not the sampling noise, sets
   how far µ moves when the σ grid changes, and the scaled error covers it.
7. fallback, after fitting, in any of these cases:
   - the fit does not converge;
   - the standard error of µ is not finite or exceeds the measured range;
   - µ lies outside the measured range;
   - the RMS residual exceeds 10 % of the drop.

A fallback reports the σ where the curve, interpolated linearly in log10 σ, first falls to the
half-way level. Its error is half the width, in the fit space, of the σ interval that brackets
that crossing, converted to σ like a fit error. This is a conservative bound, not a standard
error. When the interpolated curve never falls to half-way (it rises instead), the status is
failed. Results other than `ok` keep the measured points, so `predict_accuracy` interpolates
them.

NOTE: the thresholds above (3 standard errors, a quarter, 10 %, 20 %, BIC margin 10) are
choices checked on synthetic curves only, not calibrated on measured profiles.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields

import numpy as np
from scipy import stats
from scipy.optimize import OptimizeWarning, brentq, curve_fit
from scipy.special import expit

from wnplan.errors import DataError, FileFormatError, SettingsError

logger = logging.getLogger(__name__)

STATUSES = ("ok", "robust", "sensitive", "fallback", "failed")
METHODS = ("logistic", "logistic-free-min", "two-logistic", "interpolated", "none")
SPACES = ("linear", "log")

_SIGNIFICANCE = 3.0  # standard errors for a difference to count
_CONSISTENT_PROBABILITY = float(stats.norm.cdf(_SIGNIFICANCE) - stats.norm.cdf(-_SIGNIFICANCE))
_MIN_PLATEAU_LOSS = 0.25  # fraction of (a_max − chance) a plateau must lose to be a step
_MIN_STEP_SHARE = 0.2  # fraction of the drop that each of two steps must carry
_MAX_RISE = 0.1  # fraction of the drop above which a rise makes the curve non-monotone
_MAX_RMS_RESIDUAL = 0.1  # fraction of the drop above which a fit does not describe the curve
# BIC decrease that a second step must bring. It is large because real drops are rarely exact
# logistics, so a flexible model always fits them a little better.
_BIC_MARGIN = 10.0
_LOGISTIC_METHODS = ("logistic", "logistic-free-min", "two-logistic")
_OPTIONAL_NUMBERS = (
    "midpoint",
    "midpoint_error",
    "slope",
    "second_midpoint",
    "second_midpoint_error",
)
_ONE_STEP_NAMES = ("a_max", "a_min", "mu", "s")
_TWO_STEP_NAMES = ("a_max", "a_min", "weight", "mu1", "s1", "mu2", "s2")


@dataclass(frozen=True)
class CurvePoint:
    """Mean accuracy at one noise level σ, over `repeats` repeats of `samples` samples each."""

    sigma: float
    accuracy: float
    stderr: float
    samples: int
    repeats: int

    def __post_init__(self) -> None:
        checks = (
            ("sigma", math.isfinite(self.sigma) and self.sigma >= 0, "a finite value ≥ 0"),
            ("accuracy", 0.0 <= self.accuracy <= 1.0, "a value in [0, 1]"),
            ("stderr", math.isfinite(self.stderr) and self.stderr >= 0, "a finite value ≥ 0"),
            ("samples", self.samples >= 1, "an integer ≥ 1"),
            ("repeats", self.repeats >= 1, "an integer ≥ 1"),
        )
        for name, valid, allowed in checks:
            if not valid:
                raise DataError(
                    f"invalid curve point: {name}={getattr(self, name)!r}, expected {allowed}. "
                    + "Check the sweep results or the profile that contain the point"
                )


@dataclass(frozen=True)
class FitResult:
    """Fitted accuracy-versus-σ curve of one site, with midpoints in the σ units of its points.

    `slope` and the µ and s values in `params` are in the fit space (decades for `log`).
    `params` contains the logistic parameters, or the measured points as `sigma_i`/`accuracy_i`
    for results without a logistic fit.

    a_max is the fitted upper asymptote. In linear space F(0) lies below it when µ is not large
    compared with s, so a_max can exceed the clean accuracy.
    """

    status: str
    method: str
    space: str
    midpoint: float | None
    midpoint_error: float | None
    slope: float | None
    a_max: float
    a_min: float
    second_midpoint: float | None = None
    second_midpoint_error: float | None = None
    lower_bound: bool = False
    upper_bound: bool = False
    reason: str = ""
    params: dict[str, float] = field(default_factory=dict)
    error_scale: float = 1.0

    def __post_init__(self) -> None:
        for name, allowed in (("status", STATUSES), ("method", METHODS), ("space", SPACES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}, expected one of {allowed}")
        for name in ("lower_bound", "upper_bound"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}={getattr(self, name)!r}, expected true or false")
        if not isinstance(self.reason, str) or not isinstance(self.params, Mapping):
            raise TypeError("reason must be a string and params a mapping of names to numbers")

        if isinstance(self.error_scale, bool) or not isinstance(self.error_scale, (int, float)):
            raise TypeError(f"error_scale={self.error_scale!r}, expected a number")
        if not (math.isfinite(self.error_scale) and self.error_scale >= 1.0):
            raise ValueError(f"error_scale={self.error_scale!r}, expected a finite number ≥ 1")
        numbers = {name: getattr(self, name) for name in (*_OPTIONAL_NUMBERS, "a_max", "a_min")}
        numbers.update({f"params[{key!r}]": value for key, value in self.params.items()})
        for name, value in numbers.items():
            if value is None and name in _OPTIONAL_NUMBERS:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name}={value!r}, expected a number")
            if not math.isfinite(value):
                raise ValueError(f"{name}={value!r}, expected a finite number")

    def to_dict(self) -> dict[str, object]:
        """Return a JSON-ready record with plain floats and no NaN or infinity."""
        record: dict[str, object] = {item.name: getattr(self, item.name) for item in fields(self)}
        for name in (*_OPTIONAL_NUMBERS, "a_max", "a_min"):
            record[name] = None if record[name] is None else float(record[name])
        record["params"] = {key: float(value) for key, value in sorted(self.params.items())}
        record["error_scale"] = float(self.error_scale)
        return record

    @property
    def statistical_error(self) -> float | None:
        """The standard error of the midpoint from the sampling noise alone, without the misfit."""
        return None if self.midpoint_error is None else self.midpoint_error / self.error_scale

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> FitResult:
        """Rebuild a result from `to_dict` output, raising FileFormatError if it is invalid."""
        if not isinstance(data, Mapping):
            raise FileFormatError(f"fit record must be a JSON object, got {type(data).__name__}")
        names = {item.name for item in fields(cls)}
        required = {
            item.name
            for item in fields(cls)
            if item.default is MISSING and item.default_factory is MISSING
        }
        problems = [
            f"{label} keys {keys}"
            for label, keys in (
                ("unknown", sorted(set(data) - names)),
                ("missing", sorted(required - set(data))),
            )
            if keys
        ]
        if problems:
            raise FileFormatError(
                f"invalid fit record: {', '.join(problems)}. "
                + "Regenerate the profile with this version of wnplan"
            )
        try:
            return cls(**{**data, "params": dict(data.get("params", {}))})
        except (TypeError, ValueError) as error:
            raise FileFormatError(
                f"invalid fit record: {error}. Regenerate the profile with this version of wnplan"
            ) from error


def floor_stderr(accuracy: float, stderr: float, samples: int) -> float:
    """Return max(stderr, √(p(1−p)/n)) with p = accuracy clipped to [1/n, 1 − 1/n].

    With n = 1 that interval is empty, so p = 0.5, the largest binomial error.
    """
    if samples < 1:
        raise DataError(f"samples={samples!r}, expected an integer ≥ 1 evaluated samples")
    p = 0.5 if samples == 1 else min(max(accuracy, 1.0 / samples), 1.0 - 1.0 / samples)
    return max(float(stderr), math.sqrt(p * (1.0 - p) / samples))


def half_way_crossing(points: Sequence[CurvePoint], level: float | None = None) -> float | None:
    """Return the σ where the curve, interpolated in log10 σ, first falls to `level`.

    `level` defaults to half-way between the largest and smallest mean accuracy. Between
    σ = 0 and the first σ > 0 the interpolation is linear in σ. Returns None when the curve
    never falls from above `level` to at or below it.
    """
    curve = _prepare(points, "log")
    if level is None:
        level = (float(curve.accuracy.max()) + float(curve.accuracy.min())) / 2
    crossing = _first_crossing(curve.sigma, curve.accuracy, level)
    return None if crossing is None else crossing[0]


def fit_curve(points: Sequence[CurvePoint], chance: float, space: str = "linear") -> FitResult:
    """Fit the logistic to one accuracy-versus-σ curve, in the decision order of the module doc.

    Args:
        points: measured points in any order. Points at the same σ are pooled.
        chance: chance accuracy 1/K for K classes, in (0, 1).
        space: "linear" to fit in σ, "log" to fit in log10 σ.
    """
    _check_settings(chance, space)
    curve = _prepare(points, space)
    best = int(np.argmax(curve.accuracy))
    a_max = float(curve.accuracy[best])
    if a_max - chance <= _SIGNIFICANCE * curve.error[best]:
        reason = _at_chance_reason(curve, chance)
        return _without_fit(curve, "failed", a_max, min(chance, a_max), reason)

    plateau = _plateau_level(curve, chance, a_max)
    free_min = plateau is not None
    a_min = plateau if free_min else chance
    level = (a_max + a_min) / 2
    if np.all(curve.accuracy > level):
        return _robust(curve, a_max, a_min, level)
    if curve.sigma[0] == 0 and curve.accuracy[0] > level >= curve.accuracy[1]:
        return _sensitive(curve, a_max, a_min, level)

    problem = _unfittable_reason(curve, a_max, a_min, level, free_min)
    if problem is None:
        result, problem = _fit_logistic(curve, a_max, a_min, free_min)
        if result is not None:
            return result
    logger.debug("falling back to interpolation: %s", problem)
    return _fallback(curve, a_max, a_min, level, problem)


def predict_accuracy(fit: FitResult, sigma: float | np.ndarray) -> float | np.ndarray:
    """Return the fitted accuracy F(σ), clamped to [a_min, a_max].

    Results without a logistic fit interpolate their measured points in log10 σ and hold the
    end values beyond them. σ is in the units of the fitted curve. A scalar gives a float.
    """
    query = np.asarray(sigma, dtype=float)
    if np.any(np.isnan(query)) or np.any(query < 0):
        raise SettingsError(f"sigma={sigma!r} contains negative or NaN values. Pass σ ≥ 0")
    if fit.method in _LOGISTIC_METHODS:
        values = _logistic(_logistic_params(fit), _to_fit_space(query, fit.space))
    else:
        values = _interpolate(*_read_knots(fit.params), query)
    values = np.clip(values, fit.a_min, fit.a_max)
    return float(values) if values.ndim == 0 else values


def sigma_at_accuracy(fit: FitResult, accuracy: float) -> float | None:
    """Return the smallest σ at which `predict_accuracy` has fallen to `accuracy`.

    Returns 0.0 when the curve is at or below `accuracy` already at σ = 0, and None when it
    never falls that far (below a_min, or beyond the measured points of an interpolated curve).
    """
    if not 0.0 <= accuracy <= 1.0:
        raise SettingsError(f"accuracy={accuracy!r}, expected a value in [0, 1]")
    if accuracy >= predict_accuracy(fit, 0.0):
        return 0.0
    if accuracy < fit.a_min or (accuracy == fit.a_min and fit.method in _LOGISTIC_METHODS):
        return None

    if fit.method in ("logistic", "logistic-free-min"):
        p = _logistic_params(fit)
        x = p["mu"] + p["s"] * math.log((p["a_max"] - p["a_min"]) / (accuracy - p["a_min"]) - 1)
    elif fit.method == "two-logistic":
        x = _solve_two_step(_logistic_params(fit), accuracy)
    else:
        crossing = _first_crossing(*_read_knots(fit.params), accuracy)
        return None if crossing is None else crossing[0]
    if fit.space == "linear":
        return max(x, 0.0)
    return 10.0**x if x < 300 else None


# --- curve preparation and screening ---


@dataclass(frozen=True)
class _Curve:
    sigma: np.ndarray  # distinct σ, ascending
    accuracy: np.ndarray  # error-weighted mean accuracy at each σ
    error: np.ndarray  # floored standard error of that mean
    x: np.ndarray  # σ in the fit space, with −inf for σ = 0 in log space
    space: str


def _check_settings(chance: float, space: str) -> None:
    if not (isinstance(chance, (int, float)) and 0.0 < chance < 1.0):
        raise SettingsError(f"chance={chance!r}, expected 1/K in (0, 1) for K ≥ 2 classes")
    if space not in SPACES:
        raise SettingsError(f"space={space!r}, expected one of {SPACES}")


def _prepare(points: Sequence[CurvePoint], space: str) -> _Curve:
    if not any(point.sigma > 0 for point in points):
        raise DataError(
            f"the curve has no point with σ > 0 ({len(points)} points). Sweep at least one σ > 0"
        )
    sigma = np.array([point.sigma for point in points], dtype=float)
    accuracy = np.array([point.accuracy for point in points], dtype=float)
    weight = np.array([floor_stderr(p.accuracy, p.stderr, p.samples) ** -2 for p in points])

    levels = np.unique(sigma)
    totals = np.array([np.sum(weight[sigma == level]) for level in levels])
    sums = np.array([np.sum((weight * accuracy)[sigma == level]) for level in levels])
    return _Curve(levels, sums / totals, totals**-0.5, _to_fit_space(levels, space), space)


def _to_fit_space(sigma: np.ndarray, space: str) -> np.ndarray:
    if space == "linear":
        return np.asarray(sigma, dtype=float)
    x = np.full(np.shape(sigma), -np.inf)
    return np.log10(sigma, out=x, where=np.asarray(sigma) > 0)


def _plateau_level(curve: _Curve, chance: float, a_max: float) -> float | None:
    """Return the level of a trailing plateau that is a real step above chance, or None."""
    y, e = curve.accuracy, curve.error
    start = len(y) - 1
    while start > 0 and _consistent(y[start - 1 :], e[start - 1 :]):
        start -= 1
    if start == 0 or len(y) - start < 2:
        return None
    level = float(np.average(y[start:], weights=e[start:] ** -2))
    above_chance = np.all(y[start:] - chance > _SIGNIFICANCE * e[start:])
    is_step = a_max - level >= _MIN_PLATEAU_LOSS * (a_max - chance)
    return level if above_chance and is_step else None


def _consistent(y: np.ndarray, e: np.ndarray) -> bool:
    """Return whether the points agree with one common level, at the 3-standard-error level.

    The test compares χ² of the points around their weighted mean with the χ² quantile of the
    same tail probability as 3 standard errors. So two points agree when they differ by at most
    3 combined standard errors. Testing each point against the mean alone would let points 4
    combined errors apart pass, because the mean sits between them.
    """
    mean = np.average(y, weights=e**-2)
    chi2 = float(np.sum(((y - mean) / e) ** 2))
    return chi2 <= float(stats.chi2.ppf(_CONSISTENT_PROBABILITY, len(y) - 1))


def _unfittable_reason(
    curve: _Curve, a_max: float, a_min: float, level: float, free_min: bool
) -> str | None:
    y, e, sigma = curve.accuracy, curve.error, curve.sigma
    n_free = 4 if free_min else 3
    if len(y) < n_free + 1 or np.count_nonzero(np.isfinite(curve.x)) < 3:
        return f"only {len(y)} σ values, too few to fit a logistic with {n_free} free parameters"

    allowed_rise = np.maximum(_SIGNIFICANCE * np.hypot(e[:-1], e[1:]), _MAX_RISE * (a_max - a_min))
    excess = np.diff(y) - allowed_rise
    if np.any(excess > 0):
        i = int(np.argmax(excess))
        return (
            f"accuracy rises from {y[i]:.3g} at σ={sigma[i]:.3g} to {y[i + 1]:.3g} at "
            + f"σ={sigma[i + 1]:.3g}, so the curve is too far from monotone for a logistic"
        )

    between = (a_max - y > _SIGNIFICANCE * e) & (y - a_min > _SIGNIFICANCE * e)
    crossing = _first_crossing(sigma, y, level)
    if not np.any(between) and crossing is not None:
        i = crossing[1]
        return f"single-step drop between σ={sigma[i]:.3g} and σ={sigma[i + 1]:.3g}"
    return None


# --- least-squares fits ---


class _FitError(Exception):
    """A least-squares fit that did not converge."""


@dataclass(frozen=True)
class _Fit:
    values: dict[str, float]  # all parameters, fixed ones included
    errors: dict[str, float]  # standard errors of the free parameters, inf when unknown
    chi2: float
    rms: float
    n_free: int


def _fit_logistic(
    curve: _Curve, a_max: float, a_min: float, free_min: bool
) -> tuple[FitResult | None, str]:
    """Return the best acceptable logistic fit, or None and why no fit is acceptable."""
    fixed = {} if free_min else {"a_min": a_min}
    free = {"a_max": a_max, "a_min": a_min} if free_min else {"a_max": a_max}
    try:
        one_step = _least_squares(curve, {**free, **_one_step_start(curve, a_max, a_min)}, fixed)
        problem = _one_step_problem(curve, one_step)
    except _FitError as error:
        one_step, problem = None, str(error)
    two_step = _best_two_step(curve, a_max, a_min, free, fixed)

    n = len(curve.x)
    if two_step is not None and (problem or _bic(two_step, n) + _BIC_MARGIN < _bic(one_step, n)):
        return _logistic_result(curve, two_step, "two-logistic"), ""
    if not problem:
        method = "logistic-free-min" if free_min else "logistic"
        return _logistic_result(curve, one_step, method), ""
    return None, problem


def _best_two_step(
    curve: _Curve, a_max: float, a_min: float, free: dict[str, float], fixed: dict[str, float]
) -> _Fit | None:
    """Return the acceptable two-step fit with the lowest χ², trying every plausible shelf."""
    if len(curve.x) < len(free) + 5 + 2:  # fewer than two points more than parameters
        return None
    fits = []
    for start in _two_step_starts(curve, a_max, a_min):
        try:
            fits.append(_ordered(_least_squares(curve, {**free, **start}, fixed)))
        except _FitError:
            continue
    valid = [fit for fit in fits if not _two_step_problem(curve, fit)]
    return min(valid, key=lambda fit: fit.chi2, default=None)


def _least_squares(curve: _Curve, start: dict[str, float], fixed: dict[str, float]) -> _Fit:
    names = list(start)
    lower, upper = _bounds(curve, names)
    p0 = np.clip([start[name] for name in names], lower, upper)

    def model(x: np.ndarray, *values: float) -> np.ndarray:
        return _logistic({**fixed, **dict(zip(names, values, strict=True))}, x)

    # check_finite is off because a σ = 0 point in log space sits at x = −inf, where F = a_max.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OptimizeWarning)
        try:
            values, covariance = curve_fit(
                model,
                curve.x,
                curve.accuracy,
                p0=p0,
                sigma=curve.error,
                absolute_sigma=True,
                bounds=(lower, upper),
                check_finite=False,
                max_nfev=5000,
            )
        except (RuntimeError, ValueError, np.linalg.LinAlgError) as error:
            raise _FitError(f"the logistic fit did not converge ({error})") from error

    variances = np.diag(covariance)
    usable = np.isfinite(variances) & (variances >= 0)
    errors = np.where(usable, np.sqrt(np.where(usable, variances, 0.0)), np.inf)
    fitted = {**fixed, **{name: float(value) for name, value in zip(names, values, strict=True)}}
    residuals = curve.accuracy - _logistic(fitted, curve.x)
    return _Fit(
        values=fitted,
        errors={name: float(error) for name, error in zip(names, errors, strict=True)},
        chi2=float(np.sum((residuals / curve.error) ** 2)),
        rms=float(np.sqrt(np.mean(residuals**2))),
        n_free=len(names),
    )


def _bounds(curve: _Curve, names: list[str]) -> tuple[list[float], list[float]]:
    """Return bounds that keep accuracies and the step weight in [0, 1], and µ near the data.

    s stays between a thousandth of the finest σ step and ten times the measured range.
    """
    x_low, x_high = _measured_range(curve)
    span = x_high - x_low
    finest_step = float(np.min(np.diff(curve.x[np.isfinite(curve.x)])))
    limits = {"mu": (x_low - span, x_high + span), "s": (finest_step * 1e-3, span * 10)}
    pairs = [limits.get(name.rstrip("12"), (0.0, 1.0)) for name in names]
    return [low for low, _ in pairs], [high for _, high in pairs]


def _measured_range(curve: _Curve) -> tuple[float, float]:
    finite = curve.x[np.isfinite(curve.x)]
    return float(finite[0]), float(finite[-1])


def _one_step_start(curve: _Curve, a_max: float, a_min: float) -> dict[str, float]:
    """Start µ at the half-way crossing, and s at the 75 %-to-25 % width over 2·ln 3."""
    x_low, x_high = _measured_range(curve)
    drop = a_max - a_min
    mu = _x_crossing(curve, a_min + drop / 2)
    upper, lower = _x_crossing(curve, a_min + 0.75 * drop), _x_crossing(curve, a_min + 0.25 * drop)
    width = (lower - upper) / (2 * math.log(3)) if upper is not None and lower is not None else 0.0
    return {
        "mu": (x_low + x_high) / 2 if mu is None else mu,
        "s": width if width > 0 else (x_high - x_low) / 20,
    }


def _two_step_starts(curve: _Curve, a_max: float, a_min: float) -> list[dict[str, float]]:
    """Return one start per interior point that could lie on the shelf between two steps."""
    starts = []
    for k in np.flatnonzero(np.isfinite(curve.x))[1:-1]:
        shelf = float(curve.accuracy[k])
        share = (a_max - shelf) / (a_max - a_min)
        mu1 = _x_crossing(curve, (a_max + shelf) / 2)
        mu2 = _x_crossing(curve, (shelf + a_min) / 2, after=k)
        if 0.15 <= share <= 0.85 and mu1 is not None and mu2 is not None and mu2 > mu1:
            width = (mu2 - mu1) / 8
            starts.append({"weight": share, "mu1": mu1, "s1": width, "mu2": mu2, "s2": width})
    return starts


def _x_crossing(curve: _Curve, level: float, after: int = 0) -> float | None:
    """Return the fit-space x where the finite-x points first fall to `level`, from `after` on."""
    for i in range(after, len(curve.x) - 1):
        (x0, x1), (y0, y1) = curve.x[i : i + 2], curve.accuracy[i : i + 2]
        if np.isfinite(x0) and y0 > level >= y1:
            return float(x0 + (y0 - level) / (y0 - y1) * (x1 - x0))
    return None


def _ordered(fit: _Fit) -> _Fit:
    """Return a two-step fit with µ1 ≤ µ2, swapping the steps if needed."""
    if fit.values["mu1"] <= fit.values["mu2"]:
        return fit
    swap = {"mu1": "mu2", "mu2": "mu1", "s1": "s2", "s2": "s1"}
    values = {swap.get(name, name): value for name, value in fit.values.items()}
    values["weight"] = 1.0 - fit.values["weight"]
    errors = {swap.get(name, name): value for name, value in fit.errors.items()}
    return _Fit(values, errors, fit.chi2, fit.rms, fit.n_free)


def _one_step_problem(curve: _Curve, fit: _Fit) -> str:
    return _shape_problem(fit) or _midpoint_problem(curve, fit, "mu")


def _two_step_problem(curve: _Curve, fit: _Fit) -> str:
    v = fit.values
    if min(v["weight"], 1 - v["weight"]) < _MIN_STEP_SHARE:
        return "one of the two steps is too small"
    if v["mu2"] - v["mu1"] <= 2 * (v["s1"] + v["s2"]):
        return "the two steps overlap"
    return (
        _shape_problem(fit)
        or _midpoint_problem(curve, fit, "mu1")
        or _midpoint_problem(curve, fit, "mu2")
    )


def _shape_problem(fit: _Fit) -> str:
    drop = fit.values["a_max"] - fit.values["a_min"]
    if drop <= 0:
        return f"the fitted curve does not fall (a_max={fit.values['a_max']:.3g} ≤ a_min)"
    if fit.rms > _MAX_RMS_RESIDUAL * drop:
        return f"the logistic does not describe the points (RMS residual {fit.rms:.3g})"
    return ""


def _midpoint_problem(curve: _Curve, fit: _Fit, name: str) -> str:
    x_low, x_high = _measured_range(curve)
    mu, error = fit.values[name], fit.errors[name]
    if not math.isfinite(error) or error > x_high - x_low:
        return "the fit leaves µ undetermined (its covariance is singular or too wide)"
    if not x_low <= mu <= x_high:
        mu_text = f"{mu:.3g}" if curve.space == "linear" else f"10**{mu:.3g}"
        return f"the fitted µ={mu_text} lies outside the measured σ range"
    return ""


def _bic(fit: _Fit, n: int) -> float:
    return fit.chi2 + fit.n_free * math.log(n)


# --- results ---


def _logistic_result(curve: _Curve, fit: _Fit, method: str) -> FitResult:
    v, e = fit.values, fit.errors
    main, other = "mu", ""
    if method == "two-logistic":
        main, other = ("mu1", "mu2") if v["weight"] >= 0.5 else ("mu2", "mu1")
    scale = _birge_ratio(fit, len(curve.x))
    midpoint, midpoint_error = _to_sigma(v[main], e[main] * scale, curve.space)
    second, second_error = _to_sigma(v[other], e[other] * scale, curve.space) if other else (None, None)
    return FitResult(
        status="ok",
        method=method,
        space=curve.space,
        midpoint=midpoint,
        midpoint_error=midpoint_error,
        slope=v[main.replace("mu", "s")],
        a_max=v["a_max"],
        a_min=v["a_min"],
        second_midpoint=second,
        second_midpoint_error=second_error,
        params=v,
        error_scale=scale,
    )


def _birge_ratio(fit: _Fit, points: int) -> float:
    """Return √(χ²/dof) when the points scatter around the fit more than their errors allow, else 1."""
    dof = points - fit.n_free
    if dof < 1:
        return 1.0
    return max(1.0, math.sqrt(fit.chi2 / dof))


def _to_sigma(x: float, error: float, space: str) -> tuple[float, float]:
    """Convert a fit-space value and its standard error to σ (delta method in log space)."""
    if space == "linear":
        return x, error
    sigma = 10.0**x
    return sigma, math.log(10) * sigma * error


def _without_fit(
    curve: _Curve, status: str, a_max: float, a_min: float, reason: str, **settings: object
) -> FitResult:
    knots = {f"sigma_{i}": float(s) for i, s in enumerate(curve.sigma)}
    knots.update({f"accuracy_{i}": float(y) for i, y in enumerate(curve.accuracy)})
    settings = {"method": "none", "midpoint": None, "midpoint_error": None, **settings}
    return FitResult(
        status=status,
        space=curve.space,
        slope=None,
        a_max=float(a_max),
        a_min=float(a_min),
        reason=reason,
        params=knots,
        **settings,
    )


def _at_chance_reason(curve: _Curve, chance: float) -> str:
    best = int(np.argmax(curve.accuracy))
    measured = f"{curve.accuracy[best]:.3g} ± {curve.error[best]:.2g}"
    if curve.sigma[0] == 0:
        return (
            f"the best accuracy ({measured}, σ=0 included) is not significantly above chance "
            + f"({chance:.3g}). The model does not measurably beat chance, so no midpoint exists"
        )
    return (
        f"the best accuracy ({measured}) is not significantly above chance ({chance:.3g}), so "
        + f"either the model is at chance or the curve fell before σ={curve.sigma[0]:.3g}. "
        + "Add σ=0 and smaller σ to the sweep"
    )


def _robust(curve: _Curve, a_max: float, a_min: float, level: float) -> FitResult:
    sigma_max = float(curve.sigma[-1])
    reason = (
        f"accuracy stays above the half-way level {level:.3g} up to σ_max={sigma_max:.3g} "
        + f"(lowest {curve.accuracy.min():.3g}), so µ > {sigma_max:.3g}"
    )
    return _without_fit(curve, "robust", a_max, a_min, reason, midpoint=sigma_max, lower_bound=True)


def _sensitive(curve: _Curve, a_max: float, a_min: float, level: float) -> FitResult:
    first = float(curve.sigma[1])
    reason = (
        f"accuracy is already {curve.accuracy[1]:.3g}, at or below the half-way level "
        + f"{level:.3g}, at the smallest σ > 0 tried (σ={first:.3g}), so µ < {first:.3g}"
    )
    return _without_fit(curve, "sensitive", a_max, a_min, reason, midpoint=first, upper_bound=True)


def _fallback(curve: _Curve, a_max: float, a_min: float, level: float, problem: str) -> FitResult:
    crossing = _first_crossing(curve.sigma, curve.accuracy, level)
    if crossing is None:
        reason = f"{problem}, and the interpolated curve never falls to half-way ({level:.3g})"
        return _without_fit(curve, "failed", a_max, a_min, reason)

    sigma, i = crossing
    half_width = float(curve.x[i + 1] - curve.x[i]) / 2
    error = _to_sigma(_to_fit_space(np.asarray(sigma), curve.space).item(), half_width, curve.space)
    reason = f"{problem}. The midpoint is where the interpolated curve crosses {level:.3g}"
    return _without_fit(
        curve,
        "fallback",
        a_max,
        a_min,
        reason,
        method="interpolated",
        midpoint=sigma,
        midpoint_error=error[1] if math.isfinite(error[1]) else None,
    )


# --- evaluation ---


def _logistic(params: Mapping[str, float], x: np.ndarray) -> np.ndarray:
    """Evaluate the one- or two-step logistic at fit-space x (expit cannot overflow)."""
    drop = params["a_max"] - params["a_min"]
    if "mu1" in params:
        first = expit((params["mu1"] - x) / params["s1"])
        second = expit((params["mu2"] - x) / params["s2"])
        share = params["weight"] * first + (1 - params["weight"]) * second
    else:
        share = expit((params["mu"] - x) / params["s"])
    return params["a_min"] + drop * share


def _logistic_params(fit: FitResult) -> Mapping[str, float]:
    names = _TWO_STEP_NAMES if fit.method == "two-logistic" else _ONE_STEP_NAMES
    missing = [name for name in names if name not in fit.params]
    if missing:
        raise FileFormatError(f"{fit.method} fit lacks the parameters {missing}. Refit the curve")
    return fit.params


def _solve_two_step(params: Mapping[str, float], accuracy: float) -> float:
    """Return the fit-space x where the two-step curve equals `accuracy` (a_min < it < F(0))."""
    reach = 50 * max(params["s1"], params["s2"])
    low, high = params["mu1"] - reach, params["mu2"] + reach

    def gap(x: float) -> float:
        return float(_logistic(params, np.asarray(x))) - accuracy

    while gap(low) <= 0:
        low -= reach
    while gap(high) >= 0:
        high += reach
    return float(brentq(gap, low, high, xtol=1e-12))


def _read_knots(params: Mapping[str, float]) -> tuple[np.ndarray, np.ndarray]:
    count = sum(1 for name in params if name.startswith("sigma_"))
    try:
        sigma = np.array([params[f"sigma_{i}"] for i in range(count)], dtype=float)
        accuracy = np.array([params[f"accuracy_{i}"] for i in range(count)], dtype=float)
    except KeyError as error:
        raise FileFormatError(f"interpolated fit lacks the measured point {error}") from error
    if count == 0 or sigma[-1] <= 0 or np.any(np.diff(sigma) <= 0) or sigma[0] < 0:
        raise FileFormatError("interpolated fit needs measured points at ascending σ ≥ 0")
    return sigma, accuracy


def _interpolate(sigma: np.ndarray, accuracy: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Interpolate linearly in log10 σ, and in σ between σ = 0 and the first σ > 0."""
    positive = sigma > 0
    values = np.interp(_to_fit_space(query, "log"), np.log10(sigma[positive]), accuracy[positive])
    if sigma[0] == 0:
        ramp = accuracy[0] + (accuracy[1] - accuracy[0]) * query / sigma[1]
        values = np.where(query < sigma[1], ramp, values)
    return values


def _first_crossing(
    sigma: np.ndarray, accuracy: np.ndarray, level: float
) -> tuple[float, int] | None:
    """Return (σ, i) where the curve first falls from above `level` to it, in [σ_i, σ_i+1]."""
    for i in range(len(sigma) - 1):
        y0, y1 = accuracy[i], accuracy[i + 1]
        if y0 > level >= y1:
            fraction = (y0 - level) / (y0 - y1)
            if sigma[i] == 0:
                return float(fraction * sigma[i + 1]), i
            u0, u1 = math.log10(sigma[i]), math.log10(sigma[i + 1])
            return float(10.0 ** (u0 + fraction * (u1 - u0))), i
    return None
