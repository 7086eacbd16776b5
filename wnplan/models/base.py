"""The interface every model backend implements, so that sweeps never branch on the format.

A backend exposes the model's sites and three ways to run it on a batch of samples:

- `run`: a full forward pass with noise at any set of sites, fed in as `x · mul + add`;
- `activations`: clean activations at chosen sites (for calibration);
- `suffix`: the part of the network downstream of one site, to rerun only that part for
  walking noise at that site.

Arrays in and out are numpy; the backends convert. A model may accept only some batch sizes
(a batch fixed at export, or a range that `torch.export` recorded). This base class splits
larger batches into chunks the model accepts and pads a short last chunk, so callers never
see the limit.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wnplan.errors import DataError, ModelError
from wnplan.quantize import Quantizer

# Per-site (mul, add) arrays, each None when absent: the site's value becomes x · mul + add.
NoiseArrays = Mapping[int, tuple[np.ndarray | None, np.ndarray | None]]
# Per-site fake-quantization applied after the noise.
Quantizers = Mapping[int, Quantizer]

NORMALIZATION_OPS = frozenset(
    {
        "BatchNormalization",
        "InstanceNormalization",
        "LayerNormalization",
        "GroupNormalization",
        "batch_norm",
        "native_batch_norm",
        "_native_batch_norm_legit",
        "_native_batch_norm_legit_functional",
        "_native_batch_norm_legit_no_training",
        "_batch_norm_no_update",
        "_batch_norm_with_update",
        "instance_norm",
        "layer_norm",
        "group_norm",
    }
)


@dataclass(frozen=True)
class Site:
    """A point in the activation path where noise can be injected.

    Attributes:
        index: position in execution order; 0 is the model input.
        name: stable name (ONNX: the output tensor's name; PyTorch: module path or graph node).
        op: the operator that produces the value (ONNX op type or ATen op name; "input").
        shape: per-sample shape, without the batch dimension.
        parameters: number of learnable parameters of the producing operator.
        module: PyTorch module path of the producing call, or "" when unknown.
    """

    index: int
    name: str
    op: str
    shape: tuple[int, ...]
    parameters: int = 0
    module: str = ""

    @property
    def is_normalization(self) -> bool:
        return self.op in NORMALIZATION_OPS

    def to_dict(self) -> dict[str, Any]:
        record = {
            "index": self.index,
            "name": self.name,
            "op": self.op,
            "shape": list(self.shape),
            "parameters": self.parameters,
        }
        if self.module:
            record["module"] = self.module
        return record


@dataclass(frozen=True)
class BatchLimits:
    """The batch sizes a model accepts: `minimum` to `maximum` samples (None: no maximum)."""

    minimum: int = 1
    maximum: int | None = None

    @property
    def fixed(self) -> int | None:
        """The only accepted batch size, or None when the model accepts several."""
        return self.maximum if self.maximum == self.minimum else None

    def accepts(self, count: int) -> bool:
        return self.minimum <= count and (self.maximum is None or count <= self.maximum)


@dataclass(frozen=True)
class DataDeclaration:
    """Data and preprocessing that a model file declares for itself."""

    data: str
    normalize: str | None = None
    source: str = ""


@dataclass
class Suffix(ABC):
    """The network downstream of one site, run from cached clean values.

    `prepare` computes the clean values the suffix needs (the site's value first, then any
    other value that crosses into the suffix, such as a skip connection). Every one of them
    has the samples along its first axis, so callers may split, pad or stack them by sample.
    `run` evaluates the suffix with a replacement for the site's value.
    """

    site: Site
    limits: BatchLimits = field(default_factory=BatchLimits, kw_only=True)

    @abstractmethod
    def _prepare(self, x: np.ndarray) -> list[np.ndarray]: ...

    @abstractmethod
    def _run(self, values: Sequence[np.ndarray]) -> np.ndarray: ...

    def prepare(self, x: np.ndarray) -> list[np.ndarray]:
        """Return the clean boundary values for samples x; the site's value comes first."""
        return _chunked(self._prepare, [x], self.limits, multi=True)

    def run(self, boundary: Sequence[np.ndarray], site_value: np.ndarray) -> np.ndarray:
        """Return logits of the suffix with `site_value` in place of the site's clean value."""
        # Noise is drawn in float32; a float16 or float64 site gets its value in its own type.
        site_value = site_value.astype(boundary[0].dtype, copy=False)

        def run_chunk(*values: np.ndarray) -> np.ndarray:
            return class_scores(self._run(values), values[0].shape[0])

        return _chunked(run_chunk, [site_value, *boundary[1:]], self.limits)


class Model(ABC):
    """A loaded classifier with its sites; see the module docstring for the contract."""

    format: str = ""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sha256 = file_sha256(path)
        self.batch_limits = BatchLimits()
        self.declaration: DataDeclaration | None = None

    @property
    def fixed_batch(self) -> int | None:
        """The only batch size the model accepts, or None when it accepts several."""
        return self.batch_limits.fixed

    @property
    @abstractmethod
    def sites(self) -> tuple[Site, ...]: ...

    @property
    @abstractmethod
    def input_shape(self) -> tuple[int | None, ...]:
        """Input shape with None for dynamic dimensions, batch dimension first."""

    @abstractmethod
    def _run(self, x: np.ndarray, noise: NoiseArrays, quantize: Quantizers) -> np.ndarray: ...

    @abstractmethod
    def _activations(self, x: np.ndarray, indices: Sequence[int]) -> list[np.ndarray]: ...

    @abstractmethod
    def suffix(self, index: int) -> Suffix:
        """Return the part of the network downstream of site `index`."""

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "sha256": self.sha256, "format": self.format}

    def run(
        self, x: np.ndarray, noise: NoiseArrays | None = None, quantize: Quantizers | None = None
    ) -> np.ndarray:
        """Return logits (N, K) for samples x with noise, then fake-quantization, at sites."""
        noise = noise or {}
        quantize = quantize or {}
        if not noise:
            return _chunked(
                lambda batch: class_scores(self._run(batch, {}, quantize), batch.shape[0]), [x], self.batch_limits
            )
        order = sorted(noise)
        arrays = [x]
        for index in order:
            arrays.extend(part for part in noise[index] if part is not None)

        def run_chunk(*chunk: np.ndarray) -> np.ndarray:
            parts = iter(chunk[1:])
            chunk_noise = {
                index: tuple(next(parts) if part is not None else None for part in noise[index])
                for index in order
            }
            return class_scores(self._run(chunk[0], chunk_noise, quantize), chunk[0].shape[0])

        return _chunked(run_chunk, arrays, self.batch_limits)

    def activations(self, x: np.ndarray, indices: Sequence[int]) -> list[np.ndarray]:
        """Return the clean values at the given sites for samples x, in the order given."""
        return _chunked(lambda batch: self._activations(batch, indices), [x], self.batch_limits, multi=True)

    def check_input(self, x: np.ndarray) -> None:
        """Raise DataError unless samples x fit the model's input shape."""
        expected = self.input_shape
        got = x.shape
        fits = len(expected) == len(got) and all(
            want is None or want == have or position == 0
            for position, (want, have) in enumerate(zip(expected, got, strict=False))
        )
        if not fits:
            shown = ["N" if dim is None else str(dim) for dim in expected]
            raise DataError(
                f"data samples have shape {tuple(got[1:])} but the model expects input of shape "
                + f"({', '.join(shown)}); pass data of that shape with --data"
            )


