"""Evaluation and training data: `.npz` files, IDX folders, and the built-in data sets.

A data specification is one of:

- a path to a `.npz` file with arrays `x` (samples first) and `y` (integer class labels);
- a path to a folder of MNIST-format IDX files, plain or gzipped;
- `fashion-mnist[:test|:train]`, read from the Debian package `dataset-fashion-mnist`
  (files under `/usr/share/datasets/fashion-mnist`);
- `digits[:test|:train]`, scikit-learn's bundled handwritten digits, resized from 8×8 to 28×28
  so that MNIST-shaped models apply.

Integer images are scaled to [0, 1] first (uint8 by 255; the digits' 0–16 levels by 16). The
optional normalization `(x - mean) / std` is applied after that. Both are recorded.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import math
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wnplan.errors import DataError

logger = logging.getLogger(__name__)

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
BUILTIN_NAMES = ("fashion-mnist", "digits")
SPLITS = ("test", "train")
DIGITS_TEST_FRACTION = 0.2

# Exception types that numpy raises for damaged or hostile .npz archives: zip and zlib errors,
# bad array headers (ValueError), short members (EOFError, ValueError), huge declared shapes.
_NPZ_ERRORS = (
    ValueError, OSError, EOFError, KeyError, struct.error, zipfile.BadZipFile, zlib.error,
    NotImplementedError, OverflowError, MemoryError, TypeError,
)
# Labels beyond this magnitude lose precision as float64 and cannot be class indices.
_MAX_LABEL = 2**53

_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


@dataclass(frozen=True)
class Dataset:
    """Preprocessed samples and labels, with the record of where they came from.

    Attributes:
        x: samples, float32, shape (N, ...) with the sample axis first.
        y: integer class labels, int64, shape (N,).
        name: the data specification as given (for example `fashion-mnist:test`).
        preprocessing: scaling, normalization and limit that were applied.
        sha256: hash of the preprocessed `x` and `y`, which keys the result store.
    """

    x: np.ndarray
    y: np.ndarray
    name: str
    preprocessing: dict[str, Any] = field(default_factory=dict)
    sha256: str = ""

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def describe(self) -> dict[str, Any]:
        """Return the JSON record of this data set used in profiles."""
        return {
            "name": self.name,
            "samples": len(self),
            "sha256": self.sha256,
            "preprocessing": self.preprocessing,
        }

    def subset(self, indices: np.ndarray, name_suffix: str) -> Dataset:
        """Return the samples at `indices` as a new data set with its own hash."""
        x = np.ascontiguousarray(self.x[indices])
        y = np.ascontiguousarray(self.y[indices])
        return Dataset(x, y, self.name + name_suffix, dict(self.preprocessing), _hash_arrays(x, y))


def parse_normalize(text: str | None) -> tuple[float, float] | None:
    """Parse `MEAN,STD` into two floats; None or an empty string means no normalization."""
    if text is None or text.strip() == "":
        return None
    parts = text.split(",")
    try:
        mean, std = (float(part) for part in parts)
    except ValueError:
        raise DataError(
            f"invalid --normalize value {text!r}: expected MEAN,STD such as 0.5,0.5"
        ) from None
    if not np.isfinite(mean) or not np.isfinite(std) or std <= 0:
        raise DataError(f"invalid --normalize value {text!r}: STD must be a positive finite number")
    return mean, std


def load_data(
    spec: str,
    normalize: tuple[float, float] | None = None,
    limit: int | None = None,
    default_split: str = "test",
) -> Dataset:
    """Load, validate and preprocess a data set.

    Args:
        spec: a `.npz` path, an IDX folder, or a built-in name with an optional `:split`.
        normalize: `(mean, std)` applied after scaling to [0, 1], or None.
        limit: keep only the first `limit` samples, or None for all.
        default_split: split used for built-in names and IDX folders given without one.

    Raises:
        DataError: the data is missing, malformed, empty, or contains NaN or inf.
    """
    if limit is not None and limit < 1:
        raise DataError(f"invalid --limit {limit}: expected a positive number of samples")

    x, y, scaling = _read_raw(spec, default_split)
    x, y = _validate(x, y, spec)
    if limit is not None:
        x, y = x[:limit], y[:limit]

    x, scaling = _scale(x, scaling)
    preprocessing: dict[str, Any] = {"scale": scaling}
    if normalize is not None:
        mean, std = normalize
        x = (x - np.float32(mean)) / np.float32(std)
        preprocessing["normalize"] = [mean, std]
    if limit is not None:
        preprocessing["limit"] = limit

    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.ascontiguousarray(y, dtype=np.int64)
    if not np.all(np.isfinite(x)):
        raise DataError(
            f"data {spec!r}: x has values that become inf or NaN in float32 after preprocessing; "
            + "rescale the data first"
        )
    logger.info("loaded %s: %d samples of shape %s", spec, len(y), x.shape[1:])
    return Dataset(x, y, spec, preprocessing, _hash_arrays(x, y))


def _read_raw(spec: str, default_split: str) -> tuple[np.ndarray, np.ndarray, str]:
    name, _, split = spec.partition(":")
    if name in BUILTIN_NAMES:
        split = split or default_split
        if split not in SPLITS:
            raise DataError(
                f"unknown split {split!r} in data {spec!r}: expected one of {', '.join(SPLITS)}"
            )
        if name == "digits":
            return (*_read_digits(split), "digits/16")
        return (*_read_idx_folder(FASHION_MNIST_DIR, split, spec), "auto")

    path = Path(spec).expanduser()
    if not path.exists():
        raise DataError(
            f"data not found: {spec!r}. Expected a .npz file, an IDX folder, or one of "
            + f"{', '.join(BUILTIN_NAMES)} (optionally with :test or :train)"
        )
    if path.is_dir():
        return (*_read_idx_folder(path, default_split, spec), "auto")
    if path.suffix == ".npz":
        return (*_read_npz(path), "auto")
    raise DataError(
        f"unsupported data file {spec!r}: expected a .npz file with arrays x and y, or a folder "
        + "of IDX files"
    )


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        loaded = np.load(path, allow_pickle=False)
    except _NPZ_ERRORS as error:
        raise DataError(f"{path}: not a readable .npz file ({_describe(error)})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: contains one .npy array, not a .npz archive; save x and y with numpy.savez")
    with loaded as archive:
        missing = [key for key in ("x", "y") if key not in archive.files]
        if missing:
            raise DataError(
                f"{path}: missing array {missing[0]!r}; a .npz data file needs arrays 'x' "
                + f"(samples) and 'y' (labels), found {sorted(archive.files)}"
            )
        try:
            return archive["x"], archive["y"]
        except _NPZ_ERRORS as error:
            if isinstance(error, ValueError) and "pickle" in str(error):
                raise DataError(f"{path}: cannot read arrays without unpickling ({error})") from None
            raise DataError(f"{path}: corrupted .npz file ({_describe(error)})") from None


def _describe(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _read_idx_folder(folder: Path, split: str, spec: str) -> tuple[np.ndarray, np.ndarray]:
    if not folder.is_dir():
        raise DataError(
            f"data folder {str(folder)!r} for {spec!r} not found. Install the Debian package "
            + "dataset-fashion-mnist (apt-get install dataset-fashion-mnist), or pass a folder of "
            + "IDX files with --data"
        )
    prefixes = ("t10k", "test") if split == "test" else ("train",)
    images = _find_idx_file(folder, prefixes, "images")
    labels = _find_idx_file(folder, prefixes, "labels")
    if images is None or labels is None:
        raise DataError(
            f"no {split} IDX files in {str(folder)!r}: expected files named like "
            + f"{prefixes[0]}-images-idx3-ubyte[.gz] and {prefixes[0]}-labels-idx1-ubyte[.gz]"
        )
    x = read_idx(images)
    if x.ndim == 3:
        x = x[:, None, :, :]
    return x, read_idx(labels)


def _find_idx_file(folder: Path, prefixes: tuple[str, ...], kind: str) -> Path | None:
    for entry in sorted(os.listdir(folder)):
        lower = entry.lower()
        if lower.startswith(prefixes) and kind in lower and "idx" in lower:
            return folder / entry
    return None


def read_idx(path: Path) -> np.ndarray:
    """Read one MNIST-format IDX file, plain or gzipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as stream:
            raw = stream.read()
    except (OSError, EOFError) as error:
        raise DataError(f"{path}: cannot read IDX file ({error})") from None

    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    count = math.prod(shape) if shape else 0
    if len(raw) - header != count * dtype.itemsize:
        raise DataError(
            f"{path}: IDX payload has {len(raw) - header} bytes, the header declares shape "
            + f"{shape} ({count * dtype.itemsize} bytes); the file is truncated or corrupted"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _read_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    from scipy.ndimage import zoom
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.float32)  # (1797, 8, 8), levels 0..16
    labels = bunch.target.astype(np.int64)

    # A fixed permutation makes the split the same on every machine.
    order = np.random.default_rng(0).permutation(len(labels))
    n_test = round(len(labels) * DIGITS_TEST_FRACTION)
    chosen = order[:n_test] if split == "test" else order[n_test:]
    resized = zoom(images[chosen], (1, 3.5, 3.5), order=1)
    return np.clip(resized, 0, 16)[:, None, :, :], labels[chosen]


