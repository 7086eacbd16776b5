"""Profile figures: midpoints per site, and accuracy-versus-σ curves with their fits."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.lines import Line2D

from wnplan.fit import FitResult, predict_accuracy
from wnplan.report.figures import (
    CHANCE_STYLE,
    MODE_STYLES,
    RenderedFigure,
    new_figure,
    panel_grid,
    plain_log_labels,
    save_figure,
    site_label,
    thin_log_ticks,
)
from wnplan.report.sources import (
    MODE_LABELS,
    MODES,
    curve_data,
    global_curves,
    midpoint_text,
    sigma_label,
    site_curves,
)

STATUS_LABELS = {
    "ok": "fitted µ ± s.e.",
    "fallback": "interpolated µ (fallback)",
    "robust": "robust: µ above σ_max (↑)",
    "sensitive": "sensitive: µ below σ_min (↓)",
    "failed": "failed: no µ",
}


_ARROW_FACTOR = 1.5  # a bound's arrow spans this multiple of µ, about 0.4 decades on the log axis


def midpoints_figure(profile: Mapping[str, Any], out_dir: Path) -> RenderedFigure | None:
    """Draw µ per site on a log axis, inference-only and trained side by side, with global µ."""
    sites = [site for site in profile["sites"] if site_curves(profile, site)]
    if not sites:
        return None
    modes = [mode for mode in MODES if any(mode in site_curves(profile, site) for site in sites)]
    offsets = {mode: (rank - (len(modes) - 1) / 2) * 0.28 for rank, mode in enumerate(modes)}

    figure = new_figure(max(6.5, 0.5 * len(sites) + 4.5), 4.8)
    ax = figure.add_subplot()
    labelled: set[str] = set()
    for position, site in enumerate(sites):
        for mode, curve in site_curves(profile, site).items():
            _draw_midpoint(ax, position + offsets[mode], curve["fit"], mode, labelled)
    for mode, curve in global_curves(profile).items():
        fit = curve["fit"]
        if fit.get("midpoint"):
            ax.axhline(fit["midpoint"], color=MODE_STYLES[mode]["color"], linestyle=MODE_STYLES[mode]["linestyle"],
                       linewidth=1.0, label=f"global µ, {MODE_LABELS[mode]}: {midpoint_text(fit)}")

    ax.set_yscale("log")
    plain_log_labels(ax.yaxis)
    if not ax.has_data():
        ax.set_ylim(1e-2, 1e2)
    ax.set_xticks(range(len(sites)), [site_label(site) for site in sites], rotation=45, ha="right", fontsize=8)
    ax.set_xlim(-0.7, len(sites) - 0.3)
    ax.set_xlabel("site (index and name)")
    ax.set_ylabel(textwrap.fill(f"midpoint µ: {sigma_label(profile['noise'])}", 48), fontsize=9)
    ax.grid(True, axis="y", which="major", color="0.85", linewidth=0.6)
    ax.set_title("Midpoint noise level µ per site (larger is more robust)", fontsize=10)
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda position: _legend_rank(labels[position]))
    figure.legend([handles[i] for i in order], [labels[i] for i in order], loc="outside right upper", fontsize=8)
    caption = "µ per site with its standard error; arrows mark bounds, crosses mark sites without a midpoint."
    return save_figure(figure, out_dir, "midpoints", "Midpoints per site", caption)


def curves_figure(profile: Mapping[str, Any], out_dir: Path) -> RenderedFigure | None:
    """Draw every site's accuracy-versus-σ curve in one grid of small panels."""
    sites = [site for site in profile["sites"] if site_curves(profile, site)]
    if not sites:
        return None
    columns = min(4, len(sites))
    rows = math.ceil(len(sites) / columns)
    figure, axes = panel_grid(rows, columns, (2.9, 2.0))
    modes: set[str] = set()
    for ax, site in zip(axes.flat, sites, strict=False):
        for mode, curve in site_curves(profile, site).items():
            draw_curve(ax, curve, mode)
            modes.add(mode)
        _decorate_curve_axes(ax, profile["chance"])
        ax.set_title(site_label(site), fontsize=8)
    for ax in axes.flat[len(sites):]:
        ax.set_visible(False)

    figure.supxlabel(sigma_label(profile["noise"]), fontsize=9)
    figure.supylabel("accuracy (fraction)", fontsize=9)
    handles = curve_legend_handles([mode for mode in MODES if mode in modes])
    figure.legend(handles=handles, loc="upper center", ncols=min(len(handles), 4), fontsize=8, frameon=False)
    caption = "Accuracy versus σ per site (walking noise): measured means ± s.e., the fitted logistic, µ and chance."
    return save_figure(figure, out_dir, "curves", "Accuracy versus σ per site", caption)


def global_figure(profile: Mapping[str, Any], out_dir: Path) -> RenderedFigure | None:
    """Draw the global-noise curve (the same σ at every covered site) with its fit."""
    curves = global_curves(profile)
    if not curves:
        return None
    figure = new_figure(6.4, 4.4)
    ax = figure.add_subplot()
    for mode, curve in curves.items():
        draw_curve(ax, curve, mode)
    _decorate_curve_axes(ax, profile["chance"])
    ax.set_xlabel(sigma_label(profile["noise"]), fontsize=9)
    ax.set_ylabel("accuracy (fraction)")
    covered = len(profile["global"].get("sites", []))
    ax.set_title(f"Global noise on {covered} sites at once", fontsize=10)
    ax.legend(handles=curve_legend_handles(list(curves)), loc="lower left", fontsize=8)
    caption = "Accuracy when every covered site gets the same σ; its µ is the default operating point of `check`."
    return save_figure(figure, out_dir, "global-curve", "Global noise", caption)


