"""Read the files a report draws from, and pull curves, midpoints and trained-mode extras out of them.

A report starts from a profile, a plan or a check file. A plan names its profile, and a check
names its plan, so the report follows those links (relative paths are tried from the working
directory, then from the folder of the file that names them).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wnplan import records
from wnplan.errors import FileFormatError, SettingsError
from wnplan.simulate import locate, read_plan_profile

MODES = ("inference", "trained")
MODE_LABELS = {"inference": "inference-only", "trained": "noise-aware trained"}
_ADDITIVE_UNITS = {
    "absolute": "absolute, activation units",
    "rms": "relative to each site's clean RMS",
    "range": "relative to each site's clean range",
}


@dataclass(frozen=True)
class ReportSources:
    """The records one report draws from; `plan` and `check` are None when not given."""

    profile: dict[str, Any]
    plan: dict[str, Any] | None = None
    check: dict[str, Any] | None = None
    source_kind: str = "profile"


@dataclass(frozen=True)
class CurveData:
    """Measured points of one accuracy-versus-σ curve, sorted by σ, with its fit record."""

    sigma: np.ndarray
    accuracy: np.ndarray
    stderr: np.ndarray
    fit: dict[str, Any]
    points: tuple[dict[str, Any], ...]


def load_sources(source: str | Path | Mapping[str, Any]) -> ReportSources:
    """Read a profile, plan or check (a path or a record) and the files it names.

    Raises:
        FileFormatError: a file is missing, invalid, or of an unknown kind.
        SettingsError: a plan or check names no file, or a named file changed since.
    """
    record, path = _read_any(source)
    kind = record["kind"]
    if kind == "profile":
        sources = ReportSources(profile=record, source_kind=kind)
    elif kind == "plan":
        profile, _ = read_plan_profile(record, path)
        sources = ReportSources(profile=profile, plan=record, source_kind=kind)
    else:
        plan, plan_path = _read_check_plan(record, path)
        profile, _ = read_plan_profile(plan, plan_path)
        sources = ReportSources(profile=profile, plan=plan, check=record, source_kind=kind)

    # The schema cannot tie a map's grid to its axes, so a bad map is found here, before any drawing.
    for grid in sources.profile.get("maps", []):
        check_map(grid)
    return sources


def _read_any(source: str | Path | Mapping[str, Any]) -> tuple[dict[str, Any], Path | None]:
    if isinstance(source, Mapping):
        record = dict(source)
        kind = record.get("kind")
        if kind not in records.KINDS:
            raise FileFormatError(
                f"the record has kind {kind!r}; a report needs a profile, plan or check record"
            )
        records.validate(record, kind)
        return record, None

    path = Path(source)
    try:
        kind = json.loads(path.read_text()).get("kind") if path.is_file() else None
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        kind = None
    if kind not in records.KINDS:
        if not path.is_file():
            raise FileFormatError(f"report source not found: {str(path)!r}; pass a profile, plan or check file")
        raise FileFormatError(
            f"{path} is not a wnplan profile, plan or check file (its kind is {kind!r}); pass one of those"
        )
    return records.read_record(path, kind), path


def _read_check_plan(check: Mapping[str, Any], check_path: Path | None) -> tuple[dict[str, Any], Path]:
    name = check["plan"]["path"]
    if not name:
        raise SettingsError("the check does not name the plan it measured; run `wnplan check PLAN` again")
    base = check_path.parent if check_path else Path(".")
    plan_path = locate(name, base)
    plan = records.read_record(plan_path, "plan")
    if records.record_sha256(plan) != check["plan"]["sha256"]:
        raise SettingsError(f"{plan_path} changed since the check measured it; run `wnplan check` again")
    return plan, plan_path


def check_map(grid: Mapping[str, Any]) -> None:
    """Raise FileFormatError unless a map's accuracy grid has one row per σ_mul and one column per σ_add."""
    expected = (len(grid["sigma_mul"]), len(grid["sigma_add"]))
    rows = grid["accuracy"]
    shape = (len(rows), *sorted({len(row) for row in rows})) if rows else (0, expected[1])
    if shape != expected:
        raise FileFormatError(
            f"the map of site {grid['site']} ({grid['order']}, {grid['mode']}) has an accuracy grid of shape "
            + f"{shape}, expected {expected} (rows σ_mul, columns σ_add); profile the map again"
        )


# --- curves and midpoints ---


def site_curves(profile: Mapping[str, Any], entry: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Return the curve records of a site (or of the global record) by mode, skipping absent ones.

    A profile measured only in trained mode may keep its trained curve under `walking` (or, for
    the global record, at the top level). That curve is returned as "trained".
    """
    only_trained = profile["settings"]["mode"] == "trained"
    if "walking" in entry:
        own = entry["walking"]
    else:
        own = entry if "points" in entry else None  # the global record is a curve itself
    curves: dict[str, dict[str, Any]] = {}
    if own:
        curves["trained" if only_trained and not entry.get("trained") else "inference"] = own
    if entry.get("trained"):
        curves["trained"] = entry["trained"]
    return curves


def global_curves(profile: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Return the global curve records by mode; empty when the profile has no global scope."""
    return site_curves(profile, profile["global"]) if profile.get("global") else {}


def curve_data(curve: Mapping[str, Any]) -> CurveData:
    """Return a curve record's points as arrays sorted by σ."""
    points = sorted(curve["points"], key=lambda point: point["sigma"])
    return CurveData(
        sigma=np.array([point["sigma"] for point in points], dtype=float),
        accuracy=np.array([point["accuracy"] for point in points], dtype=float),
        stderr=np.array([point["stderr"] for point in points], dtype=float),
        fit=dict(curve["fit"]),
        points=tuple(points),
    )


def midpoint_text(fit: Mapping[str, Any], digits: int = 3) -> str:
    """Format a fit's midpoint with its status: `1.23 ± 0.04`, `> 100`, `< 0.01`, `≈ 0.5`, or `—`."""
    midpoint, error = fit.get("midpoint"), fit.get("midpoint_error")
    if midpoint is None:
        return "—"
    value = f"{midpoint:.{digits}g}"
    if fit.get("lower_bound"):
        return f"> {value}"
    if fit.get("upper_bound"):
        return f"< {value}"
    prefix = "≈ " if fit.get("status") == "fallback" else ""
    return f"{prefix}{value} ± {error:.2g}" if error is not None else f"{prefix}{value}"


def sigma_label(noise: Mapping[str, Any]) -> str:
    """Return the σ axis label for a profile's noise kind and reference."""
    units = _ADDITIVE_UNITS.get(noise.get("reference", "absolute"), noise.get("reference", ""))
    kind = noise["kind"]
    if kind == "additive":
        return f"σ ({units})"
    if kind == "multiplicative":
        return "σ (multiplicative, relative to each value)"
    ratio = float(noise.get("mix_ratio", 0.5))
    return f"amplitude A (σ_add = {ratio:g}·A, {units}; σ_mul = {1 - ratio:g}·A)"


def additive_units(noise: Mapping[str, Any]) -> str:
    """Return the units of additive σ under a profile's noise reference."""
    return _ADDITIVE_UNITS.get(noise.get("reference", "absolute"), "absolute")
