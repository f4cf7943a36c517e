"""Image-quality metrics of the evaluation harness: pure functions on tensors / arrays.

Conventions: images are float tensors [N, C, H, W] in [-1, 1] (what `LatentDiffusionModel.decode`
returns), so the data range of PSNR and SSIM is 2. Features are [N, D] float tensors or arrays.

- Fréchet distance (FID, diffquant.frechet): our own float64 implementation of the closed form (not torchmetrics' FID,
  whose import alone takes seconds, nor its Inception extractor, meaningless on 32x32 Fashion-MNIST);
  the harness feeds it the evaluation classifier's 256-d penultimate features. The matrix square
  root term uses symmetric eigendecompositions instead of ``scipy.linalg.sqrtm`` (same value, checked
  by the tests; see `trace_sqrt_product` for why).
- PSNR: per image, capped at `PSNR_CAP_DB` (identical images have infinite PSNR, which neither a
  mean nor JSON can hold), then averaged over images.
- SSIM: our own implementation of Wang et al. (2004) with an 11x11 Gaussian window (σ = 1.5),
  K1 = 0.01, K2 = 0.03, per channel, averaged over the valid region (no padding) as in the
  authors' reference code. torchmetrics uses the same window and constants but also averages
  over reflect-padded borders; the tests check that both agree on the valid region.
- Feature distance: mean L2 distance between L2-normalised classifier features of paired images,
  a cheap perceptual distance in [0, 2] (0 = same embedding direction).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# the Fréchet maths lives in the core (the zoo's trainers monitor FID too); re-exported here
from diffquant.frechet import feature_statistics, frechet_distance, trace_sqrt_product  # noqa: F401

PSNR_CAP_DB = 100.0
SQNR_CAP_DB = 100.0  # identical noise predictions (the FP model against itself) have infinite SQNR
DATA_RANGE = 2.0  # images in [-1, 1]


# -- Fréchet distance ---------------------------------------------------------------------------


def fid_from_features(features: torch.Tensor | np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray) -> float:
    """Fréchet distance of a feature set [N, D] against reference statistics."""
    mu, sigma = feature_statistics(features)
    return frechet_distance(mu, sigma, ref_mu, ref_sigma)


# -- paired image metrics ---------------------------------------------------------------------


def psnr(images: torch.Tensor, reference: torch.Tensor, data_range: float = DATA_RANGE,
         cap_db: float = PSNR_CAP_DB) -> float:
    """Mean over images of 10·log10(data_range² / MSE), each image capped at `cap_db` (MSE 0 -> cap)."""
    per_image = psnr_per_image(images, reference, data_range, cap_db)
    return float(per_image.mean())


def psnr_per_image(images: torch.Tensor, reference: torch.Tensor, data_range: float = DATA_RANGE,
                   cap_db: float = PSNR_CAP_DB) -> torch.Tensor:
    """PSNR in dB of each image pair [N], capped at `cap_db`."""
    _check_pair(images, reference)
    mse = (images.double() - reference.double()).pow(2).flatten(1).mean(dim=1)
    # log10(range²/0) = inf, clamped by the cap; no special case for identical images needed.
    db = 10.0 * torch.log10(data_range**2 / mse)
    return db.clamp(max=cap_db)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(images: torch.Tensor, reference: torch.Tensor, data_range: float = DATA_RANGE,
         window_size: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> float:
    """Mean structural similarity of image pairs [N, C, H, W] (1 = identical); see the module docstring.

    Images smaller than the window use a window of their own size (odd), so 8x8 tests still work.
    """
    _check_pair(images, reference)
    x, y = images.double(), reference.double()
    channels = x.shape[1]
    size = min(window_size, *x.shape[-2:])
    size -= 1 - size % 2  # odd, so the window has a centre
    window = _gaussian_window(size, sigma).expand(channels, 1, size, size)

    def blur(t: torch.Tensor) -> torch.Tensor:  # valid-region local means, per channel
        return F.conv2d(t, window, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean())


def feature_distance(features: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean L2 distance between L2-normalised feature vectors of paired samples [N, D] (in [0, 2])."""
    _check_pair(features, reference)
    a = F.normalize(features.double(), dim=1)
    b = F.normalize(reference.double(), dim=1)
    return float((a - b).norm(dim=1).mean())


def class_accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of samples whose predicted class equals the requested label."""
    _check_pair(predictions, labels)
    if predictions.numel() == 0:
        raise ValueError("accuracy of an empty set")
    return float((predictions == labels).double().mean())


def capped_sqnr_db(value: float, cap_db: float = SQNR_CAP_DB) -> float:
    """An SQNR in dB with +inf (identical tensors) reported as the cap, so it averages and fits JSON."""
    return cap_db if math.isinf(value) and value > 0 else min(value, cap_db)


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"paired inputs of different shapes: {tuple(a.shape)} vs {tuple(b.shape)}")
