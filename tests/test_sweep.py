"""Tests for the sweep loop and its SQLite store (wnplan.sweep, wnplan.store): resume and --fresh.

Profiles run on the trained digits perceptron of conftest.py with 100 digits samples, so a
whole profile takes well under a second. Interruptions are real: the progress callback
raises KeyboardInterrupt after a given number of finished trials.
"""

from __future__ import annotations

import logging
import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from wnplan import records
from wnplan.data import load_data
from wnplan.errors import SettingsError
from wnplan.evaluate import InferenceEvaluator, evaluate_noisy
from wnplan.executors import InProcessExecutor
from wnplan.fit import fit_curve
from wnplan.models import load_model
from wnplan.noise import NoiseSpec, site_noise
from wnplan.profiler import Execution, ProfileSettings, profile
from wnplan.store import Store, TrialResult, trial_key
from wnplan.sweep import Curve, SweepContext, Trial, run_sweep
from wnplan.train.trainer import TrainingSettings

LIMIT = 100
GRID = (0.1, 1.0, 3.0)
REPEATS = 2
# 4 walking curves and 1 global curve, 3 σ values each, 2 repeats.
GRID_TRIALS = 5 * len(GRID) * REPEATS
GRID_SETTINGS = ProfileSettings(scope="both", repeats=REPEATS, sigmas=GRID, seed=0)
# The adaptive grid on the input site and the first Gemm only, to keep it short.
ADAPTIVE_SETTINGS = ProfileSettings(scope="walking", sites="0-1", repeats=REPEATS, seed=0, max_trials=60)


class Interrupt:
    """A progress callback that raises KeyboardInterrupt once `after` trials have finished."""

    def __init__(self, after: int) -> None:
        self.after = after

    def __call__(self, done: int, total: int) -> None:
        if done >= self.after:
            raise KeyboardInterrupt


def _run(model: Path, store: Path | None, settings: ProfileSettings = GRID_SETTINGS, **options) -> dict:
    return profile(model, "digits", settings, limit=LIMIT, store=store, **options)


def _stored_rows(store: Path) -> list[tuple[str, int, float]]:
    with sqlite3.connect(store) as connection:
        return connection.execute("SELECT key, correct, finished FROM trials ORDER BY key").fetchall()


def _done_counts(caplog: pytest.LogCaptureFixture) -> tuple[int, int, int]:
    """Return (total, computed, reused) from the last "profile done" log record."""
    done = [record for record in caplog.records if record.getMessage().startswith("profile done")]
    assert done, "profile() logged no summary"
    total, computed, reused = done[-1].args[:3]
    return total, computed, reused


@pytest.fixture(scope="module")
def reference_profile(digits_mlp, tmp_path_factory) -> str:
    """The uninterrupted grid profile, measured with a store of its own, as canonical JSON."""
    store = tmp_path_factory.mktemp("reference") / "store.sqlite"
    return records.dumps(_run(digits_mlp.onnx, store))


# --- resume ---


@pytest.mark.parametrize("after", [1, 7, GRID_TRIALS - 1])
def test_profile_resumes_after_interrupt(digits_mlp, tmp_path, caplog, after, reference_profile):
    store = tmp_path / "store.sqlite"

    with pytest.raises(KeyboardInterrupt):
        _run(digits_mlp.onnx, store, progress=Interrupt(after))
    kept = _stored_rows(store)
    assert len(kept) == after

    with caplog.at_level(logging.INFO, logger="wnplan.profiler"):
        resumed = _run(digits_mlp.onnx, store)

    assert _done_counts(caplog) == (GRID_TRIALS, GRID_TRIALS - after, after)
    rows = _stored_rows(store)
    assert len(rows) == GRID_TRIALS
    assert set(kept) <= set(rows)  # the kept trials were neither recomputed nor rewritten
    assert records.dumps(resumed) == reference_profile


def test_profile_second_run_computes_nothing(digits_mlp, tmp_path, caplog, reference_profile):
    store = tmp_path / "store.sqlite"
    _run(digits_mlp.onnx, store)
    rows = _stored_rows(store)

    with caplog.at_level(logging.INFO, logger="wnplan.profiler"):
        again = _run(digits_mlp.onnx, store)

    assert _done_counts(caplog) == (GRID_TRIALS, 0, GRID_TRIALS)
    assert _stored_rows(store) == rows
    assert records.dumps(again) == reference_profile


