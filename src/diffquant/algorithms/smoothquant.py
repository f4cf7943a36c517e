"""SmoothQuant: migrate activation outliers into the weights with per-input-channel factors.

    λ_j = max|X_j|^α / max|W_{:,j}|^(1−α),   X̂ = X · diag(λ)⁻¹,   Ŵ = W · diag(λ)

The transform alone leaves the full-precision output unchanged; the division of the input is kept
as an explicit per-channel divisor on the layer (folded into a preceding op by real kernels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from diffquant.job import QuantizationJob
from diffquant.recipes.config import RecipeError, StageConfig, register_stage

# Factors are clamped so that dead channels (max |X_j| = 0) or zero weight columns cannot blow up.
FACTOR_RANGE = (1e-5, 1e5)


def smoothing_factors(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """λ = x_absmax^α / w_absmax^β per input channel; 1 where either statistic is zero."""
    x = x_absmax.double()
    w = w_absmax.double()
    factors = x.pow(alpha) / w.pow(beta)
    dead = (x == 0) | (w == 0)
    factors = torch.where(dead, torch.ones_like(factors), factors)
    return factors.clamp(*FACTOR_RANGE).float()


@register_stage
@dataclass(frozen=True)
class SmoothQuant(StageConfig):
    """Smooth every layer whose input is quantized. alpha: migration strength (0 = none)."""

    type: ClassVar[str] = "smoothquant"
    needs_calibration: ClassVar[bool] = True
    alpha: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise RecipeError(f"smoothquant alpha must lie in [0, 1], got {self.alpha}")

    def apply(self, job: QuantizationJob) -> None:
        stats = job.require_stats()
        for name, layer in job.layers.items():
            if layer.input_quantizer is None or getattr(layer, "groups", 1) != 1:
                continue
            x_absmax = stats.require(name).overall.absmax
            factors = smoothing_factors(x_absmax, layer.weight_input_absmax(), self.alpha, 1.0 - self.alpha)
            layer.fold_input_scale(factors.to(layer.weight.device))
