"""Tests for noise models and reproducible noise draws (wnplan.noise), on both backends.

Statistical checks use 10^6 draws with fixed seeds. The standard error of the mean is then
σ/1000 and that of the standard deviation about σ/1400. The tolerance of 1 % of σ is therefore
about ten standard errors wide, so the checks do not depend on luck.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from wnplan.data import Dataset
from wnplan.errors import SettingsError
from wnplan.evaluate import count_correct, evaluate_noisy
from wnplan.models import load_model
from wnplan.noise import (
    NOISE_BLOCK,
    NoiseSpec,
    SiteNoise,
    apply_noise,
    derive_seed,
    draw_noise,
    noisy_into,
    site_noise,
)

BACKENDS = ("pt2", "onnx")
STATISTICS_SHAPE = (1000, 1000)  # 10^6 draws
RELATIVE_TOLERANCE = 0.01  # of σ, for the mean and the standard deviation of 10^6 draws
SEED = 1234

# onnxruntime's default optimization level (ORT_ENABLE_ALL) rewrites Conv nodes into a
# blocked layout and fuses them with a following Relu or Add. A Mul/Add noise node after the
# Conv blocks that fusion, so the "noisy" graph rounds differently from the clean one even
# with mul = 1 and add = 0. ORT_ENABLE_EXTENDED gives bit-identical results.
def _backend_params(xfail_onnx_reason: str | None = None) -> list:
    onnx_marks = [pytest.mark.xfail(strict=True, reason=xfail_onnx_reason)] if xfail_onnx_reason else []
    return [pytest.param("pt2", id="pt2"), pytest.param("onnx", id="onnx", marks=onnx_marks)]


def _labelled(model, x: np.ndarray) -> Dataset:
    """Return x with the clean model's predictions as labels (clean accuracy 100 %)."""
    labels = np.argmax(model.run(x), axis=1).astype(np.int64)
    return Dataset(x, labels, "residual-inputs")


# --- σ = 0 gives the clean output ---


def test_site_noise_zero_sigma_is_clean():
    for spec in (
        NoiseSpec("additive"),
        NoiseSpec("multiplicative"),
        NoiseSpec("mixed", order="add-first"),
        NoiseSpec("mixed", order="mul-first", reference="rms"),
    ):
        level = site_noise(spec, 0.0, scale=3.0)
        assert level.is_clean, spec


def test_draw_noise_clean_returns_no_arrays():
    mul, add = draw_noise(SiteNoise(), (4, 3), seed=SEED, site_index=2, start=0)

    assert mul is None
    assert add is None


def test_apply_noise_without_arrays_returns_input():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)

    assert apply_noise(x, None, None) is x


