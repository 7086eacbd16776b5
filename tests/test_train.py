"""Tests of trained mode: twins, vectorized noise-aware training, evaluation and records.

The models are tiny (a 784 → 16 → 10 perceptron with BatchNorm, a small conv net and a
perceptron without BatchNorm), exported to .pt2 and ONNX in a temporary folder. Data are
the first 256 training and 128 test samples of scikit-learn's digits (resized to 28×28).
Every random step uses a fixed seed (torch seed 0, sweep seed 0).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import export_onnx, export_pt2
from torch import nn
from torch.func import functional_call

from wnplan.data import Dataset, load_data
from wnplan.errors import SettingsError
from wnplan.models import Model, load_model
from wnplan.models.base import file_sha256
from wnplan.noise import NoiseSpec, SiteNoise, derive_seed
from wnplan.sweep import Trial
from wnplan.train import TrainedEvaluator, TrainingConfig, TrainingSettings, build_twin, records, train
from wnplan.train.layers import inject_noise, inject_noise_forward_only
from wnplan.train.measure import correct_counts, evaluate_noisy
from wnplan.train.trainer import chunk_size, initial_tensors, make_optimizer, stacks_configurations
from wnplan.train.twin import Twin

TORCH_SEED = 0
SWEEP_SEED = 0
TRAIN_SAMPLES = 256
EVAL_SAMPLES = 128
# Vectorized and one-by-one training run the same arithmetic in a different order (batched
# matmuls, BatchNorm over merged channels), so results agree to float32 rounding only.
VECTORIZED_TOLERANCE = 1e-4


def _bn_mlp() -> nn.Module:
    torch.manual_seed(TORCH_SEED)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))


def _plain_mlp() -> nn.Module:
    torch.manual_seed(TORCH_SEED)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10))


def _conv_net() -> nn.Module:
    torch.manual_seed(TORCH_SEED)
    return nn.Sequential(
        nn.Conv2d(1, 3, 5, stride=2), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(3 * 6 * 6, 10),
    )


def _with_statistics(module: nn.Module) -> nn.Module:
    """Give BatchNorm layers non-trivial running statistics (one pass in train mode, seed 0)."""
    module.train()
    with torch.no_grad():
        module(torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(TORCH_SEED)))
    return module.eval()


@pytest.fixture(scope="module")
def train_data() -> Dataset:
    return load_data("digits:train", limit=TRAIN_SAMPLES)


@pytest.fixture(scope="module")
def eval_data() -> Dataset:
    return load_data("digits:test", limit=EVAL_SAMPLES)


@pytest.fixture(scope="module")
def bn_mlp(tmp_path_factory) -> tuple[nn.Module, Path, Path]:
    folder = tmp_path_factory.mktemp("train_models")
    module = _with_statistics(_bn_mlp())
    example = torch.zeros(2, 1, 28, 28)
    pt2_path = export_pt2(module, example, folder / "bn_mlp.pt2")
    return module, pt2_path, export_onnx(module, example, folder / "bn_mlp.onnx")


@pytest.fixture(scope="module")
def conv_net(tmp_path_factory) -> tuple[nn.Module, Path]:
    folder = tmp_path_factory.mktemp("train_conv")
    module = _with_statistics(_conv_net())
    return module, export_pt2(module, torch.zeros(2, 1, 28, 28), folder / "conv.pt2")


@pytest.fixture(scope="module")
def plain_mlp(tmp_path_factory) -> tuple[nn.Module, Path]:
    folder = tmp_path_factory.mktemp("train_plain")
    module = _plain_mlp().eval()
    return module, export_pt2(module, torch.zeros(2, 1, 28, 28), folder / "plain.pt2")


def _configs(site: int, sigmas, kind: str = "additive") -> list[TrainingConfig]:
    spec = NoiseSpec(kind)
    return [
        TrainingConfig(((site, _level(spec, sigma)),), training_seed=100 + position % 2, noise_seed=200 + position)
        for position, sigma in enumerate(sigmas)
    ]


def _level(spec: NoiseSpec, sigma: float) -> SiteNoise:
    sigma_add, sigma_mul = spec.components(sigma)
    return SiteNoise(sigma_add, sigma_mul)


def _seed_of(trial: Trial) -> int:
    return derive_seed(SWEEP_SEED, trial.identity({"kind": "additive"}, "trained", SWEEP_SEED))


def _trials(model: Model, site: int, sigmas, repeats: int = 1, scope: str = "walking") -> list[Trial]:
    names = (model.sites[site].name,)
    return [Trial(scope, (site,), names, sigma, repeat) for sigma in sigmas for repeat in range(repeats)]


def _eval_logits(twin: Twin, tensors: dict[str, torch.Tensor], k: int, x: torch.Tensor) -> torch.Tensor:
    module = twin.site_module([0], inject_noise, 2).eval()
    with torch.no_grad():
        return functional_call(module, {name: value[k] for name, value in tensors.items()}, (x, None, None))[0]


# -- twins -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["pt2", "onnx"])
def test_twin_matches_model(bn_mlp, backend):
    model = load_model(bn_mlp[1] if backend == "pt2" else bn_mlp[2])
    twin = build_twin(model)
    x = np.random.default_rng(0).standard_normal((5, 1, 28, 28)).astype(np.float32)

    with torch.no_grad():
        logits = twin.module.eval()(torch.from_numpy(x))[0].numpy()

    np.testing.assert_allclose(logits, model.run(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["pt2", "onnx"])
def test_twin_maps_every_site(bn_mlp, backend):
    model = load_model(bn_mlp[1] if backend == "pt2" else bn_mlp[2])
    twin = build_twin(model)
    x = np.random.default_rng(1).standard_normal((4, 1, 28, 28)).astype(np.float32)

    assert len(twin.site_nodes) == len(model.sites)
    assert twin.site_nodes[0] is twin.input_node
    for site in model.sites:
        module = twin.site_module([site.index], inject_noise, 2, return_sites=True).eval()
        with torch.no_grad():
            value = module(torch.from_numpy(x), None, None)[1].numpy()
        np.testing.assert_allclose(value, model.activations(x, [site.index])[0], rtol=1e-5, atol=1e-5)


def test_twin_batch_norm_follows_mode(bn_mlp):
    twin = build_twin(load_model(bn_mlp[1]))
    x = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    tensors = {name: value.detach().clone() for name, value in twin.tensors().items()}
    module = twin.site_module([0], inject_noise, 2)

    with torch.no_grad():
        hidden_eval = functional_call(module.eval(), tensors, (x, None, None))[0]
        hidden_train = functional_call(module.train(), tensors, (x, None, None))[0]

    assert not torch.allclose(hidden_eval, hidden_train)
    running = [name for name in twin.running_names() if name.endswith("running_mean")]
    assert not torch.equal(tensors[running[0]], twin.tensors()[running[0]])


# -- training ----------------------------------------------------------------------------------


def test_train_clamps_weights_only(tmp_path, train_data):
    torch.manual_seed(TORCH_SEED)
    module = _bn_mlp()
    with torch.no_grad():
        for layer in (module[1], module[4]):
            layer.weight.uniform_(-1.0, 1.0)
            layer.bias.fill_(0.5)
        module[2].weight.fill_(2.0)
        module[2].bias.fill_(0.5)
    model = load_model(export_pt2(_with_statistics(module), torch.zeros(2, 1, 28, 28), tmp_path / "clamp.pt2"))
    twin = build_twin(model)
    limit = 0.1

    trained = train(twin, _configs(2, [0.5]), train_data, TrainingSettings(clamp_weights=limit, train_limit=64))

    for name in twin.trainable_names():
        value = trained.tensors[name]
        if twin.roles[name].kind == "weight":
            assert value.abs().max() <= limit
        else:
            assert value.abs().max() > limit, f"{name} ({twin.roles[name].kind}) was clamped"


@pytest.mark.parametrize(("kind", "agree"), [("additive", True), ("multiplicative", False)])
def test_gradients_forward_only_versus_autograd(bn_mlp, kind, agree):
    twin = build_twin(load_model(bn_mlp[1]))
    site = 3  # the ReLU after BatchNorm; fc1 and the BatchNorm come before it
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 28, 28, generator=generator)
    noise = 1.0 + 0.5 * torch.randn(16, 16, generator=generator)
    mul, add = (None, noise - 1.0) if kind == "additive" else (noise, None)
    labels = torch.arange(16) % 10

    gradients = {}
    for name, transform in (("forward-only", inject_noise_forward_only), ("autograd", inject_noise)):
        module = twin.site_module([site], transform, 2).train()
        tensors = {key: value.detach().clone().requires_grad_(key in twin.trainable_names())
                   for key, value in twin.tensors().items()}
        logits = functional_call(module, tensors, (x, mul, add))[0]
        torch.nn.functional.cross_entropy(logits, labels).backward()
        gradients[name] = {key: tensors[key].grad for key in twin.trainable_names()}

    before_site = gradients["forward-only"]["1.weight"], gradients["autograd"]["1.weight"]
    after_site = gradients["forward-only"]["4.weight"], gradients["autograd"]["4.weight"]
    # Forward values agree up to the rounding of x + (noisy − x) versus noisy.
    torch.testing.assert_close(*after_site, rtol=1e-5, atol=1e-7)
    assert torch.allclose(*before_site, rtol=1e-6, atol=1e-8) == agree


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_stacked_optimizer_equals_separate(optimizer):
    settings = TrainingSettings(optimizer=optimizer, lr=0.01)
    generator = torch.Generator().manual_seed(0)
    stacked = torch.randn(3, 4, 5, generator=generator).requires_grad_(True)
    separate = [stacked[k].detach().clone().requires_grad_(True) for k in range(3)]
    stacked_optimizer = make_optimizer([stacked], settings)
    separate_optimizers = [make_optimizer([value], settings) for value in separate]

    for _ in range(5):
        gradient = torch.randn(3, 4, 5, generator=generator)
        stacked.grad = gradient.clone()
        stacked_optimizer.step()
        for k, (value, step) in enumerate(zip(separate, separate_optimizers, strict=True)):
            value.grad = gradient[k].clone()
            step.step()

    # Elementwise updates: equal up to float32 rounding of vectorized kernels on different sizes.
    for k in range(3):
        torch.testing.assert_close(stacked[k].detach(), separate[k].detach(), rtol=1e-6, atol=1e-7)


# Adam is only compared without BatchNorm: a bias that feeds BatchNorm has a zero gradient up
# to rounding, and Adam's normalisation turns that rounding into steps of size lr, so two
# orders of summation give visibly different biases. SGD keeps such steps at lr · rounding.
@pytest.mark.parametrize(("fixture", "optimizer"), [("plain_mlp", "adam"), ("conv_net", "sgd"), ("bn_mlp", "sgd")])
def test_vectorized_equals_one_by_one(request, fixture, optimizer, train_data, eval_data):
    model = load_model(request.getfixturevalue(fixture)[1])
    twin = build_twin(model)
    configs = _configs(2, [0.0, 0.3, 1.0], "multiplicative")
    settings = TrainingSettings(batch_size=64, train_limit=192, optimizer=optimizer, lr=0.01, vectorize=True)

    vectorized = train(twin, configs, train_data, settings)
    alone = train(twin, configs, train_data, dataclasses.replace(settings, vectorize=False))

    assert vectorized.steps == alone.steps == 3
    x = torch.from_numpy(eval_data.x[:32])
    for k in range(len(configs)):
        torch.testing.assert_close(
            _eval_logits(twin, vectorized.tensors, k, x), _eval_logits(twin, alone.tensors, k, x),
            rtol=VECTORIZED_TOLERANCE, atol=VECTORIZED_TOLERANCE,
        )
        assert math.isclose(vectorized.final_loss[k], alone.final_loss[k], rel_tol=VECTORIZED_TOLERANCE)


def test_vectorized_parameters_equal_one_by_one(plain_mlp, train_data):
    twin = build_twin(load_model(plain_mlp[1]))
    configs = _configs(1, [0.1, 0.5], "additive")
    settings = TrainingSettings(batch_size=64, train_limit=192, optimizer="sgd", lr=0.05, vectorize=True)

    vectorized = train(twin, configs, train_data, settings)
    alone = train(twin, configs, train_data, dataclasses.replace(settings, vectorize=False))

    for name in twin.stacked_names():
        torch.testing.assert_close(vectorized.tensors[name], alone.tensors[name], rtol=1e-5, atol=1e-6)


def test_zero_sigma_equals_plain_fine_tuning(bn_mlp, train_data):
    module, pt2_path, _ = bn_mlp
    twin = build_twin(load_model(pt2_path))
    config = _configs(2, [0.0])[0]
    settings = TrainingSettings(batch_size=64, train_limit=192, vectorize=False)

    trained = train(twin, [config], train_data, settings)

    reference = copy.deepcopy(module).train()
    optimizer = torch.optim.Adam(reference.parameters(), lr=settings.lr, fused=True)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=3)
    x, y = torch.from_numpy(train_data.x[:192]), torch.from_numpy(train_data.y[:192])
    order = torch.randperm(192, generator=torch.Generator().manual_seed(config.stream_seeds()["data_order"]))
    for start in range(0, 192, 64):
        batch = order[start : start + 64]
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(reference(x[batch]), y[batch]).backward()
        optimizer.step()
        schedule.step()

    expected = dict(reference.named_parameters()) | dict(reference.named_buffers())
    for name in twin.stacked_names():
        torch.testing.assert_close(trained.tensors[name][0], expected[name].detach(), rtol=1e-6, atol=1e-7)


def test_training_leaves_user_model_unchanged(bn_mlp, train_data, eval_data):
    _, pt2_path, onnx_path = bn_mlp
    hashes = {path: file_sha256(path) for path in (pt2_path, onnx_path)}
    torch_model, onnx_model = load_model(pt2_path), load_model(onnx_path)
    torch_state = {name: value.clone() for name, value in torch_model._module.state_dict().items()}
    onnx_bytes = onnx_model.proto.SerializeToString()

    for model in (torch_model, onnx_model):
        evaluator = TrainedEvaluator(model, train_data, eval_data, NoiseSpec("additive"), {}, _seed_of,
                                     TrainingSettings(train_limit=128, lr=0.05))
        results = list(evaluator.run_group(_trials(model, 2, [0.5])))
        assert len(results) == 1

    assert {path: file_sha256(path) for path in hashes} == hashes
    for name, value in torch_model._module.state_dict().items():
        assert torch.equal(value, torch_state[name]), name
    assert onnx_model.proto.SerializeToString() == onnx_bytes


def test_batch_norm_statistics_update_in_twin_only(bn_mlp, train_data):
    model = load_model(bn_mlp[1])
    original = {name: value.clone() for name, value in model._module.state_dict().items()}
    twin = build_twin(model)
    start = initial_tensors(twin, _configs(2, [0.1]), from_scratch=False)

    trained = train(twin, _configs(2, [0.1]), train_data, TrainingSettings(train_limit=128))

    for name in twin.running_names():
        assert not torch.allclose(trained.tensors[name], start[name]), f"{name} did not change"
        assert torch.equal(model._module.state_dict()[name], original[name])
        assert torch.equal(twin.tensors()[name], original[name])


def test_from_scratch_reinitialises_per_seed(bn_mlp):
    twin = build_twin(load_model(bn_mlp[1]))
    configs = [TrainingConfig(((2, SiteNoise()),), seed, 0) for seed in (1, 1, 2)]

    tensors = initial_tensors(twin, configs, from_scratch=True)

    weight = tensors["1.weight"]
    assert torch.equal(weight[0], weight[1])
    assert not torch.equal(weight[0], weight[2])
    assert weight.abs().max() <= 1 / math.sqrt(784)
    assert torch.equal(tensors["2.weight"], torch.ones_like(tensors["2.weight"]))
    assert not torch.equal(weight[0], twin.tensors()["1.weight"])


def test_automatic_stacking_follows_activation_size(bn_mlp, conv_net):
    small = build_twin(load_model(bn_mlp[1]))
    large = build_twin(load_model(conv_net[1]))

    assert stacks_configurations(small, TrainingSettings())
    assert not stacks_configurations(large, TrainingSettings(batch_size=4096))
    assert stacks_configurations(large, TrainingSettings(batch_size=4096, vectorize=True))
    assert not stacks_configurations(small, TrainingSettings(vectorize=False))


def test_chunk_size_respects_memory_limit(bn_mlp):
    twin = build_twin(load_model(bn_mlp[1]))
    tight = TrainingSettings(memory_limit=1 << 20)
    roomy = TrainingSettings()

    assert chunk_size(twin, tight, 8) < 8
    assert chunk_size(twin, roomy, 8) == 8
    assert chunk_size(twin, TrainingSettings(memory_limit=1 << 20, batch_size=100000), 8) == 1


@pytest.mark.parametrize(
    ("option", "value"),
    [("optimizer", "rmsprop"), ("schedule", "step"), ("grad", "both"), ("epochs", 0), ("lr", -1.0),
     ("clamp_weights", 0.0), ("device", "cuda"), ("train_limit", 1), ("batch_size", 1)],
)
def test_settings_reject_invalid_value(option, value):
    with pytest.raises(SettingsError, match=str(value).replace("-", "\\-")):
        TrainingSettings(**{option: value})


# -- evaluator ---------------------------------------------------------------------------------


def test_evaluator_yields_json_safe_records(bn_mlp, train_data, eval_data):
    model = load_model(bn_mlp[1])
    evaluator = TrainedEvaluator(model, train_data, eval_data, NoiseSpec("multiplicative"), {}, _seed_of,
                                 TrainingSettings(train_limit=128))
    trials = _trials(model, 3, [0.1, 1.0], repeats=2)

    results = list(evaluator.run_group(trials))

    assert len(results) == len(trials)
    for result in results:
        json.dumps(result.extra, allow_nan=False)
        assert result.total == EVAL_SAMPLES
        assert set(result.extra) >= {"seeds", "weights", "activations", "binarization", "clean_accuracy", "training"}
        assert set(result.extra["weights"]) == {"1.weight", "4.weight"}
        histogram = result.extra["activations"]["clean"]
        linear, log_abs = histogram["linear"], histogram["log_abs"]
        assert sum(linear["counts"]) + linear["below"] + linear["above"] == histogram["count"]
        assert sum(log_abs["counts"]) + log_abs["zero"] + log_abs["above"] == histogram["count"]
    # Repeats of one σ share the training seed; each trial has its own evaluation seed.
    assert results[0].extra["seeds"]["training"] == results[2].extra["seeds"]["training"]
    assert results[0].extra["seeds"]["training"] != results[1].extra["seeds"]["training"]
    assert len({result.extra["seeds"]["trial"] for result in results}) == len(results)


def test_binarization_reference_is_noisy_accuracy(bn_mlp, train_data, eval_data):
    # The quantized site runs with the trial's noise, so the reference is the trial's accuracy.
    model = load_model(bn_mlp[1])
    evaluator = TrainedEvaluator(model, train_data, eval_data, NoiseSpec("multiplicative"), {}, _seed_of,
                                 TrainingSettings(train_limit=128))
    trials = _trials(model, 3, [0.1, 10.0])

    results = list(evaluator.run_group(trials))

    for result in results:
        test = result.extra["binarization"]
        assert test["with_noise"] is True
        assert test["reference_accuracy"] == result.correct / result.total


def test_binarization_chance_is_majority_share(bn_mlp, train_data, eval_data):
    # Three quarters of one label: a model predicting only that label scores 0.75, so its test cannot decide.
    labels = eval_data.y.copy()
    labels[: 3 * len(labels) // 4] = 0
    skewed = Dataset(eval_data.x, labels, "skewed", {}, "skewed")
    model = load_model(bn_mlp[1])
    evaluator = TrainedEvaluator(model, train_data, skewed, NoiseSpec("additive"), {}, _seed_of,
                                 TrainingSettings(train_limit=128))

    result = next(evaluator.run_group(_trials(model, 3, [0.1])))

    assert result.extra["binarization"]["chance"] == pytest.approx(np.bincount(labels).max() / len(labels))


@pytest.mark.parametrize("vectorize", [True, False])
def test_identity_quantizer_leaves_noisy_counts_unchanged(bn_mlp, train_data, eval_data, vectorize):
    model = load_model(bn_mlp[1])
    twin = build_twin(model)
    levels = [((3, SiteNoise(sigma_mul=0.5)),), ((3, SiteNoise(sigma_mul=2.0)),)]
    tensors = initial_tensors(twin, [TrainingConfig(level, 1, 2) for level in levels], from_scratch=False)
    seeds = [11, 12]

    plain = evaluate_noisy(twin, levels, seeds, tensors, eval_data, 64, vectorize, 0)
    # A quantizer that returns its input must leave every count as it was.
    quantized = evaluate_noisy(twin, levels, seeds, tensors, eval_data, 64, vectorize, 0,
                               _keep, [torch.zeros(2), torch.zeros(2)])

    assert quantized.correct == plain.correct


def _keep(x, threshold, level):
    return x


def test_evaluator_is_reproducible_across_chunks(bn_mlp, train_data, eval_data):
    model = load_model(bn_mlp[1])
    trials = _trials(model, 2, [0.2, 2.0])
    results = {}
    for memory_limit in (2 << 30, 1 << 20):
        settings = TrainingSettings(train_limit=128, memory_limit=memory_limit)
        evaluator = TrainedEvaluator(model, train_data, eval_data, NoiseSpec("additive"), {}, _seed_of, settings)
        results[memory_limit] = list(evaluator.run_group(trials))

    for together, alone in zip(results[2 << 30], results[1 << 20], strict=True):
        assert abs(together.correct - alone.correct) <= 1
        assert together.extra["seeds"] == alone.extra["seeds"]


def test_evaluator_trains_global_scope(bn_mlp, train_data, eval_data):
    model = load_model(bn_mlp[2])
    sites = (0, 1, 3, 4)
    trial = Trial("global", sites, tuple(model.sites[index].name for index in sites), 0.3, 0)
    evaluator = TrainedEvaluator(model, train_data, eval_data, NoiseSpec("additive"), {}, _seed_of,
                                 TrainingSettings(train_limit=128))

    (result,) = evaluator.run_group([trial])

    assert 0 <= result.correct <= EVAL_SAMPLES
    assert "activations" not in result.extra
    json.dumps(result.extra, allow_nan=False)


def test_evaluator_rejects_mixed_group(bn_mlp, train_data, eval_data):
    model = load_model(bn_mlp[1])
    evaluator = TrainedEvaluator(model, train_data, eval_data, NoiseSpec("additive"), {}, _seed_of)
    trials = _trials(model, 2, [0.1]) + _trials(model, 3, [0.1])

    with pytest.raises(SettingsError, match="share scope and sites"):
        list(evaluator.run_group(trials))


# -- records -----------------------------------------------------------------------------------


def test_preserved_relative_accuracy_uses_largest_sigma():
    points = [{"sigma": 0.1, "accuracy": 0.8}, {"sigma": 10.0, "accuracy": 0.2}, {"sigma": 1.0, "accuracy": 0.5}]

    assert records.preserved_relative_accuracy(points, clean_accuracy=0.8) == pytest.approx(0.25)
    assert records.preserved_relative_accuracy([{"sigma": 0.0, "accuracy": 0.4}, *points]) == pytest.approx(0.5)
    assert records.preserved_relative_accuracy([], clean_accuracy=0.8) is None
    assert records.preserved_relative_accuracy(points, clean_accuracy=0.0) is None


def test_binary_levels_split_two_clusters():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.0, 0.01, 500), rng.normal(3.0, 0.01, 300)])

    threshold, high = records.binary_levels(values)
    ternary_threshold, level = records.ternary_levels(np.concatenate([values, -values]))

    assert 0.5 < threshold < 2.5
    assert high == pytest.approx(3.0, abs=0.01)
    assert 0.5 < ternary_threshold < 2.5
    assert level == pytest.approx(3.0, abs=0.01)


def test_activation_histogram_counts_non_finite():
    values = np.array([0.0, 1e-3, 1.0, 5.0, np.nan, np.inf, -2.0])

    histogram = records.activation_histogram(values)

    json.dumps(histogram, allow_nan=False)
    assert histogram["non_finite"] == 2
    assert histogram["log_abs"]["zero"] == 1
    assert len(histogram["linear"]["edges"]) == records.LINEAR_BINS + 1


def test_binarization_record_flags_binary_site():
    binarized = records.binarization_record(0.9, 0.895, 0.85, (0.5, 1.0), (0.5, 1.0), chance=0.1)
    lost = records.binarization_record(0.9, 0.7, 0.895, (0.5, 1.0), (0.5, 1.0), chance=0.1)

    assert binarized["self_binarized"] is True
    assert lost["self_binarized"] is False
    assert lost["ternary_holds"] is True


def test_binarization_record_undecided_at_chance():
    at_chance = records.binarization_record(0.12, 0.11, 0.1, (0.5, 1.0), (0.5, 1.0), chance=0.1)

    assert at_chance["self_binarized"] is None
    assert at_chance["ternary_holds"] is None


class _UnusualOps(nn.Module):
    """A transposed convolution and a cumulative sum: operators without a stacked rule."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(TORCH_SEED)
        self.up = nn.ConvTranspose2d(1, 2, 3, stride=2)
        self.out = nn.Linear(2 * 57 * 57, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.cumsum(self.up(x), dim=-1).flatten(1))


