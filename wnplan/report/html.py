"""The self-contained HTML page of a report: key tables and the figures as embedded PNG data.

The page loads nothing from outside: images are `data:` URIs, the style sheet is inline, and a
Content-Security-Policy forbids every other source, so a browser fetches nothing when it opens it.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from typing import Any

from wnplan.report.extras import last_binarization, preserved_accuracy
from wnplan.report.figures import DPI, RenderedFigure
from wnplan.report.plan_plots import CHECK_ORDER, uniform_executions
from wnplan.report.sources import (
    MODE_LABELS,
    MODES,
    ReportSources,
    curve_data,
    global_curves,
    midpoint_text,
    sigma_label,
    site_curves,
)
from wnplan.report.trained import trained_entries

_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 72rem; padding: 0 1rem; color: #111; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; font-size: 0.9rem; }
th, td { border: 1px solid #999; padding: 0.2rem 0.5rem; text-align: left; vertical-align: top; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1rem 0 2rem; }
figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { font-size: 0.9rem; color: #333; }
.failed { font-weight: bold; }
"""


def render_page(sources: ReportSources, figures: Sequence[RenderedFigure]) -> str:
    """Return the report page as an HTML5 document."""
    profile = sources.profile
    by_stem = {figure.stem: figure for figure in figures}
    sections = [
        _section("summary", "Summary", _summary_table(profile)),
        _section("sites", "Sites", _sites_table(profile) + _figures(by_stem, ("midpoints", "curves", "global-curve"))),
    ]
    if sources.plan is not None:
        body = _plan_summary(sources.plan) + _plan_table(sources.plan, sources.check)
        sections.append(_section("plan", "Plan", body + _figures(by_stem, ("plan-executions",))))
    if sources.check is not None:
        sections.append(_section("check", "Check", _check_table(sources.check) + _figures(by_stem, ("check",))))
    trained = [stem for stem in ("trained-preserved", "trained-binarization", "trained-weights", "trained-histograms")
               if stem in by_stem]
    if trained:
        body = _binarization_table(profile) + _figures(by_stem, trained)
        sections.append(_section("trained", "Noise-aware training", body))
    maps = [stem for stem in by_stem if stem.startswith("map-")]
    if maps:
        sections.append(_section("maps", "Mixed-noise maps", _maps_table(profile) + _figures(by_stem, maps)))

    title = f"wnplan report: {profile['model']['path']}"
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_POLICY}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)}</title>",
        f"<style>{_STYLE}</style>",
        "</head>",
        "<body>",
        "<main>",
        f"<h1>{escape(title)}</h1>",
        *sections,
        "</main>",
        "</body>",
        "</html>",
        "",
    ])


def _section(anchor: str, heading: str, body: str) -> str:
    return f'<section id="{anchor}">\n<h2>{escape(heading)}</h2>\n{body}\n</section>'


def _figures(by_stem: Mapping[str, RenderedFigure], stems: Iterable[str]) -> str:
    parts = []
    for stem in stems:
        figure = by_stem.get(stem)
        if figure is None:
            continue
        # Shown at 100 CSS pixels per inch, two thirds of the PNG's pixels, so high-density
        # screens and print get the full resolution.
        width, height = (round(size * 100 / DPI) for size in _png_size(figure.png))
        data = base64.b64encode(figure.png).decode("ascii")
        files = ", ".join(path.name for path in figure.paths)
        size = f'width="{width}" height="{height}"'
        image = f'<img src="data:image/png;base64,{data}" alt="{escape(figure.title)}" {size}>'
        caption = f"<figcaption>{escape(figure.caption)} Files: {escape(files)}.</figcaption>"
        parts.append(f'<figure id="figure-{escape(stem)}">\n{image}\n{caption}\n</figure>')
    return "\n".join(parts)


