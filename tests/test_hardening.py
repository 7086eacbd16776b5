"""Hardening tests: models from other toolchains, hostile files, and security.

The sections follow the numbered cases of docs/errors.md. Each test builds its input (a
model, data file or record that some converter, editor or attacker could produce) and
checks the documented outcome: the case works, or it ends in one specific `WnplanError`.
Killed and interrupted runs (case 10) are in test_kill_resume.py, and mutated inputs in
test_fuzz.py. Tests elsewhere that already prove a case are named in docs/errors.md.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import socket
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import export_onnx, export_pt2, write_npz
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from wnplan import records
from wnplan.accelerator import load_accelerator_file
from wnplan.cli import main
from wnplan.data import load_data
from wnplan.errors import DataError, FileFormatError, ModelError, StoreError, WnplanError
from wnplan.models import load_model, model_sha256, onnx_graph
from wnplan.models.base import file_sha256
from wnplan.models.onnx_backend import make_session
from wnplan.models.onnx_files import MAX_MODEL_BYTES, MIN_DEFAULT_OPSET
from wnplan.noise import SiteNoise, derive_seed, draw_noise
from wnplan.plan import AllocationSettings, allocate
from wnplan.profiler import ProfileSettings, profile
from wnplan.quantize import Quantizer
from wnplan.simulate import check
from wnplan.store import Store, TrialResult

SEED = 0
ATOL = 1e-5
FEATURES = 4
HIDDEN = 5
CLASSES = 3
BACKENDS = ("pt2", "onnx")
# A profile that finishes in well under a second on the tiny models below.
QUICK = ProfileSettings(scope="both", sigmas=(0.1, 1.0, 10.0), repeats=2, seed=SEED)


def tiny_weights() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SEED)
    first = rng.standard_normal((FEATURES, HIDDEN)).astype(np.float32)
    second = rng.standard_normal((HIDDEN, CLASSES)).astype(np.float32)
    return first, second


def tiny_reference(x: np.ndarray, add_at_hidden: np.ndarray | None = None) -> np.ndarray:
    """Return relu(x · W1) · W2, with optional noise added to the Relu output."""
    first, second = tiny_weights()
    hidden = np.maximum(x @ first, 0.0)
    if add_at_hidden is not None:
        hidden = hidden + add_at_hidden
    return hidden @ second


def tiny_onnx(opset: int = 17, ir_version: int = 8, reverse_nodes: bool = False) -> onnx.ModelProto:
    """Return x (N, 4) → MatMul → Relu → MatMul → logits (N, 3), a dynamic batch, given opset."""
    first, second = tiny_weights()
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["logits"], name="fc2"),
    ]
    if reverse_nodes:
        nodes.reverse()
    initializers = [numpy_helper.from_array(first, "w1"), numpy_helper.from_array(second, "w2")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", FEATURES])]
    if ir_version < 4:  # IR versions before 4 list initializers among the graph inputs
        inputs += [helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)) for init in initializers]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])]
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def tiny_inputs(count: int = 10) -> np.ndarray:
    return np.random.default_rng(SEED + 1).standard_normal((count, FEATURES)).astype(np.float32)


def tiny_data(path: Path, count: int = 40) -> Path:
    """Write samples labelled by the tiny model's own predictions, so clean accuracy is 1."""
    x = tiny_inputs(count)
    return write_npz(path, x=x, y=tiny_reference(x).argmax(axis=1))


def additive(site_index: int, shape: tuple[int, ...], sigma: float = 0.5) -> dict:
    return {site_index: draw_noise(SiteNoise(sigma), shape, SEED, site_index, 0)}


def site_named(model, name: str):
    return next(site for site in model.sites if site.name == name)


def is_sorted(graph: onnx.GraphProto) -> bool:
    """Return whether every node reads only graph inputs, initializers and earlier outputs."""
    known = {value.name for value in graph.input} | {init.name for init in graph.initializer} | {""}
    for node in graph.node:
        if any(name not in known for name in node.input):
            return False
        known.update(node.output)
    return True


