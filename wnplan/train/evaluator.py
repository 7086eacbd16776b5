"""Trained-mode trials: train one model per trial with noise, then measure it with noise.

`TrainedEvaluator.run_group` is the trained-mode counterpart of
`wnplan.evaluate.InferenceEvaluator.run_group`: it takes the trials of one curve and yields
one `TrialResult` per trial, in order, as chunks of trials finish.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from wnplan.data import Dataset
from wnplan.errors import SettingsError
from wnplan.evaluate import strided_subset, trial_noise
from wnplan.models import Model
from wnplan.noise import NoiseSpec
from wnplan.store import TrialResult
from wnplan.sweep import Trial
from wnplan.train import records
from wnplan.train.layers import quantize_three_levels, quantize_two_levels
from wnplan.train.measure import evaluate_noisy, evaluate_transformed
from wnplan.train.trainer import TrainingConfig, TrainingSettings, chunk_size, stacks_configurations, train
from wnplan.train.twin import Twin, build_twin

logger = logging.getLogger(__name__)

RECORD_SAMPLES = 1024  # evaluation samples whose site values feed histograms and quantizer levels


class TrainedEvaluator:
    """Runs trained-mode trials of one model and data set.

    Each trial trains its own copy of the model with noise at its sites (fine-tuning, or
    from scratch), then measures its accuracy with noise at the same sites. Each result's
    `extra` contains the trained model's records: `mode`, `training` (the settings), `seeds`
    (`trial`, `training` and the derived `streams`), `steps`, `final_loss`,
    `clean_accuracy`, `weights` (mean |w| per conv/linear layer) and, for walking trials,
    `activations` (histograms) and `binarization` (the self-binarization test).

    Args:
        model: the model; it is never modified.
        train_data: training data.
        eval_data: evaluation data.
        noise: the noise model.
        scales: per-site reference statistic for relative σ (1.0 for absolute σ).
        seed_of: the noise seed of a trial (a hash of its identity and the sweep seed).
        settings: how to train.
    """

    def __init__(
        self,
        model: Model,
        train_data: Dataset,
        eval_data: Dataset,
        noise: NoiseSpec,
        scales: Mapping[int, float],
        seed_of: Callable[[Trial], int],
        settings: TrainingSettings | None = None,
    ) -> None:
        self.model = model
        self.train_data = train_data
        self.eval_data = eval_data
        self.noise = noise
        self.scales = scales
        self.seed_of = seed_of
        self.settings = settings or TrainingSettings()
        self._twin: Twin | None = None
        self._subsets: dict[int, Dataset] = {}

    @property
    def twin(self) -> Twin:
        """The trainable twin of the model, built on first use."""
        if self._twin is None:
            self._twin = build_twin(self.model)
        return self._twin

    def config_of(self, trial: Trial) -> TrainingConfig:
        """Return the training configuration of a trial.

        The training seed (data order, initial weights) is the seed of the same trial at
        σ = 0 on all data, so the models of one repeat at different σ start alike and see
        the same batches. The training noise seed derives from the trial's own seed.
        """
        levels = tuple((index, trial_noise(self.noise, trial, self.scales.get(index, 1.0))) for index in trial.sites)
        return TrainingConfig(levels, self.seed_of(_at_zero_sigma(trial)), self.seed_of(trial))

    def data_for(self, trial: Trial) -> Dataset:
        """Return the trial's evaluation data: all of it, or the evenly strided subset of `trial.samples`."""
        samples = getattr(trial, "samples", None)
        if samples is None or samples >= len(self.eval_data):
            return self.eval_data
        if samples not in self._subsets:
            self._subsets[samples] = strided_subset(self.eval_data, samples)
        return self._subsets[samples]

    def run_group(self, trials: Sequence[Trial]) -> Iterator[TrialResult]:
        """Train and measure the trials, yielding one result per trial in order.

        All trials must share their scope and sites (one curve). They are trained in
        chunks that fit `settings.memory_limit`.
        """
        if not trials:
            return
        _check_group(trials)
        twin = self.twin
        size = chunk_size(twin, self.settings, len(trials))
        logger.info(
            "training %d models at sites %s in chunks of %d, %s", len(trials), list(trials[0].sites), size,
            "stacked" if stacks_configurations(twin, self.settings) else "one by one",
        )
        for chunk in _chunks(trials, size):
            yield from self._run_chunk(twin, chunk, [self.config_of(trial) for trial in chunk])

    def _run_chunk(
        self, twin: Twin, trials: Sequence[Trial], configs: Sequence[TrainingConfig]
    ) -> Iterator[TrialResult]:
        started = time.perf_counter()
        trained = train(twin, configs, self.train_data, self.settings)
        seeds = [self.seed_of(trial) for trial in trials]
        data = self.data_for(trials[0])
        evaluation = evaluate_noisy(
            twin, [config.levels for config in configs], seeds, trained.tensors, data,
            self.settings.eval_batch_size, stacks_configurations(twin, self.settings), RECORD_SAMPLES,
        )
        clean = self._accuracy_with(twin, data, configs[0].sites[0], trained.tensors, _identity, [])
        # The accuracy of always predicting the most common label: 1/K on balanced data, more otherwise.
        majority = float(np.bincount(data.y).max()) / len(data.y)
        binarization = self._binarization(twin, data, trials, configs, trained.tensors, evaluation, majority)
        seconds = (time.perf_counter() - started) / len(trials)

        total = len(data)
        chance = 1.0 / max(2, len(np.unique(data.y)))
        _warn_diverged(trials, trained.final_loss, [count / total for count in clean], chance, self.settings.lr)
        for position, (trial, config) in enumerate(zip(trials, configs, strict=True)):
            extra = {
                "mode": "trained",
                "training": self.settings.to_dict(),
                "seeds": {
                    "trial": seeds[position],
                    "training": config.training_seed,
                    "streams": config.stream_seeds(),
                },
                "steps": trained.steps,
                "final_loss": records.finite_or_none(trained.final_loss[position]),
                "clean_accuracy": clean[position] / total,
                "weights": self._weight_record(twin, trained.tensors, position),
            }
            if evaluation.clean_values is not None:
                extra["activations"] = {
                    "site": trial.sites[0],
                    "samples": int(evaluation.clean_values.shape[1]),
                    "clean": records.activation_histogram(evaluation.clean_values[position]),
                    "noisy": records.activation_histogram(evaluation.noisy_values[position]),
                }
            if binarization is not None:
                extra["binarization"] = binarization[position]
            yield TrialResult(evaluation.correct[position], total, extra, seconds)

    def _accuracy_with(self, twin, data, site, tensors, transform, arguments) -> list[int]:
        """Return correct counts per configuration with `transform` at one site and no noise."""
        return evaluate_transformed(
            twin, site, transform, arguments, tensors, data, self.settings.eval_batch_size,
            stacks_configurations(twin, self.settings),
        )

    def _binarization(self, twin, data, trials, configs, tensors, evaluation, chance) -> list[dict[str, Any]] | None:
        """Return the self-binarization test per configuration, for one walking site."""
        if evaluation.clean_values is None:
            return None
        binary = [records.binary_levels(values) for values in evaluation.clean_values]
        ternary = [records.ternary_levels(values) for values in evaluation.clean_values]
        # The quantized values get the trial's own noise, and the reference is the noisy accuracy.
        # A model trained with large noise learned its BatchNorm statistics on noisy values, so
        # its accuracy without noise does not describe the site.
        seeds = [self.seed_of(trial) for trial in trials]
        levels = [config.levels for config in configs]
        vectorize = stacks_configurations(twin, self.settings)
        counts = [
            evaluate_noisy(
                twin, levels, seeds, tensors, data, self.settings.eval_batch_size, vectorize, 0,
                quantizer, _per_config(thresholds),
            ).correct
            for quantizer, thresholds in ((quantize_two_levels, binary), (quantize_three_levels, ternary))
        ]
        total = len(data)
        return [
            records.binarization_record(
                evaluation.correct[k] / total, counts[0][k] / total, counts[1][k] / total, binary[k], ternary[k],
                chance,
            )
            for k in range(len(configs))
        ]

    @staticmethod
    def _weight_record(twin: Twin, tensors: Mapping[str, torch.Tensor], position: int) -> dict[str, float | None]:
        names = [name for name in twin.trainable_names() if twin.roles[name].kind == "weight"]
        weights = {name: tensors[name][position].numpy() for name in names}
        labels = {name: twin.roles[name].label for name in weights}
        return records.mean_absolute_weights(weights, labels)


