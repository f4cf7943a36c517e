"""Evaluation metrics on cases with known answers, and the shipped reference statistics."""

import math

import numpy as np
import pytest
import torch

from diffquant.eval import metrics
from diffquant.eval.stats import (
    FMNIST_TEST_STATS,
    ReferenceStats,
    classifier_features,
    load_reference_stats,
    save_reference_stats,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- Fréchet distance -----------------------------------------------------------------------------


def test_frechet_distance_of_a_set_with_itself_is_zero():
    features = torch.randn(500, 16, generator=_gen())
    mu, sigma = metrics.feature_statistics(features)
    assert metrics.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)
    assert metrics.fid_from_features(features, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_of_diagonal_gaussians_matches_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    got = metrics.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_of_rotated_gaussians_matches_closed_form():
    # sigma2 = R sigma1 Rᵀ with the same spectrum; the 2-D trace formula
    # tr((Σ1Σ2)^½) = sqrt(tr(Σ1Σ2) + 2 sqrt(det(Σ1Σ2))) gives the exact answer.
    theta = 0.7
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    s1 = np.diag([4.0, 1.0])
    s2 = rot @ s1 @ rot.T
    prod = s1 @ s2
    tr_sqrt = math.sqrt(np.trace(prod) + 2 * math.sqrt(np.linalg.det(prod)))
    mu1, mu2 = np.zeros(2), np.array([3.0, 4.0])
    expected = 25.0 + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_trace_term_agrees_with_scipy_sqrtm():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    a = torch.randn(200, 12, generator=_gen(5)).double()
    b = (torch.randn(200, 12, generator=_gen(6)) @ torch.randn(12, 12, generator=_gen(7))).double()
    s1, s2 = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    expected = np.trace(scipy_linalg.sqrtm(s1 @ s2)).real
    assert metrics.trace_sqrt_product(s1, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_with_few_samples_is_finite_and_nonnegative():
    a = torch.randn(20, 64, generator=_gen(1))
    b = torch.randn(20, 64, generator=_gen(2)) + 0.5
    mu, sigma = metrics.feature_statistics(b)
    value = metrics.fid_from_features(a, mu, sigma)
    assert math.isfinite(value) and value > 0


def test_frechet_distance_rejects_mismatched_and_tiny_inputs():
    with pytest.raises(ValueError, match="different dimension"):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="N >= 2"):
        metrics.feature_statistics(torch.zeros(1, 4))


# -- PSNR / SSIM / feature distance / accuracy --------------------------------------------------------


def test_psnr_of_identical_images_is_the_cap():
    x = torch.rand(3, 1, 8, 8, generator=_gen()) * 2 - 1
    assert metrics.psnr(x, x.clone()) == metrics.PSNR_CAP_DB == 100.0


def test_psnr_of_a_known_mse():
    ref = torch.zeros(2, 1, 4, 4)
    x = ref + 0.1  # MSE 0.01, data range 2 -> 10 log10(4 / 0.01)
    assert metrics.psnr(x, ref) == pytest.approx(10 * math.log10(400.0), rel=1e-6)  # 0.1 in float32
    assert metrics.psnr(x, ref, data_range=1.0) == pytest.approx(20.0, rel=1e-6)


def test_psnr_averages_per_image_values():
    ref = torch.zeros(2, 1, 4, 4)
    x = torch.stack([torch.full((1, 4, 4), 0.1), torch.zeros(1, 4, 4)])
    # one image at 26.02 dB, one identical (capped at 100): the mean of the two
    assert metrics.psnr(x, ref) == pytest.approx((10 * math.log10(400.0) + 100.0) / 2)


def test_ssim_identical_is_one_and_decreases_with_noise():
    x = torch.rand(4, 1, 32, 32, generator=_gen()) * 2 - 1
    assert metrics.ssim(x, x.clone()) == pytest.approx(1.0, abs=1e-12)
    noise = torch.randn(x.shape, generator=_gen(1))
    values = [metrics.ssim((x + s * noise).clamp(-1, 1), x) for s in (0.05, 0.2, 0.5)]
    assert 1.0 > values[0] > values[1] > values[2]


def _ssim_by_windows(x: np.ndarray, y: np.ndarray, size: int = 11, sigma: float = 1.5, data_range: float = 2.0):
    """Wang et al.'s formula window by window, straight from the paper: an independent reference."""
    g = np.exp(-((np.arange(size) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for i in range(x.shape[0] - size + 1):
        for j in range(x.shape[1] - size + 1):
            a, b = x[i : i + size, j : j + size], y[i : i + size, j : j + size]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
            cov = (w * (a - ma) * (b - mb)).sum()
            values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


def test_ssim_matches_the_formula_window_by_window():
    x = torch.rand(1, 1, 16, 16, generator=_gen(3)) * 2 - 1
    y = (x + 0.3 * torch.randn(x.shape, generator=_gen(4))).clamp(-1, 1)
    expected = _ssim_by_windows(y[0, 0].double().numpy(), x[0, 0].double().numpy())
    assert metrics.ssim(y, x) == pytest.approx(expected, abs=1e-10)


def test_ssim_of_constant_images_is_the_luminance_term():
    a, b = 0.5, -0.25
    c1 = (0.01 * 2.0) ** 2
    x, y = torch.full((1, 1, 12, 12), a), torch.full((1, 1, 12, 12), b)
    assert metrics.ssim(x, y) == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-9)


def test_feature_distance():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert metrics.feature_distance(a, a * 3) == pytest.approx(0.0, abs=1e-12)  # scale-invariant
    b = torch.tensor([[0.0, 1.0], [0.0, 5.0]])
    assert metrics.feature_distance(a, b) == pytest.approx(math.sqrt(2) / 2)  # (√2 + 0) / 2


def test_class_accuracy():
    assert metrics.class_accuracy(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 0, 0])) == 0.5
    with pytest.raises(ValueError, match="empty"):
        metrics.class_accuracy(torch.tensor([]), torch.tensor([]))
    with pytest.raises(ValueError, match="shapes"):
        metrics.class_accuracy(torch.tensor([1]), torch.tensor([1, 2]))


def test_capped_sqnr():
    assert metrics.capped_sqnr_db(float("inf")) == metrics.SQNR_CAP_DB
    assert metrics.capped_sqnr_db(31.5) == 31.5


# -- reference statistics -------------------------------------------------------------------------------


def test_shipped_stats_match_the_shipped_classifier():
    stats = load_reference_stats()  # raises if computed with other classifier weights
    assert FMNIST_TEST_STATS.stat().st_size < 400_000
    assert stats.count == 10_000 and stats.mu.shape == (256,) and stats.sigma.shape == (256, 256)
    assert np.allclose(stats.sigma, stats.sigma.T) and np.all(stats.mu >= 0)  # post-ReLU features


def test_reference_stats_round_trip_and_classifier_check(tmp_path):
    from diffquant.zoo.classifier import load_classifier

    images = torch.rand(8, 1, 32, 32, generator=_gen()) * 2 - 1
    mu, sigma = metrics.feature_statistics(classifier_features(load_classifier(), images, batch_size=3))
    path = save_reference_stats(ReferenceStats(mu, sigma, 8, "not-the-classifier"), tmp_path / "s.safetensors")
    loaded = load_reference_stats(path, check_classifier=False)
    assert loaded.count == 8 and np.allclose(loaded.mu, mu, atol=1e-6)
    with pytest.raises(ValueError, match="other classifier weights"):
        load_reference_stats(path)
    with pytest.raises(FileNotFoundError, match="eval-stats"):
        load_reference_stats(tmp_path / "missing.safetensors")
