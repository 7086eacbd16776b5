"""Gaussian noise models and reproducible noise draws.

Every noise kind is applied to an activation x as the affine map `x · mul + add`:

- additive: mul = 1, add ~ N(0, σ²);
- multiplicative: mul ~ N(1, σ²), add = 0;
- mixed, multiplicative first: `x · N(1, σ_mul²) + N(0, σ_add²)`;
- mixed, additive first: `(x + N(0, σ_add²)) · N(1, σ_mul²)`, which is
  `x · mul + add · mul`, so the caller gets `add` already multiplied.

On one σ axis, mixed noise uses the amplitude A = σ and a ratio r:
σ_add = A·r and σ_mul = A·(1 − r).

Noise is drawn outside the model and fed in, never by in-graph random ops, because a
fresh onnxruntime session repeats the draws of the first one. Each draw comes from a
generator seeded by (trial seed, site index, block of samples), so the noise a sample gets
does not depend on how samples are batched, which worker runs the trial, or in which order.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from wnplan.errors import SettingsError

NOISE_KINDS = ("additive", "multiplicative", "mixed")
NOISE_ORDERS = ("mul-first", "add-first")
REFERENCES = ("absolute", "rms", "range")

# Noise for sample i is drawn in the block i // NOISE_BLOCK. Changing it changes every draw.
NOISE_BLOCK = 256


@dataclass(frozen=True)
class NoiseSpec:
    """The noise model of a sweep.

    Attributes:
        kind: "additive", "multiplicative" or "mixed".
        order: for mixed noise, "mul-first" or "add-first"; ignored otherwise.
        mix_ratio: r in [0, 1] for mixed noise on one axis: σ_add = A·r, σ_mul = A·(1 − r).
        reference: "absolute" σ, or σ relative to the site's clean "rms" or "range".
    """

    kind: str = "additive"
    order: str = "mul-first"
    mix_ratio: float = 0.5
    reference: str = "absolute"

    def __post_init__(self) -> None:
        if self.kind not in NOISE_KINDS:
            raise SettingsError(f"unknown noise kind {self.kind!r}: expected one of {', '.join(NOISE_KINDS)}")
        if self.order not in NOISE_ORDERS:
            raise SettingsError(f"unknown noise order {self.order!r}: expected one of {', '.join(NOISE_ORDERS)}")
        if not 0.0 <= self.mix_ratio <= 1.0:
            raise SettingsError(f"invalid --mix-ratio {self.mix_ratio}: expected a value in [0, 1]")
        if self.reference not in REFERENCES:
            raise SettingsError(
                f"unknown noise reference {self.reference!r}: expected one of " + f"{', '.join(REFERENCES)}"
            )

    def components(self, sigma: float) -> tuple[float, float]:
        """Split one σ (or mixed amplitude A) into (σ_add, σ_mul), in the spec's reference."""
        if self.kind == "additive":
            return sigma, 0.0
        if self.kind == "multiplicative":
            return 0.0, sigma
        return sigma * self.mix_ratio, sigma * (1.0 - self.mix_ratio)

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        if self.kind != "mixed":
            record.pop("order")
            record.pop("mix_ratio")
        return record

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> NoiseSpec:
        return cls(
            kind=record["kind"],
            order=record.get("order", "mul-first"),
            mix_ratio=float(record.get("mix_ratio", 0.5)),
            reference=record.get("reference", "absolute"),
        )


@dataclass(frozen=True)
class SiteNoise:
    """Absolute noise levels at one site: y = x · N(1, sigma_mul²) + N(0, sigma_add²).

    `add_first` applies the additive part before the multiplicative one.
    """

    sigma_add: float = 0.0
    sigma_mul: float = 0.0
    add_first: bool = False

    @property
    def is_clean(self) -> bool:
        return self.sigma_add == 0.0 and self.sigma_mul == 0.0


def site_noise(spec: NoiseSpec, sigma: float, scale: float = 1.0) -> SiteNoise:
    """Turn σ in the spec's reference into absolute levels at a site.

    Args:
        spec: the noise model.
        sigma: σ (or mixed amplitude) in the spec's reference.
        scale: the site's reference statistic (clean RMS or range) for relative σ; 1 for
            absolute σ. Multiplicative noise is already relative to x, so only σ_add is scaled.
    """
    sigma_add, sigma_mul = spec.components(sigma)
    return SiteNoise(sigma_add * scale, sigma_mul, spec.kind == "mixed" and spec.order == "add-first")


def derive_seed(base_seed: int, identity: Mapping[str, Any]) -> int:
    """Derive a 128-bit seed from the user's seed and a trial's identity.

    The identity is hashed as canonical JSON, so the seed depends only on what the trial is.
    """
    canonical = json.dumps({"seed": base_seed, "trial": identity}, sort_keys=True)
    return int.from_bytes(hashlib.sha256(canonical.encode()).digest()[:16], "little")