_DIVERGED_MESSAGE = (
    "the model trained at site %s, σ=%g, repeat %d scores %.3f without noise (chance %.3f, final loss %s): "
    + "its training diverged or the noise destroyed it. If σ is small, lower --lr (now %g)"
)
# A trained model within this factor of chance accuracy, without noise, gets a warning.
_NEAR_CHANCE = 1.2


def _warn_diverged(
    trials: Sequence[Trial], losses: Sequence[float], clean: Sequence[float], chance: float, lr: float
) -> None:
    """Log a warning for trained models whose loss is not finite or that score near chance clean.

    Such a model scores near chance with or without noise, which the curve would otherwise
    show as a site that cannot take any noise.
    """
    for trial, loss, accuracy in zip(trials, losses, clean, strict=True):
        if not math.isfinite(loss) or accuracy <= _NEAR_CHANCE * chance:
            logger.warning(
                _DIVERGED_MESSAGE, ",".join(trial.site_names), trial.sigma, trial.repeat, accuracy, chance, loss, lr
            )


def _at_zero_sigma(trial: Trial) -> Trial:
    """Return the trial at σ = 0 on all data, whose seed is the training seed of every σ."""
    fields = {field.name for field in dataclasses.fields(trial)}
    changes: dict[str, Any] = {"sigma": 0.0}
    if "sigma_pair" in fields and trial.sigma_pair is not None:
        changes["sigma_pair"] = (0.0, 0.0)
    if "samples" in fields:
        changes["samples"] = None
    return dataclasses.replace(trial, **changes)


