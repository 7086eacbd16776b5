"""Shared figure machinery: styles that survive black-and-white print, and atomic PNG/SVG output.

Figures are `matplotlib.figure.Figure` objects rendered by the Agg canvas directly, so writing a
report never selects a pyplot backend or changes matplotlib's global state.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from matplotlib.axis import Axis
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter, LogLocator

logger = logging.getLogger(__name__)

DPI = 150
# Each mode differs in marker, line style and fill as well as colour, so print in grey keeps them apart.
MODE_STYLES = {
    "inference": {"color": "#1f4e79", "marker": "o", "linestyle": "-", "hatch": "//"},
    "trained": {"color": "#b35806", "marker": "s", "linestyle": "--", "hatch": ".."},
}
CHANCE_STYLE = {"color": "0.45", "linestyle": "-.", "linewidth": 1.0}
CLEAN_STYLE = {"color": "0.3", "linestyle": ":", "linewidth": 1.0}
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">")
LINESTYLES = ("-", "--", "-.", ":")


@dataclass(frozen=True)
class RenderedFigure:
    """One figure as written: its file stem, title and caption, PNG bytes, and the paths written."""

    stem: str
    title: str
    caption: str
    png: bytes
    paths: tuple[Path, ...]


def new_figure(width: float, height: float) -> Figure:
    """Return an empty figure of `width` × `height` inches with constrained layout."""
    return Figure(figsize=(width, height), layout="constrained")


def panel_grid(rows: int, columns: int, panel: tuple[float, float], sharey: bool = True, gap_y: float = 0.55):
    """Return a figure and a `rows` × `columns` array of axes, each `panel` inches, with fixed margins.

    `gap_y` is the vertical gap between panels in inches, room for a title and tick labels.

    Fixed margins fit the small-multiple grids (one-line titles, small tick labels) and avoid
    constrained layout, which takes seconds on a grid of log axes.
    """
    left, right, bottom, top = 0.85, 0.2, 0.75, 0.75
    gap_x = 0.25 if sharey else 0.7  # panels with their own y axis need room for its labels
    width = left + right + columns * panel[0] + (columns - 1) * gap_x
    height = bottom + top + rows * panel[1] + (rows - 1) * gap_y
    figure = Figure(figsize=(width, height))
    axes = figure.subplots(rows, columns, sharey=sharey, squeeze=False, gridspec_kw={
        "left": left / width, "right": 1 - right / width, "bottom": bottom / height, "top": 1 - top / height,
        "wspace": gap_x / panel[0], "hspace": gap_y / panel[1],
    })
    return figure, axes


def save_figure(figure: Figure, out_dir: Path, stem: str, title: str, caption: str) -> RenderedFigure:
    """Write `figure` as `stem.png` and `stem.svg` in `out_dir`, each atomically.

    PNG and SVG carry no software or date stamp, so the PNG of the same input is byte-identical.
    """
    png = _render(figure, "png", {"Software": None})
    # The PNG draw has placed every axes already, so the SVG keeps that layout instead of
    # solving it again (constrained layout is the slowest part of drawing a grid of panels).
    figure.set_layout_engine("none")
    svg = _render(figure, "svg", {"Date": None})
    paths = (write_atomic(out_dir / f"{stem}.png", png), write_atomic(out_dir / f"{stem}.svg", svg))
    logger.info("wrote figure %s", paths[0])
    return RenderedFigure(stem, title, caption, png, paths)


def thin_log_ticks(axis: Axis) -> None:
    """Put minor ticks of a log axis at 2 and 5 times each decade only, which draws much faster."""
    axis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))


class PlainLogFormatter(LogFormatter):
    """Label the ticks that `LogFormatter` labels, as plain numbers (`0.6`, `4`, `1e+06`)."""

    def __call__(self, x: float, pos: int | None = None) -> str:
        return f"{x:g}" if super().__call__(x, pos) else ""


def plain_log_labels(axis: Axis) -> None:
    """Label a log axis with plain numbers, which read better than 4×10⁰ over a decade or two."""
    axis.set_major_formatter(PlainLogFormatter())
    axis.set_minor_formatter(PlainLogFormatter())


def short_name(name: str, limit: int = 30) -> str:
    """Shorten a site name to `limit` characters, keeping its start and end."""
    if len(name) <= limit:
        return name
    head = (limit - 1) // 2
    return f"{name[:head]}…{name[-(limit - 1 - head):]}"


def site_label(site: dict) -> str:
    """Return a tick label such as `3 relu1`."""
    return f"{site['index']} {short_name(site['name'])}"


def _render(figure: Figure, file_format: str, metadata: dict[str, None]) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format=file_format, dpi=DPI, metadata=metadata)
    return buffer.getvalue()


def write_atomic(path: Path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file and a rename, so a killed write leaves no partial file."""
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path
