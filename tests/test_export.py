"""Tests for writing a plan into an ONNX model (wnplan.export and `wnplan export-onnx`).

The plan comes from a real profile of the Fashion-MNIST example MLP with BatchNorm (300 test
samples, σ grid 0.1 to 10, 2 repeats, seed 0) and the 1/µ rule with site 1 shielded. Without
the Fashion-MNIST files, the tiny digits perceptron of `conftest.py` takes its place.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
from conftest import run_cli

from wnplan import records
from wnplan.data import load_data, parse_normalize
from wnplan.errors import ModelError
from wnplan.export import NODE_METADATA_IR_VERSION, export_plan_to_onnx
from wnplan.plan import AllocationSettings, allocate
from wnplan.profiler import ProfileSettings, profile

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "models"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
SHIELDED_SITE = 1
BUDGET = 22
INPUT_SAMPLES = 32
SITE_KEYS = {"wnplan.site", "wnplan.executions", "wnplan.bits", "wnplan.shield"}


@dataclass(frozen=True)
class PlannedModel:
    """An ONNX model with a plan made for it, and inputs to run it on."""

    model: Path
    plan: dict[str, Any]
    plan_path: Path
    inputs: np.ndarray


@pytest.fixture(scope="session")
def planned_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> PlannedModel:
    """Profile a small model, plan a budget of 22 with the 1/µ rule, and write the plan file."""
    if FASHION_MNIST.is_dir():
        model, data, normalize = EXAMPLES / "mlp_bn.onnx", "fashion-mnist:test", "0.5,0.5"
    else:
        model, data, normalize = request.getfixturevalue("digits_mlp").onnx, "digits", None

    settings = ProfileSettings(scope="both", repeats=2, sigmas=(0.1, 0.3, 1.0, 3.0, 10.0), seed=0)
    record = profile(model, data, settings, normalize=normalize, limit=300, store=None)
    plan = allocate(record, AllocationSettings(budget=BUDGET, method="paper", shield=str(SHIELDED_SITE)))

    plan_path = tmp_path_factory.mktemp("plan") / "plan.json"
    records.write_record(plan, "plan", plan_path)
    inputs = load_data(data, parse_normalize(normalize), limit=INPUT_SAMPLES).x
    return PlannedModel(Path(model), plan, plan_path, inputs)


@pytest.fixture(scope="session")
def exported(planned_model: PlannedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("exported") / "annotated.onnx"
    export_plan_to_onnx(planned_model.plan, planned_model.model, out)
    return out


def node_metadata(model: onnx.ModelProto) -> dict[str, dict[str, str]]:
    """Return each node's metadata properties, keyed by the node's first output."""
    return {node.output[0]: {entry.key: entry.value for entry in node.metadata_props} for node in model.graph.node}


def run_model(path: Path, inputs: np.ndarray) -> list[np.ndarray]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: inputs})


# --- the exported model ---


def test_export_passes_onnx_checker(exported):
    model = onnx.load(str(exported))

    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version >= NODE_METADATA_IR_VERSION


def test_export_outputs_identical_in_onnxruntime(planned_model, exported):
    original = run_model(planned_model.model, planned_model.inputs)
    annotated = run_model(exported, planned_model.inputs)

    assert len(annotated) == len(original)
    for before, after in zip(original, annotated, strict=True):
        np.testing.assert_array_equal(after, before)


def test_export_keeps_graph_unchanged(planned_model, exported):
    original = onnx.load(str(planned_model.model)).graph
    annotated = onnx.load(str(exported)).graph

    for node in annotated.node:
        del node.metadata_props[:]
    assert annotated.SerializeToString(deterministic=True) == original.SerializeToString(deterministic=True)


def test_export_site_metadata_matches_plan(planned_model, exported):
    metadata = node_metadata(onnx.load(str(exported)))
    input_names = {value.name for value in onnx.load(str(planned_model.model)).graph.input}

    annotated_sites = [site for site in planned_model.plan["sites"] if site["name"] not in input_names]
    assert annotated_sites, "the plan should have sites produced by nodes"
    for site in annotated_sites:
        properties = metadata[site["name"]]
        assert properties["wnplan.site"] == str(site["index"]), site["name"]
        assert properties["wnplan.executions"] == str(site["executions"]), site["name"]
        assert properties["wnplan.shield"] == ("true" if site["shield"] else "false"), site["name"]
        if site["bits"]["bits"] is None:
            assert "wnplan.bits" not in properties, site["name"]
        else:
            assert properties["wnplan.bits"] == str(site["bits"]["bits"]), site["name"]


def test_export_marks_shielded_site(planned_model, exported):
    metadata = node_metadata(onnx.load(str(exported)))
    shielded = [site for site in planned_model.plan["sites"] if site["shield"]]

    assert [site["index"] for site in shielded] == [SHIELDED_SITE]
    assert metadata[shielded[0]["name"]]["wnplan.shield"] == "true"
    assert metadata[shielded[0]["name"]]["wnplan.executions"] == "0"


def test_export_leaves_other_nodes_unannotated(planned_model, exported):
    metadata = node_metadata(onnx.load(str(exported)))
    site_names = {site["name"] for site in planned_model.plan["sites"]}

    for output, properties in metadata.items():
        if output not in site_names:
            assert not SITE_KEYS & properties.keys(), output


def test_export_input_site_in_model_metadata(planned_model, exported):
    model = onnx.load(str(exported))
    summary = json.loads({entry.key: entry.value for entry in model.metadata_props}["wnplan.plan"])
    input_site = planned_model.plan["sites"][0]

    assert input_site["index"] == 0
    assert input_site["name"] in {value.name for value in model.graph.input}
    assert all(properties.get("wnplan.site") != "0" for properties in node_metadata(model).values())
    assert summary["sites"][0] == {
        "index": 0,
        "name": input_site["name"],
        "executions": input_site["executions"],
        "bits": input_site["bits"]["bits"],
        "shield": input_site["shield"],
    }


def test_export_model_metadata_summarizes_plan(planned_model, exported):
    model = onnx.load(str(exported))
    properties = {entry.key: entry.value for entry in model.metadata_props}
    summary = json.loads(properties["wnplan.plan"])
    plan = planned_model.plan

    assert summary["method"] == plan["method"]
    assert summary["budget"] == plan["budget"]
    assert summary["accelerator"] is None
    assert [site["index"] for site in summary["sites"]] == [site["index"] for site in plan["sites"]]
    assert [site["executions"] for site in summary["sites"]] == [site["executions"] for site in plan["sites"]]
    assert [site["shield"] for site in summary["sites"]] == [site["shield"] for site in plan["sites"]]


def test_export_keeps_existing_model_metadata(planned_model, exported):
    before = {entry.key: entry.value for entry in onnx.load(str(planned_model.model)).metadata_props}
    after = {entry.key: entry.value for entry in onnx.load(str(exported)).metadata_props}

    for key, value in before.items():
        assert after[key] == value, key


def test_export_omits_bits_without_hint(planned_model, tmp_path):
    plan = copy.deepcopy(planned_model.plan)
    site = plan["sites"][-1]  # the logits, which a node produces
    site["bits"]["bits"] = None
    out = tmp_path / "no-bits.onnx"

    export_plan_to_onnx(plan, planned_model.model, out)

    properties = node_metadata(onnx.load(str(out)))[site["name"]]
    assert "wnplan.bits" not in properties
    assert properties["wnplan.executions"] == str(site["executions"])


def test_export_returns_annotated_node_count(planned_model, tmp_path):
    input_names = {value.name for value in onnx.load(str(planned_model.model)).graph.input}
    expected = sum(site["name"] not in input_names for site in planned_model.plan["sites"])

    assert export_plan_to_onnx(planned_model.plan, planned_model.model, tmp_path / "out.onnx") == expected


# --- rejected inputs ---


def test_export_rejects_plan_of_other_model(planned_model, tmp_path):
    other = tmp_path / "other.onnx"
    proto = onnx.load(str(planned_model.model))
    proto.doc_string = "a different file"
    onnx.save(proto, str(other))
    out = tmp_path / "out.onnx"

    with pytest.raises(ModelError) as error:
        export_plan_to_onnx(planned_model.plan, other, out)

    message = str(error.value)
    assert "sha256" in message
    assert str(other) in message
    assert planned_model.plan["profile"]["model"]["path"] in message
    assert not out.exists()


def test_export_rejects_non_onnx_model(planned_model, tmp_path):
    model = tmp_path / "model.pt2"
    model.write_bytes(planned_model.model.read_bytes())
    out = tmp_path / "out.onnx"

    with pytest.raises(ModelError, match="not an ONNX file"):
        export_plan_to_onnx(planned_model.plan, model, out)
    assert not out.exists()


# --- command line ---


def test_export_cli_writes_model(capsys, planned_model, tmp_path):
    out = tmp_path / "cli.onnx"

    code, _, err = run_cli(capsys, "export-onnx", planned_model.plan_path, planned_model.model, "-o", out)

    assert code == 0, err
    assert out.is_file()
    assert f"wrote {out}" in " ".join(err.split())
    onnx.checker.check_model(onnx.load(str(out)))


def test_export_cli_bad_model_path_exits_2(capsys, planned_model, tmp_path):
    missing = tmp_path / "missing.onnx"
    out = tmp_path / "never.onnx"

    code, _, err = run_cli(capsys, "export-onnx", planned_model.plan_path, missing, "-o", out)

    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("wnplan: error: ")
    assert "missing.onnx" in lines[0]
    assert "Traceback" not in err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_export_cli_profile_as_plan_exits_2(capsys, planned_model, tmp_path):
    profile_path = tmp_path / "profile.json"
    profile_path.write_text(json.dumps({"kind": "profile"}))
    out = tmp_path / "never.onnx"

    code, _, err = run_cli(capsys, "export-onnx", profile_path, planned_model.model, "-o", out)

    assert code == 2, err
    assert "a plan file is needed" in err
    assert not out.exists()
