"""The speed-ups the profile benchmark measures change no result.

Walking trials run through `InferenceEvaluator` reuse the clean values at their site, run
only the suffix, and stack several trials in one run. For identical seeds they must count
exactly as many correct predictions as one full forward pass per trial (`Model.run` with
the noise from `draw_noise`), which is how the naive way in `benchmarks/bench_profile.py`
measures them. Both backends are covered: onnxruntime (mlp_bn.onnx) and torch (lenet5_bn.pt2),
on the first 300 Fashion-MNIST test images.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from wnplan.data import Dataset, load_data
from wnplan.evaluate import InferenceEvaluator, count_correct
from wnplan.models import Model, load_model
from wnplan.noise import NoiseSpec, SiteNoise, draw_noise
from wnplan.sweep import Trial

MODELS = Path(__file__).resolve().parent.parent / "examples" / "models"
SAMPLES = 300
SIGMAS = (0.5, 2.0)  # absolute σ where these models lose part of their accuracy
REPEATS = 2
BASE_SEED = 20240


@pytest.fixture(scope="module")
def data() -> Dataset:
    return load_data("fashion-mnist:test", (0.5, 0.5), SAMPLES)


@pytest.fixture(scope="module", params=["mlp_bn.onnx", "lenet5_bn.pt2"])
def model(request: pytest.FixtureRequest, data: Dataset) -> Model:
    return load_model(MODELS / request.param, sample=data.x[:2])


def chosen_sites(model: Model) -> list[int]:
    """Return the input, the first layer, a middle site, and the last two sites (logits last)."""
    count = len(model.sites)
    return sorted({0, 1, count // 2, count - 2, count - 1})


def trial_seed(site: int, sigma: float, repeat: int) -> int:
    return BASE_SEED + 1000 * site + 10 * SIGMAS.index(sigma) + repeat


def site_trials(model: Model, site: int) -> list[Trial]:
    name = model.sites[site].name
    return [Trial("walking", (site,), (name,), sigma, repeat) for sigma in SIGMAS for repeat in range(REPEATS)]


def full_pass_counts(model: Model, data: Dataset, trials: list[Trial]) -> list[int]:
    """Count correct predictions with one full forward pass over all samples per trial."""
    counts = []
    for trial in trials:
        (site,) = trial.sites
        shape = (len(data), *model.sites[site].shape)
        noise = draw_noise(SiteNoise(trial.sigma, 0.0), shape, trial_seed(site, trial.sigma, trial.repeat), site, 0)
        counts.append(count_correct(model.run(data.x, {site: noise}), data.y))
    return counts


def evaluator_counts(model: Model, data: Dataset, trials: list[Trial], **options: int) -> list[int]:
    """Count correct predictions through the engine's evaluator (suffix reuse)."""
    evaluator = InferenceEvaluator(
        model, data, NoiseSpec(), {}, lambda trial: trial_seed(trial.sites[0], trial.sigma, trial.repeat), **options
    )
    return [result.correct for result in evaluator.run_group(trials)]


def test_evaluator_counts_equal_full_pass(model: Model, data: Dataset) -> None:
    clean = count_correct(model.run(data.x), data.y)
    sites = chosen_sites(model)
    changed = 0
    for site in sites:
        trials = site_trials(model, site)
        expected = full_pass_counts(model, data, trials)
        changed += sum(count != clean for count in expected)

        # batch_bytes=1 leaves room for one trial per suffix run; the default stacks all four.
        one_per_run = evaluator_counts(model, data, trials, batch_bytes=1)
        stacked = evaluator_counts(model, data, trials)
        # 100-sample chunks cut across the 256-sample noise blocks.
        small_chunks = evaluator_counts(model, data, trials, chunk_samples=100)

        assert one_per_run == expected, f"site {site}: one trial per run differs from the full pass"
        assert stacked == expected, f"site {site}: stacked trials differ from the full pass"
        assert small_chunks == expected, f"site {site}: 100-sample chunks differ from the full pass"
    # The noise must change the outcome often, or equal counts would prove nothing.
    assert changed >= len(sites) * len(SIGMAS)


def test_evaluator_repeats_differ(model: Model, data: Dataset) -> None:
    site = len(model.sites) // 2
    trials = [Trial("walking", (site,), (model.sites[site].name,), SIGMAS[1], repeat) for repeat in range(REPEATS)]
    evaluator = InferenceEvaluator(
        model, data, NoiseSpec(), {}, lambda trial: trial_seed(site, SIGMAS[1], trial.repeat)
    )
    first, second = (result.correct for result in evaluator.run_group(trials))
    again = next(iter(evaluator.run_group(trials[:1]))).correct

    assert first == again
    assert first != second, "two repeats drew the same noise"