def _chunks(trials: Sequence[Trial], size: int) -> Iterator[Sequence[Trial]]:
    """Split trials, in order, into runs of at most `size` that share their data subset."""
    start = 0
    while start < len(trials):
        end = start + 1
        samples = getattr(trials[start], "samples", None)
        while end < len(trials) and end - start < size and getattr(trials[end], "samples", None) == samples:
            end += 1
        yield trials[start:end]
        start = end


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _per_config(levels: Sequence[tuple[float, float]]) -> list[torch.Tensor]:
    """Return the quantizer arguments (thresholds, levels) as two (K,) tensors."""
    values = np.array(levels, dtype=np.float32).reshape(len(levels), 2)
    values = np.nan_to_num(values, nan=0.0, posinf=np.finfo(np.float32).max, neginf=np.finfo(np.float32).min)
    return [torch.from_numpy(np.ascontiguousarray(values[:, 0])), torch.from_numpy(np.ascontiguousarray(values[:, 1]))]


def _check_group(trials: Sequence[Trial]) -> None:
    first = trials[0]
    if first.scope not in ("walking", "global"):
        raise SettingsError(f"unknown trial scope {first.scope!r}: expected walking or global")
    if first.scope == "walking" and len(first.sites) != 1:
        raise SettingsError(f"a walking trial has noise at exactly one site, got sites {list(first.sites)}")
    for trial in trials[1:]:
        if trial.scope != first.scope or trial.sites != first.sites:
            first_group = f"{first.scope} {list(first.sites)}"
            other_group = f"{trial.scope} {list(trial.sites)}"
            raise SettingsError(
                f"trials trained together must share scope and sites; got {first_group} and {other_group}"
            )
