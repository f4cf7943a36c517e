"""What an evaluation takes and gives: its settings, its target and its result (the images with them)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffquant.configs import check_count
from diffquant.zoo.model import LatentDiffusionModel


@dataclass(frozen=True)
class EvalSettings:
    """How to evaluate. steps=None: the model's own default; cache_dir=None: ~/.cache/diffquant/eval."""

    samples: int = 1000
    steps: int | None = None
    seed: int = 0
    sqnr_samples: int = 64
    batch_size: int = 250
    cache: bool = True
    cache_dir: Path | None = None
    progress: bool = False
    frozen: bool = False  # run a quantized target through the packed integer kernels (diffquant.freeze)

    def __post_init__(self) -> None:
        if self.samples < 2:
            raise ValueError(f"evaluation needs at least 2 samples (FID needs a covariance), got {self.samples}")
        if self.sqnr_samples < 1 or self.batch_size < 1:
            raise ValueError("sqnr_samples and batch_size must be positive")
        check_count("steps", self.steps, optional=True)  # before any sampling: None is the model's default


@dataclass
class EvalTarget:
    """What is evaluated: the model, its FP reference (the same object for an FP target) and, for a
    checkpoint on disk, its folder (whose checkpoint_info gives the quantized bytes)."""

    model: LatentDiffusionModel
    reference: LatentDiffusionModel
    name: str
    folder: Path | None = None

    @property
    def is_reference(self) -> bool:
        return self.model is self.reference


@dataclass
class Evaluation:
    """The metrics and the two image sets they were computed from (same labels, same noise)."""

    result: dict[str, Any]
    target: EvalTarget
    labels: torch.Tensor
    fp_images: torch.Tensor
    images: torch.Tensor