def test_stacked_graph_falls_back_to_vmap(tmp_path):
    model = load_model(export_pt2(_UnusualOps().eval(), torch.zeros(2, 1, 28, 28), tmp_path / "unusual.pt2"))
    twin = build_twin(model)
    tensors = initial_tensors(twin, _configs(1, [0.0, 0.0]), from_scratch=False)
    with torch.no_grad():
        tensors["up.weight"][1].mul_(2.0)
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    stacked = twin.stacked_site_module([0], inject_noise, 2).eval()

    with torch.no_grad():
        logits = stacked(x.expand(2, *x.shape), None, None, *(tensors[name] for name in twin.stacked_names()))[0]

    for k in range(2):
        torch.testing.assert_close(logits[k], _eval_logits(twin, tensors, k, x), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif("samples" not in {field.name for field in dataclasses.fields(Trial)},
                    reason="trials carry no data subset")
def test_evaluator_uses_trial_subset(bn_mlp, train_data, eval_data):
    model = load_model(bn_mlp[1])
    evaluator = TrainedEvaluator(model, train_data, eval_data, NoiseSpec("additive"), {}, _seed_of,
                                 TrainingSettings(train_limit=128))
    full, screened = _trials(model, 2, [0.5])[0], dataclasses.replace(_trials(model, 2, [0.5])[0], samples=32)

    results = list(evaluator.run_group([full, screened]))

    assert [result.total for result in results] == [EVAL_SAMPLES, 32]
    assert results[0].extra["seeds"]["training"] == results[1].extra["seeds"]["training"]


class _ViewsAfterLinear(nn.Module):
    """A linear layer on 4 rows per sample whose output `view` merges: stacked outputs are transposed."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(TORCH_SEED)
        self.rows = nn.Linear(196, 8)
        self.norm = nn.BatchNorm1d(32)
        self.out = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.rows(x.view(-1, 4, 196)).view(-1, 32)
        return self.out(torch.relu(self.norm(hidden)))


class _PermutedFeatures(nn.Module):
    """A convolution whose channels move last (permute) for a linear layer over them."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(TORCH_SEED)
        self.conv = nn.Conv2d(1, 4, 7, stride=7)
        self.mix = nn.Linear(4, 3)
        self.out = nn.Linear(3 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.mix(self.conv(x).permute(0, 2, 3, 1)).flatten(1))


@pytest.mark.parametrize(
    ("module_class", "operator_name"), [(_ViewsAfterLinear, "view.default"), (_PermutedFeatures, "permute.default")]
)
def test_stacked_training_reshaped_values(tmp_path, train_data, module_class, operator_name):
    module = _with_statistics(module_class())
    model = load_model(export_pt2(module, torch.zeros(2, 1, 28, 28), tmp_path / "reshaped.pt2"))
    twin = build_twin(model)
    assert operator_name in {getattr(node.target, "__name__", "") for node in twin.module.graph.nodes}
    configs = _configs(1, [0.1, 0.5])
    settings = TrainingSettings(batch_size=64, train_limit=192, optimizer="sgd", lr=0.05, vectorize=True)

    vectorized = train(twin, configs, train_data, settings)
    alone = train(twin, configs, train_data, dataclasses.replace(settings, vectorize=False))

    for name in twin.stacked_names():
        torch.testing.assert_close(vectorized.tensors[name], alone.tensors[name], rtol=1e-4, atol=1e-5)


def test_correct_counts_reject_non_finite_logits():
    logits = torch.tensor([[[float("nan"), float("nan")], [2.0, 1.0]], [[float("inf"), 0.0], [0.0, 1.0]]])
    labels = torch.tensor([0, 1])

    assert correct_counts(logits, labels).tolist() == [0, 1]