def file_sha256(path: Path) -> str:
    """Return the sha256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def class_scores(logits: np.ndarray, count: int) -> np.ndarray:
    """Return a model output as class scores of shape (count, classes), or raise ModelError.

    A model fixed at batch 1 whose output lost the batch axis (shape (classes,)) is accepted.
    """
    if logits.ndim == 1 and count == 1:
        logits = logits[None]
    if logits.ndim != 2 or logits.shape[0] != count or not np.issubdtype(logits.dtype, np.floating):
        raise ModelError(
            f"the model's first output has shape {logits.shape} and dtype {logits.dtype} for a batch of " +
            f"{count} samples; wnplan needs floating-point class scores of shape ({count}, classes)"
        )
    if logits.shape[1] < 2:
        raise ModelError(
            f"the model's first output has {logits.shape[1]} column for each sample; wnplan needs one "
            + "score per class, so export a binary classifier with two output columns"
        )
    return logits


def _chunked(
    function: Callable[..., Any],
    arrays: Sequence[np.ndarray],
    limits: BatchLimits,
    multi: bool = False,
) -> Any:
    """Call `function` on whole arrays, or on chunks whose size the model accepts.

    Chunks hold at most `limits.maximum` samples. A chunk with fewer than `limits.minimum`
    samples is padded by repeating its last sample, and the padded rows are dropped from the
    result. `multi` marks functions that return a list of arrays rather than one.
    """
    count = arrays[0].shape[0]
    if count == 0 or limits.accepts(count):
        return function(*arrays)

    size = limits.maximum if limits.maximum is not None else max(count, limits.minimum)
    pieces: list[Any] = []
    for start in range(0, count, size):
        chunk = [array[start : start + size] for array in arrays]
        used = chunk[0].shape[0]
        if used < limits.minimum:
            chunk = [_pad(array, limits.minimum) for array in chunk]
        result = function(*chunk)
        pieces.append([part[:used] for part in result] if multi else result[:used])

    if multi:
        return [np.concatenate(parts) for parts in zip(*pieces, strict=True)]
    return np.concatenate(pieces)


def _pad(array: np.ndarray, size: int) -> np.ndarray:
    missing = size - array.shape[0]
    return np.concatenate([array, np.repeat(array[-1:], missing, axis=0)])
