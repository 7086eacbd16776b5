"""Accelerator profiles: the noise, costs and bit widths of a noisy analog accelerator.

An accelerator profile is a TOML file of plain data (nothing in it is ever executed):

    name = "additive-generic"
    description = "..."
    source = "..."

    [noise]
    kind = "additive"        # additive | multiplicative | mixed
    order = "mul-first"      # mul-first | add-first; required for mixed, optional otherwise
    sigma_add = 0.4          # additive σ, in the unit set by `reference`; default 0
    sigma_mul = 0.0          # multiplicative σ, relative to x by definition; default 0
    reference = "rms"        # absolute | rms | range

    [cost]
    execution = 1.0          # cost of one execution of one site
    shielded = 4.0           # cost of running one site on the precise digital unit

    [bits]
    widths = [2, 3, 4, 6, 8] # activation bit widths the hardware offers

The σ values are the noise of one execution. Averaging n executions of a site divides both
σ by √n. wnplan ships a few generic profiles as package data (`wnplan.accelerators`, built
from the repository's `profiles/` folder); `load_accelerator` also reads any user file.
"""

from __future__ import annotations

import itertools
import logging
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from wnplan.errors import FileFormatError, SettingsError
from wnplan.noise import NOISE_KINDS, NOISE_ORDERS, REFERENCES, NoiseSpec, SiteNoise

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

logger = logging.getLogger(__name__)

SHIPPED_PACKAGE = "wnplan.accelerators"
PROFILE_SUFFIX = ".toml"
MAX_BIT_WIDTH = 32

# The keys each table of a profile may hold, and which of them are required.
TOP_KEYS = {
    "name": True,
    "description": True,
    "source": True,
    "noise": True,
    "cost": True,
    "bits": True,
}
NOISE_KEYS = {
    "kind": True,
    "order": False,
    "sigma_add": False,
    "sigma_mul": False,
    "reference": True,
}
COST_KEYS = {"execution": True, "shielded": True}
BITS_KEYS = {"widths": True}
TABLES = ("noise", "cost", "bits")

# What each free-text field should say, for the message when it is empty.
TEXT_HINTS = {
    "name": "how the profile is called (for a shipped profile, its file name without .toml)",
    "description": "what the profile models",
    "source": "where its numbers come from",
}


