"""Clean activation statistics per site, measured on calibration data.

They give relative σ its meaning (σ relative to a site's RMS or range) and give bit-width
hints the activation range to cover.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from wnplan.data import Dataset
from wnplan.models import Model

logger = logging.getLogger(__name__)

CALIBRATION_SAMPLES = 2048
GROUP_BYTES = 256 << 20  # activation memory per pass when many sites are measured at once
RANGE_PERCENTILES = (0.1, 99.9)


def site_statistics(model: Model, data: Dataset, samples: int = CALIBRATION_SAMPLES) -> list[dict[str, float]]:
    """Return clean statistics for every site, in site order.

    Each record has `rms`, `mean`, `std`, `min`, `max`, and the robust range
    `range_low`, `range_high` (0.1th and 99.9th percentiles) with `range` their difference.
    Statistics come from the first `samples` samples of `data`.
    """
    x = data.x[:samples]
    records: list[dict[str, float]] = []
    for group in _groups(model, x.shape[0]):
        values = model.activations(x, group)
        records.extend(_describe(value) for value in values)
    logger.info("calibrated %d sites on %d samples", len(records), x.shape[0])
    return records


def _groups(model: Model, samples: int) -> list[list[int]]:
    groups: list[list[int]] = [[]]
    size = 0
    for site in model.sites:
        site_bytes = samples * int(np.prod(site.shape, dtype=np.int64)) * 4
        if groups[-1] and size + site_bytes > GROUP_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(site.index)
        size += site_bytes
    return groups


def _describe(value: np.ndarray) -> dict[str, float]:
    flat = value.astype(np.float64, copy=False).ravel()
    low, high = np.percentile(flat, RANGE_PERCENTILES)
    return {
        "rms": float(np.sqrt(np.mean(flat**2))),
        "mean": float(flat.mean()),
        "std": float(flat.std()),
        "min": float(flat.min()),
        "max": float(flat.max()),
        "range_low": float(low),
        "range_high": float(high),
        "range": float(high - low),
    }


def reference_scales(statistics: Sequence[dict[str, float]], reference: str) -> dict[int, float]:
    """Return each site's σ scale for a reference: 1 for absolute, else its RMS or range.

    A site whose statistic is 0 (a dead activation) gets scale 1, so relative σ there acts
    as absolute σ rather than vanishing.
    """
    if reference == "absolute":
        return {index: 1.0 for index in range(len(statistics))}
    key = "rms" if reference == "rms" else "range"
    return {index: (record[key] if record[key] > 0 else 1.0) for index, record in enumerate(statistics)}
