"""Plan and check figures: executions per site against the uniform baseline, and measured accuracies."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from wnplan.allocation import uniform_counts
from wnplan.report.figures import CHANCE_STYLE, MARKERS, RenderedFigure, new_figure, save_figure, site_label

CHECK_ORDER = ("plan", "uniform", "paper", "clean")


def uniform_executions(plan: Mapping[str, Any], check: Mapping[str, Any] | None = None) -> list[int]:
    """Return the uniform baseline's executions per plan site, shielded sites at 0.

    The check's measured uniform allocation is used when it lists one count per plan site.
    Otherwise the budget is spread evenly over the unshielded sites, as `wnplan check` does.
    """
    sites = plan["sites"]
    measured = ((check or {}).get("results", {}).get("uniform") or {}).get("executions")
    if measured is not None and len(measured) == len(sites):
        return [int(count) for count in measured]
    active = [position for position, site in enumerate(sites) if not site["shield"]]
    counts = [0] * len(sites)
    if active:
        for position, count in zip(active, uniform_counts(len(active), plan["budget"]), strict=True):
            counts[position] = count
    return counts


def executions_figure(plan: Mapping[str, Any], check: Mapping[str, Any] | None, out_dir: Path) -> RenderedFigure:
    """Draw executions per site, uniform and plan side by side, with bit hints and shields."""
    sites = plan["sites"]
    positions = np.arange(len(sites))
    planned = [0 if site["shield"] else site["executions"] for site in sites]
    uniform = uniform_executions(plan, check)

    figure = new_figure(max(6.5, 0.55 * len(sites) + 3.0), 4.8)
    ax = figure.add_subplot()
    width = 0.38
    ax.bar(positions - width / 2, uniform, width, facecolor="white", edgecolor="0.2", hatch="..",
           label="uniform baseline")
    ax.bar(positions + width / 2, planned, width, facecolor="0.55", edgecolor="0.1", hatch="//",
           label=f"plan ({plan['method']})")
    top = max([*planned, *uniform, 1])
    for position, site, count in zip(positions, sites, planned, strict=True):
        if site["shield"]:
            ax.axvspan(position - 0.45, position + 0.45, facecolor="none", edgecolor="0.5", hatch="xx", linewidth=0)
            ax.text(position, top * 0.5, "shielded", rotation=90, ha="center", va="center", fontsize=8,
                    bbox={"facecolor": "white", "edgecolor": "0.5", "pad": 1.5})
            continue
        bits = (site.get("bits") or {}).get("bits")
        if bits is not None:
            ax.text(position + width / 2, count + top * 0.02, f"{bits}b", ha="center", va="bottom", fontsize=7)

    ax.set_xticks(positions, [site_label(site) for site in sites], rotation=45, ha="right", fontsize=8)
    ax.set_xlim(-0.7, len(sites) - 0.3)
    ax.set_ylim(0, top * 1.18)
    ax.set_xlabel("site (index and name)")
    ax.set_ylabel("executions n (noise σ divided by √n)", fontsize=9)
    predicted = plan.get("predicted_accuracy")
    subtitle = f", predicted accuracy {predicted:.3f}" if predicted is not None else ""
    ax.set_title(f"Executions per site, budget {plan['budget']}{subtitle}", fontsize=10)
    ax.grid(True, axis="y", color="0.88", linewidth=0.6)
    ax.legend(loc="upper left", fontsize=8)
    caption = "Executions per site, plan and uniform baseline. Labels over the plan bars are bit-width hints."
    return save_figure(figure, out_dir, "plan-executions", "Plan: executions per site", caption)


def check_figure(check: Mapping[str, Any], chance: float | None, out_dir: Path) -> RenderedFigure:
    """Draw each allocation's measured accuracy with its confidence interval."""
    results = check["results"]
    names = [name for name in CHECK_ORDER if name in results] + sorted(set(results) - set(CHECK_ORDER))
    confidence = check["settings"]["confidence"]

    figure = new_figure(6.4, 0.55 * len(names) + 1.9)
    ax = figure.add_subplot()
    for row, name in enumerate(names):
        result = results[name]
        accuracy = result["accuracy"]
        errors = [[max(accuracy - result["ci_low"], 0.0)], [max(result["ci_high"] - accuracy, 0.0)]]
        ax.errorbar([accuracy], [row], xerr=errors, marker=MARKERS[row % len(MARKERS)], color="0.15",
                    markersize=7, capsize=4, linestyle="none")
        ax.annotate(f"{accuracy:.3f} [{result['ci_low']:.3f}, {result['ci_high']:.3f}]", (accuracy, row),
                    xytext=(0, 9), textcoords="offset points", ha="center", fontsize=7)
        predicted = result.get("predicted_accuracy")
        if predicted is not None:
            ax.plot([predicted], [row], marker="D", markersize=6, markerfacecolor="white", color="0.35",
                    linestyle="none", label="predicted by the plan")
    if chance is not None:
        ax.axvline(chance, label="chance", **CHANCE_STYLE)

    ax.set_yticks(range(len(names)), names)
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.set_xlabel(f"accuracy (fraction), {confidence:.0%} interval")
    sigma = check["settings"].get("sigma")
    at = f"σ = {sigma:.3g}" if sigma is not None else "the accelerator's noise"
    ax.set_title(f"Check at {at}, {check['settings']['repeats']} draws", fontsize=10)
    ax.grid(True, axis="x", color="0.88", linewidth=0.6)
    if ax.get_legend_handles_labels()[0]:
        figure.legend(loc="outside lower center", ncols=2, fontsize=8)
    caption = f"Simulated accuracy of each allocation with its {confidence:.0%} interval over noise draws."
    return save_figure(figure, out_dir, "check", "Check: simulated accuracy", caption)
