"""Reference feature statistics of the real test set, shipped so evaluation needs no dataset.

`fmnist-test.safetensors` holds `mu` [256] and `sigma` [256, 256] (float32): the mean and unbiased
covariance of the evaluation classifier's penultimate features (`FashionClassifier.features`) over
the 10,000 Fashion-MNIST test images, padded to 32x32 in [-1, 1] in file order (no shuffling). Its
metadata records the sha256 of the classifier weights it was computed with; loading refuses a file
made with other weights, since FID against it would silently be meaningless.

Regenerate (needs the dataset, `apt-get install dataset-fashion-mnist`) with
``diffquant eval-stats`` or ``python -m diffquant.eval.stats``.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from diffquant.atomic import atomic_file
from diffquant.eval.metrics import feature_statistics
from diffquant.folders import sha256_of
from diffquant.zoo.classifier import WEIGHTS_DIR as CLASSIFIER_DIR
from diffquant.zoo.classifier import load_classifier

STATS_DIR = Path(__file__).parent
FMNIST_TEST_STATS = STATS_DIR / "fmnist-test.safetensors"
CLASSIFIER_WEIGHTS = CLASSIFIER_DIR / "model.safetensors"
REGENERATE_HINT = "regenerate it with `diffquant eval-stats` (needs the Fashion-MNIST dataset)"


@dataclass(frozen=True)
class ReferenceStats:
    mu: np.ndarray  # [D] float64
    sigma: np.ndarray  # [D, D] float64
    count: int
    classifier_sha256: str


@torch.no_grad()
def classifier_features(classifier: torch.nn.Module, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Penultimate features [N, D] of images [N, 1, 32, 32] in [-1, 1], in order, batched."""
    classifier.eval()
    parts = [classifier.features(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    return torch.cat(parts)


def compute_reference_stats(out: str | Path = FMNIST_TEST_STATS, root: str | Path | None = None) -> ReferenceStats:
    """Classifier-feature statistics of the Fashion-MNIST test split, written atomically to `out`."""
    from diffquant.zoo.data import fashion_mnist_tensors

    images, _ = fashion_mnist_tensors("test", root=root)
    mu, sigma = feature_statistics(classifier_features(load_classifier(), images))
    stats = ReferenceStats(mu, sigma, len(images), sha256_of(CLASSIFIER_WEIGHTS))
    save_reference_stats(stats, out)
    return stats


def save_reference_stats(stats: ReferenceStats, out: str | Path) -> Path:
    out = Path(out)
    tensors = {"mu": stats.mu.astype(np.float32), "sigma": stats.sigma.astype(np.float32)}
    metadata = {"count": str(stats.count), "classifier_sha256": stats.classifier_sha256,
                "features": "FashionClassifier.features (penultimate, post-ReLU)",
                "data": "Fashion-MNIST test split, 32x32 padded, [-1, 1], file order"}
    with atomic_file(out) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o644)  # a shipped package file, readable by all
    return out


def load_reference_stats(path: str | Path = FMNIST_TEST_STATS, check_classifier: bool = True) -> ReferenceStats:
    """The shipped statistics (float64); refuses a file computed with other classifier weights."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference statistics {path} are missing: {REGENERATE_HINT}")
    with safe_open(str(path), framework="np") as f:
        metadata = f.metadata() or {}
    arrays = load_file(str(path))
    stats = ReferenceStats(arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64),
                           int(metadata.get("count", 0)), metadata.get("classifier_sha256", ""))
    if check_classifier and stats.classifier_sha256 != sha256_of(CLASSIFIER_WEIGHTS):
        raise ValueError(f"{path} was computed with other classifier weights than {CLASSIFIER_WEIGHTS}: "
                         f"{REGENERATE_HINT}")
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffquant.eval.stats", description="Regenerate the shipped reference feature statistics.")
    parser.add_argument("--out", type=Path, default=FMNIST_TEST_STATS)
    parser.add_argument("--data-root", type=Path, default=None, help="Fashion-MNIST IDX folder")
    args = parser.parse_args(argv)
    stats = compute_reference_stats(args.out, args.data_root)
    print(f"wrote {args.out}: {stats.count} images, {stats.mu.shape[0]}-d features")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