def run_cli(capsys: pytest.CaptureFixture, *arguments: str) -> tuple[int, str]:
    """Run `wnplan ARGUMENTS` in-process and return (exit code, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(argument) for argument in arguments])
    code = exit_info.value.code
    return (0 if code is None else code), capsys.readouterr().err


def assert_one_line_error(code: int, err: str, fragment: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("wnplan: error: "), err
    assert fragment in lines[0], lines[0]


# --- 1. external data in a sub-folder, working directory elsewhere ---


def save_external(model: onnx.ModelProto, path: Path, location: str = "weights.bin") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location, size_threshold=0
    )
    return path


@pytest.fixture
def external_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The tiny model with external weights in models/sub/; the working directory is elsewhere/.

    elsewhere/ contains a decoy weights.bin of the same size with other values, which a session
    that resolved external data against the working directory would read.
    """
    path = save_external(tiny_onnx(), tmp_path / "models" / "sub" / "tiny.onnx")
    data_file = path.parent / "weights.bin"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "weights.bin").write_bytes(np.full(data_file.stat().st_size // 4, 7.0, np.float32).tobytes())
    monkeypatch.chdir(elsewhere)
    return Path("..") / "models" / "sub" / "tiny.onnx"


def test_external_data_resolves_next_to_model(external_model):
    x = tiny_inputs()

    model = load_model(external_model)
    relu = site_named(model, "r")
    noise = additive(relu.index, (len(x), HIDDEN))
    suffix = model.suffix(relu.index)
    boundary = suffix.prepare(x)

    np.testing.assert_allclose(model.run(x), tiny_reference(x), rtol=0, atol=ATOL)
    np.testing.assert_allclose(model.run(x, noise), tiny_reference(x, noise[relu.index][1]), rtol=0, atol=ATOL)
    doubled = np.maximum(x @ tiny_weights()[0], 0) * 2 @ tiny_weights()[1]
    np.testing.assert_allclose(suffix.run(boundary, boundary[0] * 2), doubled, rtol=0, atol=ATOL)


def test_external_data_profile_from_other_folder(external_model, tmp_path):
    data = tiny_data(tmp_path / "data.npz")

    record = profile(external_model, str(data), QUICK, store=None)

    assert record["clean"]["accuracy"] == 1.0
    assert record["model"]["path"] == str(external_model)


def test_external_data_changes_model_hash(external_model):
    data_file = Path("..") / "models" / "sub" / "weights.bin"
    before = load_model(external_model).sha256
    assert model_sha256(external_model) == before

    data_file.write_bytes(bytes(reversed(data_file.read_bytes())))
    after = load_model(external_model).sha256

    assert after != before  # stored trials of the old weights are not reused
    assert model_sha256(external_model) == after


def test_external_data_missing_file_raises(external_model):
    (Path("..") / "models" / "sub" / "weights.bin").unlink()

    with pytest.raises(ModelError, match=r"external data file 'weights.bin' of tensor 'w1' not found"):
        load_model(external_model)


def test_external_data_truncated_file_raises(external_model):
    data_file = Path("..") / "models" / "sub" / "weights.bin"
    data_file.write_bytes(data_file.read_bytes()[:20])

    with pytest.raises(ModelError, match="truncated or belongs to another model"):
        load_model(external_model)


@pytest.mark.parametrize("location", ["../weights.bin", "/etc/hostname"])
def test_external_data_outside_model_folder_raises(tmp_path, location):
    path = save_external(tiny_onnx(), tmp_path / "sub" / "tiny.onnx")
    proto = onnx.load(str(path), load_external_data=False)
    for entry in proto.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    onnx.save(proto, str(path))

    with pytest.raises(ModelError, match="outside the model's folder"):
        load_model(path)


def test_session_rejects_unloaded_external_data(external_model):
    proto = onnx.load(str(external_model), load_external_data=False)

    with pytest.raises(ModelError, match="still refers to external data"):
        make_session(proto, external_model)


def test_model_over_two_gigabytes_raises(tmp_path):
    # One float32 tensor of 2^29 + 1 values (just over 2 GiB) in a sparse data file.
    count = (1 << 29) + 1
    tensor = TensorProto(name="big", data_type=TensorProto.FLOAT, dims=[count])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "big.bin"), ("offset", "0"), ("length", str(4 * count))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "big"], ["y"])],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, count])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, count])],
        [tensor],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with open(tmp_path / "big.bin", "wb") as stream:
        stream.truncate(4 * count)
    onnx.save(model, str(tmp_path / "big.onnx"))
    assert 4 * count > MAX_MODEL_BYTES

    with pytest.raises(ModelError, match=r"2\.15 GB; .*protobuf cannot serialize 2 GB"):
        load_model(tmp_path / "big.onnx")


# --- 2. nodes out of topological order ---


def test_out_of_order_graph_rewrites_pass_checker(tmp_path):
    proto = tiny_onnx(reverse_nodes=True)
    with pytest.raises(onnx.checker.ValidationError, match="topologically sorted"):
        onnx.checker.check_model(proto)
    onnx.save(proto, str(tmp_path / "reversed.onnx"))
    x = tiny_inputs()

    model = load_model(tmp_path / "reversed.onnx")

    names = [site.name for site in model.sites]
    assert names == ["x", "h", "r", "logits"]
    rewritten = [onnx_graph.insert_noise(model.proto, [name], [(True, True)], model._types) for name in names]
    rewritten.append(onnx_graph.insert_noise(model.proto, names, [(True, True)] * len(names), model._types))
    rewritten += [onnx_graph.extract_suffix(model.proto, model._nodes, name, model._types)[0] for name in names]
    rewritten.append(onnx_graph.with_outputs(model.proto, names, model._types))
    for graph_model in rewritten:
        assert is_sorted(graph_model.graph)
        onnx.checker.check_model(graph_model, full_check=True)
    relu = site_named(model, "r")
    noise = additive(relu.index, (len(x), HIDDEN))
    np.testing.assert_allclose(model.run(x, noise), tiny_reference(x, noise[relu.index][1]), rtol=0, atol=ATOL)


