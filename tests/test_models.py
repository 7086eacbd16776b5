"""Tests for the model backends (wnplan.models): sites, graph edits, suffixes, batching, loading.

Models are built in code and exported into temporary folders (see conftest.py). Weights are
random (torch seed 0), because no test here needs a trained model.
"""

from __future__ import annotations

import copy
import json
import textwrap
import zipfile

import numpy as np
import onnx
import pytest
import torch
from conftest import RESIDUAL_SHAPE, SharedLinearNet, export_onnx, export_pt2
from torch import nn

from wnplan.errors import DataError, ModelError
from wnplan.models import load_model, onnx_graph, read_declaration
from wnplan.models.base import file_sha256
from wnplan.noise import SiteNoise, apply_noise, draw_noise

BACKENDS = ("pt2", "onnx")
SEED = 7
# onnxruntime runs the suffix and the full graph with different kernel fusions, so ONNX
# results may differ in the last float32 bits (observed up to 1.2e-7 on the residual model).
ONNX_ATOL = 1e-6


# --- the research architectures ---


def _mlp(batch_norm: bool) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = 28 * 28
    for _ in range(3):
        layers.append(nn.Linear(width, 64))
        if batch_norm:
            layers.append(nn.BatchNorm1d(64))
        layers.append(nn.ReLU())
        width = 64
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def _lenet5(batch_norm: bool) -> nn.Module:
    def block(layer: nn.Module, norm: nn.Module) -> list[nn.Module]:
        return [layer, norm, nn.ReLU()] if batch_norm else [layer, nn.ReLU()]

    return nn.Sequential(
        *block(nn.Conv2d(1, 6, 5), nn.BatchNorm2d(6)),
        nn.MaxPool2d(2),
        *block(nn.Conv2d(6, 16, 5), nn.BatchNorm2d(16)),
        nn.MaxPool2d(2),
        nn.Flatten(),
        *block(nn.Linear(16 * 4 * 4, 120), nn.BatchNorm1d(120)),
        *block(nn.Linear(120, 84), nn.BatchNorm1d(84)),
        nn.Linear(84, 10),
    )


RESEARCH_ARCHITECTURES = {
    "mlp": (lambda: _mlp(False), 8),
    "mlp_bn": (lambda: _mlp(True), 11),
    "lenet5": (lambda: _lenet5(False), 12),
    "lenet5_bn": (lambda: _lenet5(True), 16),
}


@pytest.fixture(scope="module")
def research_models(tmp_path_factory) -> dict:
    """The four research architectures (random weights, seed 0), exported to .pt2 and .onnx."""
    folder = tmp_path_factory.mktemp("research")
    torch.manual_seed(0)
    example = torch.randn(2, 1, 28, 28)
    exported = {}
    for name, (build, _) in RESEARCH_ARCHITECTURES.items():
        module = build().eval()
        exported[name] = (
            export_pt2(module, example, folder / f"{name}.pt2"),
            export_onnx(module, example, folder / f"{name}.onnx"),
        )
    return exported


@pytest.mark.parametrize("name", list(RESEARCH_ARCHITECTURES))
def test_pt2_site_count_matches_research(name, research_models):
    expected = RESEARCH_ARCHITECTURES[name][1]

    model = load_model(research_models[name][0])

    assert len(model.sites) == expected, [site.op for site in model.sites]
    assert model.sites[0].op == "input"


def test_pt2_batch_norm_sites_are_normalization(research_models):
    model = load_model(research_models["lenet5_bn"][0])

    normalization = [site.index for site in model.sites if site.is_normalization]

    assert len(normalization) == 4
    assert all(model.sites[index - 1].op in ("conv2d", "linear") for index in normalization)


@pytest.mark.parametrize("name", ["mlp", "mlp_bn", "lenet5"])
def test_onnx_site_count_matches_pt2(name, research_models):
    expected = RESEARCH_ARCHITECTURES[name][1]

    model = load_model(research_models[name][1])

    assert len(model.sites) == expected, [site.op for site in model.sites]


def test_onnx_lenet5_bn_folds_conv_batch_norm(research_models):
    path = research_models["lenet5_bn"][1]
    graph_ops = [node.op_type for node in onnx.load(str(path)).graph.node]

    model = load_model(path)

    # The exporter folds both Conv+BatchNorm2d pairs; the two BatchNorm1d layers stay.
    assert graph_ops.count("BatchNormalization") == 2
    assert [site.op for site in model.sites].count("BatchNormalization") == 2
    assert len(model.sites) == 16 - 2


# --- ONNX graph edits ---


