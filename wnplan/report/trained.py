"""Trained-mode figures: weight magnitudes, activation histograms, self-binarization, preserved accuracy.

They draw the per-model extras (`records`) that noise-aware training attaches to curve points,
and are skipped when a profile has none.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from wnplan.report.extras import Histogram, last_binarization, last_histograms, preserved_accuracy, weights_by_sigma
from wnplan.report.figures import (
    LINESTYLES,
    MARKERS,
    MODE_STYLES,
    RenderedFigure,
    new_figure,
    panel_grid,
    plain_log_labels,
    save_figure,
    short_name,
    site_label,
    thin_log_ticks,
)
from wnplan.report.sources import MODE_LABELS, MODES, curve_data, sigma_label, site_curves


def trained_entries(profile: Mapping[str, Any]) -> list[tuple[dict[str, Any], Any]]:
    """Return (site, trained curve data) for every site with a trained curve."""
    entries = []
    for site in profile["sites"]:
        curve = site_curves(profile, site).get("trained")
        if curve:
            entries.append((site, curve_data(curve)))
    return entries


def weights_figure(profile: Mapping[str, Any], out_dir: Path) -> RenderedFigure | None:
    """Draw mean |w| per layer against the training σ, one panel per noisy site."""
    panels = [(site, *weights_by_sigma(data)) for site, data in trained_entries(profile)]
    panels = [(site, sigmas, layers) for site, sigmas, layers in panels if layers and np.any(sigmas > 0)]
    if not panels:
        return None

    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = panel_grid(rows, columns, (3.0, 2.0))
    names = sorted({name for _, _, layers in panels for name in layers})
    for ax, (site, sigmas, layers) in zip(axes.flat, panels, strict=False):
        positive = sigmas > 0
        for rank, name in enumerate(names):
            if name in layers:
                ax.plot(sigmas[positive], layers[name][positive], marker=MARKERS[rank % len(MARKERS)],
                        linestyle=LINESTYLES[rank % len(LINESTYLES)], color=f"{0.1 + 0.5 * (rank % 3) / 2:.2f}",
                        markersize=4, label=short_name(name, 22))
        ax.set_xscale("log")
        ax.set_yscale("log")
        thin_log_ticks(ax.xaxis)
        plain_log_labels(ax.yaxis)
        ax.set_title(f"noise at {site_label(site)}", fontsize=8)
        ax.tick_params(labelsize=7, which="both")
        ax.grid(True, color="0.9", linewidth=0.5)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)

    figure.supxlabel(f"training {sigma_label(profile['noise'])}", fontsize=9)
    figure.supylabel("mean |w| per layer", fontsize=9)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="upper center", ncols=min(len(labels), 4), fontsize=7, frameon=False)
    caption = "Mean weight magnitude per layer after noise-aware training with noise at one site, against that σ."
    return save_figure(figure, out_dir, "trained-weights", "Trained: weight magnitude per layer", caption)


def histograms_figure(profile: Mapping[str, Any], out_dir: Path) -> RenderedFigure | None:
    """Draw activation histograms at each noisy site, on linear and on log axes."""
    panels = [(site, found) for site, data in trained_entries(profile) if (found := last_histograms(data))]
    if not panels:
        return None

    figure, axes = panel_grid(len(panels), 2, (3.4, 1.4), sharey=False, gap_y=0.8)
    for (linear, logarithmic), (site, (sigma, histograms)) in zip(axes, panels, strict=True):
        title = f"{site_label(site)}, σ = {sigma:.3g}"
        # Values with noise can be orders of magnitude wider than without, which would squeeze
        # the clusters of the trained network into one bin, so linear bins show the first only.
        _draw_histograms(linear, histograms[:1], log_axes=False)
        shown = f"{histograms[0].label}, " if len(histograms) > 1 else ""
        linear.set_title(f"{title}: {shown}linear bins", fontsize=8)
        _draw_histograms(logarithmic, histograms, log_axes=True)
        logarithmic.set_title(f"{title}: log bins", fontsize=8)
        if len(histograms) > 1:
            logarithmic.legend(fontsize=6, loc="upper right")
    figure.supylabel("count", fontsize=9)
    caption = "Activations at each noisy site after noise-aware training, at the largest σ. "
    caption += "Two clusters, one near zero and one large, indicate self-binarization."
    return save_figure(figure, out_dir, "trained-histograms", "Trained: activation histograms", caption)


def binarization_figure(profile: Mapping[str, Any], out_dir: Path) -> RenderedFigure | None:
    """Draw the self-binarization test per site: reference, 2-level and 3-level accuracy."""
    rows = [(site, found) for site, data in trained_entries(profile) if (found := last_binarization(data))]
    if not rows:
        return None
    figure = new_figure(max(6.5, 0.5 * len(rows) + 3.5), 4.4)
    ax = figure.add_subplot()
    series = (("reference", "reference (not quantized)", "o"), ("accuracy_2_levels", "2 levels", "^"),
              ("accuracy_3_levels", "3 levels", "s"))
    for offset, (key, label, marker) in zip((-0.2, 0.0, 0.2), series, strict=True):
        values = [test[key] for _, (_, test) in rows]
        ax.plot(np.arange(len(rows)) + offset, values, marker=marker, linestyle="none", color="0.15",
                markerfacecolor="white" if key != "reference" else "0.15", markersize=6, label=label)
    for position, (_, (_, test)) in enumerate(rows):
        if test["binarizes"]:
            ax.axvspan(position - 0.45, position + 0.45, facecolor="0.9", edgecolor="0.6", hatch="..", linewidth=0)
    ax.axhline(profile["chance"], color="0.45", linestyle="-.", linewidth=1.0, label="chance")
    ax.set_xticks(range(len(rows)), [site_label(site) for site, _ in rows], rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy (fraction)")
    ax.set_title("Self-binarization test at the largest σ (shaded: binarizes)", fontsize=10)
    figure.legend(loc="outside right upper", fontsize=8)
    caption = "Accuracy with the site's activations quantized to 2 or 3 levels, next to the unquantized reference. "
    caption += "A site binarizes when quantizing barely changes the accuracy."
    return save_figure(figure, out_dir, "trained-binarization", "Trained: self-binarization", caption)


def preserved_figure(profile: Mapping[str, Any], out_dir: Path) -> RenderedFigure | None:
    """Draw preserved relative accuracy per site, inference-only and trained side by side."""
    clean = profile["clean"]["accuracy"]
    sites = [site for site in profile["sites"] if "trained" in site_curves(profile, site)]
    if not sites:
        return None
    modes = [mode for mode in MODES if any(mode in site_curves(profile, site) for site in sites)]
    width = 0.8 / len(modes)
    figure = new_figure(max(6.5, 0.5 * len(sites) + 3.5), 4.4)
    ax = figure.add_subplot()
    for rank, mode in enumerate(modes):
        values = []
        for site in sites:
            curve = site_curves(profile, site).get(mode)
            value = preserved_accuracy(curve_data(curve), clean) if curve else None
            values.append(np.nan if value is None else value)
        positions = np.arange(len(sites)) + (rank - (len(modes) - 1) / 2) * width
        style = MODE_STYLES[mode]
        ax.bar(positions, values, width, facecolor="white" if rank == 0 else "0.6", edgecolor=style["color"],
               hatch=style["hatch"], label=MODE_LABELS[mode])
    ax.axhline(1.0, color="0.3", linestyle=":", linewidth=1.0, label="all accuracy preserved")
    # A site at chance both with and without noise also "preserves" its accuracy, so the
    # chance ratio shows which bars mean nothing.
    ax.axhline(profile["chance"] / clean, color="0.45", linestyle="-.", linewidth=1.0, label="chance ÷ clean accuracy")
    ax.set_xticks(range(len(sites)), [site_label(site) for site in sites], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("accuracy at the largest σ\n÷ accuracy at σ = 0", fontsize=9)
    ax.set_title("Preserved relative accuracy per site", fontsize=10)
    figure.legend(loc="outside right upper", fontsize=8)
    caption = "Accuracy at the largest σ tried divided by the accuracy without noise (σ = 0, or the clean accuracy)."
    return save_figure(figure, out_dir, "trained-preserved", "Trained: preserved relative accuracy", caption)


def _draw_histograms(ax, histograms: list[Histogram], log_axes: bool) -> None:
    """Draw the first histogram filled and any further one (values with noise) as an outline."""
    drawn = []
    for rank, histogram in enumerate(histograms):
        edges, counts = (histogram.log_edges, histogram.log_counts) if log_axes else (histogram.edges, histogram.counts)
        if not edges or not counts or len(edges) != len(counts) + 1:
            continue
        edges, counts = np.asarray(edges, dtype=float), np.asarray(counts, dtype=float)
        if rank == 0:
            style = {"fill": True, "facecolor": "0.78", "edgecolor": "0.35", "hatch": "//"}
        else:
            style = {"fill": False, "edgecolor": "black", "linewidth": 1.3}
        ax.stairs(counts, edges, label=histogram.label, **style)
        drawn.append((edges, counts))
    ax.tick_params(labelsize=7, which="both")
    if not drawn:
        ax.text(0.5, 0.5, "no histogram recorded", transform=ax.transAxes, ha="center", va="center", fontsize=8)
        return
    if not log_axes:
        ax.set_xlabel("activation value", fontsize=7)
        return

    # Log bins are drawn on a log x axis, trimmed to the bins that hold values, when their edges
    # are positive magnitudes. Edges ≤ 0 are taken to be log10 values already.
    all_edges = np.concatenate([edges for edges, _ in drawn])
    if np.all(all_edges > 0):
        ax.set_xscale("log")
        thin_log_ticks(ax.xaxis)
        occupied = [_occupied_range(edges, counts) for edges, counts in drawn if np.any(counts > 0)]
        if occupied:
            ax.set_xlim(min(low for low, _ in occupied) / 2, max(high for _, high in occupied) * 2)
        ax.set_xlabel("activation magnitude |x| (log axis)", fontsize=7)
    else:
        ax.set_xlabel("log10 of the activation magnitude", fontsize=7)
    if any(np.any(counts > 0) for _, counts in drawn):
        ax.set_yscale("log")
        plain_log_labels(ax.yaxis)
    zeros = [f"{histogram.zero} {histogram.label}" for histogram in histograms if histogram.zero]
    if zeros:
        ax.text(0.02, 0.95, "at 0: " + ", ".join(zeros), transform=ax.transAxes, ha="left", va="top", fontsize=6)


def _occupied_range(edges: np.ndarray, counts: np.ndarray) -> tuple[float, float]:
    """Return the lowest and the highest edge of the bins that hold values."""
    filled = np.flatnonzero(counts)
    return float(edges[filled[0]]), float(edges[filled[-1] + 1])