# --- 3. independent, reproducible noise however sessions are created ---


@pytest.mark.parametrize("backend", BACKENDS)
def test_fresh_sessions_draw_noise_from_trial_seed(backend, residual_model, residual_inputs):
    path = residual_model.path(backend)
    first, fresh = load_model(path), load_model(path)  # two models, so two sets of sessions
    site = first.sites[3]
    shape = (len(residual_inputs), *site.shape)
    seeds = [derive_seed(SEED, {"scope": "walking", "sites": [site.name], "repeat": repeat}) for repeat in (0, 1)]

    def noisy(model, seed):
        return model.run(residual_inputs, {site.index: draw_noise(SiteNoise(0.5), shape, seed, site.index, 0)})

    np.testing.assert_array_equal(noisy(first, seeds[0]), noisy(fresh, seeds[0]))
    np.testing.assert_array_equal(noisy(fresh, seeds[1]), noisy(first, seeds[1]))
    assert not np.allclose(noisy(fresh, seeds[0]), noisy(fresh, seeds[1]))


def test_profile_repeats_draw_independent_noise(digits_mlp):
    settings = ProfileSettings(scope="walking", sites="1", sigmas=(1.0, 3.0), repeats=4, seed=SEED)

    first = profile(digits_mlp.onnx, "digits", settings, limit=100, store=None)
    again = profile(digits_mlp.onnx, "digits", settings, limit=100, store=None)

    points = first["sites"][1]["walking"]["points"][1:]
    assert any(point["stderr"] > 0 for point in points)  # the repeats differ
    assert records.dumps(first) == records.dumps(again)


# --- 4. ONNX-ML and old opsets ---


def ml_classifier(path: Path) -> Path:
    """Save a model that imports only ai.onnx.ml: LinearClassifier with labels, then scores."""
    first, second = tiny_weights()
    coefficients = (first @ second).T  # (classes, features)
    node = helper.make_node(
        "LinearClassifier",
        ["x"],
        ["label", "scores"],
        domain="ai.onnx.ml",
        coefficients=coefficients.ravel().tolist(),
        intercepts=[0.0] * CLASSES,
        classlabels_ints=list(range(CLASSES)),
        post_transform="NONE",
    )
    graph = helper.make_graph(
        [node],
        "ml",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", FEATURES])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, ["batch"]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", CLASSES]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("ai.onnx.ml", 1)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_ml_only_model_imports_default_opset(tmp_path):
    path = ml_classifier(tmp_path / "ml.onnx")
    x = tiny_inputs()
    expected = x @ (tiny_weights()[0] @ tiny_weights()[1])

    model = load_model(path)

    assert [site.name for site in model.sites] == ["x", "scores"]
    np.testing.assert_allclose(model.run(x), expected, rtol=0, atol=1e-4)
    rewritten = onnx_graph.insert_noise(model.proto, ["x"], [(True, True)], model._types, [Quantizer(-2.0, 2.0, 4)])
    imports = {entry.domain: entry.version for entry in rewritten.opset_import}
    assert imports == {"ai.onnx.ml": 1, "": 18}  # the newest default opset of IR version 8
    noise = additive(0, x.shape)
    noisy_expected = (x + noise[0][1]) @ (tiny_weights()[0] @ tiny_weights()[1])
    np.testing.assert_allclose(model.run(x, noise), noisy_expected, rtol=0, atol=1e-4)


def test_ml_only_model_profiles(tmp_path):
    path = ml_classifier(tmp_path / "ml.onnx")
    x = tiny_inputs(40)
    data = write_npz(tmp_path / "data.npz", x=x, y=(x @ tiny_weights()[0] @ tiny_weights()[1]).argmax(axis=1))

    record = profile(path, str(data), QUICK, store=None)

    assert record["clean"]["accuracy"] == 1.0
    assert record["classes"] == CLASSES
    assert record["sites"][0]["walking"]["fit"]["status"] in ("ok", "robust", "sensitive", "fallback")


def test_opset_below_seven_raises_with_conversion_hint(tmp_path):
    onnx.save(tiny_onnx(opset=6, ir_version=3), str(tmp_path / "old.onnx"))

    with pytest.raises(ModelError) as raised:
        load_model(tmp_path / "old.onnx")

    message = str(raised.value)
    assert "uses ONNX opset 6" in message
    assert f"needs opset {MIN_DEFAULT_OPSET} or newer" in message
    assert "onnx.version_converter" in message


def test_opset_newer_than_onnx_raises(tmp_path):
    newest = onnx.defs.onnx_opset_version()
    onnx.save(tiny_onnx(opset=newest + 1), str(tmp_path / "new.onnx"))

    with pytest.raises(ModelError, match=f"uses ONNX opset {newest + 1}, newer than"):
        load_model(tmp_path / "new.onnx")


