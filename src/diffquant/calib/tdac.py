"""EDA-DM's TDAC (temporal distribution-aware calibration) step weights, from per-step features.

Steps whose features many other steps share (density) and steps pointing away from the rest
(diversity) get more calibration samples; `selection` turns the weights into counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# EDA-DM's TDAC hyper-parameters (BienLuky/EDA-DM scripts): density radius r = 3.0 for ImageNet and
# CIFAR-10, 0.3 for LSUN and COCO; diversity weight lam = 1.2 ImageNet, 1.0 LSUN-bedroom, 5.0 COCO.
TDAC_RADIUS = 3.0
TDAC_LAMBDA = 1.2


@dataclass
class StepFeatures:
    """TDAC's per-step features: `features[i]` is [num_samples, D] float32 (flattened) at `steps[i]`,
    taken from the conditional rows of `module`'s output."""

    module: str
    steps: list[int]
    features: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.features)


def _feature_matrix(features: StepFeatures | Sequence[torch.Tensor]) -> torch.Tensor:
    per_step = features.features if isinstance(features, StepFeatures) else list(features)
    if len(per_step) < 1:
        raise ValueError("TDAC needs features of at least one step")
    sizes = {f.numel() for f in per_step}
    if len(sizes) != 1:
        raise ValueError(f"every step's features must have the same size, got sizes {sorted(sizes)}")
    return torch.stack([f.reshape(-1).double() for f in per_step])


def _pairwise_mse(F: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """[T, T] mean((F_t - F_t')^2) from the Gram matrix of the rows of F."""
    sq = gram.diagonal()
    return (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0) / F.shape[1]


def tdac_scores(features: StepFeatures | Sequence[torch.Tensor], r: float = TDAC_RADIUS
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """EDA-DM's raw per-step scores (float64, [T] each), from each step's flattened features F_t.

    density d_t = #{t' != t : mean((F_t - F_t')^2) <= r}: steps whose features many others share.
    diversity v_t = sum_{t' != t} (1 - cos(F_t, F_t')): steps pointing away from the rest.
    """
    F = _feature_matrix(features)
    gram = F @ F.T
    sq = gram.diagonal()
    mse = _pairwise_mse(F, gram)
    norms = sq.sqrt().clamp_min(1e-12)
    cos = gram / (norms[:, None] * norms[None, :])
    others = ~torch.eye(F.shape[0], dtype=torch.bool)
    density = ((mse <= r) & others).sum(dim=1).double()
    diversity = ((1 - cos) * others).sum(dim=1)
    return density, diversity


def _min_max(x: torch.Tensor) -> torch.Tensor:
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else torch.zeros_like(x)


def tdac_weights(features: StepFeatures | Sequence[torch.Tensor], r: float = TDAC_RADIUS,
                 lam: float = TDAC_LAMBDA) -> torch.Tensor:
    """EDA-DM's TDAC step weights w_t = d_hat_t + lam * v_hat_t (float64, [T]), with d and v from
    `tdac_scores` min-max normalised (a constant score normalises to zeros).

    Defaults are the paper's class-conditional ImageNet values (r = 3.0, lam = 1.2). The authors use
    r = 3.0 for ImageNet / CIFAR-10 and 0.3 for LSUN / COCO; lam = 1.2 ImageNet, 1.0 LSUN-bedroom,
    5.0 COCO. r is in the features' squared units, so it depends on the model and feature module.
    """
    if r < 0 or lam < 0:
        raise ValueError(f"need r >= 0 and lam >= 0, got r={r}, lam={lam}")
    density, diversity = tdac_scores(features, r)
    return _min_max(density) + lam * _min_max(diversity)


def median_step_distance(features: StepFeatures | Sequence[torch.Tensor]) -> float:
    """The median over step pairs t != t' of mean((F_t - F_t')^2): the scale of TDAC's radius on these
    features (0.0 for a single step). A radius r * median_step_distance counts, for r = 1, roughly
    half of the other steps as neighbours of a typical step, on any model and feature module."""
    F = _feature_matrix(features)
    if F.shape[0] < 2:
        return 0.0
    mse = _pairwise_mse(F, F @ F.T)
    return float(mse[~torch.eye(F.shape[0], dtype=torch.bool)].median())

