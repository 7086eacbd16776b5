"""Fuzz tests: mutated ONNX, .npz and JSON inputs through the entry points the CLI uses.

Hypothesis mutates small valid seed files, byte by byte and field by field. Each mutated
file goes through the same in-process functions that `wnplan profile`, `allocate` and
`check` call. Those are `profile` for ONNX models, `load_model` and a noisy run for `.pt2`
programs, `load_model_and_data` and `clean_accuracy` for data, and `read_record` for
profile, plan and check files, followed by `allocate` for a profile and `check` for a plan
that still reads as valid. Every input must either work or raise
a `WnplanError`, which the CLI prints as one line with exit code 2. Any other exception is a
failure, and Hypothesis reports the input that raised it.

A smaller run passes mutated models to `wnplan.cli.main` in-process, to check the CLI's
contract: exit code 0, or 2 with exactly one line on stderr.

The runs are derandomized, so CI sees the same inputs every time: 1,200 in all. Set
WNPLAN_FUZZ_SCALE (default 1) to multiply the counts for a longer run by hand.
"""

from __future__ import annotations

import copy
import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from wnplan import records
from wnplan.cli import main
from wnplan.errors import WnplanError
from wnplan.models import load_model
from wnplan.noise import SiteNoise, draw_noise
from wnplan.plan import AllocationSettings, allocate
from wnplan.profiler import ProfileSettings, clean_accuracy, load_model_and_data, profile
from wnplan.simulate import check

SCALE = max(1, int(os.environ.get("WNPLAN_FUZZ_SCALE", "1")))
LOG = os.environ.get("WNPLAN_FUZZ_LOG")  # a file that collects the error messages, for review
ONNX_EXAMPLES = 300 * SCALE
CLI_EXAMPLES = 50 * SCALE
PT2_EXAMPLES = 100 * SCALE
NPZ_EXAMPLES = 300 * SCALE
JSON_EXAMPLES = 450 * SCALE  # 150 each for profile, plan and check files

FEATURES = 6
CLASSES = 3
SAMPLES = 24
SEED = 0
# One walking curve at one σ: the shortest profile that still inserts noise and cuts a suffix.
FUZZ_SETTINGS = ProfileSettings(scope="walking", sites="1", sigmas=(0.5,), repeats=1, seed=SEED)


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    )


class Counter:
    """Counts the inputs a fuzz test ran and how they ended."""

    def __init__(self) -> None:
        self.inputs = 0
        self.rejected = 0

    def run(self, function, *arguments) -> None:
        self.inputs += 1
        try:
            function(*arguments)
        except WnplanError as error:
            message = f"{type(error).__name__}: {error}"
        else:
            return
        self.rejected += 1
        assert "\n" not in message.strip(), f"multi-line error message: {message}"
        if LOG:
            with open(LOG, "a") as stream:
                stream.write(message[:200] + "\n")


# --- seed files ---


