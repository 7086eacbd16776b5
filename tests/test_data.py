"""Tests for data loading (wnplan.data): .npz files, IDX folders, digits, preprocessing, errors.

IDX files are written by the tests themselves, plain and gzipped, in the MNIST layout: two
zero bytes, a type code, the number of dimensions, big-endian uint32 sizes, then the values.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import write_npz

from wnplan.data import load_data, parse_normalize, read_idx
from wnplan.errors import DataError

IDX_TYPE_CODES = {np.dtype(np.uint8): 0x08, np.dtype(">f4"): 0x0D}


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    """Write `array` (uint8 or big-endian float32) as an IDX file, gzipped if `compress`."""
    header = bytes([0, 0, IDX_TYPE_CODES[array.dtype], array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.tobytes()
    if compress:
        with gzip.open(path, "wb") as stream:
            stream.write(payload)
    else:
        path.write_bytes(payload)
    return path


def _images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, 4, 4), dtype=np.uint8)


def _labels(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed + 1).integers(0, 10, size=count, dtype=np.uint8)


def _idx_folder(folder: Path, prefix: str, count: int, compress: bool, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    folder.mkdir(exist_ok=True)
    images, labels = _images(count, seed), _labels(count, seed)
    suffix = ".gz" if compress else ""
    write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, compress)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress)
    return images, labels


# --- .npz files ---


def test_load_npz_float_data(tmp_path):
    x = np.random.default_rng(0).standard_normal((12, 3, 5)).astype(np.float32)
    y = np.arange(12) % 4
    path = write_npz(tmp_path / "data.npz", x=x, y=y)

    data = load_data(str(path))

    np.testing.assert_array_equal(data.x, x)
    np.testing.assert_array_equal(data.y, y)
    assert data.x.dtype == np.float32
    assert data.y.dtype == np.int64
    assert len(data) == 12
    assert data.preprocessing == {"scale": "none"}
    assert len(data.sha256) == 64


def test_load_npz_uint8_scaled_to_unit_range(tmp_path):
    x = np.array([[0, 51, 255], [255, 0, 102]], dtype=np.uint8)
    path = write_npz(tmp_path / "data.npz", x=x, y=np.array([0, 1]))

    data = load_data(str(path))

    np.testing.assert_allclose(data.x, x.astype(np.float32) / 255.0)
    assert data.x.min() == 0.0
    assert data.x.max() == 1.0
    assert data.preprocessing["scale"] == "uint8/255"


def test_load_npz_normalize_after_scaling(tmp_path):
    x = np.array([[0, 255], [255, 0]], dtype=np.uint8)
    path = write_npz(tmp_path / "data.npz", x=x, y=np.array([0, 1]))

    data = load_data(str(path), normalize=(0.5, 0.5))

    np.testing.assert_array_equal(data.x, np.array([[-1.0, 1.0], [1.0, -1.0]], dtype=np.float32))
    assert data.preprocessing["normalize"] == [0.5, 0.5]


def test_load_npz_limit_keeps_first_samples(tmp_path):
    x = np.arange(20, dtype=np.float32).reshape(10, 2)
    path = write_npz(tmp_path / "data.npz", x=x, y=np.arange(10))

    data = load_data(str(path), limit=3)
    everything = load_data(str(path))
    larger = load_data(str(path), limit=50)

    np.testing.assert_array_equal(data.x, x[:3])
    np.testing.assert_array_equal(data.y, [0, 1, 2])
    assert data.preprocessing["limit"] == 3
    assert data.sha256 != everything.sha256
    assert len(larger) == 10


def test_load_npz_integer_valued_float_labels(tmp_path):
    path = write_npz(tmp_path / "data.npz", x=np.zeros((3, 2), np.float32), y=np.array([0.0, 2.0, 1.0]))

    data = load_data(str(path))

    np.testing.assert_array_equal(data.y, [0, 2, 1])
    assert data.y.dtype == np.int64


def test_load_npz_hash_is_reproducible(tmp_path):
    x = np.random.default_rng(3).standard_normal((5, 2)).astype(np.float32)
    first = write_npz(tmp_path / "a.npz", x=x, y=np.arange(5))
    second = write_npz(tmp_path / "b.npz", x=x, y=np.arange(5))

    assert load_data(str(first)).sha256 == load_data(str(second)).sha256
    assert load_data(str(first)).sha256 != load_data(str(first), normalize=(0.1, 2.0)).sha256


# --- IDX folders ---


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_load_idx_folder(tmp_path, compress):
    images, labels = _idx_folder(tmp_path / "idx", "t10k", 9, compress)

    data = load_data(str(tmp_path / "idx"))

    assert data.x.shape == (9, 1, 4, 4)
    np.testing.assert_allclose(data.x[:, 0], images.astype(np.float32) / 255.0)
    np.testing.assert_array_equal(data.y, labels)
    assert data.preprocessing["scale"] == "uint8/255"


def test_load_idx_folder_picks_split(tmp_path):
    folder = tmp_path / "idx"
    _, test_labels = _idx_folder(folder, "t10k", 5, compress=False, seed=1)
    _, train_labels = _idx_folder(folder, "train", 7, compress=True, seed=2)

    test = load_data(str(folder))
    train = load_data(str(folder), default_split="train")

    np.testing.assert_array_equal(test.y, test_labels)
    np.testing.assert_array_equal(train.y, train_labels)


def test_load_idx_folder_with_limit_and_normalize(tmp_path):
    images, _ = _idx_folder(tmp_path / "idx", "t10k", 9, compress=True)

    data = load_data(str(tmp_path / "idx"), normalize=(0.5, 0.25), limit=4)

    expected = (images[:4].astype(np.float32) / 255.0 - 0.5) / 0.25
    np.testing.assert_allclose(data.x[:, 0], expected, rtol=1e-6, atol=1e-6)
    assert len(data) == 4


def test_read_idx_float_values(tmp_path):
    values = np.linspace(-1, 1, 12).astype(">f4").reshape(3, 4)
    path = write_idx(tmp_path / "values-idx2-float", values)

    np.testing.assert_array_equal(read_idx(path), values)


def test_load_idx_folder_without_files_raises(tmp_path):
    (tmp_path / "empty").mkdir()

    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        load_data(str(tmp_path / "empty"))


def test_read_idx_truncated_raises(tmp_path):
    path = write_idx(tmp_path / "t10k-images-idx3-ubyte", _images(4))
    path.write_bytes(path.read_bytes()[:-5])

    with pytest.raises(DataError, match="truncated"):
        read_idx(path)


def test_read_idx_bad_magic_raises(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(b"\x01\x02\x03\x04" + bytes(16))

    with pytest.raises(DataError, match="magic"):
        read_idx(path)


def test_read_idx_corrupt_gzip_raises(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(b"\x1f\x8b" + bytes(30))

    with pytest.raises(DataError, match="cannot read IDX"):
        read_idx(path)


# --- digits ---


def test_load_digits_limit_and_range():
    data = load_data("digits", limit=50)

    assert data.x.shape == (50, 1, 28, 28)
    assert data.x.dtype == np.float32
    assert 0.0 <= float(data.x.min())
    assert float(data.x.max()) <= 1.0
    assert set(np.unique(data.y)) <= set(range(10))
    assert data.preprocessing == {"scale": "digits/16", "limit": 50}


def test_load_digits_splits_are_disjoint_and_fixed():
    test = load_data("digits:test")
    train = load_data("digits:train")

    assert len(test) + len(train) == 1797
    assert len(test) == 359
    assert load_data("digits").sha256 == test.sha256
    train_rows = {row.tobytes() for row in train.x}
    assert sum(row.tobytes() in train_rows for row in test.x) < 5  # digits has a few duplicates


# --- errors ---


def test_load_data_missing_file_raises(tmp_path):
    missing = str(tmp_path / "absent.npz")

    with pytest.raises(DataError, match="data not found") as raised:
        load_data(missing)

    assert missing in str(raised.value)


def test_load_data_unsupported_file_raises(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("1,2,3\n")

    with pytest.raises(DataError, match="unsupported data file"):
        load_data(str(path))


def test_load_npz_without_y_raises(tmp_path):
    path = write_npz(tmp_path / "data.npz", x=np.zeros((3, 2), np.float32), labels=np.arange(3))

    with pytest.raises(DataError, match="missing array 'y'") as raised:
        load_data(str(path))

    assert "labels" in str(raised.value)


def test_load_npz_nan_raises(tmp_path):
    x = np.zeros((4, 2), np.float32)
    x[1, 0] = np.nan
    x[2, 1] = np.inf
    path = write_npz(tmp_path / "data.npz", x=x, y=np.arange(4))

    with pytest.raises(DataError, match="2 NaN or inf"):
        load_data(str(path))


def test_load_npz_negative_labels_raise(tmp_path):
    path = write_npz(tmp_path / "data.npz", x=np.zeros((3, 2), np.float32), y=np.array([0, -1, 2]))

    with pytest.raises(DataError, match="negative labels"):
        load_data(str(path))


def test_load_npz_mismatched_lengths_raise(tmp_path):
    path = write_npz(tmp_path / "data.npz", x=np.zeros((5, 2), np.float32), y=np.arange(4))

    with pytest.raises(DataError, match="5 samples but y has 4 labels"):
        load_data(str(path))


def test_load_npz_empty_raises(tmp_path):
    path = write_npz(tmp_path / "data.npz", x=np.zeros((0, 2), np.float32), y=np.zeros(0, np.int64))

    with pytest.raises(DataError, match="empty"):
        load_data(str(path))


def test_load_npz_fractional_labels_raise(tmp_path):
    path = write_npz(tmp_path / "data.npz", x=np.zeros((2, 2), np.float32), y=np.array([0.5, 1.0]))

    with pytest.raises(DataError, match="integer class labels"):
        load_data(str(path))


def test_load_npz_object_array_raises(tmp_path):
    path = write_npz(tmp_path / "data.npz", x=np.array([[1], "a"], dtype=object), y=np.arange(2))

    with pytest.raises(DataError, match="unpickling"):
        load_data(str(path))


def test_load_npz_corrupted_raises(tmp_path):
    path = tmp_path / "data.npz"
    path.write_bytes(np.random.default_rng(0).bytes(1000))

    with pytest.raises(DataError) as raised:
        load_data(str(path))

    assert "data.npz" in str(raised.value)


def test_load_npz_int16_images_raise(tmp_path):
    path = write_npz(tmp_path / "data.npz", x=np.ones((2, 2), np.int16), y=np.arange(2))

    with pytest.raises(DataError, match="int16"):
        load_data(str(path))


def test_load_data_zero_limit_raises(tmp_path):
    with pytest.raises(DataError, match="--limit 0"):
        load_data("digits", limit=0)


def test_load_digits_unknown_split_raises():
    with pytest.raises(DataError, match="'validation'"):
        load_data("digits:validation")


@pytest.mark.parametrize("text", ["abc", "0.5", "0.5,0.5,0.5", "0.5,0", "0.5,-1", "nan,1", "0,inf", "0.5;0.5"])
def test_parse_normalize_invalid_raises(text):
    with pytest.raises(DataError, match="--normalize") as raised:
        parse_normalize(text)

    assert repr(text) in str(raised.value)


@pytest.mark.parametrize(
    ("text", "expected"), [(None, None), ("", None), ("0.5,0.5", (0.5, 0.5)), (" 0.1 , 2 ", (0.1, 2.0))]
)
def test_parse_normalize_valid(text, expected):
    assert parse_normalize(text) == expected


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_load_npz_float64_overflow_raises(tmp_path):
    x = np.array([[1.0, 2.0], [1e300, 0.0]], dtype=np.float64)
    path = write_npz(tmp_path / "data.npz", x=x, y=np.arange(2))

    with pytest.raises(DataError, match="inf"):
        load_data(str(path))
