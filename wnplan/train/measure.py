"""Evaluation of trained configurations: noisy accuracy, and accuracy with a transformed site.

Evaluation noise follows the inference-only convention: `wnplan.noise.draw_noise` with the
trial's seed, drawn per (seed, site, block of samples), so a trained model and a clean
model evaluated with the same trial seed see the same noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.func import functional_call

from wnplan.data import Dataset
from wnplan.noise import NOISE_BLOCK, SiteNoise, draw_noise
from wnplan.train.layers import inject_noise
from wnplan.train.twin import Twin

FLOAT_BYTES = 4
# Activation memory of one stacked evaluation pass (all K models), about that of one model's
# pass of 1024 samples through LeNet-5. Larger passes stream memory and run slower per sample.
STACKED_PASS_BYTES = 64 << 20


class ConfigurationRunner:
    """Runs a twin's site module in eval mode for K trained configurations.

    Args:
        twin: the twin.
        sites: sites whose value `transform` replaces.
        transform: called as transform(value, *extra) after each site.
        arity: extra inputs per site.
        tensors: the configurations' trained tensors, each (K, ...).
        vectorize: run all K at once (stacked) rather than one after another.
        return_sites: also return each site's value before and after the transform.
    """

    def __init__(
        self,
        twin: Twin,
        sites: Sequence[int],
        transform: Callable[..., torch.Tensor],
        arity: int,
        tensors: dict[str, torch.Tensor],
        vectorize: bool,
        return_sites: bool = False,
    ) -> None:
        self.names = twin.stacked_names()
        self.tensors = tensors
        self.count = next(iter(tensors.values())).shape[0]
        self.sample_bytes = FLOAT_BYTES * twin.sample_numel
        self.vectorize = vectorize
        build = twin.stacked_site_module if vectorize else twin.site_module
        self.module = build(sites, transform, arity, return_sites).eval()

    def batch_size(self, samples: int) -> int:
        """Return the samples per pass: `samples`, or fewer for a stacked pass that would be large.

        A stacked pass keeps its activations within STACKED_PASS_BYTES but takes at least one
        noise block (256 samples), and whole blocks where possible, because a chunk that ends
        inside a block makes `draw_noise` draw that block again for the next chunk.
        """
        if not self.vectorize:
            return samples
        fitting = STACKED_PASS_BYTES // max(1, self.count * self.sample_bytes)
        size = min(samples, max(NOISE_BLOCK, fitting))
        if size >= NOISE_BLOCK:
            size -= size % NOISE_BLOCK
        return max(1, size)

    def __call__(self, x: torch.Tensor, site_args: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
        """Return the module's outputs for samples x (N, ...) shared by all configurations, each (K, ...)."""
        with torch.no_grad():
            if self.vectorize:
                samples = x.unsqueeze(0).expand(self.count, *x.shape)
                return list(self.module(samples, *site_args, *(self.tensors[name] for name in self.names)))
            outputs = []
            for k in range(self.count):
                tensors = {name: self.tensors[name][k] for name in self.names}
                arguments = [None if value is None else value[k] for value in site_args]
                outputs.append(functional_call(self.module, tensors, (x, *arguments)))
            return [torch.stack(parts) for parts in zip(*outputs, strict=True)]


@dataclass(frozen=True)
class NoisyEvaluation:
    """Noisy accuracy of K configurations, and the site values of the first samples.

    Attributes:
        correct: correctly classified samples per configuration.
        clean_values: the site's value before the noise, (K, R, *site shape), for the first R
            samples; None when several sites are noisy.
        noisy_values: the same values after the noise.
    """

    correct: list[int]
    clean_values: np.ndarray | None
    noisy_values: np.ndarray | None


