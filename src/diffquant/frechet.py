"""Fréchet distance between Gaussians fitted to feature sets (FID's closed form), in float64.

Plain maths on arrays, low in the package: the evaluation harness (eval.metrics, which re-exports it and
documents the choices) and the zoo's trainers (FID while a reference model trains) both use it.
"""

from __future__ import annotations

import numpy as np
import torch

from diffquant.kernels.cpu import torch_threads


def feature_statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (float64) of features [N, D], N >= 2."""
    x = _as_float64(features)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"feature statistics need [N >= 2, D] features, got shape {tuple(x.shape)}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2):

        ||mu1 - mu2||² + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^½)

    tr((Σ1 Σ2)^½) is computed as tr((Σ1^½ Σ2 Σ1^½)^½) — the same eigenvalues, since the two matrices
    are similar — from two symmetric eigendecompositions in float64 (`trace_sqrt_product`). The
    result is clamped at 0 (the distance is non-negative; tiny negative values are round-off).
    """
    mu1, mu2, sigma1, sigma2 = (_as_float64(a) for a in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different dimension: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    return max(0.0, float(value))


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((Σ1 Σ2)^½) for symmetric PSD Σ1, Σ2 — what ``np.trace(scipy.linalg.sqrtm(Σ1 @ Σ2))`` gives
    (the tests check both agree), computed differently for two reasons:

    - Σ1 Σ2 is not symmetric, so sqrtm needs a complex Schur form and returns round-off imaginary
      parts and, for the singular covariances of small sample sets, warnings or non-finite values;
      Σ1^½ Σ2 Σ1^½ is symmetric PSD, so its eigenvalues are real and clipping round-off below 0 is exact.
    - Speed: sqrtm of 256x256 took seconds through a multi-threaded BLAS on a shared CPU; this takes
      ~20 ms. The eigendecompositions run single-threaded (torch.linalg): the matrices are too small
      for threads to pay, and on a busy machine thread start-up dominated.
    """
    a, b = torch.from_numpy(_as_float64(sigma1)), torch.from_numpy(_as_float64(sigma2))
    with torch_threads(1):
        w, v = torch.linalg.eigh(a)
        root = (v * w.clamp(min=0).sqrt()) @ v.T  # Σ1^½, negative round-off eigenvalues clipped
        inner = root @ b @ root
        eig = torch.linalg.eigvalsh((inner + inner.T) / 2)  # symmetrise away round-off
    return float(eig.clamp(min=0).sqrt().sum())


def _as_float64(a: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64)