@dataclass(frozen=True)
class Accelerator:
    """A noisy analog accelerator, as described by an accelerator profile.

    Attributes:
        name: the profile's name. A shipped profile's name is its file name without `.toml`.
        description: what the profile models.
        source: where its numbers come from.
        kind: noise kind, "additive", "multiplicative" or "mixed".
        order: for mixed noise, "mul-first" or "add-first"; None when the file gives none.
        sigma_add: additive σ of one execution, in the unit set by `reference`.
        sigma_mul: multiplicative σ of one execution (relative to x by definition).
        reference: "absolute" σ_add, or σ_add relative to each site's clean "rms" or "range".
        execution_cost: cost of one execution of one site, in the profile's own cost unit.
        shielded_cost: cost of running one site on the precise digital unit, same unit.
        bit_widths: the activation bit widths the hardware offers, ascending.
        path: the file the profile was read from ("" when built in code).
        shipped: True for a profile shipped with wnplan.

    Raises:
        SettingsError: a value is out of range, or the σ values do not fit the noise kind.
            The message names the profile field (for example `noise.sigma_add`).
    """

    name: str
    description: str
    source: str
    kind: str
    order: str | None
    sigma_add: float
    sigma_mul: float
    reference: str
    execution_cost: float
    shielded_cost: float
    bit_widths: tuple[int, ...]
    path: str = ""
    shipped: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "bit_widths", tuple(self.bit_widths))
        _check_text(self)
        _check_noise(self)
        _check_costs(self)
        _check_bit_widths(self.bit_widths)

    @property
    def sigma(self) -> float:
        """σ on the one-axis scale of `noise_spec()`: the mixed amplitude A = σ_add + σ_mul."""
        return self.sigma_add + self.sigma_mul

    def noise_spec(self) -> NoiseSpec:
        """Return the noise model of this accelerator for the sweep and simulation code.

        For mixed noise the ratio is r = σ_add / (σ_add + σ_mul), so that
        `noise_spec().components(sigma)` returns (σ_add, σ_mul) up to rounding.
        """
        mix_ratio = self.sigma_add / self.sigma if self.kind == "mixed" else 0.5
        return NoiseSpec(
            kind=self.kind,
            order=self.order or NOISE_ORDERS[0],
            mix_ratio=mix_ratio,
            reference=self.reference,
        )

    def site_levels(self, scale: float = 1.0, executions: int = 1) -> SiteNoise:
        """Return the absolute noise at one site that is executed and averaged n times.

        Args:
            scale: the site's clean statistic named by `reference` (its RMS or range, see
                `wnplan.calibrate.reference_scales`); 1 for an absolute reference. Only σ_add
                is multiplied by it, because multiplicative noise is already relative to x.
            executions: n ≥ 1, the number of executions averaged. Both σ are divided by √n.

        Raises:
            SettingsError: `scale` is negative or not finite, or `executions` is below 1.
        """
        if not isinstance(scale, int | float) or isinstance(scale, bool) or not math.isfinite(scale) or scale < 0:
            raise SettingsError(
                f"invalid site scale {scale!r}: expected a finite number ≥ 0 "
                + "(the site's RMS or range, or 1 for an absolute reference)"
            )
        if not isinstance(executions, int) or isinstance(executions, bool) or executions < 1:
            raise SettingsError(f"invalid executions {executions!r}: expected an integer ≥ 1")

        root = math.sqrt(executions)
        return SiteNoise(
            sigma_add=self.sigma_add * scale / root,
            sigma_mul=self.sigma_mul / root,
            add_first=self.kind == "mixed" and self.order == "add-first",
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON record of this accelerator, as plans store it.

        The record has the file's layout. A shipped profile records no path, so that plans do
        not depend on where wnplan is installed.
        """
        noise: dict[str, Any] = {
            "kind": self.kind,
            "sigma_add": self.sigma_add,
            "sigma_mul": self.sigma_mul,
            "reference": self.reference,
        }
        if self.order is not None:
            noise["order"] = self.order
        return {
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "shipped": self.shipped,
            "path": None if self.shipped else self.path,
            "noise": noise,
            "cost": {"execution": self.execution_cost, "shielded": self.shielded_cost},
            "bits": {"widths": list(self.bit_widths)},
        }

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Accelerator:
        """Rebuild an accelerator from its `to_dict()` record, for example from a plan.

        Raises:
            FileFormatError: the record is incomplete or has invalid values.
        """
        try:
            document = {key: record[key] for key in TOP_KEYS}
        except KeyError as error:
            raise FileFormatError(f"accelerator record: missing field {error.args[0]!r}") from None
        path = record.get("path") or ""
        return _parse(document, where="accelerator record", path=path, shipped=bool(record.get("shipped")))


def list_accelerators() -> list[Accelerator]:
    """Return the accelerator profiles shipped with wnplan, sorted by name.

    Raises:
        FileFormatError: a shipped profile is invalid (a packaging fault).
    """
    return [_load_shipped(name) for name in shipped_names()]


def shipped_names() -> list[str]:
    """Return the names of the shipped accelerator profiles, sorted."""
    folder = resources.files(SHIPPED_PACKAGE)
    return sorted(
        entry.name[: -len(PROFILE_SUFFIX)]
        for entry in folder.iterdir()
        if entry.is_file() and entry.name.endswith(PROFILE_SUFFIX)
    )


def load_accelerator(name_or_path: str | Path) -> Accelerator:
    """Load an accelerator profile by shipped name or from a TOML file.

    A value is read as a path when it ends in `.toml`, contains a path separator, or names an
    existing file. Otherwise it is the name of a shipped profile.

    Raises:
        SettingsError: the value is not a path and no shipped profile has that name.
        FileFormatError: the file is missing, unreadable, not valid TOML, or not a valid
            profile. The message names the file and the field.
    """
    text = str(name_or_path)
    if _looks_like_path(text):
        return load_accelerator_file(Path(text))

    names = shipped_names()
    if text not in names:
        raise SettingsError(
            f"unknown accelerator {text!r}: expected one of {', '.join(names)}, "
            + f"or the path of a {PROFILE_SUFFIX} file"
        )
    return _load_shipped(text)


def load_accelerator_file(path: str | Path) -> Accelerator:
    """Load an accelerator profile from a TOML file.

    Raises:
        FileFormatError: the file is missing, unreadable, not valid TOML, or not a valid
            profile. The message names the file and the field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(
            f"accelerator profile not found: {str(path)!r}; give an existing {PROFILE_SUFFIX} "
            + "file or the name of a shipped profile (`wnplan profiles` lists them)"
        )
    try:
        content = path.read_bytes()
    except OSError as error:
        raise FileFormatError(f"{path}: cannot read the accelerator profile: {error.strerror}") from None
    return _parse_toml(content, str(path), shipped=False)


def _looks_like_path(text: str) -> bool:
    separators = {"/", "\\"}
    has_separator = any(separator in text for separator in separators)
    return text.endswith(PROFILE_SUFFIX) or has_separator or Path(text).is_file()


def _load_shipped(name: str) -> Accelerator:
    resource = resources.files(SHIPPED_PACKAGE) / f"{name}{PROFILE_SUFFIX}"
    logger.debug("loading shipped accelerator profile %s from %s", name, resource)
    return _parse_toml(resource.read_bytes(), str(resource), shipped=True)


def _parse_toml(content: bytes, path: str, shipped: bool) -> Accelerator:
    """Decode a profile file and parse it. `path` names the file in error messages."""
    try:
        document = tomllib.loads(content.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise FileFormatError(f"{path}: not UTF-8 text (byte {error.start}); save the profile as UTF-8") from None
    except tomllib.TOMLDecodeError as error:
        # tomllib's message ends with "(at line L, column C)".
        message = " ".join(str(error).split())
        raise FileFormatError(f"{path}: invalid TOML: {message}") from None
    return _parse(document, where=path, path=path, shipped=shipped)


def _parse(document: Mapping[str, Any], where: str, path: str, shipped: bool) -> Accelerator:
    """Check the fields' presence and types, then build the accelerator (which checks values).

    `where` prefixes every error message: the file path, or "accelerator record".
    """
    _check_keys(document, TOP_KEYS, "", where)
    noise = _table(document, "noise", NOISE_KEYS, where)
    cost = _table(document, "cost", COST_KEYS, where)
    bits = _table(document, "bits", BITS_KEYS, where)

    try:
        return Accelerator(
            name=_string(document, "name", where),
            description=_string(document, "description", where),
            source=_string(document, "source", where),
            kind=_string(noise, "noise.kind", where),
            order=_string(noise, "noise.order", where) if "order" in noise else None,
            sigma_add=_number(noise, "noise.sigma_add", where, default=0.0),
            sigma_mul=_number(noise, "noise.sigma_mul", where, default=0.0),
            reference=_string(noise, "noise.reference", where),
            execution_cost=_number(cost, "cost.execution", where),
            shielded_cost=_number(cost, "cost.shielded", where),
            bit_widths=_integers(bits, "bits.widths", where),
            path=path,
            shipped=shipped,
        )
    except SettingsError as error:
        raise FileFormatError(f"{where}: {error}") from None


def _check_keys(table: Mapping[str, Any], keys: Mapping[str, bool], prefix: str, where: str) -> None:
    """Reject unknown keys (usually typos) and missing required ones."""
    section = f"the [{prefix.rstrip('.')}] table" if prefix else "the top level"
    for key in table:
        if key not in keys:
            raise FileFormatError(
                f"{where}: unknown field {prefix + key!r}; {section} allows only "
                + f"{', '.join(keys)} (check the spelling)"
            )
    for key, required in keys.items():
        if required and key not in table:
            fix = f"add a [{key}] table" if key in TABLES else f"add it to {section}"
            raise FileFormatError(f"{where}: missing field {prefix + key!r}; {fix}")


def _table(document: Mapping[str, Any], name: str, keys: Mapping[str, bool], where: str) -> Mapping[str, Any]:
    table = document[name]
    if not isinstance(table, dict):
        raise FileFormatError(
            f"{where}: field {name!r} must be a table (a [{name}] section), got {_type_name(table)} {table!r}"
        )
    _check_keys(table, keys, f"{name}.", where)
    return table


def _string(table: Mapping[str, Any], field: str, where: str) -> str:
    value = table[field.rpartition(".")[2]]
    if not isinstance(value, str):
        raise FileFormatError(f"{where}: field {field!r} must be a string, got {_type_name(value)} {value!r}")
    return value


def _number(table: Mapping[str, Any], field: str, where: str, default: float | None = None) -> float:
    key = field.rpartition(".")[2]
    if key not in table and default is not None:
        return default
    value = table[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FileFormatError(f"{where}: field {field!r} must be a number, got {_type_name(value)} {value!r}")
    return float(value)


def _integers(table: Mapping[str, Any], field: str, where: str) -> tuple[int, ...]:
    value = table[field.rpartition(".")[2]]
    if not isinstance(value, list) or any(isinstance(item, bool) or not isinstance(item, int) for item in value):
        raise FileFormatError(
            f"{where}: field {field!r} must be an array of integers, got {_type_name(value)} {value!r}"
        )
    return tuple(value)


def _type_name(value: Any) -> str:
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
    }
    return names.get(type(value), f"a {type(value).__name__}")


def _check_text(accelerator: Accelerator) -> None:
    for field in ("name", "description", "source"):
        if not getattr(accelerator, field).strip():
            raise SettingsError(f"field {field!r} is empty: write {TEXT_HINTS[field]}")


def _check_noise(accelerator: Accelerator) -> None:
    """Check the noise kind, order and reference, and that the σ values fit the kind."""
    _check_choice("noise.kind", accelerator.kind, NOISE_KINDS)
    if accelerator.order is not None:
        _check_choice("noise.order", accelerator.order, NOISE_ORDERS)
    _check_choice("noise.reference", accelerator.reference, REFERENCES)
    for field, sigma in (
        ("noise.sigma_add", accelerator.sigma_add),
        ("noise.sigma_mul", accelerator.sigma_mul),
    ):
        if not math.isfinite(sigma) or sigma < 0:
            raise SettingsError(f"field {field!r} is {sigma!r}: expected a finite σ ≥ 0")

    kind = accelerator.kind
    if kind in ("additive", "mixed") and accelerator.sigma_add == 0:
        raise SettingsError(f"field 'noise.sigma_add' is 0 but noise.kind is {kind!r}: set sigma_add > 0")
    if kind in ("multiplicative", "mixed") and accelerator.sigma_mul == 0:
        raise SettingsError(f"field 'noise.sigma_mul' is 0 but noise.kind is {kind!r}: set sigma_mul > 0")
    if kind == "additive" and accelerator.sigma_mul != 0:
        raise SettingsError(
            f"field 'noise.sigma_mul' is {accelerator.sigma_mul!r} but noise.kind is 'additive': "
            + "set sigma_mul = 0, or kind = 'mixed' with an order"
        )
    if kind == "multiplicative" and accelerator.sigma_add != 0:
        raise SettingsError(
            f"field 'noise.sigma_add' is {accelerator.sigma_add!r} "
            + "but noise.kind is 'multiplicative': set sigma_add = 0, "
            + "or kind = 'mixed' with an order"
        )
    if kind == "mixed" and accelerator.order is None:
        raise SettingsError(
            f"field 'noise.order' is missing but noise.kind is 'mixed': set it to one of {', '.join(NOISE_ORDERS)}"
        )


def _check_choice(field: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SettingsError(f"field {field!r} is {value!r}: expected one of {', '.join(choices)}")


def _check_costs(accelerator: Accelerator) -> None:
    for field, cost in (
        ("cost.execution", accelerator.execution_cost),
        ("cost.shielded", accelerator.shielded_cost),
    ):
        if not math.isfinite(cost) or cost <= 0:
            raise SettingsError(f"field {field!r} is {cost!r}: expected a finite cost > 0")


def _check_bit_widths(widths: tuple[int, ...]) -> None:
    if not widths:
        raise SettingsError("field 'bits.widths' is empty: list at least one bit width, for example [4, 8]")
    for width in widths:
        if not 1 <= width <= MAX_BIT_WIDTH:
            raise SettingsError(f"field 'bits.widths' contains {width}: expected widths from 1 to {MAX_BIT_WIDTH}")
    if any(later <= earlier for earlier, later in itertools.pairwise(widths)):
        raise SettingsError(
            f"field 'bits.widths' is {list(widths)}: expected unique widths in ascending order, "
            + f"for example {sorted(set(widths))}"
        )