def test_opset_seven_quantization_uses_opset_seven_operators(tmp_path):
    onnx.save(tiny_onnx(opset=7, ir_version=3), str(tmp_path / "opset7.onnx"))
    x = tiny_inputs()
    model = load_model(tmp_path / "opset7.onnx")
    relu = site_named(model, "r")
    quantizer = Quantizer(0.0, 3.0, 3)

    rewritten = onnx_graph.insert_noise(model.proto, ["r"], [(False, False)], model._types, [quantizer])
    logits = model.run(x, quantize={relu.index: quantizer})

    assert "Round" not in {node.op_type for node in rewritten.graph.node}  # Round needs opset 11
    onnx.checker.check_model(rewritten, full_check=True)
    hidden = quantizer.apply(np.maximum(x @ tiny_weights()[0], 0.0))
    np.testing.assert_allclose(logits, hidden @ tiny_weights()[1], rtol=0, atol=ATOL)


# --- 5. batch fixed at export ---


class BakedBatchNet(nn.Module):
    """Flattens with reshape(1, -1), which bakes a batch of 1 into the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2 * 3, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(x.reshape(1, -1)))


def per_sample(module: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([module(torch.from_numpy(row[None])).numpy() for row in x])


def test_onnx_baked_batch_runs_per_sample(tmp_path, caplog):
    torch.manual_seed(SEED)
    module = BakedBatchNet().eval()
    path = export_onnx(module, torch.zeros(1, 2, 3), tmp_path / "baked.onnx")  # declares a dynamic batch
    x = np.random.default_rng(SEED).standard_normal((7, 2, 3)).astype(np.float32)

    with caplog.at_level(logging.WARNING, logger="wnplan.models.onnx_backend"):
        model = load_model(path)

    assert model.input_shape == (None, 2, 3)
    assert model.fixed_batch == 1
    assert "runs only with batch 1" in caplog.text
    np.testing.assert_allclose(model.run(x), per_sample(module, x), rtol=0, atol=ATOL)
    suffix = model.suffix(1)
    boundary = suffix.prepare(x)
    np.testing.assert_allclose(suffix.run(boundary, boundary[0]), per_sample(module, x), rtol=0, atol=ATOL)


def test_onnx_baked_batch_profiles(tmp_path):
    torch.manual_seed(SEED)
    module = BakedBatchNet().eval()
    path = export_onnx(module, torch.zeros(1, 2, 3), tmp_path / "baked.onnx")
    x = np.random.default_rng(SEED).standard_normal((9, 2, 3)).astype(np.float32)
    data = write_npz(tmp_path / "data.npz", x=x, y=per_sample(module, x).argmax(axis=1))

    record = profile(path, str(data), QUICK, store=None)

    assert record["clean"]["accuracy"] == 1.0


def test_pt2_baked_batch_of_one_runs_in_chunks(tmp_path):
    torch.manual_seed(SEED)
    module = BakedBatchNet().eval()
    path = export_pt2(module, torch.zeros(1, 2, 3), tmp_path / "baked.pt2", dynamic=False)
    x = np.random.default_rng(SEED).standard_normal((7, 2, 3)).astype(np.float32)

    model = load_model(path)

    assert model.fixed_batch == 1
    np.testing.assert_allclose(model.run(x), per_sample(module, x), rtol=0, atol=ATOL)


def test_pt2_recorded_batch_range_is_respected(tmp_path):
    torch.manual_seed(SEED)
    module = nn.Sequential(nn.Flatten(), nn.Linear(6, CLASSES)).eval()
    x = np.random.default_rng(SEED).standard_normal((7, 2, 3)).astype(np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    # Dim.AUTO records a batch of at least 2; an explicit Dim records at most 3.
    automatic = torch.export.export(module, (torch.zeros(4, 2, 3),), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    up_to_three = ({0: torch.export.Dim("batch", min=1, max=3)},)
    bounded = torch.export.export(module, (torch.zeros(2, 2, 3),), dynamic_shapes=up_to_three)
    torch.export.save(automatic, str(tmp_path / "automatic.pt2"))
    torch.export.save(bounded, str(tmp_path / "bounded.pt2"))

    for name, (minimum, maximum) in {"automatic": (2, None), "bounded": (1, 3)}.items():
        model = load_model(tmp_path / f"{name}.pt2")
        assert (model.batch_limits.minimum, model.batch_limits.maximum) == (minimum, maximum)
        np.testing.assert_allclose(model.run(x), expected, rtol=0, atol=ATOL)
        np.testing.assert_allclose(model.run(x[:1]), expected[:1], rtol=0, atol=ATOL)


FACTORY_SOURCE = '''
"""Factory used by a hardening test."""
from torch import nn


class Baked(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(x.reshape(1, -1))


def build():
    return Baked()
'''


def test_state_dict_baked_batch_exports_batch_one(tmp_path, monkeypatch):
    (tmp_path / "wnplan_baked_factory.py").write_text(FACTORY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import wnplan_baked_factory

    torch.manual_seed(SEED)
    module = wnplan_baked_factory.build().eval()
    torch.save(module.state_dict(), tmp_path / "weights.pt")
    x = np.random.default_rng(SEED).standard_normal((5, 2, 3)).astype(np.float32)

    model = load_model(tmp_path / "weights.pt", factory="wnplan_baked_factory:build", sample=x[:2])

    assert model.fixed_batch == 1
    np.testing.assert_allclose(model.run(x), per_sample(module, x), rtol=0, atol=ATOL)


# --- 6. one module instance called at two places ---


class ReusedReluNet(nn.Module):
    """One nn.ReLU instance applied after two layers."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(FEATURES, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, HIDDEN)
        self.out = nn.Linear(HIDDEN, CLASSES)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor, first: torch.Tensor | None = None, second: torch.Tensor | None = None):
        hidden = self.act(self.fc1(x))
        if first is not None:
            hidden = hidden + first
        hidden = self.act(self.fc2(hidden))
        if second is not None:
            hidden = hidden + second
        return self.out(hidden)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reused_module_gives_two_independent_sites(backend, tmp_path):
    torch.manual_seed(SEED)
    module = ReusedReluNet().eval()
    example = torch.zeros(2, FEATURES)
    path = (export_pt2 if backend == "pt2" else export_onnx)(module, example, tmp_path / f"reused.{backend}")
    x = tiny_inputs()

    model = load_model(path)

    relu_sites = [site for site in model.sites if site.op in ("relu", "Relu")]
    assert len(relu_sites) == 2
    assert relu_sites[0].name != relu_sites[1].name
    for position, site in enumerate(relu_sites):
        noise = additive(site.index, (len(x), HIDDEN), sigma=0.8)
        add = torch.from_numpy(noise[site.index][1])
        with torch.no_grad():
            expected = module(torch.from_numpy(x), *((add, None) if position == 0 else (None, add))).numpy()
        np.testing.assert_allclose(model.run(x, noise), expected, rtol=0, atol=ATOL)


