"""Activation outlier statistics of a model, and the published figures they are compared with.

For every quantizable layer's input, over a calibration run: the per-channel max |X|, and the ratio of
the largest channel to the median channel. A ratio of 2-5 is easy for 4-bit per-token activations; the
10-100x of real models' attention and MLP inputs is what breaks them.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from diffquant.arch import adapter_for, quantizable_layers
from diffquant.calib.stats import collect_activation_stats


@dataclass(frozen=True)
class LayerOutliers:
    layer: str
    role: str
    channels: int
    max_over_median: float  # largest channel's max |X| / the median channel's
    max_abs: float


@dataclass(frozen=True)
class RoleSummary:
    role: str
    layers: int
    median_ratio: float  # median over the role's layers of max_over_median
    max_ratio: float
    max_abs: float


def layer_outliers(denoiser: nn.Module, calibration: Callable[[nn.Module], None]) -> list[LayerOutliers]:
    """Per quantizable layer: input channel outliers over `calibration(denoiser)` (a float model)."""
    roles = adapter_for(denoiser).assign(denoiser)
    layers = quantizable_layers(denoiser)
    stats = collect_activation_stats(layers, lambda: calibration(denoiser))
    rows = []
    for path in layers:
        absmax = stats[path].overall.absmax
        ratio = float(absmax.max() / absmax.median().clamp(min=1e-12))
        rows.append(LayerOutliers(path, roles[path], absmax.numel(), ratio, float(absmax.max())))
    return rows


def by_role(rows: list[LayerOutliers]) -> list[RoleSummary]:
    groups: dict[str, list[LayerOutliers]] = {}
    for row in rows:
        groups.setdefault(row.role, []).append(row)
    return [RoleSummary(role, len(g), statistics.median(r.max_over_median for r in g),
                        max(r.max_over_median for r in g), max(r.max_abs for r in g))
            for role, g in sorted(groups.items())]


@dataclass(frozen=True)
class PublishedFigure:
    """A published observation an outlier profile is drawn to match. verified: read in the source's own
    text (False: in figures or second-hand only, named as such)."""

    source: str
    models: str
    layers: str
    figure: str
    verified: bool
    url: str


# What the literature says of real models' outliers. Diffusion papers show the magnitudes in figures,
# not in their text; the only ratios stated in text are the LLM ones, which the profiles' 10-100x follows.
PUBLISHED: tuple[PublishedFigure, ...] = (
    PublishedFigure("SmoothQuant (Xiao et al., ICML 2023)", "OPT, BLOOM (LLMs)", "linear inputs after LayerNorm",
                    "outliers ~100x larger than most activation values, in a few fixed channels", True,
                    "https://arxiv.org/abs/2211.10438"),
    PublishedFigure("PTQ4DiT (Wu et al., NeurIPS 2024)", "DiT-XL/2", "attention and FFN linear inputs",
                    "a few salient channels 'with extreme values that greatly exceed the typical range'; "
                    "activation and weight extremes in different channels (complementarity); the channel "
                    "maxima vary over timesteps (sizes in Fig. 3-4 only)", True,
                    "https://arxiv.org/abs/2405.16005"),
    PublishedFigure("SVDQuant (Li et al., ICLR 2025)", "PixArt-Sigma, FLUX.1", "transformer linear inputs",
                    "'both the input X and weight W contain significant outliers' (Fig. 4); naive W4A4 "
                    "FLUX.1-dev: PSNR 18.5 dB vs BF16", False, "https://arxiv.org/abs/2411.05007"),
    PublishedFigure("LRQ-DiT (Yang et al., 2025)", "PixArt-alpha/Sigma, FLUX", "linear weights and inputs",
                    "weights 'Gaussian-like with long tails'; 'Salient Outliers with large magnitudes "
                    "concentrated in specific channels'", True, "https://arxiv.org/abs/2508.03485"),
    PublishedFigure("Q-DiT (Chen et al., CVPR 2025)", "DiT-XL/2", "linear inputs",
                    "'significant spatial variance in both weights and activations, along with temporal "
                    "variance in activations'", True, "https://arxiv.org/abs/2406.17343"),
)


def as_dicts(items: list[Any]) -> list[dict[str, Any]]:
    return [asdict(item) for item in items]