def test_onnx_insert_noise_passes_checker(residual_model):
    model = load_model(residual_model.onnx)
    names = [site.name for site in model.sites]

    for index, name in enumerate(names):
        rewritten = onnx_graph.insert_noise(model.proto, [name], [(True, True)], model._types)
        onnx.checker.check_model(rewritten, full_check=True)
        assert [node.op_type for node in rewritten.graph.node].count("Mul") >= 1, index

    parts = [(True, False), (False, True)] * 5 + [(True, True)]
    every_site = onnx_graph.insert_noise(model.proto, names, parts, model._types)
    onnx.checker.check_model(every_site, full_check=True)
    added = [value.name for value in every_site.graph.input if value.name.startswith(onnx_graph.NOISE_INPUT_PREFIX)]
    assert len(added) == 5 + 5 + 2


def test_onnx_insert_noise_leaves_original_unchanged(residual_model):
    model = load_model(residual_model.onnx)
    before = model.proto.SerializeToString()

    onnx_graph.insert_noise(model.proto, [model.sites[3].name], [(True, True)], model._types)

    assert model.proto.SerializeToString() == before


def test_onnx_extract_suffix_passes_checker(residual_model):
    model = load_model(residual_model.onnx)

    for site in model.sites:
        suffix, boundary = onnx_graph.extract_suffix(model.proto, model._nodes, site.name, model._types)
        onnx.checker.check_model(suffix, full_check=True)
        assert boundary[0] == site.name
        assert [value.name for value in suffix.graph.input] == boundary


# --- suffix runs ---


@pytest.mark.parametrize("backend", BACKENDS)
def test_suffix_run_equals_full_noisy_run(backend, residual_model, residual_inputs):
    model = load_model(residual_model.path(backend))
    atol = ONNX_ATOL if backend == "onnx" else 0.0
    crossing = []

    for site in model.sites:
        shape = (residual_inputs.shape[0], *site.shape)
        mul, add = draw_noise(SiteNoise(0.3, 0.2), shape, SEED, site.index, start=0)
        full = model.run(residual_inputs, {site.index: (mul, add)})

        suffix = model.suffix(site.index)
        boundary = suffix.prepare(residual_inputs)
        partial = suffix.run(boundary, apply_noise(boundary[0], mul, add))

        np.testing.assert_allclose(partial, full, rtol=0, atol=atol, err_msg=f"site {site.index} {site.name}")
        assert not np.array_equal(full, model.run(residual_inputs)), site.name
        if len(boundary) > 1:
            crossing.append(site.op)

    # Sites inside the residual block need the skip connection's start as a second input.
    assert len(crossing) >= 2, crossing


