"""Noise-aware training of many configurations of one twin at once.

A *configuration* is one model to train: the noise levels at its sites and its seeds.
Configurations that share their sites train together: their parameters are stacked along a
leading dimension K and one stacked forward and backward pass serves all K (see
`wnplan.train.stacked`). One optimizer over the stacked tensors is the same as K separate
optimizers, because Adam and SGD update every element on its own.

Each configuration draws its data order, initial weights and training noise from its own
generators, so its result does not depend (beyond float32 rounding) on which configurations
share its chunk.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from wnplan.data import Dataset
from wnplan.errors import SettingsError
from wnplan.noise import SiteNoise, derive_seed
from wnplan.train.batches import StepInputs
from wnplan.train.layers import inject_noise, inject_noise_forward_only
from wnplan.train.twin import Twin

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("cosine", "none")
GRADIENTS = ("forward-only", "autograd")
SGD_MOMENTUM = 0.9
SEED_BITS = 63  # torch.Generator takes seeds below 2**64; 63 bits keep them positive in JSON
# Bytes per float32 value, and how many copies of each activation a training step keeps
# alive: the value saved for backward, its gradient, and the noise inputs or a temporary.
FLOAT_BYTES = 4
ACTIVATION_COPIES = 3
# Copies of each parameter: the value, its gradient, and two Adam moments.
PARAMETER_COPIES = 4
# Largest activation memory of one configuration's training step that still stacks by default.
# NOTE: set from two models measured on one 2-core machine; other CPUs have other caches.
AUTO_STACK_BYTES = 4 << 20


@dataclass(frozen=True)
class TrainingSettings:
    """Training settings of trained mode, applied to every model it trains.

    Attributes:
        epochs: passes over the training data.
        lr: learning rate (peak learning rate with the cosine schedule).
        batch_size: training samples per step.
        optimizer: "adam" or "sgd" (with momentum 0.9).
        schedule: "cosine" (decay to 0 over all steps, per step) or "none".
        from_scratch: re-initialise conv/linear layers with PyTorch's default initialisation
            (and BatchNorm to scale 1, shift 0) instead of fine-tuning the given weights.
        clamp_weights: clamp every conv/linear weight to [−C, C] after each step; BatchNorm
            parameters and biases are not clamped. None disables it.
        grad: "forward-only" (the noise's backward pass is the identity) or "autograd"
            (ordinary gradients through x · mul + add).
        train_limit: use only the first `train_limit` training samples; None uses all.
        device: torch device; only "cpu" is supported.
        memory_limit: bytes that one chunk of configurations may use; larger groups are split.
        vectorize: True trains the configurations of a chunk together, False one after
            another (each with its own module and optimizer), and None picks per model (see
            `stacks_configurations`).
        eval_batch_size: samples per forward pass of one model during evaluation.
    """

    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 128
    optimizer: str = "adam"
    schedule: str = "cosine"
    from_scratch: bool = False
    clamp_weights: float | None = None
    grad: str = "forward-only"
    train_limit: int | None = None
    device: str = "cpu"
    memory_limit: int = 2 << 30
    vectorize: bool | None = None
    eval_batch_size: int = 1024

    def __post_init__(self) -> None:
        _check_choice("--optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("--schedule", self.schedule, SCHEDULES)
        _check_choice("--grad", self.grad, GRADIENTS)
        if self.device != "cpu":
            raise SettingsError(
                f"invalid --device {self.device!r}: trained mode runs on the cpu only; "
                + "pass --device cpu, or --mode inference to run on the GPU"
            )
        for option, value in (("--epochs", self.epochs), ("--batch-size", self.batch_size),
                              ("--eval-batch-size", self.eval_batch_size)):
            if value < 1:
                raise SettingsError(f"invalid {option} {value}: expected a positive integer")
        if self.batch_size < 2:
            raise SettingsError(f"invalid --batch-size {self.batch_size}: BatchNorm needs at least 2 samples")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise SettingsError(f"invalid --lr {self.lr}: expected a positive number such as 1e-3")
        if self.clamp_weights is not None and not (math.isfinite(self.clamp_weights) and self.clamp_weights > 0):
            raise SettingsError(f"invalid --clamp-weights {self.clamp_weights}: expected a positive number such as 1")
        if self.train_limit is not None and self.train_limit < 2:
            raise SettingsError(f"invalid --train-limit {self.train_limit}: expected at least 2 samples")
        if self.memory_limit < 1 << 20:
            raise SettingsError(f"invalid memory limit {self.memory_limit} bytes: expected at least 1 MiB")

    def to_dict(self) -> dict[str, Any]:
        """Return the settings that change results, as a JSON-ready dict."""
        record = asdict(self)
        for key in ("device", "memory_limit", "vectorize", "eval_batch_size"):
            record.pop(key)
        return record


def _check_choice(option: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise SettingsError(f"invalid {option} {value!r}: expected one of {', '.join(allowed)}")


@dataclass(frozen=True)
class TrainingConfig:
    """One model to train with noise, and the seeds that make it reproducible.

    Attributes:
        levels: absolute noise per noisy site, as (site index, noise) pairs in site order.
        training_seed: seed of the data order and of the initial weights.
        noise_seed: seed of the training noise draws.
    """

    levels: tuple[tuple[int, SiteNoise], ...]
    training_seed: int
    noise_seed: int

    @property
    def sites(self) -> tuple[int, ...]:
        return tuple(index for index, _ in self.levels)

    def stream_seeds(self) -> dict[str, int]:
        """Return the seeds of the generators this configuration uses, by purpose."""
        return {
            "data_order": _stream(self.training_seed, "data-order"),
            "initialisation": _stream(self.training_seed, "initialisation"),
            "training_noise": _stream(self.noise_seed, "training-noise"),
        }


def _stream(seed: int, purpose: str) -> int:
    return derive_seed(seed, {"stream": purpose}) % (1 << SEED_BITS)


@dataclass
class TrainedModels:
    """The trained tensors of K configurations, stacked along a leading dimension.

    Attributes:
        tensors: every tensor named by `Twin.stacked_names()`, each (K, ...), without gradients.
        steps: optimizer steps each configuration took.
        final_loss: mean training loss of each configuration's last step.
    """

    tensors: dict[str, torch.Tensor]
    steps: int
    final_loss: list[float]


def train(
    twin: Twin,
    configs: Sequence[TrainingConfig],
    data: Dataset,
    settings: TrainingSettings,
) -> TrainedModels:
    """Train each configuration with noise at its sites and return the trained tensors.

    All configurations must have the same sites. With `settings.vectorize`, they train
    together in one stacked computation; otherwise one after another.

    Raises:
        SettingsError: the configurations differ in their sites, or there is no training data.
    """
    if not configs:
        raise SettingsError("no configurations to train")
    sites = configs[0].sites
    if any(config.sites != sites for config in configs):
        raise SettingsError("configurations trained together must have the same noisy sites")
    x, y = _training_tensors(data, settings)
    if stacks_configurations(twin, settings):
        return _train_stacked(twin, sites, configs, x, y, settings)
    trained = [_train_alone(twin, sites, config, x, y, settings) for config in configs]
    tensors = {name: torch.cat([models.tensors[name] for models in trained]) for name in twin.stacked_names()}
    return TrainedModels(tensors, trained[0].steps, [models.final_loss[0] for models in trained])


def stacks_configurations(twin: Twin, settings: TrainingSettings) -> bool:
    """Return whether configurations of this twin train and evaluate stacked.

    With `settings.vectorize` None, they stack when one configuration's activations of a
    training step fit in AUTO_STACK_BYTES. Stacking K models multiplies the memory that
    element-wise operators, pooling and BatchNorm stream through, and once that leaves the
    CPU caches these operators slow down by more than the per-call overhead that stacking
    saves. The benchmark measured LeNet-5 with BatchNorm (8 MB per configuration) 0.7 to 0.8
    times as fast stacked, and the BatchNorm MLP (1 MB) 4.4 times as fast (24 configurations).
    """
    if settings.vectorize is not None:
        return settings.vectorize
    return twin.sample_numel * settings.batch_size * FLOAT_BYTES <= AUTO_STACK_BYTES


def _training_tensors(data: Dataset, settings: TrainingSettings) -> tuple[torch.Tensor, torch.Tensor]:
    count = len(data) if settings.train_limit is None else min(len(data), settings.train_limit)
    if count < 2:
        raise SettingsError(f"trained mode needs at least 2 training samples, got {count}; pass more --train-data")
    return torch.from_numpy(data.x[:count]), torch.from_numpy(data.y[:count])


def initial_tensors(twin: Twin, configs: Sequence[TrainingConfig], from_scratch: bool) -> dict[str, torch.Tensor]:
    """Return each configuration's starting tensors, stacked (K, ...), as new tensors.

    Fine-tuning starts from the twin's tensors. From scratch, conv/linear weights and biases
    are drawn uniformly from ±1/√fan_in (PyTorch's default for nn.Linear and nn.ConvNd),
    BatchNorm starts at scale 1, shift 0, mean 0 and variance 1, and other parameters keep
    their values.
    """
    source = twin.tensors()
    names = twin.stacked_names()
    stacked = {name: source[name].detach().unsqueeze(0).repeat(len(configs), *[1] * source[name].dim()).clone()
               for name in names}
    if not from_scratch:
        return stacked
    for position, config in enumerate(configs):
        generator = torch.Generator().manual_seed(config.stream_seeds()["initialisation"])
        for name in names:
            _initialise(stacked[name][position], twin.roles[name], generator)
    return stacked


def _initialise(value: torch.Tensor, role, generator: torch.Generator) -> None:
    with torch.no_grad():
        if role.kind in ("weight", "bias") and role.fan_in > 0:
            bound = 1.0 / math.sqrt(role.fan_in)
            value.uniform_(-bound, bound, generator=generator)
        elif role.kind in ("norm_scale", "running_var"):
            value.fill_(1.0)
        elif role.kind in ("norm_shift", "running_mean"):
            value.zero_()


def _train_stacked(twin, sites, configs, x, y, settings) -> TrainedModels:
    names = twin.stacked_names()
    trainable = set(twin.trainable_names())
    tensors = initial_tensors(twin, configs, settings.from_scratch)
    for name in trainable:
        tensors[name].requires_grad_(True)
    module = twin.stacked_site_module(sites, _transform(settings), 2).train()
    ordered = [tensors[name] for name in names]
    parameters = [tensors[name] for name in names if name in trainable]

    def forward(samples: torch.Tensor, noise: list) -> torch.Tensor:
        return module(samples, *noise, *ordered)[0]

    steps, losses = _run_steps(twin, sites, configs, x, y, settings, forward, parameters,
                               _clamped(twin, tensors, settings))
    return TrainedModels({name: value.detach() for name, value in tensors.items()}, steps, losses)


def _train_alone(twin, sites, config, x, y, settings) -> TrainedModels:
    """Train one configuration with its own module copy and optimizer (the unvectorized way)."""
    module = copy.deepcopy(twin.site_module(sites, _transform(settings), 2)).train()
    named = dict(module.named_parameters())
    named.update(module.named_buffers())
    start = initial_tensors(twin, [config], settings.from_scratch)
    with torch.no_grad():
        for name, value in start.items():
            named[name].copy_(value[0])
    trainable = set(twin.trainable_names())
    parameters = [named[name] for name in twin.stacked_names() if name in trainable]
    for parameter in parameters:
        parameter.requires_grad_(True)

    def forward(samples: torch.Tensor, noise: list) -> torch.Tensor:
        single = [None if value is None else value[0] for value in noise]
        return module(samples[0], *single)[0].unsqueeze(0)

    clamped = [named[name] for name in twin.trainable_names() if twin.roles[name].kind == "weight"]
    clamped = clamped if settings.clamp_weights is not None else []
    steps, losses = _run_steps(twin, sites, [config], x, y, settings, forward, parameters, clamped)
    tensors = {name: named[name].detach().unsqueeze(0).clone() for name in twin.stacked_names()}
    return TrainedModels(tensors, steps, losses)


def _clamped(twin: Twin, tensors: dict[str, torch.Tensor], settings: TrainingSettings) -> list[torch.Tensor]:
    if settings.clamp_weights is None:
        return []
    return [tensors[name] for name in twin.trainable_names() if twin.roles[name].kind == "weight"]


def _transform(settings: TrainingSettings):
    return inject_noise_forward_only if settings.grad == "forward-only" else inject_noise


def _run_steps(twin, sites, configs, x, y, settings, forward, parameters, clamped) -> tuple[int, list[float]]:
    """Run the training loop; return the step count and each configuration's last loss."""
    count = x.shape[0]
    batches_per_epoch = sum(1 for start in range(0, count, settings.batch_size) if count - start >= 2)
    total_steps = batches_per_epoch * settings.epochs
    optimizer = make_optimizer(parameters, settings)
    schedule = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
        if settings.schedule == "cosine" else None
    )
    order_generators = [torch.Generator().manual_seed(c.stream_seeds()["data_order"]) for c in configs]
    noise_generators = [torch.Generator().manual_seed(c.stream_seeds()["training_noise"]) for c in configs]
    levels = [[level for _, level in config.levels] for config in configs]
    shapes = [twin.site_shapes[index] for index in sites]
    inputs = StepInputs(levels, shapes, noise_generators, x, y, settings.batch_size)
    losses = [math.nan] * len(configs)

    for _ in range(settings.epochs):
        orders = torch.stack([torch.randperm(count, generator=generator) for generator in order_generators])
        for start in range(0, count, settings.batch_size):
            indices = orders[:, start : start + settings.batch_size]
            if indices.shape[1] < 2:
                continue  # BatchNorm cannot normalise a single sample
            noise = inputs.draw_noise(indices.shape[1])
            samples, labels = inputs.gather(indices)
            logits = forward(samples, noise)
            per_config = per_sample_loss(logits, labels).mean(dim=1)
            optimizer.zero_grad(set_to_none=True)
            per_config.sum().backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
            with torch.no_grad():
                for weight in clamped:
                    weight.clamp_(-settings.clamp_weights, settings.clamp_weights)
            losses = per_config.detach().tolist()
    logger.debug("trained %d configurations for %d steps", len(configs), total_steps)
    return total_steps, losses


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Return the cross-entropy of logits (K, B, classes) against flat labels (K·B,) as (K, B).

    Stacked linear layers leave the logits class-first in memory. Read that way, as a (K,
    classes, B) input, the softmax runs along contiguous samples, about ten times faster
    on the CPU than across the 10 classes of each sample.
    """
    size = logits.shape[0]
    if logits.mT.is_contiguous() and not logits.is_contiguous():
        return F.cross_entropy(logits.mT, labels.view(size, -1), reduction="none")
    return F.cross_entropy(logits.flatten(0, 1), labels, reduction="none").view(size, -1)


def make_optimizer(parameters: list[torch.Tensor], settings: TrainingSettings) -> torch.optim.Optimizer:
    """Return Adam or SGD (momentum 0.9) over the given tensors, using PyTorch's fused kernels."""
    if settings.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=settings.lr, fused=True)
    return torch.optim.SGD(parameters, lr=settings.lr, momentum=SGD_MOMENTUM, fused=True)


def bytes_per_configuration(twin: Twin, settings: TrainingSettings) -> int:
    """Estimate the memory one configuration needs in a stacked chunk, in bytes.

    Counts the trained tensors with their gradients and optimizer state, and the
    activations of one training step (or of one evaluation batch, if larger).
    """
    tensors = twin.tensors()
    parameters = sum(int(tensors[name].numel()) for name in twin.trainable_names())
    running = sum(int(tensors[name].numel()) for name in twin.running_names())
    activations = max(settings.batch_size * ACTIVATION_COPIES, settings.eval_batch_size) * twin.sample_numel
    return FLOAT_BYTES * (PARAMETER_COPIES * parameters + running + activations)


def chunk_size(twin: Twin, settings: TrainingSettings, count: int) -> int:
    """Return how many configurations train together within `settings.memory_limit`."""
    per_config = bytes_per_configuration(twin, settings)
    return max(1, min(count, settings.memory_limit // per_config))

