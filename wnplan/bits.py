"""Bit-width hints from additive walking-noise curves.

Uniform quantization with step Δ adds an error of standard deviation Δ/√12 to values
spread over many levels, which acts like additive noise. A site that tolerates additive
noise σ_tol therefore tolerates Δ ≤ √12·σ_tol. With 2^b levels over the activation range,
the step is range/(2^b − 1), so b = ⌈log2(range/Δ + 1)⌉ bits are enough.

σ_tol is where the site's fitted additive curve has lost its share of the accepted drop:
the whole model's `max_drop` divided by the number of sites. It is not µ, which is where half
the accuracy is gone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from wnplan.fit import FitResult, predict_accuracy, sigma_at_accuracy

SQRT12 = math.sqrt(12.0)


def bit_hint(
    fit_record: dict[str, Any],
    allowed_drop: float,
    scale: float,
    value_range: float,
    widths: Sequence[int],
) -> dict[str, Any]:
    """Return the bit-width hint of one site, with the numbers behind it.

    Args:
        fit_record: the site's walking fit (profile JSON) under additive or mixed noise.
        allowed_drop: the accuracy this site may lose from its fitted clean level
            (a fraction, e.g. 0.01 / sites).
        scale: converts the profile's σ to absolute units (the site's RMS or range for
            relative σ, 1 for absolute σ).
        value_range: the site's clean activation range (robust percentiles), absolute units.
        widths: the bit widths on offer, ascending.

    Returns:
        A record with `bits` (None when no offered width is enough), `sigma_tolerance`
        (absolute), `step_limit`, `range`, `bits_needed` and `reason`.
    """
    fit = FitResult.from_dict(fit_record)
    tolerance, note = _tolerance(fit, allowed_drop)
    record: dict[str, Any] = {"range": value_range, "allowed_drop": allowed_drop}
    if tolerance is None:
        return record | {
            "bits": None,
            "sigma_tolerance": None,
            "step_limit": None,
            "bits_needed": None,
            "reason": "the fitted curve gives no σ within the allowed drop, so no width can be derived",
        }

    sigma_tolerance = tolerance * scale
    step_limit = SQRT12 * sigma_tolerance
    if value_range <= 0:
        needed = 1
    else:
        needed = max(1, math.ceil(math.log2(value_range / step_limit + 1.0)))
    offered = [width for width in widths if width >= needed]
    record |= {"sigma_tolerance": sigma_tolerance, "step_limit": step_limit, "bits_needed": needed}
    if not offered:
        return record | {
            "bits": None,
            "reason": f"needs {needed} bits, more than the widest offered ({max(widths)}); "
            + "keep this site wide or shield it",
        }
    return record | {
        "bits": offered[0],
        "reason": f"step {value_range / (2 ** offered[0] - 1):.3g} ≤ √12·σ_tol = {step_limit:.3g}{note}",
    }


def _tolerance(fit: FitResult, allowed_drop: float) -> tuple[float | None, str]:
    """Return the σ at which the fitted curve has lost `allowed_drop`, and a note.

    A robust site never loses that much within the σ measured, so its largest measured σ is
    used, which is a conservative (lower) tolerance.
    """
    if fit.status == "failed":
        return None, ""
    target = predict_accuracy(fit, 0.0) - allowed_drop
    sigma = sigma_at_accuracy(fit, max(0.0, target))
    if sigma is None and fit.lower_bound and fit.midpoint is not None:
        return fit.midpoint, " (robust site: σ_tol taken at the largest σ measured)"
    if sigma is None or sigma <= 0:
        return None, ""
    return sigma, ""
