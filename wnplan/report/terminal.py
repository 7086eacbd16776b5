"""A text bar chart of µ per site for terminals (`wnplan report --terminal`); needs no matplotlib."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from wnplan.errors import SettingsError
from wnplan.report.sources import MODES, global_curves, midpoint_text, sigma_label, site_curves

_EIGHTHS = " ▏▎▍▌▋▊▉"
_MODE_TAGS = {"inference": "I", "trained": "T"}
_VALUE_WIDTH = 17
_MIN_WIDTH = 50


def terminal_chart(profile: Mapping[str, Any], width: int = 80) -> str:
    """Return µ per site as text bars on a log scale, `width` columns wide at most.

    Bars end in ▶ for a lower bound (robust site) and ◀ for an upper bound (sensitive site).
    Sites without a midpoint show `no µ` with their status. With trained results, each site has
    one row per mode, tagged I (inference-only) and T (noise-aware trained).

    Raises:
        SettingsError: `width` is below 50 columns.
    """
    if width < _MIN_WIDTH:
        raise SettingsError(f"invalid chart width {width}: expected at least {_MIN_WIDTH} columns")
    rows = _rows(profile)
    if not rows:
        return "no site or global midpoints in this profile"
    both = len({mode for _, mode, _ in rows}) > 1
    name_width = max(8, min(24, max(len(label) for label, _, _ in rows)))
    bar_width = width - name_width - (2 if both else 0) - _VALUE_WIDTH - 2
    low, high = _scale(rows)

    lines = [f"midpoint µ, log scale: {sigma_label(profile['noise'])}"[:width]]
    axis_left, axis_right = f"{low:.3g}", f"{high:.3g}"
    gap = max(1, bar_width - len(axis_left) - len(axis_right))
    lines.append(" " * (name_width + (2 if both else 0) + 1) + axis_left + " " * gap + axis_right)
    previous = None
    for label, mode, fit in rows:
        tag = f"{_MODE_TAGS[mode]} " if both else ""
        shown, previous = ("" if label == previous else label), label
        bar = _bar(fit, low, high, bar_width)
        value = midpoint_text(fit) if fit.get("midpoint") is not None else f"no µ ({fit['status']})"
        if fit.get("status") == "fallback":
            value = f"{value} fb"
        lines.append(f"{_fit_text(shown, name_width)} {tag}{bar:<{bar_width}} {value[:_VALUE_WIDTH]}")
    if both:
        lines.append("I: inference-only, T: noise-aware trained")
    lines.append("▶ µ is a lower bound (robust), ◀ an upper bound (sensitive), fb: interpolated")
    return "\n".join(line.rstrip() for line in lines)


def _rows(profile: Mapping[str, Any]) -> list[tuple[str, str, Mapping[str, Any]]]:
    rows = []
    for site in profile["sites"]:
        curves = site_curves(profile, site)
        for mode in MODES:
            if mode in curves:
                rows.append((f"{site['index']} {site['name']}", mode, curves[mode]["fit"]))
    for mode, curve in global_curves(profile).items():
        rows.append(("global", mode, curve["fit"]))
    return rows


def _scale(rows) -> tuple[float, float]:
    """Return the log axis ends: a bit below the smallest µ, and the largest µ."""
    values = [fit["midpoint"] for _, _, fit in rows if fit.get("midpoint")]
    if not values:
        return 0.1, 10.0
    high = max(values)
    low = min(values) / 10**0.15
    if high / low < 10:
        low = high / 10
    return low, high


def _bar(fit: Mapping[str, Any], low: float, high: float, width: int) -> str:
    midpoint = fit.get("midpoint")
    if not midpoint:
        return ""
    marker = ""
    if fit.get("lower_bound"):
        marker = "▶"
    elif fit.get("upper_bound"):
        marker = "◀"
    room = width - len(marker)
    fraction = (math.log10(midpoint) - math.log10(low)) / (math.log10(high) - math.log10(low))
    eighths = max(1, round(min(max(fraction, 0.0), 1.0) * room * 8))
    full, rest = divmod(eighths, 8)
    return "█" * full + (_EIGHTHS[rest] if rest else "") + marker


def _fit_text(text: str, width: int) -> str:
    return text.ljust(width) if len(text) <= width else text[: width - 1] + "…"
