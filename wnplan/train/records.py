"""Records of a trained model: weight sizes, activation histograms, and the self-binarization test.

Every record is JSON-ready: plain ints, floats and lists, with no NaN or infinity (a
non-finite number becomes None).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

LINEAR_BINS = 50
ROBUST_PERCENTILES = (0.5, 99.5)
# Log-spaced bins of |x|: 4 per decade from 1e-8 to 1e12, fixed so that histograms of
# different trials line up.
LOG_EDGES = tuple(float(f"{10.0 ** (k / 4):.6g}") for k in range(-32, 49))
KMEANS_ITERATIONS = 50
# Accuracy may fall by at most this much (absolute) for a site to count as self-binarized.
BINARIZATION_TOLERANCE = 0.01
# The self-binarization test decides only when the reference accuracy is this far above chance:
# at chance, quantization cannot lower the accuracy, so "within the tolerance" means nothing.
BINARIZATION_ABOVE_CHANCE = 0.05


def finite_or_none(value: float) -> float | None:
    """Return the value as a float, or None when it is NaN or infinite."""
    value = float(value)
    return value if math.isfinite(value) else None


def mean_absolute_weights(tensors: Mapping[str, np.ndarray], labels: Mapping[str, str]) -> dict[str, float | None]:
    """Return mean |w| of each conv/linear weight, keyed by its label.

    Args:
        tensors: one configuration's weights by name (only conv/linear weights).
        labels: name shown in records for each tensor name.
    """
    return {labels[name]: finite_or_none(np.mean(np.abs(value))) for name, value in sorted(tensors.items())}


def activation_histogram(values: np.ndarray) -> dict[str, Any]:
    """Return a histogram of activation values on linear bins and on log-spaced bins of |x|.

    The linear bins split the robust range (0.5th to 99.5th percentile) into 50; values
    outside it are counted in `below` and `above`. The log bins are fixed (LOG_EDGES); |x|
    under the first edge counts as `zero`, over the last as `above`. Non-finite values are
    only counted, in `non_finite`.
    """
    flat = np.asarray(values, dtype=np.float64).ravel()
    finite = flat[np.isfinite(flat)]
    record: dict[str, Any] = {"count": int(flat.size), "non_finite": int(flat.size - finite.size)}
    if finite.size == 0:
        record["linear"] = None
        record["log_abs"] = None
        return record

    low, high = (float(value) for value in np.percentile(finite, ROBUST_PERCENTILES))
    if not high > low:
        low, high = low - 0.5, high + 0.5
    counts, edges = np.histogram(finite, bins=LINEAR_BINS, range=(low, high))
    record["linear"] = {
        "edges": [float(f"{edge:.6g}") for edge in edges],
        "counts": [int(count) for count in counts],
        "below": int(np.count_nonzero(finite < low)),
        "above": int(np.count_nonzero(finite > high)),
    }

    magnitudes = np.abs(finite)
    log_counts, _ = np.histogram(magnitudes, bins=np.array(LOG_EDGES))
    record["log_abs"] = {
        "edges": list(LOG_EDGES),
        "counts": [int(count) for count in log_counts],
        "zero": int(np.count_nonzero(magnitudes < LOG_EDGES[0])),
        "above": int(np.count_nonzero(magnitudes >= LOG_EDGES[-1])),
    }
    return record


def two_means(values: np.ndarray) -> tuple[float, float, float]:
    """Split values into two clusters by 1-d k-means; return (threshold, low mean, high mean).

    Lloyd's iterations start from the 5th and 95th percentiles. The threshold is the
    midpoint of the two cluster means. With a single distinct value both means are that value.
    """
    flat = np.asarray(values, dtype=np.float64).ravel()
    flat = flat[np.isfinite(flat)]
    if flat.size == 0:
        return 0.0, 0.0, 0.0
    low, high = (float(value) for value in np.percentile(flat, (5, 95)))
    if high <= low:
        low, high = float(flat.min()), float(flat.max())
    for _ in range(KMEANS_ITERATIONS):
        threshold = (low + high) / 2
        upper = flat > threshold
        if not upper.any() or upper.all():
            break
        new_low, new_high = float(flat[~upper].mean()), float(flat[upper].mean())
        if new_low == low and new_high == high:
            break
        low, high = new_low, new_high
    return (low + high) / 2, low, high


def binary_levels(values: np.ndarray) -> tuple[float, float]:
    """Return (threshold, high level) of the 2-level quantizer {0, high} for a site's values.

    Values above the 2-means threshold map to the mean of that high cluster, the rest to 0.
    """
    flat = np.asarray(values, dtype=np.float64).ravel()
    flat = flat[np.isfinite(flat)]
    threshold, _, _ = two_means(flat)
    upper = flat[flat > threshold]
    return threshold, float(upper.mean()) if upper.size else threshold


def ternary_levels(values: np.ndarray) -> tuple[float, float]:
    """Return (threshold, level) of the symmetric 3-level quantizer {−level, 0, +level}.

    The 2-means threshold of |x| separates zero from ±level; level is the mean |x| above it.
    """
    magnitudes = np.abs(np.asarray(values, dtype=np.float64).ravel())
    return binary_levels(magnitudes)


def binarization_record(
    reference_accuracy: float,
    binary_accuracy: float,
    ternary_accuracy: float,
    binary: tuple[float, float],
    ternary: tuple[float, float],
    chance: float,
) -> dict[str, Any]:
    """Return the self-binarization test of one site of a trained model.

    The site's values are quantized to 2 levels {0, high} and, separately, to the 3 levels
    {−level, 0, level}, before the trial's noise is applied to them as usual. The site
    self-binarizes when the 2-level accuracy is within BINARIZATION_TOLERANCE of the
    reference, the model's accuracy with the same noise and no quantization. When the
    reference is less than BINARIZATION_ABOVE_CHANCE above `chance`, the test cannot decide
    and `self_binarized` and `ternary_holds` are None.
    """
    decided = reference_accuracy >= chance + BINARIZATION_ABOVE_CHANCE
    return {
        "reference_accuracy": reference_accuracy,
        "binary_accuracy": binary_accuracy,
        "ternary_accuracy": ternary_accuracy,
        "binary_threshold": finite_or_none(binary[0]),
        "binary_high": finite_or_none(binary[1]),
        "ternary_threshold": finite_or_none(ternary[0]),
        "ternary_level": finite_or_none(ternary[1]),
        "tolerance": BINARIZATION_TOLERANCE,
        "with_noise": True,
        "chance": chance,
        "self_binarized": bool(binary_accuracy >= reference_accuracy - BINARIZATION_TOLERANCE) if decided else None,
        "ternary_holds": bool(ternary_accuracy >= reference_accuracy - BINARIZATION_TOLERANCE) if decided else None,
    }


def preserved_relative_accuracy(
    points: Sequence[Mapping[str, float]], clean_accuracy: float | None = None
) -> float | None:
    """Return accuracy at the largest σ divided by accuracy at σ = 0.

    Args:
        points: the curve's points, each with `sigma` and `accuracy` (as `Curve.points()`
            returns them).
        clean_accuracy: accuracy at σ = 0, used when no point has σ = 0 (sweeps start
            above 0, so pass the curve's clean accuracy).

    Returns:
        The ratio, or None when there are no points or the reference accuracy is 0.
    """
    if not points:
        return None
    at_zero = [point["accuracy"] for point in points if point["sigma"] == 0]
    reference = at_zero[0] if at_zero else clean_accuracy
    if reference is None or reference <= 0:
        return None
    largest = max(points, key=lambda point: point["sigma"])
    return finite_or_none(largest["accuracy"] / reference)