# --- 7. a PyTorch model left in train mode ---


class TrainModeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(FEATURES, HIDDEN)
        self.norm = nn.BatchNorm1d(HIDDEN)
        self.drop = nn.Dropout(0.5)
        self.out = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.drop(torch.relu(self.norm(self.fc(x)))))


def train_mode_module() -> nn.Module:
    """Return the net with non-default BatchNorm statistics, left in train mode."""
    torch.manual_seed(SEED)
    module = TrainModeNet()
    with torch.no_grad():
        module(torch.randn(64, FEATURES) * 3 + 1)
    return module.train()


def eval_outputs(module: nn.Module, x: np.ndarray) -> np.ndarray:
    evaluated = copy.deepcopy(module).eval()
    with torch.no_grad():
        return evaluated(torch.from_numpy(x)).numpy()


@pytest.mark.filterwarnings("ignore::FutureWarning")  # run_decompositions warns about its own internals
@pytest.mark.parametrize("decomposed", [False, True], ids=["training-ir", "core-aten"])
def test_pt2_train_mode_evaluates_in_eval_mode(tmp_path, caplog, decomposed):
    module = train_mode_module()
    shapes = ({0: torch.export.Dim("batch", min=1)},)
    program = torch.export.export(module, (torch.zeros(4, FEATURES),), dynamic_shapes=shapes)
    if decomposed:
        program = program.run_decompositions()
    path = tmp_path / "train.pt2"
    torch.export.save(program, str(path))
    sha_before = file_sha256(path)
    x = tiny_inputs()
    data = write_npz(tmp_path / "data.npz", x=tiny_inputs(40), y=np.zeros(40, np.int64))

    with caplog.at_level(logging.WARNING, logger="wnplan.models.torch_backend"):
        model = load_model(path)
    state_before = {key: value.clone() for key, value in model._module.state_dict().items()}
    first = model.run(x)
    profile(path, str(data), QUICK, store=None)
    model.run(x, additive(2, (len(x), HIDDEN)))

    assert "exported in train mode" in caplog.text
    np.testing.assert_allclose(first, eval_outputs(module, x), rtol=0, atol=ATOL)  # running statistics, no dropout
    np.testing.assert_array_equal(model.run(x), first)
    for key, value in model._module.state_dict().items():
        assert torch.equal(value, state_before[key]), key
    assert file_sha256(path) == sha_before


def test_pickle_train_mode_evaluates_in_eval_mode(tmp_path):
    module = train_mode_module()
    path = tmp_path / "module.pt"
    torch.save(module, path)
    sha_before = file_sha256(path)
    x = tiny_inputs()

    model = load_model(path, trust=True, sample=x[:2])

    np.testing.assert_allclose(model.run(x), eval_outputs(module, x), rtol=0, atol=ATOL)
    assert file_sha256(path) == sha_before


# --- 8. fit pathologies, end to end ---


