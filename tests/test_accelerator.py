"""Tests for accelerator profiles (wnplan.accelerator): loading, validation, noise levels.

Malformed profiles are built by editing the text of one valid profile, so each case changes
exactly one thing. The statistical check draws 10^6 values with a fixed seed. The standard error
of their standard deviation is then about σ/1400, so the 1 % tolerance is about 14 standard
errors wide. With the fixed seed the check is also deterministic.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from wnplan.accelerator import (
    Accelerator,
    list_accelerators,
    load_accelerator,
    load_accelerator_file,
    shipped_names,
)
from wnplan.errors import FileFormatError, SettingsError
from wnplan.noise import NOISE_KINDS, SiteNoise, draw_noise, site_noise

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

REPOSITORY = Path(__file__).resolve().parents[1]
PROFILES_FOLDER = REPOSITORY / "profiles"
SHIPPED = (
    "additive-generic",
    "additive-low-noise",
    "mixed-add-first",
    "mixed-mul-first",
    "multiplicative-generic",
)

VALID = """\
name = "test-mixed"
description = "A profile for tests."
source = "Made up for tests."

[noise]
kind = "mixed"
order = "add-first"
sigma_add = 0.2
sigma_mul = 0.3
reference = "rms"

[cost]
execution = 1.0
shielded = 5.0

