"""Uniform fake-quantization of activations, used to check bit-width hints.

A b-bit quantizer over [low, high] has 2^b levels spaced by step = (high − low)/(2^b − 1).
A value is clipped to the range and rounded to the nearest level. Rounding adds an error
of standard deviation step/√12 to values spread over many levels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from wnplan.errors import SettingsError


@dataclass(frozen=True)
class Quantizer:
    """A uniform quantizer with `bits` bits over the activation range [low, high]."""

    low: float
    high: float
    bits: int

    def __post_init__(self) -> None:
        if self.bits < 1:
            raise SettingsError(f"invalid bit width {self.bits}: expected at least 1 bit")
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.high <= self.low:
            raise SettingsError(f"invalid quantization range [{self.low}, {self.high}]: expected finite low < high")

    @property
    def levels(self) -> int:
        return 2**self.bits

    @property
    def step(self) -> float:
        return (self.high - self.low) / (self.levels - 1)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Return x clipped to the range and rounded to the nearest level."""
        dtype = x.dtype
        codes = np.clip(np.round((x - dtype.type(self.low)) / dtype.type(self.step)), 0, self.levels - 1)
        return (codes * dtype.type(self.step) + dtype.type(self.low)).astype(dtype, copy=False)