def constant_model(path: Path) -> Path:
    """Save a model whose scores ignore the input: logits = x · 0 + (1, 0, 0)."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "zeros"], ["product"]),
            helper.make_node("Add", ["product", "bias"], ["logits"]),
        ],
        "constant",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        [
            numpy_helper.from_array(np.zeros((FEATURES, CLASSES), np.float32), "zeros"),
            numpy_helper.from_array(np.array([1.0, 0.0, 0.0], np.float32), "bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(
    ("labels", "status"),
    [("all-zero", "robust"), ("balanced", "failed")],
)
def test_flat_curve_gets_status_without_midpoint(tmp_path, labels, status):
    path = constant_model(tmp_path / "constant.onnx")
    y = np.zeros(30, np.int64) if labels == "all-zero" else np.arange(30) % CLASSES
    data = write_npz(tmp_path / "data.npz", x=tiny_inputs(30), y=y)
    settings = ProfileSettings(scope="walking", sites="0", sigmas=(0.1, 1.0, 10.0), repeats=2, seed=SEED)

    record = profile(path, str(data), settings, store=None)

    fit = record["sites"][0]["walking"]["fit"]
    assert fit["status"] == status
    if status == "robust":
        assert fit["midpoint"] == 10.0
        assert fit["lower_bound"] is True
    else:
        assert fit["midpoint"] is None
    assert "NaN" not in records.dumps(record)


# --- 9. hostile files ---


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 0.99])
def test_truncated_onnx_raises_model_error(tmp_path, fraction):
    data = tiny_onnx().SerializeToString()
    (tmp_path / "cut.onnx").write_bytes(data[: int(len(data) * fraction)])

    with pytest.raises(ModelError):
        load_model(tmp_path / "cut.onnx")


@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.95])
def test_truncated_pt2_raises_model_error(tmp_path, residual_model, fraction):
    data = residual_model.pt2.read_bytes()
    (tmp_path / "cut.pt2").write_bytes(data[: int(len(data) * fraction)])

    with pytest.raises(ModelError, match=r"not a readable torch\.export"):
        load_model(tmp_path / "cut.pt2")


def test_truncated_pt2_is_one_line_in_cli(tmp_path, capsys, residual_model):
    data = residual_model.pt2.read_bytes()
    (tmp_path / "cut.pt2").write_bytes(data[: len(data) // 2])

    code, err = run_cli(capsys, "sites", tmp_path / "cut.pt2")

    assert_one_line_error(code, err, "not a readable torch.export")


@pytest.mark.parametrize("fraction", [0.1, 0.6, 0.95])
def test_truncated_npz_raises_data_error(tmp_path, fraction):
    path = tiny_data(tmp_path / "data.npz")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])

    with pytest.raises(DataError):
        load_data(str(path))


def test_npy_file_named_npz_raises(tmp_path):
    np.save(tmp_path / "array.npy", tiny_inputs())
    (tmp_path / "array.npy").rename(tmp_path / "array.npz")

    with pytest.raises(DataError, match=r"one \.npy array, not a \.npz archive"):
        load_data(str(tmp_path / "array.npz"))


@pytest.mark.parametrize(
    ("x", "y", "fragment"),
    [
        (np.ones((4, 2), np.complex64), np.zeros(4, np.int64), "x has dtype complex64"),
        (np.ones((4, 2), np.float32), np.array(["a", "b", "c", "d"]), "y has dtype <U1"),
        (np.ones((4, 2), np.float32), np.eye(4, dtype=np.int64), "y.argmax(axis=1)"),
        (np.ones((4, 2), np.float32), np.array([0, 1, np.inf, 2]), "y contains NaN or inf"),
        (np.ones((4, 2), np.float32), np.array([0, 1, 2**60, 2], np.uint64), "too large for a class index"),
        (np.ones(4, np.float32), np.zeros(4, np.int64), "expected (samples, ...)"),
    ],
    ids=["complex-x", "string-y", "one-hot-y", "inf-label", "huge-label", "one-dimensional-x"],
)
def test_malformed_arrays_raise_data_error(tmp_path, x, y, fragment):
    path = write_npz(tmp_path / "bad.npz", x=x, y=y)

    with pytest.raises(DataError) as raised:
        load_data(str(path))

    assert fragment in str(raised.value)


def test_column_labels_and_bool_images_load(tmp_path):
    x = np.array([[True, False], [False, True], [True, True]])
    path = write_npz(tmp_path / "column.npz", x=x, y=np.array([[0], [1], [2]]))

    data = load_data(str(path))

    np.testing.assert_array_equal(data.y, [0, 1, 2])
    np.testing.assert_array_equal(data.x, x.astype(np.float32))


def test_labels_beyond_model_classes_raise(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_onnx(), str(path))
    data = write_npz(tmp_path / "data.npz", x=tiny_inputs(6), y=np.array([0, 1, 2, 3, 4, 5]))

    with pytest.raises(DataError, match="labels go up to 5 but the model outputs 3 classes"):
        profile(path, str(data), QUICK, store=None)


def test_deeply_nested_record_raises_file_format_error(tmp_path):
    path = tmp_path / "nested.json"
    path.write_text('{"kind": "profile", "sites": ' + "[" * 100_000 + "]" * 100_000 + "}")

    with pytest.raises(FileFormatError, match="nested too deeply"):
        records.read_record(path, "profile")


def scores_model(path: Path, output: str) -> Path:
    """Save a model whose output is an int64 label, a 4-D tensor, or a single score column."""
    if output == "label":
        nodes = [helper.make_node("ArgMax", ["x"], ["out"], axis=1, keepdims=0)]
        value = helper.make_tensor_value_info("out", TensorProto.INT64, ["batch"])
    elif output == "four-d":
        nodes = [helper.make_node("Reshape", ["x", "shape"], ["out"])]
        value = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 1, 2, 2])
    else:
        nodes = [helper.make_node("ReduceSum", ["x", "axes"], ["out"], keepdims=1)]
        value = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 1])
    initializers = [
        numpy_helper.from_array(np.array([-1, 1, 2, 2], np.int64), "shape"),
        numpy_helper.from_array(np.array([1], np.int64), "axes"),
    ]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", FEATURES])]
    graph = helper.make_graph(nodes, "scores", inputs, [value], initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize(
    ("output", "fragment"),
    [
        ("label", "no output of the model is a floating-point tensor"),
        ("four-d", "wnplan needs floating-point class scores of shape"),
        ("one-column", "1 column for each sample"),
    ],
)
def test_output_that_is_not_class_scores_raises(tmp_path, output, fragment):
    path = scores_model(tmp_path / f"{output}.onnx", output)

    def load_and_run() -> None:
        load_model(path).run(tiny_inputs())

    with pytest.raises(ModelError, match=fragment):
        load_and_run()


def test_integer_input_model_raises(tmp_path):
    model = tiny_onnx()
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.UINT8
    onnx.save(model, str(tmp_path / "uint8.onnx"))

    with pytest.raises(ModelError, match="has type UINT8; wnplan feeds floating-point samples"):
        load_model(tmp_path / "uint8.onnx")


def test_store_that_is_not_sqlite_raises(tmp_path):
    path = tmp_path / "store.sqlite"
    path.write_bytes(b"not a database at all, just text " * 100)

    with pytest.raises(StoreError, match="unreadable or not a SQLite database"):
        Store(path)


def test_store_of_another_tool_raises(tmp_path):
    import sqlite3

    with sqlite3.connect(tmp_path / "other.sqlite") as connection:
        connection.execute("CREATE TABLE trials (id INTEGER, note TEXT)")

    with pytest.raises(StoreError, match="not a wnplan result store"):
        Store(tmp_path / "other.sqlite")


def test_store_row_edited_by_hand_is_measured_again(tmp_path, caplog):
    import sqlite3

    path = tmp_path / "store.sqlite"
    with Store(path) as store:
        store.put("good", "m", "d", {}, TrialResult(3, 4))
        store.put("bad", "m", "d", {}, TrialResult(3, 4))
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE trials SET correct = 9, extra = '[' WHERE key = 'bad'")

    with Store(path) as store, caplog.at_level(logging.WARNING, logger="wnplan.store"):
        found = store.get_many(["good", "bad"])
        store.put("bad", "m", "d", {}, TrialResult(2, 4))
        again = store.get_many(["bad"])

    assert set(found) == {"good"}
    assert "deleting an invalid stored result" in caplog.text
    assert again["bad"].correct == 2


# --- 11. security ---


class CreatesFolder:
    """Unpickling this object calls os.mkdir(path): a stand-in for arbitrary code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def rewrite_archive(source: Path, target: Path, edit) -> Path:
    """Copy a zip archive, passing each member's name and bytes through `edit`."""
    with zipfile.ZipFile(source) as reader, zipfile.ZipFile(target, "w") as writer:
        for info in reader.infolist():
            content = edit(info.filename, reader.read(info))
            if content is not None:
                writer.writestr(info, content)
    return target


