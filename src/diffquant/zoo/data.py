"""Fashion-MNIST loading from the IDX files shipped by Debian's ``dataset-fashion-mnist`` package.

The IDX parser is our own (numpy only) so the project needs no torchvision and no network access.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
ENV_ROOT = "DIFFQUANT_FMNIST_DIR"
INSTALL_HINT = "apt-get update && apt-get install -y dataset-fashion-mnist"

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_SPLIT_PREFIX = {"train": "train", "test": "t10k"}
# IDX magic: two zero bytes, a dtype code (0x08 = uint8), and the number of dimensions.
_UINT8_CODE = 0x08


def resolve_root(root: str | os.PathLike | None = None) -> Path:
    """Explicit argument first, then $DIFFQUANT_FMNIST_DIR, then the Debian install location."""
    if root is not None:
        return Path(root)
    env = os.environ.get(ENV_ROOT)
    return Path(env) if env else DEFAULT_ROOT


def _find_file(root: Path, stem: str) -> Path:
    # Accept both the compressed files Debian ships and decompressed copies.
    for name in (f"{stem}.gz", stem):
        path = root / name
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}. Install the dataset with:\n"
        f"    {INSTALL_HINT}\n"
        f"or point ${ENV_ROOT} at a directory holding the IDX files."
    )


def _read_bytes(path: Path) -> bytes:
    with path.open("rb") as fh:
        head = fh.read(2)
    opener = gzip.open if head == b"\x1f\x8b" else open  # sniff rather than trust the suffix
    try:
        with opener(path, "rb") as fh:
            return fh.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: cannot read IDX data ({exc})") from exc


def read_idx(path: str | os.PathLike, ndim: int | None = None) -> np.ndarray:
    """Parse a uint8 IDX file (gzip or plain) into an array; ValueError on anything malformed."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: bad IDX magic number {data[:4].hex() or '(empty)'}")
    if data[2] != _UINT8_CODE:
        raise ValueError(f"{path}: unsupported IDX dtype code 0x{data[2]:02x} (expected 0x08, uint8)")
    dims = data[3]
    if ndim is not None and dims != ndim:
        raise ValueError(f"{path}: IDX file has {dims} dimensions, expected {ndim}")
    header = 4 + 4 * dims
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=dims, offset=4))
    expected = int(np.prod(shape, dtype=np.int64))
    if len(data) - header != expected:
        raise ValueError(
            f"{path}: IDX payload has {len(data) - header} bytes, header shape {shape} needs {expected}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(
    split: str = "train", root: str | os.PathLike | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images uint8 [N, 28, 28], labels int64 [N]) for split "train" or "test"."""
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    base = resolve_root(root)
    prefix = _SPLIT_PREFIX[split]
    images = read_idx(_find_file(base, f"{prefix}-images-idx3-ubyte"), ndim=3)
    labels = read_idx(_find_file(base, f"{prefix}-labels-idx1-ubyte"), ndim=1)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{split}: {images.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and labels.max() >= len(CLASS_NAMES):
        raise ValueError(f"{split}: label {int(labels.max())} out of range 0..{len(CLASS_NAMES) - 1}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def to_model_range(images: torch.Tensor, pad_to: int = 32) -> torch.Tensor:
    """uint8 [N, H, W] -> float32 [N, 1, pad_to, pad_to] in [-1, 1], padded with -1 (black)."""
    x = images.to(torch.float32).div_(127.5).sub_(1.0).unsqueeze(1)
    h, w = x.shape[-2:]
    if pad_to < max(h, w):
        raise ValueError(f"pad_to={pad_to} is smaller than the image size {h}x{w}")
    top, left = (pad_to - h) // 2, (pad_to - w) // 2
    return F.pad(x, (left, pad_to - w - left, top, pad_to - h - top), value=-1.0)


def fashion_mnist_tensors(
    split: str = "train", pad_to: int = 32, root: str | os.PathLike | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images float32 [N, 1, pad_to, pad_to] in [-1, 1], labels int64 [N])."""
    images, labels = load_fashion_mnist(split, root)
    return to_model_range(images, pad_to), labels


def dataset_available(root: str | os.PathLike | None = None) -> bool:
    """True when both splits can be found (used by tests and scripts to skip cleanly)."""
    base = resolve_root(root)
    stems = [
        f"{p}-{kind}" for p in _SPLIT_PREFIX.values() for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")
    ]
    return all((base / f"{s}.gz").is_file() or (base / s).is_file() for s in stems)