def draw_noise(
    noise: SiteNoise,
    shape: tuple[int, ...],
    seed: int,
    site_index: int,
    start: int,
    dtype: np.dtype = np.float32,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Draw (mul, add) for samples `start … start + shape[0] − 1` at one site.

    Returns arrays of `shape` such that the noisy activation is `x * mul + add`; either is None
    when that part is absent. The draw for a sample depends only on (seed, site_index, sample
    index), whatever `start` and the batch size are.
    """
    if noise.is_clean:
        return None, None
    parts = (noise.sigma_mul > 0, noise.sigma_add > 0)
    return scale_noise(noise, *draw_standard(shape, seed, site_index, start, parts), dtype=dtype)


def draw_standard(
    shape: tuple[int, ...], seed: int, site_index: int, start: int, parts: tuple[bool, bool]
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Draw the standard normal values behind `draw_noise`, before scaling.

    `parts` says whether the multiplicative and the additive values are drawn. Scaling the same
    draws by different σ (with `scale_noise`) gives exactly what `draw_noise` gives for each σ,
    which lets allocations be compared on common random numbers. Blocks are drawn on a small
    thread pool, since numpy's generators release the GIL.
    """
    count = shape[0]
    z_mul = np.empty(shape, np.float32) if parts[0] else None
    z_add = np.empty(shape, np.float32) if parts[1] else None
    blocks = range(start // NOISE_BLOCK, (start + count - 1) // NOISE_BLOCK + 1)
    jobs = [(seed, site_index, block, start, count, z_mul, z_add) for block in blocks]
    if len(jobs) > 1 and int(np.prod(shape)) >= _PARALLEL_ELEMENTS:
        list(_pool().map(_draw_block, jobs))
    else:
        for job in jobs:
            _draw_block(job)
    return z_mul, z_add


# Noise large enough to overflow float32 gives inf or NaN values, which evaluation counts as
# misclassified, so numpy's warnings about them would only repeat that on stderr.
OVERFLOW_TO_INF = {"over": "ignore", "invalid": "ignore"}


def scale_noise(
    noise: SiteNoise, z_mul: np.ndarray | None, z_add: np.ndarray | None, dtype: np.dtype = np.float32
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Turn standard normal draws into (mul, add) for the given noise levels."""
    mul = add = None
    if noise.sigma_mul > 0:
        mul = z_mul * np.float32(noise.sigma_mul)
        mul += np.float32(1.0)
    if noise.sigma_add > 0:
        add = z_add * np.float32(noise.sigma_add)
    if noise.add_first and mul is not None and add is not None:
        add *= mul
    if np.dtype(dtype) != np.float32:
        mul = None if mul is None else mul.astype(dtype)
        add = None if add is None else add.astype(dtype)
    return mul, add


_PARALLEL_ELEMENTS = 1 << 18
_executor: concurrent.futures.ThreadPoolExecutor | None = None


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    global _executor
    if _executor is None:
        from wnplan import runtime

        # Respect the configured thread count, so a one-thread worker draws on one thread.
        threads = runtime.threads() or min(4, os.cpu_count() or 1)
        _executor = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, threads))
    return _executor


def _draw_block(job: tuple) -> None:
    """Fill one block's rows of the standard normal arrays in place.

    The whole block is always drawn, multiplicative part first, so a sample's values do not
    depend on which rows of the block the caller asked for.
    """
    seed, site_index, block, start, count, z_mul, z_add = job
    target = z_mul if z_mul is not None else z_add
    features = target.shape[1:]
    block_start = block * NOISE_BLOCK
    low = max(start, block_start)
    high = min(start + count, block_start + NOISE_BLOCK)
    rows = slice(low - start, high - start)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, site_index, block])))
    buffer = np.empty((NOISE_BLOCK, *features), np.float32)
    for values in (z_mul, z_add):
        if values is not None:
            rng.standard_normal(dtype=np.float32, out=buffer)
            values[rows] = buffer[low - block_start : high - block_start]


def noisy_into(
    out: np.ndarray, x: np.ndarray, noise: SiteNoise, seed: int, site_index: int, start: int
) -> None:
    """Write `x * mul + add` for the noise `draw_noise` would draw into `out`, with fewer copies.

    The values equal `apply_noise(x, *draw_noise(noise, x.shape, seed, site_index, start))`
    bit for bit, because the same float32 operations run in the same order. The scaled draws
    reuse the arrays of the standard normals, and the result goes straight into `out`, for
    example one trial's rows of a stacked batch. For float32 values only.
    """
    if noise.is_clean:
        np.copyto(out, x)
        return
    parts = (noise.sigma_mul > 0, noise.sigma_add > 0)
    z_mul, z_add = draw_standard(x.shape, seed, site_index, start, parts)
    with np.errstate(**OVERFLOW_TO_INF):
        _combine_into(out, x, noise, z_mul, z_add)


def _combine_into(out: np.ndarray, x: np.ndarray, noise: SiteNoise, z_mul, z_add) -> None:
    if z_mul is not None:
        np.multiply(z_mul, np.float32(noise.sigma_mul), out=z_mul)
        z_mul += np.float32(1.0)
        np.multiply(x, z_mul, out=out)
    else:
        np.copyto(out, x)
    if z_add is not None:
        np.multiply(z_add, np.float32(noise.sigma_add), out=z_add)
        if noise.add_first and z_mul is not None:
            z_add *= z_mul
        out += z_add


def apply_noise(x: np.ndarray, mul: np.ndarray | None, add: np.ndarray | None) -> np.ndarray:
    """Return `x * mul + add`, skipping absent parts; x itself when both are None."""
    if mul is None and add is None:
        return x
    with np.errstate(**OVERFLOW_TO_INF):
        y = x * mul if mul is not None else x.copy()
        if add is not None:
            y += add
    return y