def edit_program(edit):
    """Return an archive edit that changes the program JSON (models/model.json)."""

    def apply(name: str, content: bytes) -> bytes:
        if name.endswith("models/model.json"):
            program = json.loads(content)
            edit(program)
            return json.dumps(program).encode()
        return content

    return apply


def hostile_shape_expression(marker: Path):
    def edit(program: dict) -> None:
        values = program["graph_module"]["graph"]["tensor_values"]
        sizes = next(value["sizes"] for value in values.values() if "as_expr" in value["sizes"][0])
        sizes[0]["as_expr"]["expr_str"] = f"__import__('os').mkdir('{marker}')"

    return edit_program(edit)


def hostile_guard(marker: Path):
    def edit(program: dict) -> None:
        program["guards_code"] = [f"__import__('os').mkdir('{marker}') or True"]

    return edit_program(edit)


def hostile_sample_inputs(marker: Path):
    def apply(name: str, content: bytes) -> bytes:
        if "sample_inputs/" in name:
            buffer = io.BytesIO()
            torch.save(((CreatesFolder(marker),), {}), buffer)
            return buffer.getvalue()
        return content

    return apply


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (hostile_shape_expression, "contains a shape expression"),
        (hostile_guard, "contains an input guard"),
        (hostile_sample_inputs, "pickled data that only --trust allows"),
    ],
    ids=["shape-expression", "guard", "pickled-sample-inputs"],
)
def test_pt2_with_code_is_rejected_without_running_it(tmp_path, residual_model, edit, fragment):
    marker = tmp_path / "code-ran"
    path = rewrite_archive(residual_model.pt2, tmp_path / "hostile.pt2", edit(marker))

    with pytest.raises(ModelError, match=fragment):
        load_model(path)

    assert not marker.exists()


