"""Inference-only accuracy under noise: the measurement behind every trial and check.

Walking trials reuse the clean values at their site: the part of the network before the
site runs once per group of trials, and each trial runs only the suffix. Trials with
noise at several sites run the whole network with noise inserted at each.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np

from wnplan.data import Dataset
from wnplan.models import Model
from wnplan.noise import (
    NoiseSpec,
    SiteNoise,
    apply_noise,
    draw_noise,
    draw_standard,
    noisy_into,
    scale_noise,
    site_noise,
)
from wnplan.quantize import Quantizer
from wnplan.store import TrialResult
from wnplan.sweep import Trial

logger = logging.getLogger(__name__)

CHUNK_SAMPLES = 2048
CACHE_BYTES = 1 << 30  # clean suffix inputs kept in memory per site; above this they are recomputed
BATCH_BYTES = 64 << 20  # stacked suffix inputs of several trials in one run


def count_correct(logits: np.ndarray, labels: np.ndarray) -> int:
    """Return how many samples the logits classify correctly.

    A sample whose logits are not all finite counts as wrong: argmax would pick a NaN's
    position, class 0 for all-NaN rows, and credit the samples labelled 0.
    """
    hits = (np.argmax(logits, axis=1) == labels) & np.isfinite(logits).all(axis=1)
    return int(np.count_nonzero(hits))


def evaluate_noisy(
    model: Model,
    data: Dataset,
    levels: Mapping[int, SiteNoise],
    seed: int,
    chunk_samples: int = CHUNK_SAMPLES,
    quantize: Mapping[int, Quantizer] | None = None,
) -> int:
    """Return the number of correct predictions with the given noise at each site.

    Args:
        model: the model.
        data: evaluation samples and labels.
        levels: absolute noise levels per site index; clean sites may be left out.
        seed: the noise seed of this measurement.
        chunk_samples: samples per forward pass.
        quantize: fake-quantization per site, applied after the noise.
    """
    noisy = {index: level for index, level in levels.items() if not level.is_clean}
    correct = 0
    for start in range(0, len(data), chunk_samples):
        x = data.x[start : start + chunk_samples]
        arrays = {
            index: draw_noise(level, (x.shape[0], *model.sites[index].shape), seed, index, start)
            for index, level in noisy.items()
        }
        correct += count_correct(model.run(x, arrays, quantize), data.y[start : start + chunk_samples])
    return correct


def trial_noise(spec: NoiseSpec, trial: Trial, scale: float) -> SiteNoise:
    """Return a trial's absolute noise at a site: from its σ, or from its (σ_mul, σ_add) pair."""
    if trial.sigma_pair is None:
        return site_noise(spec, trial.sigma, scale)
    sigma_mul, sigma_add = trial.sigma_pair
    return SiteNoise(sigma_add * scale, sigma_mul, trial.order == "add-first")


def evaluate_allocations(
    model: Model,
    data: Dataset,
    level_sets: Sequence[Mapping[int, SiteNoise]],
    seed: int,
    chunk_samples: int = CHUNK_SAMPLES,
    quantize: Mapping[int, Quantizer] | None = None,
) -> list[int]:
    """Return correct predictions for several noise settings measured on the same draws.

    The standard normal values are drawn once per chunk and site, then scaled for each
    setting, so differences between settings are not drowned in draw-to-draw noise
    (common random numbers). A setting gets exactly the noise that `evaluate_noisy` would
    give it alone when every setting has the same noise parts (multiplicative, additive) at
    each site it makes noisy.
    """
    noisy_sites = sorted({index for levels in level_sets for index, level in levels.items() if not level.is_clean})
    parts = {
        index: (
            any(levels.get(index, SiteNoise()).sigma_mul > 0 for levels in level_sets),
            any(levels.get(index, SiteNoise()).sigma_add > 0 for levels in level_sets),
        )
        for index in noisy_sites
    }
    correct = [0] * len(level_sets)
    for start in range(0, len(data), chunk_samples):
        x = data.x[start : start + chunk_samples]
        labels = data.y[start : start + chunk_samples]
        draws = {
            index: draw_standard((x.shape[0], *model.sites[index].shape), seed, index, start, parts[index])
            for index in noisy_sites
        }
        for position, levels in enumerate(level_sets):
            arrays = {index: scale_noise(level, *draws[index]) for index, level in levels.items() if not level.is_clean}
            correct[position] += count_correct(model.run(x, arrays, quantize), labels)
    return correct


