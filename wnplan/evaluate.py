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
from wnplan.noise import NoiseSpec, SiteNoise, apply_noise, draw_noise, draw_standard, scale_noise, site_noise
from wnplan.quantize import Quantizer
from wnplan.store import TrialResult
from wnplan.sweep import Trial

logger = logging.getLogger(__name__)

CHUNK_SAMPLES = 2048
CACHE_BYTES = 1 << 30  # clean suffix inputs kept in memory per site; above this they are recomputed


def count_correct(logits: np.ndarray, labels: np.ndarray) -> int:
    return int(np.count_nonzero(np.argmax(logits, axis=1) == labels))


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
            arrays = {
                index: scale_noise(level, *draws[index])
                for index, level in levels.items()
                if not level.is_clean
            }
            correct[position] += count_correct(model.run(x, arrays, quantize), labels)
    return correct


class InferenceEvaluator:
    """Runs inference-only trials of one model and data set.

    Args:
        model: the model.
        data: evaluation data.
        noise: the noise model.
        scales: per-site reference statistic for relative σ (1.0 for absolute σ).
        seed_of: the noise seed of a trial.
    """

    def __init__(
        self,
        model: Model,
        data: Dataset,
        noise: NoiseSpec,
        scales: Mapping[int, float],
        seed_of: Callable[[Trial], int],
        chunk_samples: int = CHUNK_SAMPLES,
    ) -> None:
        self.model = model
        self.data = data
        self.noise = noise
        self.scales = scales
        self.seed_of = seed_of
        self.chunk_samples = chunk_samples
        self._suffix_site: int | None = None
        self._suffix = None
        self._cache: dict[int, list[np.ndarray]] = {}

    def levels(self, trial: Trial) -> dict[int, SiteNoise]:
        return {index: trial_noise(self.noise, trial, self.scales.get(index, 1.0)) for index in trial.sites}

    def run_group(self, trials: Sequence[Trial]) -> Iterator[TrialResult]:
        """Yield one result per trial, in order; walking trials must share their site."""
        if trials and trials[0].scope == "walking":
            yield from self._walking(trials)
            return
        for trial in trials:
            started = time.perf_counter()
            correct = evaluate_noisy(self.model, self.data, self.levels(trial), self.seed_of(trial), self.chunk_samples)
            yield TrialResult(correct, len(self.data), seconds=time.perf_counter() - started)

    def _walking(self, trials: Sequence[Trial]) -> Iterator[TrialResult]:
        (site,) = trials[0].sites
        if site != self._suffix_site:
            # Only one site's suffix and clean values are kept, since sweeps finish a site
            # before moving to the next.
            self._suffix_site, self._suffix, self._cache = site, self.model.suffix(site), {}
        suffix = self._suffix
        starts = range(0, len(self.data), self.chunk_samples)
        cache = self._cache
        cached_bytes = sum(value.nbytes for values in cache.values() for value in values)

        for trial in trials:
            started = time.perf_counter()
            level = trial_noise(self.noise, trial, self.scales.get(site, 1.0))
            seed = self.seed_of(trial)
            correct = 0
            for start in starts:
                boundary = cache.get(start)
                if boundary is None:
                    boundary = suffix.prepare(self.data.x[start : start + self.chunk_samples])
                    size = sum(value.nbytes for value in boundary)
                    if cached_bytes + size <= CACHE_BYTES:
                        cache[start] = boundary
                        cached_bytes += size
                value = boundary[0]
                mul, add = draw_noise(level, value.shape, seed, site, start, value.dtype)
                logits = suffix.run(boundary, apply_noise(value, mul, add))
                correct += count_correct(logits, self.data.y[start : start + self.chunk_samples])
            yield TrialResult(correct, len(self.data), seconds=time.perf_counter() - started)