@pytest.mark.parametrize("backend", BACKENDS)
def test_suffix_prepare_returns_clean_site_value(backend, residual_model, residual_inputs):
    model = load_model(residual_model.path(backend))

    for site in model.sites:
        boundary = model.suffix(site.index).prepare(residual_inputs)
        (clean,) = model.activations(residual_inputs, [site.index])
        np.testing.assert_allclose(boundary[0], clean, rtol=1e-6, atol=1e-6)
        assert boundary[0].shape == (residual_inputs.shape[0], *site.shape)


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_model_sites_include_add_and_concat(backend, residual_model):
    model = load_model(residual_model.path(backend))

    ops = [site.op.lower() for site in model.sites]

    assert "add" in ops
    assert "concat" in ops or "cat" in ops
    assert len(model.sites) == 11, ops  # input, 4 convs, 3 relus, add, concat, linear


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_run_matches_torch_module(backend, residual_model, residual_inputs):
    model = load_model(residual_model.path(backend))

    with torch.no_grad():
        expected = residual_model.module(torch.from_numpy(residual_inputs)).numpy()

    np.testing.assert_allclose(model.run(residual_inputs), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_run_after_noise_is_clean_again(backend, residual_model, residual_inputs):
    path = residual_model.path(backend)
    sha_before = file_sha256(path)
    model = load_model(path)
    clean = model.run(residual_inputs)
    shape = (residual_inputs.shape[0], *model.sites[2].shape)

    model.run(residual_inputs, {2: draw_noise(SiteNoise(1.0, 1.0), shape, SEED, 2, 0)})

    np.testing.assert_array_equal(model.run(residual_inputs), clean)
    assert file_sha256(path) == sha_before


# --- a module called twice ---


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_called_twice_gives_two_sites(backend, tmp_path):
    torch.manual_seed(0)
    module = SharedLinearNet()
    example = torch.randn(2, 4)
    path = (export_pt2 if backend == "pt2" else export_onnx)(module, example, tmp_path / f"shared.{backend}")

    model = load_model(path)
    linear_ops = ("linear", "Gemm", "MatMul")
    shared = [site for site in model.sites if site.op in linear_ops and site.parameters == 4 * 4 + 4]

    assert len(shared) == 2
    assert shared[0].name != shared[1].name
    assert len(model.sites) == 5  # input, shared, relu, shared, out


# --- fixed batch size ---


def test_onnx_fixed_batch_evaluates_larger_batch(residual_model, residual_fixed_batch_onnx, residual_inputs):
    fixed = load_model(residual_fixed_batch_onnx)
    dynamic = load_model(residual_model.onnx)
    assert fixed.fixed_batch == 1
    assert dynamic.fixed_batch is None

    np.testing.assert_allclose(fixed.run(residual_inputs), dynamic.run(residual_inputs), rtol=0, atol=ONNX_ATOL)

    site = fixed.sites[5]
    shape = (residual_inputs.shape[0], *site.shape)
    noise = {site.index: draw_noise(SiteNoise(0.4, 0.4), shape, SEED, site.index, 0)}
    np.testing.assert_allclose(
        fixed.run(residual_inputs, noise), dynamic.run(residual_inputs, noise), rtol=0, atol=ONNX_ATOL
    )


def test_onnx_fixed_batch_suffix_and_activations_chunk(residual_model, residual_fixed_batch_onnx, residual_inputs):
    fixed = load_model(residual_fixed_batch_onnx)
    dynamic = load_model(residual_model.onnx)
    # 7 samples: chunks of 1, so every chunk is full; the padding path is covered below.
    x = residual_inputs[:7]

    for index in (0, 3, 9):
        fixed_suffix, dynamic_suffix = fixed.suffix(index), dynamic.suffix(index)
        fixed_boundary = fixed_suffix.prepare(x)
        dynamic_boundary = dynamic_suffix.prepare(x)
        assert [value.shape for value in fixed_boundary] == [value.shape for value in dynamic_boundary]
        np.testing.assert_allclose(
            fixed_suffix.run(fixed_boundary, fixed_boundary[0] * 1.5),
            dynamic_suffix.run(dynamic_boundary, dynamic_boundary[0] * 1.5),
            rtol=0,
            atol=ONNX_ATOL,
        )

    fixed_values = fixed.activations(x, [1, 9])
    dynamic_values = dynamic.activations(x, [1, 9])
    for got, expected in zip(fixed_values, dynamic_values, strict=True):
        np.testing.assert_allclose(got, expected, rtol=0, atol=ONNX_ATOL)


def test_onnx_fixed_batch_pads_last_chunk(residual_model, tmp_path, residual_inputs):
    example = torch.zeros(4, *RESIDUAL_SHAPE)
    path = export_onnx(residual_model.module, example, tmp_path / "batch4.onnx", dynamic=False)
    fixed = load_model(path)
    dynamic = load_model(residual_model.onnx)
    assert fixed.fixed_batch == 4

    # 10 samples = chunks of 4, 4 and 2 (padded to 4).
    logits = fixed.run(residual_inputs)

    assert logits.shape == (10, 5)
    np.testing.assert_allclose(logits, dynamic.run(residual_inputs), rtol=0, atol=ONNX_ATOL)


# --- state dict + factory ---

FACTORY_SOURCE = '''
"""Factory used by a test: returns the module instance the test stores in INSTANCE."""
INSTANCE = None


def build():
    return INSTANCE
'''


class BatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.norm = nn.BatchNorm1d(8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.norm(self.fc(x))))


def test_state_dict_factory_leaves_user_module_unchanged(tmp_path, monkeypatch):
    torch.manual_seed(0)
    user_module = BatchNormNet()
    # Give the BatchNorm non-default running statistics, then leave the module in train mode.
    user_module(torch.randn(32, 6) * 3 + 1)
    user_module.train()
    state_before = copy.deepcopy(user_module.state_dict())
    weights = tmp_path / "weights.pt"
    torch.save(user_module.state_dict(), weights)

    (tmp_path / "wnplan_test_factory.py").write_text(textwrap.dedent(FACTORY_SOURCE))
    monkeypatch.syspath_prepend(str(tmp_path))
    import wnplan_test_factory

    monkeypatch.setattr(wnplan_test_factory, "INSTANCE", user_module)
    sample = np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32)

    model = load_model(weights, factory="wnplan_test_factory:build", sample=sample)
    logits = model.run(sample)
    model.run(sample, {1: draw_noise(SiteNoise(0.5), (5, 8), SEED, 1, 0)})

    assert user_module.training
    assert all(module.training for module in user_module.modules())
    state_after = user_module.state_dict()
    assert state_after.keys() == state_before.keys()
    for key, value in state_before.items():
        assert torch.equal(state_after[key], value), key

    evaluated = copy.deepcopy(user_module).eval()
    with torch.no_grad():
        expected = evaluated(torch.from_numpy(sample)).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)
    assert model.format == "state-dict"


