"""Reports: figures (PNG and SVG) and a self-contained HTML page for a profile, plan or check.

    from wnplan.report import load_sources, terminal_chart, write_report
    paths = write_report("wnplan-check.json", "report")       # figures and report/report.html
    print(terminal_chart(load_sources("wnplan-plan.json").profile))

Figures need matplotlib (3.8 or newer); `terminal_chart` does not. docs/reports.md explains
every figure.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from wnplan.errors import SettingsError
from wnplan.report.sources import ReportSources, load_sources
from wnplan.report.terminal import terminal_chart

logger = logging.getLogger(__name__)

PAGE_NAME = "report.html"
MATPLOTLIB_MINIMUM = (3, 8)

__all__ = ["PAGE_NAME", "ReportSources", "load_sources", "terminal_chart", "write_report"]


def write_report(source: str | Path | dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write the figures of a profile, plan or check, and `report.html`, into `out_dir`.

    A plan's report also shows its profile, and a check's report its plan and profile, read
    from the paths these files record (relative paths are also tried from the folder of the
    file that records them).

    Args:
        source: a profile, plan or check, as a file path or as a record.
        out_dir: the folder to write into; created if missing. Existing files of the same
            names are replaced.

    Returns:
        The paths written: each figure's PNG and SVG, then the HTML page.

    Raises:
        FileFormatError: a file is missing or invalid.
        SettingsError: matplotlib is missing or too old, the folder cannot be created, or a
            linked file changed since the file that names it was written.
    """
    sources = load_sources(source)
    _require_matplotlib()
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SettingsError(f"cannot create the report folder {str(out)!r} ({error}); pass a writable folder") from None

    figures = _draw_figures(sources, out)

    from wnplan.report.figures import write_atomic
    from wnplan.report.html import render_page

    page = write_atomic(out / PAGE_NAME, render_page(sources, figures).encode("utf-8"))
    logger.info("wrote report %s with %d figures", page, len(figures))
    return [path for figure in figures for path in figure.paths] + [page]


def _draw_figures(sources: ReportSources, out: Path) -> list:
    from wnplan.report import maps, plan_plots, plots, trained

    profile = sources.profile
    drawn = [
        plots.midpoints_figure(profile, out),
        plots.curves_figure(profile, out),
        plots.global_figure(profile, out),
    ]
    if sources.plan is not None:
        drawn.append(plan_plots.executions_figure(sources.plan, sources.check, out))
    if sources.check is not None:
        drawn.append(plan_plots.check_figure(sources.check, profile["chance"], out))
    drawn += [
        trained.preserved_figure(profile, out),
        trained.binarization_figure(profile, out),
        trained.weights_figure(profile, out),
        trained.histograms_figure(profile, out),
    ]
    drawn += [maps.map_figure(profile, grid, out) for grid in profile.get("maps", [])]
    return [figure for figure in drawn if figure is not None]


def _require_matplotlib() -> None:
    hint = "install it with `pip install 'wnplan[report]'` (or `pip install 'matplotlib>=3.8'`)"
    try:
        import matplotlib
    except ImportError:
        raise SettingsError(f"writing report figures needs matplotlib, which is not installed; {hint}") from None
    version = tuple(int(part) for part in matplotlib.__version__.split(".")[:2] if part.isdigit())
    if version < MATPLOTLIB_MINIMUM:
        raise SettingsError(f"writing report figures needs matplotlib ≥ 3.8, found {matplotlib.__version__}; {hint}")
