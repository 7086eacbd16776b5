"""Read the per-model records that noise-aware training attaches to curve points.

A trained point may carry `records`: one object per trained model (or a single object). Two
layouts are read:

- the trainer's: `weights` {layer: mean |w|}, `activations` {"clean": histogram, "noisy":
  histogram}, each histogram with `linear` and `log_abs` bins ({"edges", "counts"}), and
  `binarization` {"reference_accuracy", "binary_accuracy", "ternary_accuracy", "self_binarized"}
  (records written before the test ran with noise name the reference "clean_accuracy");
- a flat one: `weights`, `histogram` {"edges", "counts", "log_edges", "log_counts"}, and
  `binarization` {"reference", "accuracy_2_levels", "accuracy_3_levels", "binarizes"}.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from wnplan.errors import FileFormatError
from wnplan.report.sources import CurveData

# Trainer's binarization keys, by the flat layout's names.
_BINARIZATION_KEYS = {
    "reference": "reference_accuracy",
    "accuracy_2_levels": "binary_accuracy",
    "accuracy_3_levels": "ternary_accuracy",
    "binarizes": "self_binarized",
}


@dataclass(frozen=True)
class Histogram:
    """One activation histogram: linear bins, and log bins (of |x| when the edges are positive)."""

    label: str
    edges: list[float] | None
    counts: list[float] | None
    log_edges: list[float] | None
    log_counts: list[float] | None
    zero: int | None = None  # values too small for the first log bin, such as exact zeros


def point_records(point: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Return a point's per-model records as a list (one entry per trained model)."""
    extras = point.get("records")
    if extras is None:
        return []
    if isinstance(extras, Mapping):
        return [dict(extras)]
    if isinstance(extras, Sequence) and not isinstance(extras, str):
        return [dict(item) for item in extras if isinstance(item, Mapping)]
    raise FileFormatError(f"a point's 'records' must be an object or a list of objects, got {type(extras).__name__}")


def weights_by_sigma(curve: CurveData) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Return σ values and, per layer, the mean |w| averaged over the models trained at each σ.

    A layer missing at some σ (or recorded as null) gets NaN there, which matplotlib leaves as a gap.
    """
    rows: list[tuple[float, dict[str, float]]] = []
    for point in curve.points:
        tables = [extras["weights"] for extras in point_records(point) if isinstance(extras.get("weights"), Mapping)]
        if not tables:
            continue
        layers = {name for table in tables for name in table}
        rows.append((point["sigma"], {name: _mean(table.get(name) for table in tables) for name in layers}))

    layers = sorted({name for _, table in rows for name in table})
    sigmas = np.array([sigma for sigma, _ in rows], dtype=float)
    return sigmas, {name: np.array([table.get(name, math.nan) for _, table in rows], dtype=float) for name in layers}


def last_histograms(curve: CurveData) -> tuple[float, list[Histogram]] | None:
    """Return (σ, histograms) at the largest σ that has any; the first model's, if several."""
    for point in reversed(curve.points):
        for extras in point_records(point):
            found = _histograms(extras)
            if found:
                return point["sigma"], found
    return None


def last_binarization(curve: CurveData) -> tuple[float, dict[str, Any]] | None:
    """Return (σ, self-binarization test) at the largest σ where it decided, averaged over models.

    The result has `reference`, `accuracy_2_levels`, `accuracy_3_levels` (fractions) and
    `binarizes`, which is true only when the test marks every model as binarizing. Tests
    that could not decide (models at chance with the noise, `binarizes` null) are skipped.
    """
    for point in reversed(curve.points):
        tests = [_flat_binarization(extras["binarization"]) for extras in point_records(point)
                 if isinstance(extras.get("binarization"), Mapping)]
        tests = [test for test in tests if test.get("binarizes") is not None]
        if tests:
            merged: dict[str, Any] = {
                key: _mean(test.get(key) for test in tests)
                for key in ("reference", "accuracy_2_levels", "accuracy_3_levels")
            }
            merged["binarizes"] = all(bool(test.get("binarizes")) for test in tests)
            return point["sigma"], merged
    return None


def preserved_accuracy(curve: CurveData, clean: float) -> float | None:
    """Return accuracy at the largest σ ÷ accuracy at σ = 0 (or `clean` without a σ = 0 point)."""
    if len(curve.sigma) == 0:
        return None
    reference = float(curve.accuracy[0]) if curve.sigma[0] == 0 else clean
    if reference <= 0:
        return None
    return float(curve.accuracy[-1]) / reference


def _histograms(extras: Mapping[str, Any]) -> list[Histogram]:
    flat = extras.get("histogram")
    if isinstance(flat, Mapping):
        return [Histogram("activations", flat.get("edges"), flat.get("counts"), flat.get("log_edges"),
                          flat.get("log_counts"))]

    activations = extras.get("activations")
    if not isinstance(activations, Mapping):
        return []
    found = []
    for key, label in (("clean", "without noise"), ("noisy", "with noise")):
        record = activations.get(key)
        if not isinstance(record, Mapping):
            continue
        linear = record.get("linear") or {}
        logarithmic = record.get("log_abs") or {}
        found.append(Histogram(label, linear.get("edges"), linear.get("counts"), logarithmic.get("edges"),
                               logarithmic.get("counts"), logarithmic.get("zero")))
    return found


def _flat_binarization(test: Mapping[str, Any]) -> dict[str, Any]:
    """Return a binarization test under the flat layout's keys, whichever layout it came in."""
    flat = {name: test.get(name, test.get(trainer)) for name, trainer in _BINARIZATION_KEYS.items()}
    if flat["reference"] is None:
        flat["reference"] = test.get("clean_accuracy")
    return flat


def _mean(values) -> float:
    numbers = [float(value) for value in values if isinstance(value, (int, float)) and not isinstance(value, bool)]
    return float(np.mean(numbers)) if numbers else math.nan