def _validate(x: np.ndarray, y: np.ndarray, spec: str) -> tuple[np.ndarray, np.ndarray]:
    if x.dtype.kind not in "biuf":
        raise DataError(f"data {spec!r}: x has dtype {x.dtype}; expected a numeric array")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim == 2 and y.shape[1] > 1:
        raise DataError(
            f"data {spec!r}: y has shape {y.shape}; expected one class index per sample. For one-hot " +
            "labels save y.argmax(axis=1)"
        )
    if y.ndim != 1:
        raise DataError(f"data {spec!r}: y has shape {y.shape}; expected one label per sample")
    y = _class_indices(y, spec)
    if x.ndim < 2:
        raise DataError(f"data {spec!r}: x has shape {x.shape}; expected (samples, ...)")
    if x.shape[0] != y.shape[0]:
        raise DataError(
            f"data {spec!r}: x has {x.shape[0]} samples but y has {y.shape[0]} labels"
        )
    if x.shape[0] == 0:
        raise DataError(f"data {spec!r} is empty: expected at least one sample")
    if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
        bad = int(np.count_nonzero(~np.isfinite(x)))
        raise DataError(f"data {spec!r}: x contains {bad} NaN or inf values; clean the data first")
    return x, y


def _class_indices(y: np.ndarray, spec: str) -> np.ndarray:
    """Return labels as int64 class indices, or raise DataError for labels that are not."""
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)):
            raise DataError(f"data {spec!r}: y contains NaN or inf; expected integer class labels")
        if not np.all(y == np.round(y)):
            raise DataError(
                f"data {spec!r}: y has dtype {y.dtype} with fractional values; expected integer class labels"
            )
    elif y.dtype.kind not in "iub":
        raise DataError(f"data {spec!r}: y has dtype {y.dtype}; expected integer class labels")
    if y.size and np.any(y < 0):
        raise DataError(f"data {spec!r}: y contains negative labels such as {y[y < 0][0]}; expected classes 0..K-1")
    too_large = y.astype(np.float64) >= _MAX_LABEL
    if np.any(too_large):
        raise DataError(f"data {spec!r}: y contains the label {y[too_large][0]}, too large for a class index")
    return y.astype(np.int64)


def _scale(x: np.ndarray, scaling: str) -> tuple[np.ndarray, str]:
    """Scale integer images to [0, 1] and return the scaling that was applied."""
    if scaling == "digits/16":
        return x.astype(np.float32) / np.float32(16.0), scaling
    if x.dtype == np.bool_:
        return x.astype(np.float32), "bool"
    if x.dtype == np.uint8:
        return x.astype(np.float32) / np.float32(255.0), "uint8/255"
    if x.dtype.kind in "iub":
        raise DataError(
            f"integer images of dtype {x.dtype} have no known range; convert them to float or "
            + "uint8 first"
        )
    with np.errstate(over="ignore"):  # values beyond float32 become inf, which load_data reports
        return x.astype(np.float32), "none"


def _hash_arrays(x: np.ndarray, y: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update(str(x.shape).encode())
    digest.update(np.ascontiguousarray(x).tobytes())
    digest.update(np.ascontiguousarray(y).tobytes())
    return digest.hexdigest()