[bits]
widths = [2, 4, 8]
"""

STATISTICS_SHAPE = (1000, 1000)  # 10^6 draws
RELATIVE_TOLERANCE = 0.01  # of σ, for the standard deviation of 10^6 draws
SEED = 1234


# The [noise] table of VALID. The "noise-not-table" case replaces it with `noise = 3`.
NOISE_TABLE = VALID[VALID.index("[noise]") : VALID.index("[cost]")]


def write_profile(folder: Path, text: str, name: str = "profile.toml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def edited(old: str, new: str) -> str:
    """Return VALID with exactly one occurrence of `old` replaced by `new`.

    Removing the whole [noise] table puts `noise = 3` at the top level instead.
    """
    assert VALID.count(old) == 1, f"the test edit {old!r} must match VALID exactly once"
    if old == NOISE_TABLE:
        return "noise = 3\n" + VALID.replace(old, new)
    return VALID.replace(old, new)


# --- shipped profiles ---------------------------------------------------------------------


def test_accelerator_shipped_names_complete() -> None:
    assert tuple(shipped_names()) == SHIPPED
    assert [accelerator.name for accelerator in list_accelerators()] == list(SHIPPED)


def test_accelerator_shipped_files_match_repository_folder() -> None:
    on_disk = sorted(path.stem for path in PROFILES_FOLDER.glob("*.toml"))
    assert tuple(on_disk) == SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_accelerator_shipped_profile_consistent(name: str) -> None:
    accelerator = load_accelerator(name)

    assert accelerator.name == name
    assert accelerator.shipped
    assert Path(accelerator.path).name == f"{name}.toml"
    assert accelerator.kind in NOISE_KINDS
    assert "not measured" in accelerator.source
    assert "√n" in accelerator.source
    if accelerator.kind == "mixed":
        assert accelerator.order is not None
        assert name.endswith(accelerator.order)
    assert accelerator.kind in name


@pytest.mark.parametrize("name", SHIPPED)
def test_accelerator_shipped_file_has_comments(name: str) -> None:
    text = (PROFILES_FOLDER / f"{name}.toml").read_text(encoding="utf-8")
    comment_lines = [line.strip() for line in text.splitlines() if line.lstrip().startswith("#")]
    comments = " ".join(line.lstrip("#").strip() for line in comment_lines)

    assert len(comment_lines) >= 3
    assert "not measurements of any device" in comments


def test_accelerator_mixed_profiles_differ_only_in_order() -> None:
    mul_first = load_accelerator("mixed-mul-first")
    add_first = load_accelerator("mixed-add-first")
    assert (mul_first.sigma_add, mul_first.sigma_mul) == (add_first.sigma_add, add_first.sigma_mul)
    assert mul_first.order == "mul-first"
    assert add_first.order == "add-first"


# --- loading by name and by path --------------------------------------------------------


def test_accelerator_load_by_path_equals_by_name() -> None:
    by_name = load_accelerator("additive-generic")
    by_path = load_accelerator(str(PROFILES_FOLDER / "additive-generic.toml"))

    assert not by_path.shipped
    assert by_path.path == str(PROFILES_FOLDER / "additive-generic.toml")
    assert replace(by_path, path=by_name.path, shipped=True) == by_name


def test_accelerator_load_user_file(tmp_path: Path) -> None:
    path = write_profile(tmp_path, VALID, "my-device.toml")
    accelerator = load_accelerator(path)

    assert accelerator.name == "test-mixed"
    assert accelerator.kind == "mixed"
    assert accelerator.order == "add-first"
    assert accelerator.sigma_add == 0.2
    assert accelerator.sigma_mul == 0.3
    assert accelerator.reference == "rms"
    assert accelerator.execution_cost == 1.0
    assert accelerator.shielded_cost == 5.0
    assert accelerator.bit_widths == (2, 4, 8)
    assert accelerator.path == str(path)
    assert not accelerator.shipped


def test_accelerator_load_existing_file_without_suffix(tmp_path: Path) -> None:
    path = write_profile(tmp_path, VALID, "device-profile")
    assert load_accelerator(str(path)).name == "test-mixed"


def test_accelerator_load_file_in_working_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_profile(tmp_path, VALID, "device-profile")
    monkeypatch.chdir(tmp_path)

    assert load_accelerator("device-profile").name == "test-mixed"


def test_accelerator_optional_fields_default(tmp_path: Path) -> None:
    text = VALID.replace('kind = "mixed"', 'kind = "additive"')
    text = text.replace('order = "add-first"\n', "").replace("sigma_mul = 0.3\n", "")
    accelerator = load_accelerator_file(write_profile(tmp_path, text))

    assert accelerator.order is None
    assert accelerator.sigma_mul == 0.0
    assert accelerator.noise_spec().kind == "additive"


def test_accelerator_integer_values_accepted(tmp_path: Path) -> None:
    text = edited("sigma_mul = 0.3", "sigma_mul = 1").replace("execution = 1.0", "execution = 2")
    accelerator = load_accelerator_file(write_profile(tmp_path, text))

    assert accelerator.sigma_mul == 1.0
    assert isinstance(accelerator.sigma_mul, float)
    assert accelerator.execution_cost == 2.0


# --- malformed profiles -------------------------------------------------------------------

# (case id, text of VALID to replace, replacement, words the message must contain)
MALFORMED = [
    ("missing-cost-field", "shielded = 5.0\n", "", ["missing field", "cost.shielded"]),
    ("missing-top-field", 'source = "Made up for tests."\n', "", ["missing field", "'source'"]),
    ("missing-reference", 'reference = "rms"\n', "", ["missing field", "noise.reference"]),
    ("missing-table", "[bits]\nwidths = [2, 4, 8]\n", "", ["missing field", "'bits'", "[bits] table"]),
    ("sigma-string", "sigma_add = 0.2", 'sigma_add = "0.2"', ["noise.sigma_add", "number", "'0.2'"]),
    ("cost-boolean", "execution = 1.0", "execution = true", ["cost.execution", "number", "boolean"]),
    ("name-integer", 'name = "test-mixed"', "name = 3", ["'name'", "string", "3"]),
    ("kind-array", 'kind = "mixed"', 'kind = ["mixed"]', ["noise.kind", "string"]),
    ("noise-not-table", NOISE_TABLE, "", ["'noise'", "table", "3"]),
    ("empty-description", 'description = "A profile for tests."', 'description = " "', ["description", "empty"]),
    ("negative-sigma", "sigma_add = 0.2", "sigma_add = -0.1", ["noise.sigma_add", "-0.1", "≥ 0"]),
    ("nan-sigma", "sigma_mul = 0.3", "sigma_mul = nan", ["noise.sigma_mul", "nan"]),
    ("infinite-sigma", "sigma_add = 0.2", "sigma_add = inf", ["noise.sigma_add", "inf"]),
    ("unknown-kind", 'kind = "mixed"', 'kind = "gaussian"', ["noise.kind", "'gaussian'", "additive"]),
    ("unknown-order", 'order = "add-first"', 'order = "first"', ["noise.order", "'first'", "mul-first"]),
    ("unknown-reference", 'reference = "rms"', 'reference = "peak"', ["noise.reference", "'peak'", "range"]),
    ("mixed-without-order", 'order = "add-first"\n', "", ["noise.order", "missing", "mixed"]),
    ("mixed-without-mul", "sigma_mul = 0.3", "sigma_mul = 0.0", ["noise.sigma_mul", "mixed", "> 0"]),
    ("mixed-without-add", "sigma_add = 0.2", "sigma_add = 0", ["noise.sigma_add", "mixed", "> 0"]),
    ("additive-with-mul", 'kind = "mixed"', 'kind = "additive"', ["noise.sigma_mul", "'additive'", "0.3"]),
    ("multiplicative-with-add", 'kind = "mixed"', 'kind = "multiplicative"', ["noise.sigma_add", "0.2"]),
    ("zero-cost", "execution = 1.0", "execution = 0.0", ["cost.execution", "0.0", "> 0"]),
    ("negative-cost", "shielded = 5.0", "shielded = -5.0", ["cost.shielded", "-5.0", "> 0"]),
    ("widths-empty", "widths = [2, 4, 8]", "widths = []", ["bits.widths", "empty"]),
    ("widths-unsorted", "widths = [2, 4, 8]", "widths = [8, 2, 4]", ["bits.widths", "[8, 2, 4]", "[2, 4, 8]"]),
    ("widths-duplicate", "widths = [2, 4, 8]", "widths = [2, 4, 4, 8]", ["bits.widths", "unique"]),
    ("widths-zero", "widths = [2, 4, 8]", "widths = [0, 4]", ["bits.widths", "0", "1 to 32"]),
    ("widths-too-wide", "widths = [2, 4, 8]", "widths = [8, 64]", ["bits.widths", "64", "1 to 32"]),
    ("widths-float", "widths = [2, 4, 8]", "widths = [2.5, 4]", ["bits.widths", "integers", "2.5"]),
    ("widths-scalar", "widths = [2, 4, 8]", "widths = 8", ["bits.widths", "array"]),
    ("unknown-top-key", 'name = "test-mixed"', 'name = "test-mixed"\nnmae = "typo"', ["unknown field", "'nmae'"]),
    ("unknown-noise-key", "sigma_add = 0.2", "sigma_add = 0.2\nsigma_ad = 0.1", ["unknown field", "noise.sigma_ad"]),
    ("unknown-table", "[bits]", "[bitz]\nx = 1\n[bits]", ["unknown field", "'bitz'"]),
]


@pytest.mark.parametrize(
    ("old", "new", "words"),
    [case[1:] for case in MALFORMED],
    ids=[case[0] for case in MALFORMED],
)
def test_accelerator_malformed_file_rejected(tmp_path: Path, old: str, new: str, words: list[str]) -> None:
    path = write_profile(tmp_path, edited(old, new))

    with pytest.raises(FileFormatError) as caught:
        load_accelerator(path)

    message = str(caught.value)
    assert str(path) in message
    for word in words:
        assert word in message
    assert "\n" not in message


def test_accelerator_toml_syntax_error_names_line(tmp_path: Path) -> None:
    path = write_profile(tmp_path, edited("sigma_mul = 0.3", "sigma_mul = = 0.3"))

    with pytest.raises(FileFormatError) as caught:
        load_accelerator(path)

    message = str(caught.value)
    syntax_line = VALID.splitlines().index("sigma_mul = 0.3") + 1
    assert str(path) in message
    assert "invalid TOML" in message
    assert f"line {syntax_line}" in message
    assert "\n" not in message


def test_accelerator_non_utf8_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(VALID.replace("A profile", "Un profil é").encode("latin-1"))

    with pytest.raises(FileFormatError, match="UTF-8"):
        load_accelerator(path)


def test_accelerator_missing_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"

    with pytest.raises(FileFormatError) as caught:
        load_accelerator(str(path))

    assert "not found" in str(caught.value)
    assert str(path) in str(caught.value)


def test_accelerator_missing_folder_path_rejected(tmp_path: Path) -> None:
    with pytest.raises(FileFormatError, match="not found"):
        load_accelerator(str(tmp_path / "no-such-folder" / "device"))


def test_accelerator_unknown_name_lists_shipped() -> None:
    with pytest.raises(SettingsError) as caught:
        load_accelerator("additive-generik")

    message = str(caught.value)
    assert "'additive-generik'" in message
    for name in SHIPPED:
        assert name in message


def test_accelerator_invalid_construction_rejected() -> None:
    accelerator = load_accelerator("additive-generic")

    with pytest.raises(SettingsError, match=r"noise\.sigma_add"):
        replace(accelerator, sigma_add=-1.0)
    with pytest.raises(SettingsError, match=r"bits\.widths"):
        replace(accelerator, bit_widths=(4, 2))


# --- noise levels -------------------------------------------------------------------------


@pytest.mark.parametrize("executions", [1, 2, 4, 9, 100])
def test_accelerator_site_levels_scale_by_root_executions(executions: int) -> None:
    accelerator = load_accelerator("mixed-mul-first")
    scale = 2.5

    levels = accelerator.site_levels(scale=scale, executions=executions)

    root = math.sqrt(executions)
    assert levels.sigma_add == pytest.approx(accelerator.sigma_add * scale / root, rel=1e-12)
    assert levels.sigma_mul == pytest.approx(accelerator.sigma_mul / root, rel=1e-12)
    assert not levels.add_first


def test_accelerator_site_levels_order() -> None:
    assert load_accelerator("mixed-add-first").site_levels().add_first
    assert not load_accelerator("mixed-mul-first").site_levels().add_first
    assert not load_accelerator("additive-generic").site_levels().add_first


def test_accelerator_site_levels_multiplicative_not_scaled() -> None:
    accelerator = load_accelerator("multiplicative-generic")

    levels = accelerator.site_levels(scale=10.0, executions=4)

    assert levels == SiteNoise(sigma_add=0.0, sigma_mul=accelerator.sigma_mul / 2)


@pytest.mark.parametrize(("scale", "executions"), [(-1.0, 1), (math.nan, 1), (1.0, 0), (1.0, -2), (1.0, 1.5)])
def test_accelerator_site_levels_invalid_rejected(scale: float, executions: int) -> None:
    accelerator = load_accelerator("additive-generic")

    with pytest.raises(SettingsError):
        accelerator.site_levels(scale=scale, executions=executions)


@pytest.mark.parametrize("name", SHIPPED)
def test_accelerator_noise_spec_matches_site_levels(name: str) -> None:
    accelerator = load_accelerator(name)
    spec = accelerator.noise_spec()

    for executions, scale in [(1, 1.0), (3, 0.7), (16, 12.0)]:
        expected = site_noise(spec, accelerator.sigma / math.sqrt(executions), scale)
        levels = accelerator.site_levels(scale=scale, executions=executions)
        assert levels.sigma_add == pytest.approx(expected.sigma_add, rel=1e-12)
        assert levels.sigma_mul == pytest.approx(expected.sigma_mul, rel=1e-12)
        assert levels.add_first == expected.add_first

    assert spec.kind == accelerator.kind
    assert spec.reference == accelerator.reference


def test_accelerator_drawn_noise_std_divided_by_root_executions() -> None:
    accelerator = load_accelerator("additive-generic")
    executions = 4

    levels = accelerator.site_levels(scale=1.0, executions=executions)
    _, add = draw_noise(levels, STATISTICS_SHAPE, SEED, site_index=0, start=0)

    expected = accelerator.sigma_add / math.sqrt(executions)
    assert add is not None
    assert float(np.std(add)) == pytest.approx(expected, rel=RELATIVE_TOLERANCE)


# --- records ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SHIPPED)
def test_accelerator_record_round_trip(name: str) -> None:
    accelerator = load_accelerator(name)

    record = accelerator.to_dict()
    restored = Accelerator.from_dict(json.loads(json.dumps(record, allow_nan=False)))

    assert record["path"] is None
    assert replace(restored, path=accelerator.path) == accelerator


def test_accelerator_record_keeps_user_path(tmp_path: Path) -> None:
    path = write_profile(tmp_path, VALID)
    record = load_accelerator(path).to_dict()

    assert record["path"] == str(path)
    assert record["shipped"] is False
    assert Accelerator.from_dict(record) == load_accelerator(path)


def test_accelerator_record_missing_field_rejected() -> None:
    record = load_accelerator("additive-generic").to_dict()
    del record["cost"]

    with pytest.raises(FileFormatError, match="'cost'"):
        Accelerator.from_dict(record)


# --- packaging ----------------------------------------------------------------------------


def test_packaging_lists_every_subpackage() -> None:
    """The package list in pyproject.toml is explicit, so a new subpackage must be added to it."""
    settings = tomllib.loads((REPOSITORY / "pyproject.toml").read_text(encoding="utf-8"))
    listed = set(settings["tool"]["setuptools"]["packages"])

    on_disk = {
        ".".join(init.parent.relative_to(REPOSITORY).parts) for init in (REPOSITORY / "wnplan").rglob("__init__.py")
    }

    assert on_disk <= listed
    assert "wnplan.accelerators" in listed
    assert settings["tool"]["setuptools"]["package-dir"]["wnplan.accelerators"] == "profiles"
