"""The profiling pipeline: load, find sites, calibrate, sweep, fit, and build the profile.

`profile()` is the Python entry point behind `wnplan profile`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wnplan import records, runtime
from wnplan._version import __version__
from wnplan.calibrate import reference_scales, site_statistics
from wnplan.data import Dataset, load_data, parse_normalize
from wnplan.errors import DataError, ModelError, SettingsError
from wnplan.evaluate import InferenceEvaluator, count_correct
from wnplan.executors import EvaluationJob, Executor, InProcessExecutor, ProcessPoolExecutor
from wnplan.fit import fit_curve
from wnplan.models import Model, load_model, read_declaration
from wnplan.noise import NoiseSpec
from wnplan.sites import select_sites
from wnplan.store import DEFAULT_STORE, Store
from wnplan.sweep import SIGMA_MAX, Curve, GridCurve, SweepContext, round_sigma, run_sweep

logger = logging.getLogger(__name__)

SCOPES = ("walking", "global", "both")
MODES = ("inference", "trained", "both")
FIT_SPACES = ("linear", "log")


@dataclass(frozen=True)
class ProfileSettings:
    """What to measure.

    Attributes:
        noise: the noise model (kind, order, mix ratio, σ reference).
        scope: "walking" (one site at a time), "global" (all sites at once) or "both".
        sites: site selection for walking noise (indices, names or op types); None for all.
        mode: "inference" (a clean-trained model run with noise), "trained" (each point is a
            model fine-tuned, or trained from scratch, with that noise), or "both".
        training: how trained mode trains (epochs, optimizer, clamping, gradient semantics).
        train_data: training data for trained mode; None takes the `:train` split of a
            built-in evaluation data set.
        repeats: independent noise draws per σ.
        sigmas: σ values to run exactly, in the noise reference; None for the adaptive grid.
        seed: base seed; every trial's noise seed derives from it and the trial's identity.
        fit_space: fit the logistic in σ ("linear") or in log10 σ ("log").
        global_include_norm: also put global noise on normalization sites.
        maps: instead of curves, measure mixed-noise maps (σ_mul × σ_add, both orders) at the
            selected sites; needs mixed noise and a site selection.
        screen_samples: with the adaptive grid, locate each curve's fall on this many evenly
            strided samples before measuring on all data; 0 screens on all data.
        target_error: with the adaptive grid, add repeats near µ until its standard error is
            below this fraction of µ; 0 stops once the crossing is bracketed.
        max_trials: the most trials one curve may run.
    """

    noise: NoiseSpec = field(default_factory=NoiseSpec)
    scope: str = "both"
    sites: str | None = None
    mode: str = "inference"
    repeats: int = 3
    sigmas: tuple[float, ...] | None = None
    seed: int = 0
    fit_space: str = "log"
    global_include_norm: bool = False
    maps: bool = False
    screen_samples: int = 1000
    target_error: float = 0.05
    max_trials: int = 200
    training: Any = None
    train_data: str | None = None

    def __post_init__(self) -> None:
        _check_choice("--scope", self.scope, SCOPES)
        _check_choice("--mode", self.mode, MODES)
        _check_choice("--fit-space", self.fit_space, FIT_SPACES)
        if self.maps and self.noise.kind != "mixed":
            raise SettingsError("--grid maps mixed noise: pass --noise mixed with --grid")
        if self.maps and not self.sites:
            raise SettingsError("--grid needs --sites: each map costs a full σ_mul × σ_add grid per site")
        if self.screen_samples < 0:
            raise SettingsError(f"invalid --screen-samples {self.screen_samples}: expected 0 or more")
        if not 0.0 <= self.target_error < 1.0:
            raise SettingsError(
                f"invalid --target-error {self.target_error}: expected a fraction in [0, 1), such as 0.05"
            )
        if self.max_trials < 1:
            raise SettingsError(f"invalid --max-trials {self.max_trials}: expected at least 1")
        if self.repeats < 1:
            raise SettingsError(f"invalid --repeats {self.repeats}: expected at least 1")
        if self.sigmas is not None:
            bad = [sigma for sigma in self.sigmas if not np.isfinite(sigma) or sigma <= 0]
            if bad or not self.sigmas:
                raise SettingsError(
                    f"invalid --sigmas value {bad[0] if bad else '(empty)'}: expected positive "
                    + "finite numbers such as 0.01,0.1,1"
                )
            if max(self.sigmas) > SIGMA_MAX:
                raise SettingsError(
                    f"invalid --sigmas value {max(self.sigmas)!r}: expected at most {SIGMA_MAX:g}, because "
                    + "larger noise overflows float32 activations; pass smaller σ values"
                )


def _check_choice(option: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise SettingsError(f"invalid {option} {value!r}: expected one of {', '.join(allowed)}")


def resolve_data(
    model_path: str | Path,
    data: str | None,
    normalize: str | None,
    limit: int | None,
    default_split: str = "test",
) -> Dataset:
    """Load `data`, or the data the model file declares when `data` is None."""
    if data is None:
        if not Path(model_path).exists():
            raise ModelError(f"model file not found: {str(model_path)!r}")
        declaration = read_declaration(model_path)
        if declaration is None:
            raise DataError(
                f"{model_path} declares no data: pass --data (a .npz file, an IDX folder, "
                + "fashion-mnist or digits) and --normalize MEAN,STD if the model expects it"
            )
        data = declaration.data
        if normalize is None:
            normalize = declaration.normalize
        logger.info("using the data declared in %s: %s", declaration.source, data)
    return load_data(data, parse_normalize(normalize), limit, default_split)


def load_model_and_data(
    model: str | Path,
    data: str | None = None,
    normalize: str | None = None,
    limit: int | None = None,
    factory: str | None = None,
    trust: bool = False,
) -> tuple[Model, Dataset]:
    """Load a model and its evaluation data, and check that they fit each other."""
    dataset = resolve_data(model, data, normalize, limit)
    loaded = load_model(model, factory=factory, trust=trust, sample=dataset.x[:2])
    loaded.check_input(dataset.x)
    return loaded, dataset


def clean_accuracy(model: Model, data: Dataset) -> tuple[int, int]:
    """Return (correct, classes) of the clean model; validate its output and the labels."""
    logits = model.run(data.x[: min(len(data), 64)])
    if logits.ndim != 2 or logits.shape[1] < 2 or not np.issubdtype(logits.dtype, np.floating):
        raise ModelError(
            f"the model's first output has shape {logits.shape[1:]} and dtype {logits.dtype}; "
            + "wnplan needs class scores of shape (N, classes)"
        )
    classes = int(logits.shape[1])
    if int(data.y.max()) >= classes:
        raise DataError(
            f"labels go up to {int(data.y.max())} but the model outputs {classes} classes; "
            + "check that the data matches the model"
        )
    correct = 0
    for start in range(0, len(data), 4096):
        batch = model.run(data.x[start : start + 4096])
        correct += count_correct(batch, data.y[start : start + 4096])
    return correct, classes


def build_curves(
    model: Model, settings: ProfileSettings, clean: tuple[int, int], classes: int, adaptive: bool = True
) -> tuple[list[Curve], Curve | None]:
    """Return the walking curves of the selected sites and the global curve, if requested.

    Args:
        model: the model.
        settings: what to measure.
        clean: (correct, samples) of the clean model on the evaluation data.
        classes: number of classes K; chance accuracy is 1/K.
        adaptive: screen on a subset and add repeats near µ; off for trained mode, where
            training, not evaluation, dominates the cost of a trial.
    """
    correct, samples = clean
    grid = tuple(sorted({round_sigma(sigma) for sigma in settings.sigmas})) if settings.sigmas else None
    # Screening pays off only when the subset is much smaller than the data.
    screen = settings.screen_samples if adaptive and 0 < settings.screen_samples * 2 <= samples else None
    target = settings.target_error or None if adaptive else None

    def curve(scope: str, indices: tuple[int, ...]) -> Curve:
        names = tuple(model.sites[index].name for index in indices)
        return Curve(
            scope,
            indices,
            names,
            correct / samples,
            1.0 / classes,
            grid,
            clean,
            screen_samples=screen,
            target_error=target,
            max_trials=settings.max_trials,
            fit_space=settings.fit_space,
        )

    walking: list[Curve] = []
    if settings.scope in ("walking", "both"):
        walking = [curve("walking", (index,)) for index in select_sites(model.sites, settings.sites)]
    global_curve = None
    if settings.scope in ("global", "both"):
        global_curve = curve("global", tuple(global_sites(model, settings.global_include_norm)))
    return walking, global_curve


MAP_SIGMAS = tuple(round_sigma(10.0 ** (k / 2)) for k in range(-4, 5))  # 0.01 … 100, two per decade


def build_maps(model: Model, settings: ProfileSettings) -> list[GridCurve]:
    """Return one mixed-noise map per selected site and noise order."""
    axis = tuple(sorted({round_sigma(sigma) for sigma in settings.sigmas})) if settings.sigmas else MAP_SIGMAS
    maps = []
    for index in select_sites(model.sites, settings.sites):
        for order in ("mul-first", "add-first"):
            maps.append(GridCurve((index,), (model.sites[index].name,), order, axis, axis))
    return maps


def global_sites(model: Model, include_norm: bool) -> list[int]:
    """Return the sites that global noise covers: all, or all but normalization sites."""
    return [site.index for site in model.sites if include_norm or not site.is_normalization]


def profile(
    model: str | Path,
    data: str | None = None,
    settings: ProfileSettings | None = None,
    *,
    normalize: str | None = None,
    limit: int | None = None,
    factory: str | None = None,
    trust: bool = False,
    store: str | Path | None = DEFAULT_STORE,
    fresh: bool = False,
    progress: Callable[[int, int], None] | None = None,
    execution: Execution | None = None,
) -> dict[str, Any]:
    """Measure per-site (walking) and global noise sensitivity and return the profile record.

    Args:
        model: a model file (see `wnplan.models.load_model`).
        data: a data specification (see `wnplan.data.load_data`); None uses the model's
            declared data.
        settings: what to measure.
        normalize: `MEAN,STD` applied after scaling images to [0, 1]; None uses the model's
            declaration, if any.
        limit: evaluate only the first `limit` samples.
        factory, trust: see `load_model`.
        store: the SQLite result store; None keeps results in memory only.
        fresh: ignore stored results (and overwrite them).
        progress: called with (finished trials, planned trials).
        execution: where trials run (in this process by default, or worker processes, or Ray).

    Returns:
        The profile as a JSON-ready dict, valid under the profile schema.
    """
    settings = settings or ProfileSettings()
    started = time.perf_counter()

    loaded, dataset = load_model_and_data(model, data, normalize, limit, factory, trust)
    correct, classes = clean_accuracy(loaded, dataset)
    statistics = site_statistics(loaded, dataset)
    execution = execution or Execution(factory=factory, trust=trust)

    modes = ("inference", "trained") if settings.mode == "both" else (settings.mode,)
    measured: dict[str, tuple[list[Curve], Curve | None, list[GridCurve]]] = {}
    totals = {"total": 0, "computed": 0, "reused": 0}
    train_data: Dataset | None = None
    for mode in modes:
        trained = mode == "trained"
        if settings.maps:
            walking, global_curve, maps = [], None, build_maps(loaded, settings)
        else:
            walking, global_curve = build_curves(
                loaded, settings, (correct, len(dataset)), classes, adaptive=not trained
            )
            maps = []
        curves = walking + ([global_curve] if global_curve else []) + maps
        if trained:
            check_in_process(execution)
        make = _trained_evaluator(settings, dataset, normalize, classes) if trained else None
        if make is not None:
            train_data = make.train_data
        counts = _measure(
            model, loaded, dataset, settings, statistics, curves, store, fresh, progress, execution, mode, make
        )
        for key in totals:
            totals[key] += counts[key]
        measured[mode] = (walking, global_curve, maps)

    record = _profile_record(loaded, dataset, settings, statistics, correct, classes, measured, train_data)
    logger.info(
        "profile done: %d trials (%d computed, %d from the store) in %.1f s",
        totals["total"],
        totals["computed"],
        totals["reused"],
        time.perf_counter() - started,
    )
    records.validate(record, "profile")
    return record


def _trained_evaluator(settings: ProfileSettings, dataset: Dataset, normalize: str | None, classes: int):
    """Return a function that builds the trained-mode evaluator for a loaded model.

    Raises:
        DataError: the training data do not fit the model (see `load_training_data`).
    """
    from wnplan.train.evaluator import TrainedEvaluator
    from wnplan.train.trainer import TrainingSettings

    training = settings.training or TrainingSettings()
    train_data = load_training_data(settings, dataset, normalize, classes)

    def make(model: Model, scales, seed_of) -> TrainedEvaluator:
        return TrainedEvaluator(model, train_data, dataset, settings.noise, scales, seed_of, training)

    make.train_data = train_data  # recorded in the profile
    return make


_SAME_DATA_WARNING = (
    "--train-data %r holds the same samples as the evaluation data, so trained accuracies are measured "
    + "on training samples; pass a separate training split"
)


def load_training_data(settings: ProfileSettings, dataset: Dataset, normalize: str | None, classes: int) -> Dataset:
    """Load trained mode's training data: `--train-data`, or the training split of the evaluation data.

    Raises:
        SettingsError: no training data was given and the evaluation data has no training split.
        DataError: the training samples differ in shape from the evaluation samples, or their
            labels exceed the model's classes.
    """
    from wnplan.train.trainer import TrainingSettings

    training = settings.training or TrainingSettings()
    train_spec = settings.train_data or training_split(dataset.name)
    preprocessing = dataset.preprocessing.get("normalize")
    train_data = load_data(
        train_spec, tuple(preprocessing) if preprocessing else parse_normalize(normalize), training.train_limit, "train"
    )
    if train_data.sha256 == dataset.sha256:
        logger.warning(_SAME_DATA_WARNING, train_spec)
    if train_data.x.shape[1:] != dataset.x.shape[1:]:
        raise DataError(
            f"training samples {train_spec!r} have shape {tuple(train_data.x.shape[1:])}, but the evaluation "
            + f"samples and the model have {tuple(dataset.x.shape[1:])}; pass --train-data of that shape"
        )
    if int(train_data.y.max()) >= classes or int(train_data.y.min()) < 0:
        raise DataError(
            f"training labels of {train_spec!r} range from {int(train_data.y.min())} to {int(train_data.y.max())}, "
            + f"but the model outputs {classes} classes (labels 0 to {classes - 1}); pass matching --train-data"
        )
    return train_data


def training_split(name: str) -> str:
    """Return the training split of a built-in data set name, or raise SettingsError."""
    base, _, split = name.partition(":")
    if base in ("fashion-mnist", "digits") and split in ("", "test"):
        return f"{base}:train"
    if base in ("fashion-mnist", "digits"):
        raise SettingsError(
            f"trained mode would train on the evaluation data {name!r}; pass --train-data {base}:train "
            + f"and evaluate on --data {base}:test, or pass --train-data explicitly"
        )
    raise SettingsError(
        f"trained mode needs training data and {name!r} has no built-in training split; pass --train-data"
    )


def _measure(
    model_path, loaded, dataset, settings, statistics, curves, store, fresh, progress, execution, mode, make_trained
) -> dict[str, int]:
    scales = reference_scales(statistics, settings.noise.reference)
    opened = Store(store) if store is not None else None
    try:
        identity_mode = mode if make_trained is None else _trained_identity(settings, make_trained)
        context = SweepContext(
            loaded.sha256, dataset.sha256, settings.noise.to_dict(), identity_mode, settings.seed, opened, fresh
        )
        job = EvaluationJob(
            str(model_path),
            execution.factory,
            execution.trust,
            dataset,
            settings.noise,
            scales,
            {"noise": context.noise, "mode": context.mode, "seed": context.seed},
            runtime.threads(),
        )
        if make_trained is not None:
            evaluator = make_trained(loaded, scales, context.noise_seed)
            # Every site is checked before the first model trains, not when its curve starts.
            evaluator.twin.check_sites(_sites_of(curves))
            executor = InProcessExecutor(evaluator.run_group)
        else:
            executor = make_executor(job, execution, loaded)
        with executor:
            return run_sweep(curves, settings.repeats, context, executor, progress)
    finally:
        if opened is not None:
            opened.close()


@dataclass(frozen=True)
class Execution:
    """Where and how trials run.

    Attributes:
        workers: local worker processes (0 runs trials in this process); with `ray`, the
            number of Ray workers (0: one per CPU of the cluster).
        ray: a Ray cluster address ("auto", "local", or host:port), or None.
        factory, trust: how workers load the model (see `load_model`).
    """

    workers: int = 0
    ray: str | None = None
    factory: str | None = None
    trust: bool = False

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise SettingsError(
                f"invalid --workers {self.workers}: expected 0 (run in this process) or a number of workers"
            )


def _trained_identity(settings: ProfileSettings, make_trained) -> str:
    """Return the mode part of trained trial identities: the training settings and data count."""
    from wnplan.train.trainer import TrainingSettings

    training = (settings.training or TrainingSettings()).to_dict()
    return "trained:" + records.dumps({"training": training, "train_data": make_trained.train_data.sha256}).strip()


def make_executor(job: EvaluationJob, execution: Execution, loaded: Model) -> Executor:
    """Return the executor for the execution settings; in-process reuses the loaded model."""
    if execution.ray is not None:
        from wnplan.ray_executor import RayExecutor

        return RayExecutor(job, execution.ray, workers=execution.workers or None)
    if execution.workers:
        return ProcessPoolExecutor(job, execution.workers)
    evaluator = InferenceEvaluator(loaded, job.data, job.noise, job.scales, job.noise_seed)
    return InProcessExecutor(evaluator.run_group)


def _profile_record(
    loaded: Model,
    dataset: Dataset,
    settings: ProfileSettings,
    statistics: list[dict[str, float]],
    correct: int,
    classes: int,
    measured: dict[str, tuple[list[Curve], Curve | None, list[GridCurve]]],
    train_data: Dataset | None = None,
) -> dict[str, Any]:
    """Build the profile record.

    The curves of the profile's mode go under each site's `walking` key and under `global`.
    With mode "both", those hold the inference-only curves, and the trained curves go under
    `trained` keys beside them.
    """
    main_mode = "trained" if settings.mode == "trained" else "inference"
    walking, global_curve, _ = measured[main_mode]
    extra = measured.get("trained") if settings.mode == "both" else None

    by_site = {curve.sites[0]: curve for curve in walking}
    trained_by_site = {curve.sites[0]: curve for curve in extra[0]} if extra else {}
    global_members = set(global_curve.sites) if global_curve else set()
    sites = []
    for site in loaded.sites:
        entry = site.to_dict()
        entry["statistics"] = statistics[site.index]
        entry["normalization"] = site.is_normalization
        entry["in_global"] = site.index in global_members
        curve = by_site.get(site.index)
        entry["walking"] = _curve_record(curve, classes, settings.fit_space) if curve else None
        if site.index in trained_by_site:
            entry["trained"] = _curve_record(trained_by_site[site.index], classes, settings.fit_space)
        sites.append(entry)

    global_record = None
    if global_curve is not None:
        global_record = _curve_record(global_curve, classes, settings.fit_space)
        global_record["sites"] = list(global_curve.sites)
        if extra and extra[1] is not None:
            global_record["trained"] = _curve_record(extra[1], classes, settings.fit_space)

    record = {
        "kind": "profile",
        "schema_version": records.SCHEMA_VERSION,
        "wnplan_version": __version__,
        "model": loaded.describe(),
        "data": dataset.describe(),
        "noise": settings.noise.to_dict(),
        "settings": {
            "scope": settings.scope,
            "mode": settings.mode,
            "repeats": settings.repeats,
            "seed": settings.seed,
            "fit_space": settings.fit_space,
            "grid": "given" if settings.sigmas else "adaptive",
            "sigmas": list(settings.sigmas) if settings.sigmas else None,
            "site_selection": settings.sites,
            "global_include_norm": settings.global_include_norm,
            "maps": settings.maps,
            "screen_samples": settings.screen_samples,
            "target_error": settings.target_error,
            "max_trials": settings.max_trials,
            "device": runtime.device(),
        },
        "classes": classes,
        "chance": 1.0 / classes,
        "clean": {"accuracy": correct / len(dataset), "correct": correct, "samples": len(dataset)},
        "sites": sites,
        "global": global_record,
    }
    if settings.mode != "inference":
        record["settings"]["training"] = _training_record(settings, train_data)
    all_maps = [grid.record() | {"mode": mode} for mode, (_, _, grids) in measured.items() for grid in grids]
    if all_maps:
        record["maps"] = all_maps
    return record


def _training_record(settings: ProfileSettings, train_data: Dataset | None) -> dict[str, Any]:
    """Return the training settings, and the training data as used (None when nothing was trained)."""
    from wnplan.train.trainer import TrainingSettings

    return {
        "train_data": settings.train_data,
        "train_data_used": None if train_data is None else train_data.describe(),
        "settings": (settings.training or TrainingSettings()).to_dict(),
    }


def _curve_record(curve: Curve, classes: int, fit_space: str) -> dict[str, Any]:
    """Return a curve's points (the clean model is the point at σ = 0) and its fit.

    Points screened on a data subset are listed but left out of the fit.
    """
    fit = fit_curve(curve.curve_points(), chance=1.0 / classes, space=fit_space)
    points = curve.points()
    for point in points:
        results = curve.results.get(point["sigma"]) if point["reason"] not in ("clean", "screen") else None
        if results and results[0].extra:
            # Trained models keep what the training recorded (weights, histograms, the
            # self-binarization test) for the first repeat of each σ.
            point["records"] = results[0].extra
    record = {"points": points, "fit": fit.to_dict()}
    if any("records" in point for point in points):
        from wnplan.train.records import preserved_relative_accuracy

        record["preserved_relative_accuracy"] = preserved_relative_accuracy(points)
    return record


def check_in_process(execution: Execution) -> None:
    """Raise SettingsError if trained mode is asked to run in worker processes or on Ray."""
    if execution.workers or execution.ray:
        raise SettingsError("trained mode runs in this process; drop --workers and --ray")


def check_trainable(model: Model, settings: ProfileSettings) -> None:
    """Build the trainable twin and check every site the profile would train at.

    Raises:
        ModelError: trained mode cannot convert or run the model, or cannot put noise on a
            selected site.
    """
    from wnplan.train.twin import build_twin

    walking, global_curve = build_curves(model, settings, (1, 1), 2)
    build_twin(model).check_sites(_sites_of(walking + ([global_curve] if global_curve else [])))


def _sites_of(curves: Sequence[Curve | GridCurve]) -> list[int]:
    """Return the indices of every site that the curves put noise on, in order."""
    return sorted({site for curve in curves for site in curve.sites})


def count_trials(model: Model, settings: ProfileSettings) -> tuple[int, bool]:
    """Return the number of trials a profile runs, and whether that is exact.

    With a given σ grid the count is exact; with the adaptive grid it is the first round
    plus a typical refinement (an estimate).
    """
    if settings.maps:
        maps = build_maps(model, settings)
        return len(maps) * len(maps[0].sigmas_mul) * len(maps[0].sigmas_add) * settings.repeats, True
    walking, global_curve = build_curves(model, settings, (1, 1), 2)
    curves = len(walking) + (1 if global_curve else 0)
    if settings.mode == "both":
        curves *= 2  # every curve is measured twice: inference-only, then trained
    if settings.sigmas:
        return curves * len(set(settings.sigmas)) * settings.repeats, True
    typical_points = 6 + 10  # coarse decades + refinement where the curve falls
    return curves * typical_points * settings.repeats, False