class InferenceEvaluator:
    """Runs inference-only trials of one model and data set.

    Walking trials reuse the clean values at their site, and several trials are stacked
    along the batch axis into one suffix run, up to `batch_bytes` of inputs per run.

    Args:
        model: the model.
        data: evaluation data.
        noise: the noise model.
        scales: per-site reference statistic for relative σ (1.0 for absolute σ).
        seed_of: the noise seed of a trial.
        chunk_samples: samples per forward pass of one trial.
        batch_bytes: memory cap of the stacked suffix inputs of one run.
    """

    def __init__(
        self,
        model: Model,
        data: Dataset,
        noise: NoiseSpec,
        scales: Mapping[int, float],
        seed_of: Callable[[Trial], int],
        chunk_samples: int = CHUNK_SAMPLES,
        batch_bytes: int = BATCH_BYTES,
    ) -> None:
        self.model = model
        self.data = data
        self.noise = noise
        self.scales = scales
        self.seed_of = seed_of
        self.chunk_samples = chunk_samples
        self.batch_bytes = batch_bytes
        self._subsets: dict[int, Dataset] = {}
        self._suffix_site: int | None = None
        self._suffix = None
        self._cache: dict[tuple[int | None, int], list[np.ndarray]] = {}

    def levels(self, trial: Trial) -> dict[int, SiteNoise]:
        return {index: trial_noise(self.noise, trial, self.scales.get(index, 1.0)) for index in trial.sites}

    def data_for(self, trial: Trial) -> Dataset:
        """Return the trial's data: all of it, or an evenly strided subset of `trial.samples`."""
        if trial.samples is None or trial.samples >= len(self.data):
            return self.data
        if trial.samples not in self._subsets:
            self._subsets[trial.samples] = strided_subset(self.data, trial.samples)
        return self._subsets[trial.samples]

    def run_group(self, trials: Sequence[Trial]) -> Iterator[TrialResult]:
        """Yield one result per trial, in order; walking trials must share their site."""
        if trials and trials[0].scope == "walking":
            yield from self._walking(trials)
            return
        for trial in trials:
            started = time.perf_counter()
            data = self.data_for(trial)
            correct = evaluate_noisy(self.model, data, self.levels(trial), self.seed_of(trial), self.chunk_samples)
            yield TrialResult(correct, len(data), seconds=time.perf_counter() - started)

    def _walking(self, trials: Sequence[Trial]) -> Iterator[TrialResult]:
        (site,) = trials[0].sites
        if site != self._suffix_site:
            # Only one site's suffix and clean values are kept, since sweeps finish a site
            # before moving to the next.
            self._suffix_site, self._suffix, self._cache = site, self.model.suffix(site), {}

        # Trials on the same data are measured together; results keep the trials' order.
        results: dict[int, TrialResult] = {}
        by_data: dict[int | None, list[int]] = {}
        for position, trial in enumerate(trials):
            by_data.setdefault(trial.samples if trial.samples and trial.samples < len(self.data) else None, []).append(
                position
            )
        for samples, positions in by_data.items():
            started = time.perf_counter()
            group = [trials[position] for position in positions]
            counts, total = self._walking_counts(site, samples, group)
            seconds = (time.perf_counter() - started) / len(group)
            for position, correct in zip(positions, counts, strict=True):
                results[position] = TrialResult(correct, total, seconds=seconds)
        for position in range(len(trials)):
            yield results[position]

    def _walking_counts(self, site: int, samples: int | None, trials: Sequence[Trial]) -> tuple[list[int], int]:
        data = self.data_for(trials[0])
        suffix = self._suffix
        levels = [trial_noise(self.noise, trial, self.scales.get(site, 1.0)) for trial in trials]
        seeds = [self.seed_of(trial) for trial in trials]
        correct = [0] * len(trials)
        for start in range(0, len(data), self.chunk_samples):
            boundary = self._boundary(site, samples, start, data)
            labels = data.y[start : start + self.chunk_samples]
            per_trial = sum(value.nbytes for value in boundary)
            width = max(1, min(len(trials), self.batch_bytes // max(per_trial, 1)))
            for first in range(0, len(trials), width):
                batch = range(first, min(first + width, len(trials)))
                logits = self._run_stacked(
                    suffix, boundary, [levels[i] for i in batch], [seeds[i] for i in batch], site, start
                )
                rows = boundary[0].shape[0]
                for offset, index in enumerate(batch):
                    correct[index] += count_correct(logits[offset * rows : (offset + 1) * rows], labels)
        return correct, len(data)

    def _boundary(self, site: int, samples: int | None, start: int, data: Dataset) -> list[np.ndarray]:
        key = (samples, start)
        boundary = self._cache.get(key)
        if boundary is None:
            boundary = self._suffix.prepare(data.x[start : start + self.chunk_samples])
            cached = sum(value.nbytes for values in self._cache.values() for value in values)
            if cached + sum(value.nbytes for value in boundary) <= CACHE_BYTES:
                self._cache[key] = boundary
        return boundary

    @staticmethod
    def _run_stacked(suffix, boundary, levels, seeds, site, start) -> np.ndarray:
        """Run the suffix once for several trials, their noisy site values stacked on axis 0."""
        value = boundary[0]
        if value.dtype != np.float32:
            noisy = []
            for level, seed in zip(levels, seeds, strict=True):
                mul, add = draw_noise(level, value.shape, seed, site, start, value.dtype)
                noisy.append(apply_noise(value, mul, add))
            stacked_value = np.concatenate(noisy)
        else:
            # Each trial's noisy values go straight into its rows of the stacked batch: no
            # temporaries for the scaled noise and no concatenation pass over the batch.
            rows = value.shape[0]
            stacked_value = np.empty((rows * len(levels), *value.shape[1:]), np.float32)
            for position, (level, seed) in enumerate(zip(levels, seeds, strict=True)):
                noisy_into(stacked_value[position * rows : (position + 1) * rows], value, level, seed, site, start)
        if len(levels) == 1:
            return suffix.run(boundary, stacked_value)
        stacked = [stacked_value] + [np.concatenate([other] * len(levels)) for other in boundary[1:]]
        return suffix.run(stacked, stacked[0])


def strided_subset(data: Dataset, samples: int) -> Dataset:
    """Return `samples` samples spread evenly over the data set (every k-th sample)."""
    step = max(1, len(data) // samples)
    return data.subset(np.arange(0, step * samples, step)[:samples], f"[every {step}th, {samples} samples]")
