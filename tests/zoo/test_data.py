"""Fashion-MNIST IDX loading, checked on small synthetic files (gzip and plain)."""

import gzip
import struct

import numpy as np
import pytest
import torch

from diffquant.zoo import data
from diffquant.zoo.data import (
    CLASS_NAMES,
    INSTALL_HINT,
    dataset_available,
    fashion_mnist_tensors,
    load_fashion_mnist,
    read_idx,
)


def idx_bytes(arr: np.ndarray, dtype_code: int = 0x08) -> bytes:
    header = bytes([0, 0, dtype_code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_idx(path, arr: np.ndarray, gz: bool) -> None:
    raw = idx_bytes(arr)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)


def make_split(root, prefix: str, n: int, gz: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    write_idx(root / f"{prefix}-images-idx3-ubyte", images, gz)
    write_idx(root / f"{prefix}-labels-idx1-ubyte", labels, gz)
    return images, labels


@pytest.fixture
def fake_root(tmp_path):
    """Train split gzipped (as Debian ships it), test split uncompressed."""
    train = make_split(tmp_path, "train", 5, gz=True, seed=0)
    test = make_split(tmp_path, "t10k", 3, gz=False, seed=1)
    return tmp_path, train, test


def test_class_names():
    assert len(CLASS_NAMES) == 10
    assert CLASS_NAMES[0] == "T-shirt/top" and CLASS_NAMES[9] == "Ankle boot"


@pytest.mark.parametrize("split,which", [("train", 1), ("test", 2)])
def test_load_gzip_and_plain(fake_root, split, which):
    root = fake_root[0]
    want_images, want_labels = fake_root[which]
    images, labels = load_fashion_mnist(split, root=root)
    assert images.dtype == torch.uint8 and images.shape == (len(want_images), 28, 28)
    assert labels.dtype == torch.int64 and labels.shape == (len(want_labels),)
    assert np.array_equal(images.numpy(), want_images)
    assert np.array_equal(labels.numpy(), want_labels)


def test_tensors_range_and_padding(fake_root):
    root, (want_images, want_labels), _ = fake_root
    x, y = fashion_mnist_tensors("train", pad_to=32, root=root)
    assert x.dtype == torch.float32 and x.shape == (5, 1, 32, 32)
    assert torch.equal(y, torch.from_numpy(want_labels.astype(np.int64)))
    # 2-pixel border of black (-1) on every side, image in the middle mapped 0..255 -> -1..1.
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert torch.all(x[:, 0, border] == -1.0)
    expected = torch.from_numpy(want_images).float() / 127.5 - 1.0
    assert torch.allclose(x[:, 0, 2:30, 2:30], expected)
    assert x.min() >= -1.0 and x.max() <= 1.0


def test_tensors_without_padding(fake_root):
    x, _ = fashion_mnist_tensors("test", pad_to=28, root=fake_root[0])
    assert x.shape == (3, 1, 28, 28)
    with pytest.raises(ValueError, match="pad_to"):
        fashion_mnist_tensors("test", pad_to=16, root=fake_root[0])


def test_env_var_root(fake_root, monkeypatch):
    monkeypatch.setenv(data.ENV_ROOT, str(fake_root[0]))
    images, _ = load_fashion_mnist("test")
    assert images.shape == (3, 28, 28)
    assert dataset_available()


def test_missing_files_message(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_fashion_mnist("train", root=tmp_path)
    assert INSTALL_HINT in str(err.value)
    assert "apt-get update && apt-get install -y dataset-fashion-mnist" in str(err.value)
    assert not dataset_available(tmp_path)


def test_bad_split(fake_root):
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation", root=fake_root[0])


@pytest.mark.parametrize(
    "raw,match",
    [
        (b"", "magic"),
        (b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00", "magic"),
        (b"\x00\x00\x0d\x01" + struct.pack(">I", 1) + b"\x00" * 4, "dtype"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 4) + b"\x00\x00", "payload"),
        (b"\x00\x00\x08\x03" + b"\x00\x00", "truncated"),
    ],
)
def test_malformed_idx(tmp_path, raw, match):
    path = tmp_path / "bad-idx"
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=match):
        read_idx(path)


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(4, np.uint8)))[:-6])  # cut the gzip trailer
    with pytest.raises(ValueError, match="cannot read"):
        read_idx(path)


def test_wrong_rank_and_mismatch(tmp_path):
    images = np.zeros((2, 28, 28), np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images, gz=False)
    # labels file holding a 3-D array: wrong rank
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", images, gz=False)
    with pytest.raises(ValueError, match="dimensions"):
        load_fashion_mnist("test", root=tmp_path)
    # 3 labels for 2 images
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(3, np.uint8), gz=False)
    with pytest.raises(ValueError, match="labels"):
        load_fashion_mnist("test", root=tmp_path)
    # label out of range
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0, 10], np.uint8), gz=False)
    with pytest.raises(ValueError, match="out of range"):
        load_fashion_mnist("test", root=tmp_path)