def correct_counts(logits: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Return the correct count per configuration for logits (K, N, classes) and labels (N,).

    As `wnplan.evaluate.count_correct`, a sample whose logits are not all finite counts as wrong.
    """
    hits = (logits.argmax(dim=-1) == labels) & torch.isfinite(logits).all(dim=-1)
    return hits.sum(dim=1).numpy()


def evaluate_noisy(
    twin: Twin,
    levels: Sequence[Sequence[tuple[int, SiteNoise]]],
    seeds: Sequence[int],
    tensors: dict[str, torch.Tensor],
    data: Dataset,
    batch_size: int,
    vectorize: bool,
    record_samples: int,
    quantizer: Callable[..., torch.Tensor] | None = None,
    quantizer_arguments: Sequence[torch.Tensor] = (),
) -> NoisyEvaluation:
    """Count correct predictions of K configurations with their evaluation noise.

    Args:
        twin: the twin.
        levels: per configuration, (site index, absolute noise) pairs; all share the sites.
        seeds: per configuration, the evaluation noise seed (the trial seed).
        tensors: the trained tensors, each (K, ...).
        data: evaluation data.
        batch_size: samples per forward pass (see `ConfigurationRunner.batch_size` for
            stacked passes).
        vectorize: run the configurations stacked.
        record_samples: number of first samples whose site values are returned (one noisy
            site only).
        quantizer: with one noisy site, applied to the site's value before the noise, as
            quantizer(value, *quantizer_arguments); each argument is (K,).
    """
    sites = [index for index, _ in levels[0]]
    keep_values = len(sites) == 1 and record_samples > 0
    transform, arity = inject_noise, 2
    if quantizer is not None:
        transform, arity = _QuantizedNoise(quantizer, len(quantizer_arguments)), 2 + len(quantizer_arguments)
    runner = ConfigurationRunner(twin, sites, transform, arity, tensors, vectorize, return_sites=keep_values)
    batch_size = runner.batch_size(batch_size)
    correct = np.zeros(len(levels), dtype=np.int64)
    clean_parts, noisy_parts = [], []
    recorded = 0

    for start in range(0, len(data), batch_size):
        x = torch.from_numpy(data.x[start : start + batch_size])
        labels = torch.from_numpy(data.y[start : start + batch_size])
        arguments = [*quantizer_arguments, *_evaluation_noise(twin, levels, seeds, start, x.shape[0])]
        outputs = runner(x, arguments)
        correct += correct_counts(outputs[0], labels)
        if keep_values and recorded < record_samples:
            take = min(record_samples - recorded, x.shape[0])
            clean_parts.append(outputs[1][:, :take].numpy())
            noisy_parts.append(outputs[2][:, :take].numpy())
            recorded += take

    clean = np.concatenate(clean_parts, axis=1) if clean_parts else None
    noisy = np.concatenate(noisy_parts, axis=1) if noisy_parts else None
    return NoisyEvaluation([int(value) for value in correct], clean, noisy)


class _QuantizedNoise:
    """Quantize a site's value, then add the noise: quantizer(x, *q) · mul + add."""

    def __init__(self, quantizer: Callable[..., torch.Tensor], count: int) -> None:
        self.quantizer = quantizer
        self.count = count
        self.__name__ = f"noisy_{getattr(quantizer, '__name__', 'quantizer')}"

    def __call__(self, x: torch.Tensor, *arguments: torch.Tensor | None) -> torch.Tensor:
        quantized = self.quantizer(x, *arguments[: self.count])
        return inject_noise(quantized, *arguments[self.count :])


def _evaluation_noise(twin, levels, seeds, start: int, count: int) -> list[torch.Tensor | None]:
    """Return [mul, add] per site, stacked over configurations; ones or zeros where absent."""
    arguments: list[torch.Tensor | None] = []
    for position, (site, _) in enumerate(levels[0]):
        shape = (count, *twin.site_shapes[site])
        draws = [
            draw_noise(config[position][1], shape, seed, site, start)
            for config, seed in zip(levels, seeds, strict=True)
        ]
        for part, fill in ((0, np.ones), (1, np.zeros)):
            if all(draw[part] is None for draw in draws):
                arguments.append(None)
                continue
            stacked = np.stack([draw[part] if draw[part] is not None else fill(shape, np.float32) for draw in draws])
            arguments.append(torch.from_numpy(stacked))
    return arguments


def evaluate_transformed(
    twin: Twin,
    site: int,
    transform: Callable[..., torch.Tensor],
    arguments: Sequence[torch.Tensor | None],
    tensors: dict[str, torch.Tensor],
    data: Dataset,
    batch_size: int,
    vectorize: bool,
) -> list[int]:
    """Count correct predictions with `transform(value, *arguments)` at one site and no noise.

    Args:
        arguments: per-configuration values, each (K,) or None, passed to the transform.
    """
    runner = ConfigurationRunner(twin, [site], transform, len(arguments), tensors, vectorize)
    batch_size = runner.batch_size(batch_size)
    correct = np.zeros(next(iter(tensors.values())).shape[0], dtype=np.int64)
    for start in range(0, len(data), batch_size):
        x = torch.from_numpy(data.x[start : start + batch_size])
        labels = torch.from_numpy(data.y[start : start + batch_size])
        logits = runner(x, arguments)[0]
        correct += correct_counts(logits, labels)
    return [int(value) for value in correct]
