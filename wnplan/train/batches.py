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
        self.noise: list[tuple[torch.Tensor | None, torch.Tensor | None]] = []
        for position, shape in enumerate(shapes):
            site_levels = [config[position] for config in levels]
            size = (count, batch_size, *shape)
            mul = torch.empty(size) if any(level.sigma_mul > 0 for level in site_levels) else None
            add = torch.empty(size) if any(level.sigma_add > 0 for level in site_levels) else None
            self.noise.append((mul, add))

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

        Each configuration draws from its own generator, site by site, the multiplicative
        part first, and only the parts its own noise has, so its draws do not depend on
        the other configurations. Where another configuration needs a part that this one
        lacks, this one gets ones (mul) or zeros (add), which leave its values unchanged.
        A part no configuration has is None.
        """
        arguments: list[torch.Tensor | None] = []
        for position, (mul, add) in enumerate(self.noise):
            for k, generator in enumerate(self.generators):
                level = self.levels[k][position]
                _draw_into(mul, k, batch, level.sigma_mul, 1.0, generator)
                _draw_into(add, k, batch, level.sigma_add, 0.0, generator)
                if level.add_first and level.sigma_mul > 0 and level.sigma_add > 0:
                    add[k, :batch].mul_(mul[k, :batch])
            arguments.append(None if mul is None else mul[:, :batch])
            arguments.append(None if add is None else add[:, :batch])
        return arguments


def _draw_into(buffer: torch.Tensor | None, k: int, batch: int, sigma: float, mean: float, generator) -> None:
    """Fill configuration k's part of a noise buffer with N(mean, σ²), or with `mean` when σ is 0."""
    if buffer is None:
        return
    target = buffer[k, :batch]
    if sigma > 0:
        torch.randn(target.shape, generator=generator, out=target)
        target.mul_(sigma).add_(mean)
    else:
        target.fill_(mean)
