"""Reading and writing profile, plan and check files.

Every file is validated against its JSON Schema (shipped in `wnplan/schemas/`) on write and
on read, because accelerator toolchains consume them. Files are written with sorted keys,
without NaN, atomically (a temporary file in the same folder, then a rename), so a killed
write leaves the old file or none.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema

from wnplan.errors import FileFormatError, SettingsError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
KINDS = ("profile", "plan", "check")
DEFAULT_PATHS = {
    "profile": Path("wnplan-profile.json"),
    "plan": Path("wnplan-plan.json"),
    "check": Path("wnplan-check.json"),
}


@cache
def load_schema(kind: str) -> dict[str, Any]:
    """Return the JSON Schema of a file kind ("profile", "plan" or "check")."""
    text = resources.files("wnplan").joinpath("schemas", f"{kind}.schema.json").read_text()
    return json.loads(text)


def validate(record: dict[str, Any], kind: str, source: str = "") -> None:
    """Raise FileFormatError naming the first invalid field of a record."""
    validator = jsonschema.Draft202012Validator(load_schema(kind))
    where = f"{source}: " if source else ""
    try:
        error = jsonschema.exceptions.best_match(validator.iter_errors(record))
    except RecursionError:
        problem = "values are nested too deeply; regenerate it with wnplan"
        raise FileFormatError(f"{where}invalid {kind} file: {problem}") from None
    if error is None:
        return
    location = "/".join(str(part) for part in error.absolute_path) or "(top level)"
    raise FileFormatError(
        f"{where}invalid {kind} file: field {location}: {error.message}; regenerate it with " +
        "wnplan or fix that field"
    )


def dumps(record: dict[str, Any]) -> str:
    """Return canonical JSON: sorted keys, two-space indent, no NaN or infinity."""
    try:
        return json.dumps(record, sort_keys=True, indent=2, allow_nan=False) + "\n"
    except ValueError:
        where = _non_finite_path(record)
        raise FileFormatError(
            f"field {where} is a non-finite number (NaN or infinity); wnplan writes only finite numbers"
        ) from None


def record_sha256(record: dict[str, Any]) -> str:
    """Return the sha256 of a record's canonical JSON, which names it in later files."""
    return hashlib.sha256(dumps(record).encode()).hexdigest()


def check_output_path(path: str | Path, option: str = "--out") -> Path:
    """Return the path if a file can be written there, else raise SettingsError.

    Commands call this before their work, so that a bad path fails at once and not after
    minutes of computing. Missing folders are fine when the nearest existing one is writable;
    `write_record` creates them.
    """
    text = str(path)
    if not text.strip():
        raise SettingsError(f"invalid {option} {text!r}: expected a file path such as result.json")
    path = Path(path)
    if path.is_dir():
        raise SettingsError(
            f"invalid {option} {text!r}: it is a folder; name a file inside it, such as {text}/result.json"
        )
    ancestor = path.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not _can_create_file(ancestor):
        raise SettingsError(
            f"invalid {option} {text!r}: cannot write into {str(ancestor)!r}; choose a path in a writable folder"
        )
    return path


def _can_create_file(folder: Path) -> bool:
    """Return whether a file can be created in the folder, by creating and removing one.

    Permission bits alone are not enough, because root passes every access check and some
    file systems (/proc, read-only mounts) reject new files whatever the bits are.
    """
    try:
        descriptor, probe = tempfile.mkstemp(prefix=".wnplan-probe.", dir=folder)
    except OSError:
        return False
    os.close(descriptor)
    Path(probe).unlink(missing_ok=True)
    return True


def write_record(record: dict[str, Any], kind: str, path: str | Path) -> Path:
    """Validate a record and write it atomically; return the path written.

    Raises:
        SettingsError: the file or its folder cannot be written (one line, with the OS reason).
    """
    validate(record, kind)
    path = check_output_path(path)
    try:
        return _write_text(dumps(record), kind, path)
    except OSError as error:
        raise SettingsError(f"cannot write {str(path)!r}: {error.strerror or error}; choose another --out") from None


def _write_text(text: str, kind: str, path: Path) -> Path:
    folder = path.parent if str(path.parent) else Path(".")
    folder.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    try:
        # mkstemp creates the file readable by its owner only; use the usual umask instead.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(descriptor, 0o666 & ~umask)
        with os.fdopen(descriptor, "w") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _sync_folder(folder)
    logger.info("wrote %s %s", kind, path)
    return path


def _sync_folder(folder: Path) -> None:
    """Flush the folder entry of a renamed file to disk, so the rename survives a power loss.

    Platforms that cannot open a folder (Windows) skip this step.
    """
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError as error:
        logger.debug("cannot sync folder %s: %s", folder, error)
    finally:
        os.close(descriptor)


def read_record(path: str | Path, kind: str) -> dict[str, Any]:
    """Read and validate a profile, plan or check file.

    Raises:
        FileFormatError: the file is missing, not JSON, or does not match its schema.
    """
    path = Path(path)
    if not path.is_file():
        hint = f"; run `wnplan {'profile' if kind == 'profile' else 'allocate' if kind == 'plan' else 'check'}` first"
        raise FileFormatError(f"{kind} file not found: {str(path)!r}{hint}")
    try:
        record = json.loads(path.read_text(), parse_constant=_reject_constant, parse_float=_finite_float)
    except (OSError, UnicodeDecodeError) as error:
        raise FileFormatError(f"{path}: cannot read the {kind} file ({error})") from None
    except ValueError as error:
        raise FileFormatError(f"{path}: not valid JSON ({error})") from None
    except RecursionError:
        raise FileFormatError(f"{path}: not a {kind} file (values nested too deeply)") from None
    if not isinstance(record, dict):
        raise FileFormatError(f"{path}: a {kind} file must contain a JSON object")
    if record.get("kind") != kind:
        kind_found = record.get("kind")
        found = f"a {kind_found} file" if isinstance(kind_found, str) else "not a wnplan file (no kind field)"
        raise FileFormatError(f"{path}: this is {found}, but a {kind} file is needed")
    validate(record, kind, str(path))
    return record


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} overflows to infinity, which is not allowed")
    return value


def _non_finite_path(value: Any, path: str = "") -> str | None:
    """Return the path of the first NaN or infinite number in a record, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return path or "(top level)"
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _non_finite_path(item, f"{path}/{key}" if path else str(key))
        if found is not None:
            return found
    return None