@pytest.mark.parametrize("backend", _backend_params())
def test_model_run_zero_noise_arrays_equal_clean(backend, residual_model, residual_inputs):
    model = load_model(residual_model.path(backend))
    clean = model.run(residual_inputs)

    for site in model.sites:
        shape = (residual_inputs.shape[0], *site.shape)
        mul = np.ones(shape, np.float32)
        add = np.zeros(shape, np.float32)
        noisy = model.run(residual_inputs, {site.index: (mul, add)})
        np.testing.assert_array_equal(noisy, clean, err_msg=f"site {site.index} {site.name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_evaluate_noisy_zero_sigma_counts_clean(backend, residual_model, residual_inputs):
    model = load_model(residual_model.path(backend))
    data = _labelled(model, residual_inputs)
    levels = {site.index: site_noise(NoiseSpec("mixed"), 0.0) for site in model.sites}

    correct = evaluate_noisy(model, data, levels, seed=SEED)

    assert correct == len(data)


# --- the injected noise has the requested distribution ---


def test_draw_noise_additive_mean_and_std():
    sigma = 0.3
    mul, add = draw_noise(SiteNoise(sigma_add=sigma), STATISTICS_SHAPE, SEED, site_index=1, start=0)

    assert mul is None
    assert add.dtype == np.float32
    assert abs(float(add.mean())) < RELATIVE_TOLERANCE * sigma
    assert abs(float(add.std()) - sigma) < RELATIVE_TOLERANCE * sigma


def test_draw_noise_multiplicative_mean_and_std():
    sigma = 0.5
    mul, add = draw_noise(SiteNoise(sigma_mul=sigma), STATISTICS_SHAPE, SEED, site_index=1, start=0)

    assert add is None
    assert abs(float(mul.mean()) - 1.0) < RELATIVE_TOLERANCE * sigma
    assert abs(float(mul.std()) - sigma) < RELATIVE_TOLERANCE * sigma


def test_draw_noise_mixed_components_mean_and_std():
    sigma_add, sigma_mul = 0.2, 0.7
    noise = SiteNoise(sigma_add=sigma_add, sigma_mul=sigma_mul)
    mul, add = draw_noise(noise, STATISTICS_SHAPE, SEED, site_index=0, start=0)

    assert abs(float(add.mean())) < RELATIVE_TOLERANCE * sigma_add
    assert abs(float(add.std()) - sigma_add) < RELATIVE_TOLERANCE * sigma_add
    assert abs(float(mul.mean()) - 1.0) < RELATIVE_TOLERANCE * sigma_mul
    assert abs(float(mul.std()) - sigma_mul) < RELATIVE_TOLERANCE * sigma_mul
    # The two parts come from separate streams, so they are uncorrelated.
    correlation = np.corrcoef(add.ravel()[:100_000], mul.ravel()[:100_000])[0, 1]
    assert abs(correlation) < 0.02


def test_site_noise_splits_mixed_amplitude_by_ratio():
    spec = NoiseSpec("mixed", order="add-first", mix_ratio=0.25)

    level = site_noise(spec, 2.0)

    assert level.sigma_add == pytest.approx(0.5)
    assert level.sigma_mul == pytest.approx(1.5)
    assert level.add_first


def test_site_noise_relative_scales_additive_only():
    spec = NoiseSpec("mixed", mix_ratio=0.5, reference="rms")

    level = site_noise(spec, 0.4, scale=10.0)

    assert level.sigma_add == pytest.approx(0.2 * 10.0)
    assert level.sigma_mul == pytest.approx(0.2)


def test_draw_noise_add_first_equals_add_then_multiply():
    shape = (300, 7)
    x = np.random.default_rng(SEED).standard_normal(shape).astype(np.float32)
    mul_first = SiteNoise(sigma_add=0.3, sigma_mul=0.4, add_first=False)
    add_first = SiteNoise(sigma_add=0.3, sigma_mul=0.4, add_first=True)
    m, a = draw_noise(mul_first, shape, SEED, site_index=3, start=0)

    mul, add = draw_noise(add_first, shape, SEED, site_index=3, start=0)
    noisy = apply_noise(x, mul, add)

    np.testing.assert_array_equal(mul, m)
    # x·m + (a·m) and (x + a)·m differ only by float32 rounding.
    np.testing.assert_allclose(noisy, (x + a) * m, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_run_noise_at_logits_is_affine(backend, residual_model, residual_inputs):
    model = load_model(residual_model.path(backend))
    logits_site = model.sites[-1]
    shape = (residual_inputs.shape[0], *logits_site.shape)
    mul, add = draw_noise(SiteNoise(0.5, 0.5), shape, SEED, logits_site.index, start=0)

    noisy = model.run(residual_inputs, {logits_site.index: (mul, add)})

    np.testing.assert_allclose(noisy, model.run(residual_inputs) * mul + add, rtol=1e-5, atol=1e-6)


# --- draws are reproducible and independent of batching ---


def test_draw_noise_independent_of_batching():
    noise = SiteNoise(sigma_add=0.1, sigma_mul=0.2)
    features = (3, 2)

    whole = draw_noise(noise, (1000, *features), SEED, site_index=4, start=0)
    first = draw_noise(noise, (300, *features), SEED, site_index=4, start=0)
    rest = draw_noise(noise, (700, *features), SEED, site_index=4, start=300)

    for part in range(2):
        np.testing.assert_array_equal(whole[part], np.concatenate([first[part], rest[part]]))


def test_draw_noise_single_sample_matches_batch():
    noise = SiteNoise(sigma_add=1.0)
    whole = draw_noise(noise, (3 * NOISE_BLOCK, 5), SEED, site_index=0, start=0)[1]

    for index in (0, NOISE_BLOCK - 1, NOISE_BLOCK, 2 * NOISE_BLOCK + 7):
        single = draw_noise(noise, (1, 5), SEED, site_index=0, start=index)[1]
        np.testing.assert_array_equal(single[0], whole[index])


def test_draw_noise_differs_between_seeds():
    noise = SiteNoise(sigma_add=1.0)

    one = draw_noise(noise, (50, 4), seed=1, site_index=0, start=0)[1]
    two = draw_noise(noise, (50, 4), seed=2, site_index=0, start=0)[1]

    assert not np.array_equal(one, two)


def test_draw_noise_differs_between_sites():
    noise = SiteNoise(sigma_add=1.0)

    one = draw_noise(noise, (50, 4), SEED, site_index=0, start=0)[1]
    two = draw_noise(noise, (50, 4), SEED, site_index=1, start=0)[1]

    assert not np.array_equal(one, two)
    assert abs(np.corrcoef(one.ravel(), two.ravel())[0, 1]) < 0.2


def test_draw_noise_repeats_with_same_seed():
    noise = SiteNoise(sigma_add=0.5, sigma_mul=0.5)

    one = draw_noise(noise, (40, 6), SEED, site_index=2, start=17)
    two = draw_noise(noise, (40, 6), SEED, site_index=2, start=17)

    np.testing.assert_array_equal(one[0], two[0])
    np.testing.assert_array_equal(one[1], two[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_evaluate_noisy_independent_of_chunk_size(backend, residual_model, residual_inputs):
    model = load_model(residual_model.path(backend))
    data = _labelled(model, residual_inputs)
    levels = {site.index: SiteNoise(sigma_add=0.5) for site in model.sites}

    counts = {chunk: evaluate_noisy(model, data, levels, SEED, chunk_samples=chunk) for chunk in (3, 4, 10)}

    assert len(set(counts.values())) == 1, counts
    assert counts[10] < len(data)  # the noise is large enough to change some predictions


# --- seeds derive from the trial identity only ---


def test_derive_seed_ignores_key_order():
    first = derive_seed(7, {"scope": "walking", "sites": ["fc"], "sigma": 0.1, "repeat": 0})
    second = derive_seed(7, {"repeat": 0, "sigma": 0.1, "sites": ["fc"], "scope": "walking"})

    assert first == second
    assert 0 <= first < 2**128


def test_derive_seed_changes_with_identity_and_base_seed():
    identity = {"scope": "walking", "sites": ["fc"], "sigma": 0.1, "repeat": 0}
    base = derive_seed(7, identity)

    assert derive_seed(8, identity) != base
    assert derive_seed(7, {**identity, "repeat": 1}) != base
    assert derive_seed(7, {**identity, "sigma": 0.2}) != base
    assert derive_seed(7, {**identity, "sites": ["conv"]}) != base


def test_derive_seed_same_in_another_process():
    identity = {"scope": "global", "sites": ["a", "b"], "sigma": 0.25, "repeat": 3}
    code = f"from wnplan.noise import derive_seed; print(derive_seed(11, {identity!r}))"
    # A different hash seed would change any seed built from Python's hash().
    environment = {**os.environ, "PYTHONHASHSEED": "12345"}

    output = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=environment
    ).stdout

    assert int(output) == derive_seed(11, identity)


# --- noise settings are validated ---


@pytest.mark.parametrize(
    ("arguments", "quoted"),
    [
        ({"kind": "gaussian"}, "'gaussian'"),
        ({"kind": "mixed", "order": "both"}, "'both'"),
        ({"kind": "mixed", "mix_ratio": 1.5}, "1.5"),
        ({"reference": "peak"}, "'peak'"),
    ],
)
def test_noise_spec_invalid_value_raises(arguments, quoted):
    with pytest.raises(SettingsError, match="expected") as raised:
        NoiseSpec(**arguments)

    assert quoted in str(raised.value)


def test_noise_spec_dict_round_trip():
    for spec in (NoiseSpec("additive", reference="range"), NoiseSpec("mixed", "add-first", 0.3, "rms")):
        assert NoiseSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize(
    "noise",
    [
        SiteNoise(),
        SiteNoise(sigma_add=0.7),
        SiteNoise(sigma_mul=0.3),
        SiteNoise(sigma_mul=0.3, sigma_add=0.7),
        SiteNoise(sigma_mul=0.3, sigma_add=0.7, add_first=True),
    ],
    ids=["clean", "additive", "multiplicative", "mul-first", "add-first"],
)
def test_noisy_into_equals_apply_noise_bit_for_bit(noise):
    x = np.random.default_rng(5).standard_normal((600, 3, 4)).astype(np.float32)
    expected = apply_noise(x, *draw_noise(noise, x.shape, SEED, site_index=3, start=300))
    out = np.full((2 * 600, 3, 4), np.nan, np.float32)

    noisy_into(out[600:], x, noise, SEED, site_index=3, start=300)

    np.testing.assert_array_equal(out[600:], expected)
    assert np.isnan(out[:600]).all()  # only the given rows are written


def test_count_correct_rejects_non_finite_logits():
    logits = np.array([[np.nan, np.nan], [np.inf, 0.0], [1.0, np.nan], [2.0, 1.0], [0.0, 1.0]], dtype=np.float32)
    labels = np.array([0, 0, 0, 0, 1])

    assert count_correct(logits, labels) == 2
