"""Tests for reading and writing profile, plan and check files (wnplan.records).

The valid records are real: the `digits_profile` of `conftest.py`, a plan made from it with
the 1/µ rule (budget 3 executions per site), and a check of that plan with 2 noise draws
(seed 0). Each broken case changes one field of a valid record, so the error must name it.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest

from wnplan import records
from wnplan.errors import FileFormatError, SettingsError
from wnplan.plan import AllocationSettings, allocate
from wnplan.simulate import check

DELETE = object()  # marks a field to remove instead of to change


@pytest.fixture(scope="module")
def valid_records(digits_profile: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """A real profile, plan and check, keyed by kind; the plan and check name their files."""
    folder = tmp_path_factory.mktemp("records")
    profile_path = records.write_record(digits_profile, "profile", folder / "profile.json")

    budget = 3 * len(digits_profile["sites"])
    plan = allocate(digits_profile, AllocationSettings(budget=budget, method="paper"), profile_path=profile_path)
    plan_path = records.write_record(plan, "plan", folder / "plan.json")

    result = check(plan, repeats=2, seed=0, plan_path=plan_path)
    return {"profile": digits_profile, "plan": plan, "check": result}


def broken(record: dict[str, Any], path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    """Return a deep copy of `record` with the field at `path` set to `value` (or removed)."""
    copied = copy.deepcopy(record)
    container = copied
    for key in path[:-1]:
        container = container[key]
    if value is DELETE:
        del container[path[-1]]
    else:
        container[path[-1]] = value
    return copied


def write_json(path: Path, record: dict[str, Any]) -> Path:
    path.write_text(json.dumps(record, indent=2, sort_keys=True))
    return path


def sorted_everywhere(value: Any) -> bool:
    """Return True when every JSON object in `value` lists its keys in sorted order."""
    if isinstance(value, dict):
        return list(value) == sorted(value) and all(sorted_everywhere(item) for item in value.values())
    if isinstance(value, list):
        return all(sorted_everywhere(item) for item in value)
    return True


# Each case: file kind, the field changed, its new value (or DELETE), and what the message
# must contain besides the field's location.
BROKEN_CASES = [
    ("plan", ("sites", 0, "executions"), -1, "sites/0/executions", "less than the minimum of 0"),
    ("plan", ("budget",), DELETE, "'budget' is a required property", ""),
    ("plan", ("sites", 0, "midpoint"), "1.5", "sites/0/midpoint", "is not of type 'number'"),
    ("plan", ("budget",), True, "field budget", "is not of type 'integer'"),
    ("plan", ("method",), "best", "field method", "is not one of"),
    ("plan", ("schema_version",), 2, "field schema_version", "1 was expected"),
    ("plan", ("predicted_accuracy",), 1.5, "field predicted_accuracy", "greater than the maximum of 1"),
    ("plan", ("sites",), [], "field sites", "should be non-empty"),
    ("plan", ("sites", 0, "bits", "bits"), 0, "sites/0/bits/bits", "less than the minimum of 1"),
    ("profile", ("clean", "accuracy"), "high", "clean/accuracy", "is not of type 'number'"),
    ("profile", ("chance",), DELETE, "'chance' is a required property", ""),
    ("profile", ("sites", 1, "walking", "fit", "midpoint"), -1.0, "sites/1/walking/fit/midpoint", "minimum of 0"),
    ("check", ("results", "plan", "accuracy"), 1.2, "results/plan/accuracy", "greater than the maximum of 1"),
    ("check", ("settings", "repeats"), DELETE, "field settings", "'repeats' is a required property"),
    ("check", ("verdict", "passed"), "yes", "verdict/passed", "is not of type 'boolean'"),
]
CASE_IDS = [f"{kind}-{'/'.join(map(str, path))}" for kind, path, *_ in BROKEN_CASES]


# --- validation on read and on write ---


@pytest.mark.parametrize(("kind", "path", "value", "location", "detail"), BROKEN_CASES, ids=CASE_IDS)
def test_read_record_rejects_broken_field(valid_records, tmp_path, kind, path, value, location, detail):
    file = write_json(tmp_path / f"{kind}.json", broken(valid_records[kind], path, value))

    with pytest.raises(FileFormatError) as error:
        records.read_record(file, kind)

    message = str(error.value)
    assert location in message
    assert detail in message
    assert str(file) in message
    assert f"invalid {kind} file" in message


@pytest.mark.parametrize(("kind", "path", "value", "location", "detail"), BROKEN_CASES, ids=CASE_IDS)
def test_write_record_rejects_broken_field(valid_records, tmp_path, kind, path, value, location, detail):
    target = tmp_path / "out" / f"{kind}.json"

    with pytest.raises(FileFormatError) as error:
        records.write_record(broken(valid_records[kind], path, value), kind, target)

    message = str(error.value)
    assert location in message
    assert detail in message
    assert not target.exists()
    assert not target.parent.exists() or list(target.parent.iterdir()) == []


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_read_record_rejects_non_finite_constant(valid_records, tmp_path, constant):
    text = json.dumps(broken(valid_records["plan"], ("sites", 0, "midpoint"), 123.25), indent=2)
    assert text.count("123.25") == 1
    file = tmp_path / "plan.json"
    file.write_text(text.replace("123.25", constant))

    with pytest.raises(FileFormatError) as error:
        records.read_record(file, "plan")

    assert f"{constant} is not allowed" in str(error.value)
    assert str(file) in str(error.value)


# json.loads reads a literal too large for a float as infinity without calling parse_constant.
def test_read_record_rejects_overflowing_number(valid_records, tmp_path):
    text = json.dumps(broken(valid_records["plan"], ("sites", 0, "bits", "range"), 123.25), indent=2)
    file = tmp_path / "plan.json"
    file.write_text(text.replace("123.25", "1e999"))

    with pytest.raises(FileFormatError):
        records.read_record(file, "plan")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_write_record_rejects_non_finite_number(valid_records, tmp_path, value):
    target = tmp_path / "plan.json"
    record = broken(valid_records["plan"], ("sites", 0, "bits", "range_low"), value)

    with pytest.raises(FileFormatError, match="non-finite number"):
        records.write_record(record, "plan", target)

    assert list(tmp_path.iterdir()) == []


def test_write_record_non_finite_names_field(valid_records, tmp_path):
    record = broken(valid_records["plan"], ("sites", 0, "bits", "range_low"), math.nan)

    with pytest.raises(FileFormatError, match="sites/0/bits/range_low"):
        records.write_record(record, "plan", tmp_path / "plan.json")


# --- files of the wrong kind, missing or not JSON ---


@pytest.mark.parametrize(("kind", "needed"), [("profile", "plan"), ("check", "plan"), ("plan", "profile")])
def test_read_record_rejects_wrong_kind(valid_records, tmp_path, kind, needed):
    file = write_json(tmp_path / f"{kind}.json", valid_records[kind])

    with pytest.raises(FileFormatError) as error:
        records.read_record(file, needed)

    assert f"this is a {kind} file, but a {needed} file is needed" in str(error.value)
    assert str(file) in str(error.value)


def test_write_record_rejects_wrong_kind(valid_records, tmp_path):
    target = tmp_path / "plan.json"

    with pytest.raises(FileFormatError, match="invalid plan file"):
        records.write_record(valid_records["profile"], "plan", target)

    assert not target.exists()


def test_read_record_missing_file_names_command(tmp_path):
    file = tmp_path / "absent.json"

    with pytest.raises(FileFormatError) as error:
        records.read_record(file, "plan")

    assert "plan file not found" in str(error.value)
    assert "absent.json" in str(error.value)
    assert "wnplan allocate" in str(error.value)


def test_read_record_rejects_invalid_json(tmp_path):
    file = tmp_path / "plan.json"
    file.write_text('{"kind": "plan",')

    with pytest.raises(FileFormatError, match="not valid JSON"):
        records.read_record(file, "plan")


def test_read_record_rejects_top_level_array(tmp_path):
    file = tmp_path / "plan.json"
    file.write_text('[{"kind": "plan"}]')

    with pytest.raises(FileFormatError, match="must contain a JSON object"):
        records.read_record(file, "plan")


# --- canonical, atomic writes ---


@pytest.mark.parametrize("kind", ["profile", "plan", "check"])
def test_write_record_round_trip(valid_records, tmp_path, kind):
    path = records.write_record(valid_records[kind], kind, tmp_path / f"{kind}.json")

    assert records.read_record(path, kind) == valid_records[kind]


@pytest.mark.parametrize("kind", ["profile", "plan", "check"])
def test_write_record_sorted_keys_without_nan(valid_records, tmp_path, kind):
    path = records.write_record(valid_records[kind], kind, tmp_path / f"{kind}.json")
    text = path.read_text()

    assert text == records.dumps(valid_records[kind])
    assert text.endswith("\n")
    assert sorted_everywhere(json.loads(text))
    for constant in ("NaN", "Infinity"):
        assert constant not in text


def test_write_record_same_record_same_bytes(valid_records, tmp_path):
    first = records.write_record(valid_records["plan"], "plan", tmp_path / "first.json")
    second = records.write_record(copy.deepcopy(valid_records["plan"]), "plan", tmp_path / "second.json")

    assert first.read_bytes() == second.read_bytes()


def test_write_record_leaves_no_temporary_file(valid_records, tmp_path):
    records.write_record(valid_records["plan"], "plan", tmp_path / "plan.json")
    records.write_record(valid_records["plan"], "plan", tmp_path / "plan.json")

    assert sorted(path.name for path in tmp_path.iterdir()) == ["plan.json"]


def test_write_record_creates_missing_folder(valid_records, tmp_path):
    target = tmp_path / "a" / "b" / "plan.json"

    assert records.write_record(valid_records["plan"], "plan", target) == target
    assert target.is_file()


def test_write_record_invalid_keeps_previous_file(valid_records, tmp_path):
    target = records.write_record(valid_records["plan"], "plan", tmp_path / "plan.json")
    before = target.read_bytes()

    with pytest.raises(FileFormatError):
        records.write_record(broken(valid_records["plan"], ("budget",), 0), "plan", target)

    assert target.read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["plan.json"]


def test_write_record_non_finite_keeps_previous_file(valid_records, tmp_path):
    target = records.write_record(valid_records["plan"], "plan", tmp_path / "plan.json")
    before = target.read_bytes()

    record = broken(valid_records["plan"], ("sites", 0, "bits", "range_high"), math.nan)

    with pytest.raises(FileFormatError):
        records.write_record(record, "plan", target)

    assert target.read_bytes() == before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["plan.json"]


def test_write_record_failed_rename_removes_temporary(valid_records, tmp_path):
    # A non-empty folder where the file should go makes the final rename fail after the
    # temporary file has been written.
    target = tmp_path / "plan.json"
    target.mkdir()
    (target / "keep.txt").write_text("unchanged")

    # write_record refuses the folder up front; the writer below it must still clean up.
    with pytest.raises(SettingsError, match="it is a folder"):
        records.write_record(valid_records["plan"], "plan", target)
    with pytest.raises(IsADirectoryError):
        records._write_text(records.dumps(valid_records["plan"]), "plan", target)

    assert sorted(path.name for path in tmp_path.iterdir()) == ["plan.json"]
    assert (target / "keep.txt").read_text() == "unchanged"
