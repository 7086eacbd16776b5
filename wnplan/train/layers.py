"""Graph building blocks of trainable twins: linear and conv calls, switchable BatchNorm, site transforms.

These are the targets that twin graphs call, both in their plain form (one configuration)
and, through `wnplan.train.stacked`, with a leading configuration dimension.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_CONVOLUTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Return `x · weightᵀ + bias` for weight (out, in), like `F.linear`."""
    return F.linear(x, weight, bias)


def conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
) -> torch.Tensor:
    """Return the 1-, 2- or 3-d convolution that fits weight (out, in/groups, *kernel)."""
    return _CONVOLUTIONS[weight.dim() - 2](x, weight, bias, stride, padding, dilation, groups)


def convolution_function(weight: torch.Tensor):
    """Return F.conv1d, F.conv2d or F.conv3d for a weight of shape (out, in/groups, *kernel)."""
    return _CONVOLUTIONS[weight.dim() - 2]


# Operators whose arguments 1 and 2 are a weight of shape (out, in/groups, *kernel) and a bias.
LINEAR_TARGETS = frozenset(
    {
        linear,
        conv,
        torch.ops.aten.linear.default,
        torch.ops.aten.conv1d.default,
        torch.ops.aten.conv2d.default,
        torch.ops.aten.conv3d.default,
        torch.ops.aten.conv1d.padding,
        torch.ops.aten.conv2d.padding,
        torch.ops.aten.conv3d.padding,
        torch.ops.aten.convolution.default,
        F.linear,
        F.conv1d,
        F.conv2d,
        F.conv3d,
    }
)


class BatchNormSwitch(nn.Module):
    """BatchNorm that uses batch statistics in train mode and running statistics in eval mode.

    In train mode the running statistics are updated in place, as `nn.BatchNorm*` does:
    running = (1 − momentum) · running + momentum · batch statistic (unbiased variance).
    The module contains no tensors: weight, bias and running statistics are graph inputs, so
    that each configuration can supply its own.

    Args:
        momentum: PyTorch's momentum (the weight of the new batch statistic).
        eps: added to the variance.
        as_tuple: return `(output, empty, empty)`, the output form of ATen's
            `_native_batch_norm_legit_no_training`, whose users read item 0.
    """

    def __init__(self, momentum: float, eps: float, as_tuple: bool = False) -> None:
        super().__init__()
        self.momentum = momentum
        self.eps = eps
        self.as_tuple = as_tuple

    def forward(
        self,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        running_mean: torch.Tensor,
        running_var: torch.Tensor,
    ):
        output = F.batch_norm(x, running_mean, running_var, weight, bias, self.training, self.momentum, self.eps)
        return self.wrap(output)

    def wrap(self, output: torch.Tensor):
        """Return the output in this node's form: the tensor, or a tuple when `as_tuple`."""
        if self.as_tuple:
            empty = output.new_zeros(0)
            return output, empty, empty
        return output

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}, eps={self.eps}"


def inject_noise(x: torch.Tensor, mul: torch.Tensor | None, add: torch.Tensor | None) -> torch.Tensor:
    """Return `x · mul + add`, skipping absent parts; gradients flow through the product."""
    if mul is not None:
        x = x * mul
    if add is not None:
        x = x + add
    return x


def inject_noise_forward_only(x: torch.Tensor, mul: torch.Tensor | None, add: torch.Tensor | None) -> torch.Tensor:
    """Return `x · mul + add` in the forward pass, with the identity as its backward pass.

    This is the straight-through form `x + (noisy − x).detach()`: the gradient with respect
    to x is 1 whatever the multiplicative noise is.
    """
    noisy = inject_noise(x, mul, add)
    return x + (noisy - x).detach()


def quantize_two_levels(x: torch.Tensor, threshold: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Map values above `threshold` to `high` and all others to zero."""
    return torch.where(x > threshold, high, torch.zeros_like(x))


def quantize_three_levels(x: torch.Tensor, threshold: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """Map values with |x| above `threshold` to ±`level` (keeping the sign) and all others to zero."""
    return torch.where(x.abs() > threshold, torch.sign(x) * level, torch.zeros_like(x))