def draw_curve(ax: Axes, curve: Mapping[str, Any], mode: str) -> None:
    """Draw measured points ± s.e., the fitted curve on a dense log grid, and µ, in `mode`'s style."""
    style = MODE_STYLES[mode]
    data = curve_data(curve)
    positive = data.sigma > 0
    if not np.any(positive):
        return
    sigma = data.sigma[positive]
    ax.errorbar(sigma, data.accuracy[positive], yerr=data.stderr[positive], color=style["color"],
                marker=style["marker"], markersize=3.5, linestyle="none", capsize=2, elinewidth=0.8)
    fit = data.fit
    if fit["status"] != "failed":
        grid = np.geomspace(sigma[0] / 2, sigma[-1] * 2, 240)
        fitted = predict_accuracy(FitResult.from_dict(fit), grid)
        ax.plot(grid, fitted, color=style["color"], linestyle=style["linestyle"], linewidth=1.2)
    midpoint = fit.get("midpoint")
    if midpoint:
        ax.axvline(midpoint, color=style["color"], linestyle=":", linewidth=1.0)
        level = (fit["a_max"] + fit["a_min"]) / 2
        if fit.get("lower_bound") or fit.get("upper_bound"):
            end = midpoint * (3.0 if fit.get("lower_bound") else 1 / 3.0)
            ax.annotate("", xy=(end, level), xytext=(midpoint, level),
                        arrowprops={"arrowstyle": "->", "color": style["color"]})
        else:
            ax.plot([midpoint], [level], marker="|", markersize=10, color=style["color"])
    ax.set_xscale("log")


def curve_legend_handles(modes: list[str]) -> list[Line2D]:
    """Return legend entries for the curve styles of `modes`, µ, and chance."""
    handles = []
    for mode in modes:
        style = MODE_STYLES[mode]
        handles.append(Line2D([], [], color=style["color"], marker=style["marker"], linestyle=style["linestyle"],
                              markersize=4, label=f"{MODE_LABELS[mode]}: measured ± s.e. and fit"))
    handles.append(Line2D([], [], color="0.2", linestyle=":", marker="|", markersize=8, label="µ (arrow: bound)"))
    handles.append(Line2D([], [], label="chance", **CHANCE_STYLE))
    return handles


def _decorate_curve_axes(ax: Axes, chance: float) -> None:
    ax.axhline(chance, **CHANCE_STYLE)
    ax.set_ylim(0.0, 1.02)
    ax.set_xscale("log")
    thin_log_ticks(ax.xaxis)
    ax.grid(True, which="major", color="0.9", linewidth=0.5)
    ax.tick_params(labelsize=7)


def _legend_rank(label: str) -> tuple[int, int, str]:
    """Sort legend entries: global lines, then inference-only before trained, then by status."""
    if label.startswith("global"):
        return (0, 0, label)
    mode = 0 if label.startswith(MODE_LABELS["inference"]) else 1
    statuses = [*STATUS_LABELS.values(), "second µ"]
    status = next((rank for rank, text in enumerate(statuses) if text in label), len(statuses))
    return (1 + mode, status, label)


def _draw_midpoint(ax: Axes, x: float, fit: Mapping[str, Any], mode: str, labelled: set[str]) -> None:
    """Draw one µ: a point with error bar, an arrow for a bound, or a cross when there is none."""
    style = MODE_STYLES[mode]
    status = fit["status"]
    key = f"{mode}:{status}"
    label = f"{MODE_LABELS[mode]}, {STATUS_LABELS.get(status, status)}" if key not in labelled else None
    labelled.add(key)
    common = {"color": style["color"], "marker": style["marker"], "markersize": 6, "linestyle": "none", "label": label}
    midpoint, error = fit.get("midpoint"), fit.get("midpoint_error")

    if midpoint is None:
        ax.plot([x], [0.04], transform=ax.get_xaxis_transform(), **{**common, "marker": "x", "markersize": 8})
        ax.text(x, 0.08, "no µ", transform=ax.get_xaxis_transform(), rotation=90, fontsize=7, ha="center",
                va="bottom", color=style["color"])
        return
    if fit.get("lower_bound"):
        ax.errorbar([x], [midpoint], yerr=[[0.0], [midpoint * _ARROW_FACTOR]], lolims=True, capsize=4, **common)
        return
    if fit.get("upper_bound"):
        ax.errorbar([x], [midpoint], yerr=[[midpoint * (1 - 1 / (1 + _ARROW_FACTOR))], [0.0]], uplims=True,
                    capsize=4, **common)
        return
    error = error or 0.0
    hollow = {"markerfacecolor": "white"} if status == "fallback" else {}
    ax.errorbar([x], [midpoint], yerr=[[min(error, 0.9 * midpoint)], [error]], capsize=3, **common, **hollow)
    second = fit.get("second_midpoint")
    if second:
        second_key = f"{mode}:second"
        second_label = None if second_key in labelled else f"{MODE_LABELS[mode]}, second µ (two steps)"
        ax.plot([x], [second], color=style["color"], marker="D", markersize=4, markerfacecolor="white",
                linestyle="none", label=second_label)
        labelled.add(second_key)
