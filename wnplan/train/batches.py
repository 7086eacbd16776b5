"""The inputs of each training step: samples, labels and fresh noise for K configurations.

They are written into buffers that every step reuses: a new multi-megabyte tensor per step
costs page faults and cache misses that show up as a large share of a small model's step.
A step's buffers are overwritten only after its backward pass has finished.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from wnplan.noise import SiteNoise


class StepInputs:
    """Buffers and generators for the step inputs of K configurations.

    Args:
        levels: per configuration, its absolute noise at each noisy site, in site order.
        shapes: per-sample shape of each noisy site.
        generators: per configuration, the generator of its training noise.
        x: training samples (N, ...).
        y: training labels (N,).
        batch_size: the largest batch.
    """

    def __init__(
        self,
        levels: Sequence[Sequence[SiteNoise]],
        shapes: Sequence[tuple[int, ...]],
        generators: Sequence[torch.Generator],
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
    ) -> None:
        count = len(levels)
        self.levels = levels
        self.generators = generators
        self.x, self.y = x, y
        self.samples = torch.empty((count * batch_size, *x.shape[1:]), dtype=x.dtype)
        self.labels = torch.empty(count * batch_size, dtype=y.dtype)
        self.noise: list[tuple[_Part | None, _Part | None]] = []
        for position, shape in enumerate(shapes):
            site_levels = [config[position] for config in levels]
            size = (count, batch_size, *shape)
            self.noise.append((
                _Part.make([level.sigma_mul for level in site_levels], 1.0, size),
                _Part.make([level.sigma_add for level in site_levels], 0.0, size),
            ))

    def gather(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the samples (K, B, ...) and the flat labels (K·B,) at indices (K, B)."""
        flat = indices.flatten()
        samples = self.samples[: flat.shape[0]]
        labels = self.labels[: flat.shape[0]]
        torch.index_select(self.x, 0, flat, out=samples)
        torch.index_select(self.y, 0, flat, out=labels)
        return samples.view(*indices.shape, *self.x.shape[1:]), labels

    def draw_noise(self, batch: int) -> list[torch.Tensor | None]:
        """Draw fresh noise for a step of `batch` samples; return [mul, add] per site, (K, batch, ...).

        Each configuration draws standard normal values from its own generator, site by
        site, the multiplicative part first, and only the parts its own noise has, so its
        draws do not depend on the other configurations. Where another configuration needs
        a part that this one lacks, this one gets ones (mul) or zeros (add), which leave its
        values unchanged. A part no configuration has is None. Scaling to each σ is one
        operation for all configurations.
        """
        arguments: list[torch.Tensor | None] = []
        for position, (mul, add) in enumerate(self.noise):
            for k, generator in enumerate(self.generators):
                for part in (mul, add):
                    if part is not None:
                        part.draw(k, batch, generator)
            for part in (mul, add):
                if part is not None:
                    part.scale(batch)
            for k, config in enumerate(self.levels):
                level = config[position]
                if level.add_first and level.sigma_mul > 0 and level.sigma_add > 0:
                    add.buffer[k, :batch].mul_(mul.buffer[k, :batch])
            arguments.append(None if mul is None else mul.buffer[:, :batch])
            arguments.append(None if add is None else add.buffer[:, :batch])
        return arguments


class _Part:
    """The buffer of one noise part (multiplicative or additive) at one site, for K configurations."""

    def __init__(self, sigmas: Sequence[float], mean: float, size: tuple[int, ...]) -> None:
        self.sigmas = sigmas
        self.mean = mean
        self.buffer = torch.empty(size)
        self.scales = torch.tensor(sigmas, dtype=self.buffer.dtype).reshape(-1, *[1] * (len(size) - 1))

    @classmethod
    def make(cls, sigmas: Sequence[float], mean: float, size: tuple[int, ...]) -> _Part | None:
        """Return the part, or None when no configuration has it."""
        return cls(sigmas, mean, size) if any(sigma > 0 for sigma in sigmas) else None

    def draw(self, k: int, batch: int, generator: torch.Generator) -> None:
        """Fill configuration k's share with standard normal values, or zeros when its σ is 0."""
        target = self.buffer[k, :batch]
        if self.sigmas[k] > 0:
            torch.randn(target.shape, generator=generator, out=target)
        else:
            target.zero_()

    def scale(self, batch: int) -> None:
        """Turn the standard values into N(mean, σ²) for every configuration at once."""
        values = self.buffer[:, :batch]
        values.mul_(self.scales)
        if self.mean:
            values.add_(self.mean)
