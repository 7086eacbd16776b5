"""PyTorch functions with ONNX semantics, called from graphs that the ONNX converter builds.

Each function takes one batch of samples in ONNX's layout. Functions whose meaning depends on
the leading dimensions also register a stacked form (see `wnplan.train.stacked`), which
takes tensors with one more leading (configuration) dimension.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from wnplan.train.stacked import register_batch, register_elementwise, register_stacked

_MAX_POOLS = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVERAGE_POOLS = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


@register_elementwise
def divide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Return a / b; integer tensors divide with truncation, as ONNX Div does."""
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


@register_elementwise
def pad_spatial(x: torch.Tensor, pads: Sequence[int], value: float) -> torch.Tensor:
    """Pad the trailing spatial dimensions with ONNX pads [x1_begin, x2_begin, ..., x1_end, x2_end]."""
    count = len(pads) // 2
    torch_pads: list[int] = []
    for axis in reversed(range(count)):
        torch_pads.extend([pads[axis], pads[axis + count]])
    return F.pad(x, torch_pads, value=value)


@register_elementwise
def pad_same(
    x: torch.Tensor, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int], upper: bool, value: float
) -> torch.Tensor:
    """Pad the trailing spatial dimensions for ONNX auto_pad SAME_UPPER (upper) or SAME_LOWER."""
    pads_begin, pads_end = [], []
    for size, k, s, d in zip(x.shape[-len(kernel):], kernel, strides, dilations, strict=True):
        output = math.ceil(size / s)
        total = max(0, (output - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        pads_begin.append(small if upper else large)
        pads_end.append(large if upper else small)
    return pad_spatial(x, pads_begin + pads_end, value)


def gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    c: torch.Tensor | None,
    alpha: float,
    beta: float,
    trans_a: bool,
    trans_b: bool,
) -> torch.Tensor:
    """Return alpha · A' · B' + beta · C for 2-d A and B (ONNX Gemm)."""
    a = a.transpose(-1, -2) if trans_a else a
    b = b.transpose(-1, -2) if trans_b else b
    output = a @ b
    if alpha != 1.0:
        output = output * alpha
    if c is not None:
        output = output + (c * beta if beta != 1.0 else c)
    return output


@register_stacked(gemm)
def _gemm_stacked(a, b, c, alpha, beta, trans_a, trans_b, stacked):
    a_stacked, b_stacked = stacked[0] is True, stacked[1] is True
    c_stacked = len(stacked) > 2 and stacked[2] is True
    if not a_stacked:
        size = (b if b_stacked else c).shape[0]
        a = a.unsqueeze(0).expand(size, *a.shape)
    a = a.transpose(-1, -2) if trans_a else a
    b = b.transpose(-1, -2) if trans_b else b
    # (Bᵀ @ Aᵀ)ᵀ makes autograd produce B's gradient in B's own layout, without a copy.
    output = (b.transpose(-1, -2) @ a.transpose(-1, -2)).transpose(-1, -2) if b_stacked else a @ b
    if alpha != 1.0:
        output = output * alpha
    if c is not None:
        c = c * beta if beta != 1.0 else c
        if c_stacked:
            c = c.reshape(c.shape[0], *([1] * (output.dim() - c.dim())), *c.shape[1:])
        output = output + c
    return output


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Return the numpy-style matrix product (ONNX MatMul)."""
    return torch.matmul(a, b)


@register_stacked(matmul)
def _matmul_stacked(a, b, stacked):
    a_stacked, b_stacked = stacked[0] is True, stacked[1] is True
    if a_stacked and not b_stacked and b.dim() == 2:
        return a @ b
    if a_stacked and b_stacked and b.dim() == 3 and a.dim() >= 3:
        flat = a.reshape(a.shape[0], -1, a.shape[-1])
        output = (b.transpose(1, 2) @ flat.transpose(1, 2)).transpose(1, 2)
        return output.reshape(*a.shape[:-1], b.shape[-1])
    return torch.vmap(torch.matmul, in_dims=(0 if a_stacked else None, 0 if b_stacked else None))(a, b)


@register_batch
def max_pool(
    x: torch.Tensor, kernel: Sequence[int], strides: Sequence[int], padding: Sequence[int],
    dilations: Sequence[int], ceil_mode: bool,
) -> torch.Tensor:
    """Return ONNX MaxPool with symmetric padding (asymmetric padding is applied before)."""
    return _MAX_POOLS[len(kernel)](x, kernel, strides, padding, dilations, ceil_mode)


@register_batch
def average_pool(
    x: torch.Tensor, kernel: Sequence[int], strides: Sequence[int], padding: Sequence[int],
    ceil_mode: bool, count_include_pad: bool,
) -> torch.Tensor:
    """Return ONNX AveragePool with symmetric padding."""
    return _AVERAGE_POOLS[len(kernel)](x, kernel, strides, padding, ceil_mode, count_include_pad)


@register_batch
def global_average_pool(x: torch.Tensor) -> torch.Tensor:
    """Return the mean over all spatial dimensions, kept as size-1 dimensions (ONNX GlobalAveragePool)."""
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


def flatten(x: torch.Tensor, axis: int) -> torch.Tensor:
    """Reshape to 2-d: dimensions before `axis`, and from `axis` on (ONNX Flatten)."""
    return _flatten(x, axis, 0)


@register_stacked(flatten)
def _flatten_stacked(x, axis, stacked):
    return _flatten(x, axis, 1)


def _flatten(x: torch.Tensor, axis: int, leading: int) -> torch.Tensor:
    shape = x.shape[leading:]
    axis = axis + len(shape) if axis < 0 else axis
    return x.reshape(*x.shape[:leading], math.prod(shape[:axis]), math.prod(shape[axis:]))


def reshape(x: torch.Tensor, shape: Sequence[int], allow_zero: bool) -> torch.Tensor:
    """Reshape with ONNX rules: 0 copies the input's dimension unless `allow_zero` is set."""
    return x.reshape(_resolved_shape(x.shape, shape, allow_zero))


@register_stacked(reshape)
def _reshape_stacked(x, shape, allow_zero, stacked):
    return x.reshape(x.shape[0], *_resolved_shape(x.shape[1:], shape, allow_zero))


def _resolved_shape(current: Sequence[int], shape: Sequence[int], allow_zero: bool) -> list[int]:
    return [current[index] if dim == 0 and not allow_zero else dim for index, dim in enumerate(shape)]


def transpose(x: torch.Tensor, perm: Sequence[int] | None) -> torch.Tensor:
    """Permute dimensions; None reverses them (ONNX Transpose)."""
    return x.permute(*_permutation(x.dim(), perm))


@register_stacked(transpose)
def _transpose_stacked(x, perm, stacked):
    order = _permutation(x.dim() - 1, perm)
    return x.permute(0, *(axis + 1 for axis in order))


def _permutation(rank: int, perm: Sequence[int] | None) -> list[int]:
    return list(reversed(range(rank))) if perm is None else [axis % rank for axis in perm]


def reduce_mean(x: torch.Tensor, axes: Sequence[int] | None, keepdims: bool) -> torch.Tensor:
    """Return the mean over `axes` (all axes when None), as ONNX ReduceMean."""
    return _reduce_mean(x, axes, keepdims, 0)


@register_stacked(reduce_mean)
def _reduce_mean_stacked(x, axes, keepdims, stacked):
    return _reduce_mean(x, axes, keepdims, 1)


def _reduce_mean(x: torch.Tensor, axes, keepdims: bool, leading: int) -> torch.Tensor:
    rank = x.dim() - leading
    axes = range(rank) if axes is None else [axis % rank for axis in axes]
    return x.mean(dim=tuple(axis + leading for axis in axes), keepdim=keepdims)


def unsqueeze(x: torch.Tensor, axes: Sequence[int]) -> torch.Tensor:
    """Insert size-1 dimensions at `axes` of the output (ONNX Unsqueeze)."""
    return _unsqueeze(x, axes, 0)


@register_stacked(unsqueeze)
def _unsqueeze_stacked(x, axes, stacked):
    return _unsqueeze(x, axes, 1)


def _unsqueeze(x: torch.Tensor, axes: Sequence[int], leading: int) -> torch.Tensor:
    rank = x.dim() - leading + len(axes)
    for axis in sorted(axis % rank for axis in axes):
        x = x.unsqueeze(axis + leading)
    return x


def squeeze(x: torch.Tensor, axes: Sequence[int] | None) -> torch.Tensor:
    """Remove size-1 dimensions at `axes`, or all of them when None (ONNX Squeeze)."""
    return _squeeze(x, axes, 0)


@register_stacked(squeeze)
def _squeeze_stacked(x, axes, stacked):
    return _squeeze(x, axes, 1)


def _squeeze(x: torch.Tensor, axes, leading: int) -> torch.Tensor:
    rank = x.dim() - leading
    if axes is None:
        axes = [axis for axis in range(rank) if x.shape[axis + leading] == 1]
    return x.squeeze(dim=tuple(axis % rank + leading for axis in axes)) if axes else x


def softmax_coerced(x: torch.Tensor, axis: int) -> torch.Tensor:
    """Return Softmax of opset < 13: over all dimensions from `axis` on, taken as one."""
    return _softmax_coerced(x, axis, 0)


@register_stacked(softmax_coerced)
def _softmax_coerced_stacked(x, axis, stacked):
    return _softmax_coerced(x, axis, 1)


def _softmax_coerced(x: torch.Tensor, axis: int, leading: int) -> torch.Tensor:
    shape = x.shape
    flat = _flatten(x, axis, leading)
    return torch.softmax(flat, dim=-1).reshape(shape)


def concat(tensors: Sequence[torch.Tensor], axis: int) -> torch.Tensor:
    """Concatenate along `axis` (ONNX Concat)."""
    return torch.cat(list(tensors), dim=axis)


@register_stacked(concat)
def _concat_stacked(tensors, axis, stacked):
    flags = stacked[0]
    size = next(part.shape[0] for part, flag in zip(tensors, flags, strict=True) if flag)
    parts = [
        part if flag else part.unsqueeze(0).expand(size, *part.shape)
        for part, flag in zip(tensors, flags, strict=True)
    ]
    return torch.cat(parts, dim=axis + 1 if axis >= 0 else axis)