def test_pt2_with_pickled_object_member_is_rejected(tmp_path, residual_model):
    root = zipfile.ZipFile(residual_model.pt2).namelist()[0].split("/")[0]
    path = rewrite_archive(residual_model.pt2, tmp_path / "opaque.pt2", lambda name, content: content)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr(f"{root}/data/constants/opaque_obj_0", b"anything")

    with pytest.raises(ModelError, match=r"pickled Python object .*opaque_obj_0"):
        load_model(path)


def test_pt2_loads_with_trust_and_without(residual_model, residual_inputs):
    checked = load_model(residual_model.pt2)
    trusted = load_model(residual_model.pt2, trust=True)

    np.testing.assert_array_equal(checked.run(residual_inputs), trusted.run(residual_inputs))
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def test_state_dict_with_pickled_code_is_not_unpickled(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"fc.weight": CreatesFolder(marker)}, tmp_path / "weights.pt")

    with pytest.raises(ModelError, match="cannot read the state dict safely"):
        load_model(tmp_path / "weights.pt", factory="torch.nn:Identity", sample=tiny_inputs(2))

    assert not marker.exists()


def test_pickled_module_needs_trust(tmp_path):
    torch.save(train_mode_module(), tmp_path / "module.pt")

    with pytest.raises(ModelError, match="--trust to unpickle a full module"):
        load_model(tmp_path / "module.pt", sample=tiny_inputs(2))


# torch.jit.script is deprecated, but users still have TorchScript archives.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("trust", [False, True])
def test_torchscript_is_rejected_without_loading(tmp_path, trust):
    scripted = torch.jit.script(nn.Linear(FEATURES, CLASSES))
    scripted.save(str(tmp_path / "scripted.pt"))

    with pytest.raises(ModelError, match="TorchScript archives are not supported"):
        load_model(tmp_path / "scripted.pt", trust=trust, sample=tiny_inputs(2))


def test_accelerator_and_record_files_are_data_only(tmp_path, digits_profile):
    marker = tmp_path / "code-ran"
    code = f"__import__('os').mkdir('{marker}')"
    accelerator = tmp_path / "device.toml"
    accelerator.write_text(
        f'name = "{code}"\ndescription = "{code}"\nsource = "{code}"\n' +
        '[noise]\nkind = "additive"\nsigma_add = 0.1\nsigma_mul = 0.0\nreference = "rms"\n' +
        "[cost]\nexecution = 1.0\nshielded = 4.0\n[bits]\nwidths = [4, 8]\n"
    )
    edited = copy.deepcopy(digits_profile)
    edited["sites"][1]["name"] = code
    edited["settings"]["site_selection"] = code
    profile_path = records.write_record(edited, "profile", tmp_path / "profile.json")

    try:
        load_accelerator_file(accelerator)
    except WnplanError:
        pass  # a rejected value is fine; running it is not
    record = records.read_record(profile_path, "profile")
    allocate(record, AllocationSettings(budget=3 * len(record["sites"]), method="paper"), profile_path=profile_path)

    assert not marker.exists()


def test_profile_allocate_check_open_no_socket(digits_mlp, tmp_path, monkeypatch):
    attempts: list[tuple] = []

    def reject_connection(*arguments, **options):
        attempts.append(arguments)
        raise OSError("a wnplan test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "__init__", reject_connection)
    monkeypatch.setattr(socket, "create_connection", reject_connection)
    monkeypatch.setattr(socket, "getaddrinfo", reject_connection)
    profile_settings = ProfileSettings(scope="both", sigmas=(0.1, 1.0, 3.0), repeats=2, seed=SEED)

    record = profile(digits_mlp.onnx, "digits", profile_settings, limit=60, store=tmp_path / "store.sqlite")
    profile_path = records.write_record(record, "profile", tmp_path / "profile.json")
    settings = AllocationSettings(budget=3 * len(record["sites"]), search_budget=0.0)
    plan = allocate(record, settings, profile_path=profile_path)
    plan_path = records.write_record(plan, "plan", tmp_path / "plan.json")
    result = check(plan, repeats=2, seed=SEED, plan_path=plan_path)

    assert result["results"]["plan"]["accuracy"] > 0
    assert attempts == []