def test_profile_adaptive_grid_resumes_identically(digits_mlp, tmp_path, caplog):
    uninterrupted = _run(digits_mlp.onnx, tmp_path / "reference.sqlite", ADAPTIVE_SETTINGS)
    measured = [
        point
        for site in uninterrupted["sites"]
        if site["walking"]
        for point in site["walking"]["points"]
        if point["reason"] != "clean"
    ]
    points = len(measured)
    total = sum(point["repeats"] for point in measured)
    assert points > 2 * 6  # the coarse grid was extended or refined on both sites
    store = tmp_path / "store.sqlite"

    with pytest.raises(KeyboardInterrupt):
        _run(digits_mlp.onnx, store, ADAPTIVE_SETTINGS, progress=Interrupt(total // 2 + 1))
    with caplog.at_level(logging.INFO, logger="wnplan.profiler"):
        resumed = _run(digits_mlp.onnx, store, ADAPTIVE_SETTINGS)

    assert _done_counts(caplog) == (total, total - (total // 2 + 1), total // 2 + 1)
    assert records.dumps(resumed) == records.dumps(uninterrupted)


def test_profile_resumes_with_process_pool(digits_mlp, tmp_path, caplog, reference_profile):
    store = tmp_path / "store.sqlite"
    with pytest.raises(KeyboardInterrupt):
        _run(digits_mlp.onnx, store, progress=Interrupt(5))

    with caplog.at_level(logging.INFO, logger="wnplan.profiler"):
        resumed = _run(digits_mlp.onnx, store, execution=Execution(workers=2))

    assert _done_counts(caplog) == (GRID_TRIALS, GRID_TRIALS - 5, 5)
    assert records.dumps(resumed) == reference_profile


def test_profile_store_keys_depend_on_seed_and_data(digits_mlp, tmp_path, caplog):
    store = tmp_path / "store.sqlite"
    _run(digits_mlp.onnx, store)
    other_seed = ProfileSettings(scope="both", repeats=REPEATS, sigmas=GRID, seed=1)

    with caplog.at_level(logging.INFO, logger="wnplan.profiler"):
        _run(digits_mlp.onnx, store, other_seed)
        assert _done_counts(caplog)[1] == GRID_TRIALS
        profile(digits_mlp.onnx, "digits", GRID_SETTINGS, limit=LIMIT - 1, store=store)
        assert _done_counts(caplog)[1] == GRID_TRIALS

    assert len(_stored_rows(store)) == 3 * GRID_TRIALS


# --- --fresh ---


def test_profile_fresh_recomputes_and_overwrites(digits_mlp, tmp_path, caplog, reference_profile):
    store = tmp_path / "store.sqlite"
    _run(digits_mlp.onnx, store)
    # Corrupt one stored result: a run that reuses the store must then report it.
    with sqlite3.connect(store) as connection:
        connection.execute("UPDATE trials SET correct = 0 WHERE key = (SELECT MAX(key) FROM trials)")

    reused = _run(digits_mlp.onnx, store)
    with caplog.at_level(logging.INFO, logger="wnplan.profiler"):
        fresh = _run(digits_mlp.onnx, store, fresh=True)
    after_fresh = _run(digits_mlp.onnx, store)

    assert records.dumps(reused) != reference_profile
    assert _done_counts(caplog) == (GRID_TRIALS, GRID_TRIALS, 0)
    assert records.dumps(fresh) == reference_profile
    assert records.dumps(after_fresh) == reference_profile
    assert len(_stored_rows(store)) == GRID_TRIALS


def test_profile_without_store_is_reproducible(digits_mlp, reference_profile):
    assert records.dumps(_run(digits_mlp.onnx, None)) == reference_profile


def test_backends_agree_on_noisy_accuracy(digits_mlp):
    data = load_data("digits", limit=LIMIT)
    onnx_model, pt2_model = load_model(digits_mlp.onnx), load_model(digits_mlp.pt2)
    assert len(onnx_model.sites) == len(pt2_model.sites)

    for index in range(len(onnx_model.sites)):
        for sigma in GRID:
            # Same seed and site index, so both backends get the same noise arrays.
            level = {index: site_noise(NoiseSpec(), sigma)}
            onnx_correct = evaluate_noisy(onnx_model, data, level, seed=3)
            pt2_correct = evaluate_noisy(pt2_model, data, level, seed=3)
            # Float rounding differs between the backends, so a sample near a tie may flip.
            assert abs(onnx_correct - pt2_correct) <= 1, (index, sigma)


def test_profile_input_site_same_on_both_backends(digits_mlp):
    onnx_record = _run(digits_mlp.onnx, None)
    pt2_record = _run(digits_mlp.pt2, None)

    # Only the input site has the same name on both backends, and the name seeds the noise.
    assert onnx_record["sites"][0]["name"] == pt2_record["sites"][0]["name"] == "input"
    assert onnx_record["sites"][0]["walking"]["points"] == pt2_record["sites"][0]["walking"]["points"]


def test_profile_site_fallen_at_smallest_sigma_is_sensitive(digits_mlp):
    settings = ProfileSettings(scope="walking", sites="0", repeats=REPEATS, sigmas=(5.0, 10.0, 30.0), seed=0)

    record = _run(digits_mlp.onnx, None, settings)

    fit = record["sites"][0]["walking"]["fit"]
    assert record["clean"]["accuracy"] > 0.9
    assert fit["status"] == "sensitive"
    assert fit["midpoint"] == 5.0
    assert fit["upper_bound"] is True


# --- the store ---


def test_store_put_keeps_existing_unless_replace(tmp_path):
    identity = {"scope": "walking", "sites": ["a"], "sigma": 0.1, "repeat": 0}
    key = trial_key("m" * 64, "d" * 64, identity)
    with Store(tmp_path / "nested" / "store.sqlite") as store:
        store.put(key, "m", "d", identity, TrialResult(5, 10, {"note": 1}, 0.5))
        store.put(key, "m", "d", identity, TrialResult(9, 10))
        kept = store.get_many([key])[key]
        store.put(key, "m", "d", identity, TrialResult(9, 10), replace=True)
        replaced = store.get_many([key])[key]

        assert kept == TrialResult(5, 10, {"note": 1}, 0.5)
        assert replaced.correct == 9
        assert store.count() == 1
        assert store.mean_seconds("m") is None  # the replacing result has no timing


def test_store_get_many_in_batches(tmp_path):
    with Store(tmp_path / "store.sqlite") as store:
        keys = [trial_key("m", "d", {"repeat": repeat}) for repeat in range(520)]
        for position, key in enumerate(keys):
            store.put(key, "m", "d", {"repeat": position}, TrialResult(position, 520))

        found = store.get_many([*keys, "absent"])

    assert len(found) == 520
    assert found[keys[510]].correct == 510


def test_store_unwritable_path_raises(tmp_path):
    with pytest.raises(SettingsError, match="--store") as raised:
        Store(tmp_path)  # a folder, not a database file

    assert str(tmp_path) in str(raised.value)


def test_trial_key_depends_on_model_data_and_identity():
    identity = {"scope": "global", "sigma": 1.0, "repeat": 0}
    key = trial_key("model", "data", identity)

    assert trial_key("model", "data", dict(reversed(identity.items()))) == key
    assert trial_key("other", "data", identity) != key
    assert trial_key("model", "other", identity) != key
    assert trial_key("model", "data", {**identity, "repeat": 1}) != key


# --- the sweep loop ---


def test_run_sweep_counts_and_progress(digits_mlp):
    model = load_model(digits_mlp.onnx)
    data = load_data("digits", limit=LIMIT)
    spec = NoiseSpec()
    context = SweepContext(model.sha256, data.sha256, spec.to_dict(), "inference", 0, store=None)
    evaluator = InferenceEvaluator(model, data, spec, {}, context.noise_seed)
    curves = [Curve("walking", (index,), (model.sites[index].name,), 0.9, 0.1, GRID) for index in (0, 2)]
    calls: list[tuple[int, int]] = []

    with InProcessExecutor(evaluator.run_group) as executor:
        counts = run_sweep(curves, 3, context, executor, lambda done, total: calls.append((done, total)))

    assert counts == {"total": 18, "computed": 18, "reused": 0}
    assert calls[-1] == (18, 18)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    assert all(len(results) == 3 for curve in curves for results in curve.results.values())


def test_walking_trial_equals_full_noisy_run(digits_mlp):
    model = load_model(digits_mlp.onnx)
    data = load_data("digits", limit=LIMIT)
    spec = NoiseSpec("mixed", mix_ratio=0.5)
    context = SweepContext(model.sha256, data.sha256, spec.to_dict(), "inference", 0, store=None)
    evaluator = InferenceEvaluator(model, data, spec, {}, context.noise_seed, chunk_samples=32)

    for site in model.sites:
        trials = [Trial("walking", (site.index,), (site.name,), sigma, 0) for sigma in (0.5, 2.0)]
        results = list(evaluator.run_group(trials))
        for trial, result in zip(trials, results, strict=True):
            level = {site.index: site_noise(spec, trial.sigma)}
            expected = evaluate_noisy(model, data, level, context.noise_seed(trial), chunk_samples=32)
            assert result.correct == expected, (site.name, trial.sigma)
            assert result.total == LIMIT


def _run_synthetic(curve: Curve, accuracy, samples: int = 10_000) -> int:
    """Feed a curve binomial results of a known accuracy function; return its trial count."""
    rng = np.random.default_rng(0)
    count = 0
    while trials := curve.next_trials(3):
        for trial in trials:
            total = trial.samples or samples
            curve.add(trial, TrialResult(int(rng.binomial(total, accuracy(trial.sigma))), total))
            count += 1
    return count


def test_target_error_ignores_misfit_part_of_error():
    # A Gompertz-shaped fall is no logistic: with 10,000 samples the fit's χ²/dof is far above 1.
    # More repeats cannot shrink that part, so the refinement stops on the sampling error.
    def gompertz(sigma: float) -> float:
        return 0.1 + 0.8 * math.exp(-math.exp((math.log10(sigma) + 0.3) / 0.25))

    curve = Curve("walking", (0,), ("x",), 0.9, 0.1, clean=(9000, 10_000), screen_samples=1000,
                  target_error=0.01, max_trials=200)
    trials = _run_synthetic(curve, gompertz)
    fit = fit_curve(curve.curve_points(), chance=0.1, space="log")

    assert fit.status == "ok"
    assert fit.error_scale > 2.0
    assert fit.statistical_error <= 0.01 * fit.midpoint < fit.midpoint_error
    assert trials < 100  # the misfit-scaled error would have added repeats up to the cap


# --- trained mode ---

TRAINED_SETTINGS = ProfileSettings(
    scope="walking", sites="0-1", mode="trained", repeats=2, sigmas=(0.3, 3.0), seed=0,
    training=TrainingSettings(epochs=1, batch_size=32, train_limit=256),
)
TRAINED_TRIALS = 2 * 2 * 2  # 2 sites × 2 σ × 2 repeats


def test_trained_profile_resumes_at_trial_level(digits_mlp, tmp_path, caplog):
    reference = _run(digits_mlp.onnx, tmp_path / "reference.sqlite", TRAINED_SETTINGS)
    store = tmp_path / "store.sqlite"

    with pytest.raises(KeyboardInterrupt):
        _run(digits_mlp.onnx, store, TRAINED_SETTINGS, progress=Interrupt(1))
    kept = _stored_rows(store)
    assert 0 < len(kept) < TRAINED_TRIALS  # the first site's trials were stored, not the second's

    with caplog.at_level(logging.INFO, logger="wnplan.profiler"):
        resumed = _run(digits_mlp.onnx, store, TRAINED_SETTINGS)

    assert _done_counts(caplog) == (TRAINED_TRIALS, TRAINED_TRIALS - len(kept), len(kept))
    assert set(kept) <= set(_stored_rows(store))  # finished trials were neither recomputed nor rewritten
    for ours, theirs in zip(resumed["sites"], reference["sites"], strict=True):
        if ours.get("walking") is None:
            continue
        assert [point["accuracy"] for point in ours["walking"]["points"]] == [
            point["accuracy"] for point in theirs["walking"]["points"]
        ]