def test_state_dict_without_factory_raises(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(SharedLinearNet().state_dict(), path)

    with pytest.raises(ModelError, match="--factory") as raised:
        load_model(path)

    assert "--trust" in str(raised.value)


def test_state_dict_bad_factory_raises(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(SharedLinearNet().state_dict(), path)
    sample = np.zeros((2, 4), np.float32)

    with pytest.raises(ModelError, match="'no_colon'"):
        load_model(path, factory="no_colon", sample=sample)
    with pytest.raises(ModelError, match="cannot import"):
        load_model(path, factory="wnplan_no_such_module:build", sample=sample)


# --- loading errors ---


def test_load_model_missing_file_raises(tmp_path):
    with pytest.raises(ModelError, match="not found") as raised:
        load_model(tmp_path / "absent.onnx")

    assert "absent.onnx" in str(raised.value)


def test_load_model_unsupported_extension_raises(tmp_path):
    path = tmp_path / "model.h5"
    path.write_bytes(b"\x89HDF\r\n")

    with pytest.raises(ModelError, match="unsupported model file") as raised:
        load_model(path)

    assert "model.h5" in str(raised.value)


@pytest.mark.parametrize("seed", range(5))
def test_load_model_random_bytes_onnx_raises(tmp_path, seed):
    path = tmp_path / "random.onnx"
    path.write_bytes(np.random.default_rng(seed).bytes(4096))

    with pytest.raises(ModelError) as raised:
        load_model(path)

    assert "random.onnx" in str(raised.value)


def test_load_model_random_bytes_pt2_raises(tmp_path):
    path = tmp_path / "random.pt2"
    path.write_bytes(np.random.default_rng(0).bytes(4096))

    with pytest.raises(ModelError, match=r"torch\.export"):
        load_model(path)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_load_model_torchscript_raises(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.script(SharedLinearNet()).save(str(path))
    assert zipfile.is_zipfile(path)

    with pytest.raises(ModelError, match="TorchScript"):
        load_model(path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_input_wrong_shape_raises(backend, residual_model):
    model = load_model(residual_model.path(backend))

    with pytest.raises(DataError, match=r"\(8, 8\)") as raised:
        model.check_input(np.zeros((3, 8, 8), np.float32))

    assert "1, 6, 6" in str(raised.value)
    model.check_input(np.zeros((3, *RESIDUAL_SHAPE), np.float32))


# --- data declarations ---


def test_read_declaration_from_onnx_metadata(digits_mlp_declared):
    declaration = read_declaration(digits_mlp_declared)

    assert declaration is not None
    assert declaration.data == "digits"
    assert declaration.normalize is None
    assert load_model(digits_mlp_declared).declaration == declaration


def test_read_declaration_from_pt2_sidecar(tmp_path, residual_model):
    path = tmp_path / "copy.pt2"
    path.write_bytes(residual_model.pt2.read_bytes())
    (tmp_path / "copy.pt2.json").write_text(json.dumps({"data": "digits:test", "normalize": "0.5,0.5"}))

    declaration = read_declaration(path)

    assert declaration is not None
    assert declaration.data == "digits:test"
    assert declaration.normalize == "0.5,0.5"


def test_read_declaration_invalid_sidecar_raises(tmp_path, residual_model):
    path = tmp_path / "copy.pt2"
    path.write_bytes(residual_model.pt2.read_bytes())
    (tmp_path / "copy.pt2.json").write_text("{not json")

    with pytest.raises(ModelError, match=r"copy\.pt2\.json"):
        read_declaration(path)


def test_read_declaration_absent_returns_none(residual_model):
    assert read_declaration(residual_model.onnx) is None
    assert read_declaration(residual_model.pt2) is None


class _ShufflesFeatures(nn.Module):
    """Features regrouped by unflatten, permute, chunk and cat: ONNX shape inference loses their shapes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(784, 32)
        self.norm = nn.BatchNorm1d(32)
        self.out = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.fc(x.flatten(1))
        first, second = hidden.unflatten(1, (4, 8)).permute(0, 2, 1).flatten(1).chunk(2, dim=1)
        return self.out(torch.relu(self.norm(torch.cat([second, first], dim=1) + hidden)))


def test_onnx_sites_without_inferred_shape_run(tmp_path):
    path = export_onnx(_ShufflesFeatures(), torch.zeros(2, 1, 28, 28), tmp_path / "shuffle.onnx")
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    shapeless = [value.name for value in inferred.graph.value_info if not value.type.tensor_type.HasField("shape")]
    assert shapeless  # the case under test: tensors whose shape inference gives up

    model = load_model(path, sample=np.zeros((2, 1, 28, 28), np.float32))
    site = next(site for site in model.sites if site.name in shapeless)
    x = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    noisy = model.run(x, {site.index: draw_noise(SiteNoise(0.5), (3, *site.shape), 0, site.index, 0)})

    assert noisy.shape == (3, 10)
    assert not np.allclose(noisy, model.run(x))
