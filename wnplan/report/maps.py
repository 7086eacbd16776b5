"""Mixed-noise maps: accuracy over σ_mul × σ_add for one site, noise order and mode."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import patheffects
from matplotlib.lines import Line2D

from wnplan.errors import FileFormatError
from wnplan.report.figures import RenderedFigure, new_figure, save_figure, short_name
from wnplan.report.sources import MODE_LABELS, additive_units, check_map

# Each accuracy level keeps its line style in every map. The σ_add = σ_mul diagonal is dotted.
CONTOUR_STYLES = {0.2: "-", 0.4: "--", 0.6: "-.", 0.8: (0, (8, 3))}
# White lines with a black outline stay visible on both ends of the colour map.
OUTLINE = [patheffects.withStroke(linewidth=2.4, foreground="black")]
ORDER_LABELS = {"mul-first": "multiplicative first", "add-first": "additive first"}


def map_stem(grid: Mapping[str, Any]) -> str:
    """Return the file stem of a map, such as `map-site03-mul-first-inference`."""
    return f"map-site{grid['site']:02d}-{grid['order']}-{grid['mode']}"


def map_figure(profile: Mapping[str, Any], grid: Mapping[str, Any], out_dir: Path) -> RenderedFigure:
    """Draw one map as a heatmap on log axes, with accuracy contours and the measured points.

    Rows or columns at σ = 0 cannot sit on a log axis and are left out of the drawing.

    Raises:
        FileFormatError: the accuracy grid does not have one row per σ_mul and one column per σ_add.
    """
    sigma_mul, sigma_add, accuracy = _positive_grid(grid)
    figure = new_figure(6.2, 5.6)
    ax = figure.add_subplot()
    mesh = ax.pcolormesh(_log_edges(sigma_add), _log_edges(sigma_mul), accuracy, cmap="viridis", vmin=0.0,
                         vmax=1.0, shading="flat")
    colorbar = figure.colorbar(mesh, ax=ax)
    colorbar.set_label("accuracy (fraction)")

    handles = []
    if len(sigma_mul) >= 2 and len(sigma_add) >= 2:
        levels = [level for level in CONTOUR_STYLES if accuracy.min() < level < accuracy.max()]
        if levels:
            lines = ax.contour(sigma_add, sigma_mul, accuracy, levels=levels, colors="white",
                               linestyles=[CONTOUR_STYLES[level] for level in levels], linewidths=1.2)
            lines.set_path_effects(OUTLINE)
            ax.clabel(lines, fmt="%.1f", fontsize=7)
            handles = [Line2D([], [], color="white", linestyle=CONTOUR_STYLES[level], linewidth=1.2,
                              path_effects=OUTLINE, label=f"accuracy {level:.1f}") for level in levels]
    add_points, mul_points = np.meshgrid(sigma_add, sigma_mul)
    ax.plot(add_points.ravel(), mul_points.ravel(), linestyle="none", marker="o", markersize=2.5,
            markerfacecolor="black", markeredgecolor="white", markeredgewidth=0.4, label="measured")
    low, high = max(sigma_add[0], sigma_mul[0]), min(sigma_add[-1], sigma_mul[-1])
    if low < high:
        ax.plot([low, high], [low, high], color="0.85", linestyle=":", linewidth=1.0, label="σ_add = σ_mul")

    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"σ_add ({additive_units(profile['noise'])})", fontsize=9)
    ax.set_ylabel("σ_mul (relative to each value)", fontsize=9)
    order, mode = ORDER_LABELS[grid["order"]], MODE_LABELS[grid["mode"]]
    title = f"site {grid['site']} {short_name(grid['name'])}: {order}, {mode}"
    ax.set_title(title, fontsize=9)
    figure.legend(handles=[*ax.get_legend_handles_labels()[0], *handles], loc="outside lower center", ncols=3,
                  fontsize=7, facecolor="0.75")
    caption = f"Accuracy under mixed noise at site {grid['site']}, {order}, {mode}; "
    caption += f"{grid['repeats']} repeats on {grid['samples']} samples per point."
    return save_figure(figure, out_dir, map_stem(grid), f"Mixed-noise map: {title}", caption)


def _positive_grid(grid: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    check_map(grid)
    sigma_mul = np.asarray(grid["sigma_mul"], dtype=float)
    sigma_add = np.asarray(grid["sigma_add"], dtype=float)
    accuracy = np.asarray(grid["accuracy"], dtype=float)
    rows, columns = np.argsort(sigma_mul), np.argsort(sigma_add)
    sigma_mul, sigma_add, accuracy = sigma_mul[rows], sigma_add[columns], accuracy[np.ix_(rows, columns)]
    keep_rows, keep_columns = sigma_mul > 0, sigma_add > 0
    if not keep_rows.any() or not keep_columns.any():
        raise FileFormatError(
            f"the map of site {grid['site']} has no σ_mul > 0 or no σ_add > 0, so it cannot be drawn on log "
            + "axes; profile the map with positive σ values"
        )
    return sigma_mul[keep_rows], sigma_add[keep_columns], accuracy[np.ix_(keep_rows, keep_columns)]


def _log_edges(values: np.ndarray) -> np.ndarray:
    """Return cell edges half-way between values in log10, one half-step beyond each end."""
    logs = np.log10(values)
    if len(logs) == 1:
        return 10.0 ** np.array([logs[0] - 0.25, logs[0] + 0.25])
    middles = (logs[:-1] + logs[1:]) / 2
    first, last = logs[0] - (middles[0] - logs[0]), logs[-1] + (logs[-1] - middles[-1])
    return 10.0 ** np.concatenate([[first], middles, [last]])