def _png_size(png: bytes) -> tuple[int, int]:
    """Return (width, height) in pixels from a PNG's IHDR chunk."""
    width, height = struct.unpack(">II", png[16:24])
    return width, height


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{escape(str(header))}</th>" for header in headers)
    body = []
    for row in rows:
        cells = []
        for cell in row:
            number = isinstance(cell, (int, float)) and not isinstance(cell, bool)
            text = _number(cell) if number else ("—" if cell is None else str(cell))
            cells.append(f'<td class="number">{escape(text)}</td>' if number else f"<td>{escape(text)}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>"


def _number(value: float | int | None, digits: int = 4) -> str:
    if value is None:
        return "—"
    return str(value) if isinstance(value, int) else f"{value:.{digits}g}"


def _summary_table(profile: Mapping[str, Any]) -> str:
    noise, settings, clean = profile["noise"], profile["settings"], profile["clean"]
    noise_text = noise["kind"]
    if noise["kind"] == "mixed":
        noise_text += f", {noise.get('order', 'mul-first')}, ratio {noise.get('mix_ratio', 0.5):g}"
    model = profile["model"]
    rows = [
        ("model", f"{model['path']} ({model['format']}, sha256 {model['sha256'][:12]}…)"),
        ("data", f"{profile['data']['name']}, {profile['data']['samples']} samples"),
        ("noise", f"{noise_text}; {sigma_label(noise)}"),
        ("mode and scope", f"{settings['mode']}, {settings['scope']}"),
        ("repeats and seed", f"{settings['repeats']} {'repeat' if settings['repeats'] == 1 else 'repeats'} per σ, "
         + f"seed {settings['seed']}"),
        ("clean accuracy", f"{clean['accuracy']:.4f} ({clean['correct']} of {clean['samples']})"),
        ("classes and chance", f"{profile['classes']} classes, chance {profile['chance']:.3g}"),
    ]
    for mode, curve in global_curves(profile).items():
        fit = curve["fit"]
        rows.append((f"global µ, {MODE_LABELS[mode]}", f"{midpoint_text(fit, 4)} ({fit['status']})"))
    return _table(("item", "value"), rows)


def _sites_table(profile: Mapping[str, Any]) -> str:
    modes = [mode for mode in MODES if any(mode in site_curves(profile, site) for site in profile["sites"])]
    trained = any(mode == "trained" for mode in modes)
    headers = ["index", "name", "op"]
    for mode in modes:
        headers += [f"µ ± s.e., {MODE_LABELS[mode]}", f"status, {MODE_LABELS[mode]}"]
        if trained:
            headers.append(f"preserved accuracy, {MODE_LABELS[mode]}")
    headers.append("notes")
    rows = []
    for site in profile["sites"]:
        curves = site_curves(profile, site)
        row: list[Any] = [site["index"], site["name"], site["op"]]
        notes = []
        for mode in modes:
            curve = curves.get(mode)
            fit = curve["fit"] if curve else None
            row += [midpoint_text(fit) if fit else "not profiled", fit["status"] if fit else None]
            if trained:
                row.append(preserved_accuracy(curve_data(curve), profile["clean"]["accuracy"]) if curve else None)
            if fit:
                notes += [f"{MODE_LABELS[mode]}: {note}" for note in _fit_notes(fit)]
        row.append("; ".join(notes))
        rows.append(row)
    return _table(headers, rows)


def _fit_notes(fit: Mapping[str, Any]) -> list[str]:
    """Return what a reader of µ needs to know beyond the status: the reason, a plateau, a second step."""
    notes = [fit["reason"]] if fit.get("reason") else []
    if fit.get("method") == "logistic-free-min":
        notes.append(f"levels off at accuracy {fit['a_min']:.3g}, above chance, so µ is half-way to that level")
    if fit.get("method") == "two-logistic" and fit.get("second_midpoint"):
        notes.append(f"falls in two steps, second µ = {fit['second_midpoint']:.3g}")
    return notes


def _plan_summary(plan: Mapping[str, Any]) -> str:
    point = plan["operating_point"]
    sigma = point.get("sigma")
    rows = [
        ("method and budget", f"{plan['method']}, budget {plan['budget']}"),
        ("executions used", str(plan["total_executions"])),
        ("operating point", f"{_number(sigma)} ({point['source']})" if sigma is not None else point["source"]),
        ("predicted accuracy", _number(plan.get("predicted_accuracy"))),
        ("shielded sites", str(plan["shielded"])),
        ("total cost", _number(plan["cost"].get("total"))),
    ]
    return _table(("item", "value"), rows)


def _plan_table(plan: Mapping[str, Any], check: Mapping[str, Any] | None) -> str:
    uniform = uniform_executions(plan, check)
    rows = []
    for site, baseline in zip(plan["sites"], uniform, strict=True):
        bits = site.get("bits") or {}
        shield = f"shielded: {site.get('shield_reason', '')}".rstrip(": ") if site["shield"] else ""
        rows.append((site["index"], site["name"], 0 if site["shield"] else site["executions"], baseline,
                     bits.get("bits"), bits.get("sigma_tolerance"), site.get("predicted_accuracy"),
                     shield, site.get("note", "")))
    headers = ("index", "name", "executions", "uniform", "bits", "σ tolerance", "predicted accuracy", "shield", "note")
    return _table(headers, rows)


def _check_table(check: Mapping[str, Any]) -> str:
    settings, results, verdict = check["settings"], check["results"], check["verdict"]
    sigma = settings.get("sigma")
    measured = f"At σ = {_number(sigma)} ({settings['sigma_source']}), {settings['repeats']} noise draws"
    measured += f" on {settings['samples']} samples."
    outcome = "passed" if verdict["passed"] else "failed"
    intro = f"<p>{escape(measured)} Verdict: <strong>{outcome}</strong>: {escape(verdict['reason'])}.</p>"
    names = [name for name in CHECK_ORDER if name in results] + sorted(set(results) - set(CHECK_ORDER))
    interval = f"{settings['confidence']:.0%} interval"
    rows = [
        (name, results[name]["accuracy"], f"[{results[name]['ci_low']:.4f}, {results[name]['ci_high']:.4f}]",
         results[name]["repeats"], results[name].get("predicted_accuracy"))
        for name in names
    ]
    return intro + "\n" + _table(("allocation", "accuracy", interval, "draws", "predicted"), rows)


def _binarization_table(profile: Mapping[str, Any]) -> str:
    rows = []
    for site, data in trained_entries(profile):
        found = last_binarization(data)
        if found:
            sigma, test = found
            rows.append((site["index"], site["name"], sigma, test["reference"], test["accuracy_2_levels"],
                         test["accuracy_3_levels"], "yes" if test["binarizes"] else "no"))
    if not rows:
        return ""
    headers = ("index", "name", "σ", "reference accuracy", "2 levels", "3 levels", "binarizes")
    return "<h3>Self-binarization test</h3>\n" + _table(headers, rows)


def _maps_table(profile: Mapping[str, Any]) -> str:
    rows = []
    for grid in profile.get("maps", []):
        values = [value for row in grid["accuracy"] for value in row]
        rows.append((grid["site"], grid["name"], grid["order"], MODE_LABELS[grid["mode"]],
                     f"{len(grid['sigma_mul'])} × {len(grid['sigma_add'])}", min(values, default=None),
                     max(values, default=None)))
    headers = ("site", "name", "order", "mode", "σ_mul × σ_add points", "lowest accuracy", "highest accuracy")
    return _table(headers, rows)