def seed_onnx() -> onnx.ModelProto:
    """Return a tiny classifier: Gemm (6 → 8), Relu, Gemm (8 → 3), with a dynamic batch."""
    rng = np.random.default_rng(SEED)
    weights = [
        numpy_helper.from_array(rng.standard_normal((FEATURES, 8)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((8, CLASSES)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.standard_normal(CLASSES).astype(np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "fuzz",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def seed_npz_bytes() -> bytes:
    rng = np.random.default_rng(SEED)
    x = rng.standard_normal((SAMPLES, FEATURES)).astype(np.float32)
    y = rng.integers(0, CLASSES, SAMPLES)
    buffer = io.BytesIO()
    np.savez(buffer, x=x, y=y)
    return buffer.getvalue()


def seed_pt2(path: Path) -> Path:
    """Export a tiny classifier (Linear 6 → 8, BatchNorm, ReLU, Linear 8 → 3) with a dynamic batch."""
    torch.manual_seed(SEED)
    module = nn.Sequential(nn.Linear(FEATURES, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, CLASSES)).eval()
    example = torch.zeros(2, FEATURES)
    program = torch.export.export(module, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(program, str(path))
    return path


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory, digits_profile: dict) -> dict[str, Any]:
    """Valid seed inputs: the tiny model in both formats, its data, and a real profile, plan and check."""
    folder = tmp_path_factory.mktemp("fuzz_seeds")
    model = seed_onnx()
    model_path = folder / "model.onnx"
    onnx.save(model, model_path)
    pt2_path = seed_pt2(folder / "model.pt2")
    data_path = folder / "data.npz"
    data_path.write_bytes(seed_npz_bytes())
    profile_path = records.write_record(digits_profile, "profile", folder / "profile.json")
    budget = 3 * len(digits_profile["sites"])
    plan = allocate(digits_profile, AllocationSettings(budget=budget, method="paper"), profile_path=profile_path)
    plan_path = records.write_record(plan, "plan", folder / "plan.json")
    result = check(plan, repeats=2, seed=SEED, plan_path=plan_path)
    return {
        "model": model,
        "model_path": model_path,
        "pt2_path": pt2_path,
        "data_path": data_path,
        "records": {"profile": digits_profile, "plan": plan, "check": result},
    }


# --- byte mutations, shared by all formats ---

BYTE_OPERATIONS = ("flip", "set", "insert", "delete", "truncate", "duplicate")
byte_mutations = st.lists(
    st.tuples(
        st.sampled_from(BYTE_OPERATIONS),
        st.floats(0.0, 1.0, allow_nan=False, exclude_max=True),
        st.integers(0, 255),
        st.binary(min_size=1, max_size=8),
    ),
    min_size=1,
    max_size=4,
)


def mutate_bytes(data: bytes, operations: list[tuple[str, float, int, bytes]]) -> bytes:
    """Apply byte operations at relative positions: flip a bit, overwrite, insert, cut."""
    buffer = bytearray(data)
    for operation, where, value, chunk in operations:
        if not buffer:
            break
        position = int(where * len(buffer))
        if operation == "flip":
            buffer[position] ^= 1 << (value % 8)
        elif operation == "set":
            buffer[position] = value
        elif operation == "insert":
            buffer[position:position] = chunk
        elif operation == "delete":
            del buffer[position : position + 1 + value % 16]
        elif operation == "truncate":
            del buffer[position:]
        else:
            buffer[position:position] = buffer[position : position + 1 + value]
    return bytes(buffer)


# --- ONNX ---

ONNX_FIELD_MUTATIONS = (
    "op_type", "drop_node", "swap_nodes", "node_input", "node_output", "dims", "data_type", "raw_data",
    "input_type", "input_dim", "output_name", "opset", "ir_version", "ml_only", "attribute", "drop_output",
)
OP_TYPES = ("Relu", "Softmax", "Gemm", "MatMul", "Add", "Flatten", "Reshape", "Identity", "Cast", "Loop", "Unknown")
onnx_field_mutations = st.lists(
    st.tuples(st.sampled_from(ONNX_FIELD_MUTATIONS), st.integers(0, 7), st.integers(-3, 40)),
    min_size=1,
    max_size=3,
)


def mutate_onnx(seed: onnx.ModelProto, operations: list[tuple[str, int, int]]) -> onnx.ModelProto:
    """Apply field-level edits to a copy of the model: operators, tensors, types, versions."""
    model = copy.deepcopy(seed)
    graph = model.graph
    for operation, index, value in operations:
        nodes = graph.node
        node = nodes[index % len(nodes)] if nodes else None
        init = graph.initializer[index % len(graph.initializer)] if graph.initializer else None
        if operation == "op_type" and node is not None:
            node.op_type = OP_TYPES[value % len(OP_TYPES)]
        elif operation == "drop_node" and node is not None:
            nodes.remove(node)
        elif operation == "swap_nodes" and len(nodes) > 1:
            other = copy.deepcopy(nodes[(index + 1) % len(nodes)])
            nodes[(index + 1) % len(nodes)].CopyFrom(node)
            node.CopyFrom(other)
        elif operation == "node_input" and node is not None and node.input:
            names = ["x", "h", "r", "logits", "w1", "w2", "", "missing"]
            node.input[value % len(node.input)] = names[index % len(names)]
        elif operation == "node_output" and node is not None:
            node.output[0] = ["x", "h", "r", "logits", "w1", "fresh"][value % 6]
        elif operation == "dims" and init is not None and init.dims:
            init.dims[value % len(init.dims)] = value
        elif operation == "data_type" and init is not None:
            init.data_type = value % 24
        elif operation == "raw_data" and init is not None:
            init.raw_data = init.raw_data[: max(0, value)]
        elif operation == "input_type":
            graph.input[0].type.tensor_type.elem_type = value % 24
        elif operation == "input_dim":
            dim = graph.input[0].type.tensor_type.shape.dim[index % 2]
            dim.dim_value = value
        elif operation == "output_name" and graph.output:
            graph.output[0].name = ["h", "r", "x", "w1", "nothing"][value % 5]
        elif operation == "opset":
            model.opset_import[0].version = value
        elif operation == "ir_version":
            model.ir_version = value
        elif operation == "ml_only":
            del model.opset_import[:]
            model.opset_import.append(helper.make_opsetid("ai.onnx.ml", 1 + value % 6))
        elif operation == "attribute" and node is not None:
            node.attribute.append(helper.make_attribute(["transB", "alpha", "axis", "to"][index % 4], value))
        elif operation == "drop_output" and graph.output:
            del graph.output[0]
    return model


def run_onnx(path: Path, data_path: Path) -> None:
    profile(path, str(data_path), FUZZ_SETTINGS, store=None)


@pytest.mark.parametrize("kind", ["bytes", "fields"])
def test_fuzz_onnx_inputs_end_cleanly(seeds, tmp_path, kind):
    counter = Counter()
    seed_bytes = seeds["model"].SerializeToString()
    path = tmp_path / "mutated.onnx"

    @fuzz_settings(ONNX_EXAMPLES // 2)
    @given(byte_mutations if kind == "bytes" else onnx_field_mutations)
    def run(operations):
        if kind == "bytes":
            path.write_bytes(mutate_bytes(seed_bytes, operations))
        else:
            path.write_bytes(mutate_onnx(seeds["model"], operations).SerializeToString())
        counter.run(run_onnx, path, seeds["data_path"])

    run()
    assert counter.inputs == ONNX_EXAMPLES // 2
    assert counter.rejected > 0


def test_fuzz_cli_prints_one_line_errors(seeds, tmp_path, capsys):
    seed_bytes = seeds["model"].SerializeToString()
    path = tmp_path / "mutated.onnx"
    codes: list[int] = []

    @fuzz_settings(CLI_EXAMPLES)
    @given(byte_mutations)
    def run(operations):
        path.write_bytes(mutate_bytes(seed_bytes, operations))
        with pytest.raises(SystemExit) as exit_info:
            main(["sites", str(path)])
        code = exit_info.value.code or 0
        err = capsys.readouterr().err
        codes.append(code)
        assert code in (0, 2), err
        if code == 2:
            assert len(err.strip().splitlines()) == 1, err
            assert err.startswith("wnplan: error: "), err

    run()
    assert len(codes) == CLI_EXAMPLES
    assert 2 in codes


# --- .npz ---

NPZ_DTYPES = (
    np.float32, np.float64, np.float16, np.uint8, np.int16, np.int64, np.uint64, np.bool_, np.complex64,
    np.dtype("<U3"), np.dtype("datetime64[s]"),
)
arrays = st.sampled_from(NPZ_DTYPES).flatmap(
    lambda dtype: hnp.arrays(dtype, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))
)
npz_contents = st.dictionaries(st.sampled_from(["x", "y", "z", "X"]), arrays, min_size=0, max_size=3)


def run_npz(model_path: Path, data_path: Path) -> None:
    model, data = load_model_and_data(model_path, str(data_path))
    clean_accuracy(model, data)


@pytest.mark.parametrize("kind", ["bytes", "arrays"])
def test_fuzz_npz_inputs_end_cleanly(seeds, tmp_path, kind):
    counter = Counter()
    seed_bytes = seeds["data_path"].read_bytes()
    path = tmp_path / "mutated.npz"

    @fuzz_settings(NPZ_EXAMPLES // 2)
    @given(byte_mutations if kind == "bytes" else npz_contents)
    def run(mutation):
        if kind == "bytes":
            path.write_bytes(mutate_bytes(seed_bytes, mutation))
        else:
            with open(path, "wb") as stream:
                np.savez(stream, **mutation)
        counter.run(run_npz, seeds["model_path"], path)

    run()
    assert counter.inputs == NPZ_EXAMPLES // 2
    assert counter.rejected > 0


# --- profile, plan and check files ---

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
json_operations = st.lists(
    st.tuples(st.sampled_from(["replace", "delete", "insert"]), st.integers(0, 10**6), json_values),
    min_size=1,
    max_size=3,
)


def containers(value: Any) -> list[Any]:
    """Return every dict and list inside a JSON value, the value itself first."""
    found, pending = [], [value]
    while pending:
        current = pending.pop()
        if isinstance(current, (dict, list)):
            found.append(current)
            pending.extend(current.values() if isinstance(current, dict) else current)
    return found


def mutate_record(record: dict[str, Any], operations: list[tuple[str, int, Any]]) -> dict[str, Any]:
    """Replace, delete or insert values at places chosen by index among all containers."""
    mutated = copy.deepcopy(record)
    for operation, index, generated in operations:
        value = copy.deepcopy(generated)  # Hypothesis may reuse one object, which would make a cycle
        places = containers(mutated)
        container = places[index % len(places)]
        keys = list(container) if isinstance(container, dict) else list(range(len(container)))
        if operation == "insert" or not keys:
            if isinstance(container, dict):
                container[f"extra{index % 7}"] = value
            else:
                container.insert(index % (len(container) + 1), value)
            continue
        key = keys[(index // len(places)) % len(keys)]
        if operation == "replace":
            container[key] = value
        else:
            del container[key]
    return mutated


def use_record(path: Path, kind: str) -> None:
    """Read a record as the CLI does, then allocate from a profile or check a plan."""
    record = records.read_record(path, kind)
    if kind == "profile":
        budget = 3 * len(record["sites"])
        allocate(record, AllocationSettings(budget=budget, search_budget=0.0), profile_path=path)
    elif kind == "plan":
        check(record, repeats=1, seed=SEED, plan_path=path)


@pytest.mark.parametrize("record_kind", records.KINDS)
@pytest.mark.parametrize("kind", ["text", "fields"])
def test_fuzz_record_files_end_cleanly(seeds, tmp_path, record_kind, kind):
    counter = Counter()
    record = seeds["records"][record_kind]
    text = records.dumps(record).encode()
    path = tmp_path / f"mutated-{record_kind}.json"
    examples = JSON_EXAMPLES // 6

    @fuzz_settings(examples)
    @given(byte_mutations if kind == "text" else json_operations)
    def run(mutation):
        if kind == "text":
            path.write_bytes(mutate_bytes(text, mutation))
        else:
            path.write_text(json.dumps(mutate_record(record, mutation)))
        counter.run(use_record, path, record_kind)

    run()
    assert counter.inputs == examples
    assert counter.rejected > 0


# --- .pt2 ---


def mutate_archive(data: bytes, operations: list[tuple[str, int, Any]]) -> bytes:
    """Rewrite the archive with field-level edits to its JSON members (program, configs)."""
    source = zipfile.ZipFile(io.BytesIO(data))
    members = [info for info in source.infolist() if info.filename.endswith(".json")]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as target:
        for info in source.infolist():
            content = source.read(info)
            if info is members[operations[0][1] % len(members)]:
                content = json.dumps(mutate_record(json.loads(content), operations)).encode()
            target.writestr(info, content)
    return buffer.getvalue()


def run_pt2(path: Path) -> None:
    model = load_model(path)
    x = np.random.default_rng(SEED).standard_normal((5, FEATURES)).astype(np.float32)
    site = model.sites[-1]
    model.run(x, {site.index: draw_noise(SiteNoise(0.5), (5, *site.shape), SEED, site.index, 0)})


@pytest.mark.parametrize("kind", ["bytes", "fields"])
def test_fuzz_pt2_inputs_end_cleanly(seeds, tmp_path, kind):
    counter = Counter()
    seed_bytes = seeds["pt2_path"].read_bytes()
    path = tmp_path / "mutated.pt2"

    @fuzz_settings(PT2_EXAMPLES // 2)
    @given(byte_mutations if kind == "bytes" else json_operations)
    def run(mutation):
        if kind == "bytes":
            path.write_bytes(mutate_bytes(seed_bytes, mutation))
        else:
            path.write_bytes(mutate_archive(seed_bytes, mutation))
        counter.run(run_pt2, path)

    run()
    assert counter.inputs == PT2_EXAMPLES // 2
    assert counter.rejected > 0
