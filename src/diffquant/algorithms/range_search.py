"""Static input ranges chosen by error search instead of min / max (EfficientDM's initialisation,
METHODS.md §1: 80 shrink factors in 1 % steps, Lp error with p = 2.4).

Min / max ranges waste most of a 4-bit grid on rare extremes. The stage calibrates the job as usual,
then replays the calibration function once in full precision; for every static input quantizer and
every sampling step (or once, without per-step ranges) it scores the candidate ranges [α·lo, α·hi],
α = 1, 1 − step, …, on a random subset of each call's input rows by Σ |x − Q(x)|^p, and keeps the
candidate with the lowest total. Dynamic quantizers are left alone; so are steps the replay never runs.
A split input quantizer (shortcut splitting, QuantSpec.split_shortcut) picks the factor of each of its
two ranges by the error on that range's own channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from diffquant.calib.stats import ActivationStats, ChannelRange, feature_last_2d
from diffquant.calib.steps import current_step
from diffquant.formats.ops import fake_quantize
from diffquant.job import CalibrationRequiredError, QuantizationJob, quantizers_disabled
from diffquant.nn.layers import QuantizedLayer
from diffquant.nn.learnable import lsq_supports
from diffquant.recipes.config import RecipeError, StageConfig, check_int, check_number, register_stage


@register_stage
@dataclass(frozen=True)
class RangeSearch(StageConfig):
    """Per layer (and sampling step) the shrink factor α of the calibrated range with the lowest
    Σ|x − Q(x)|^p; `candidates` factors 1, 1 − step, …; `rows` input rows per call scored."""

    type: ClassVar[str] = "range_search"
    needs_calibration: ClassVar[bool] = True
    p: float = 2.4
    candidates: int = 80
    step: float = 0.01
    rows: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("candidates", "rows"):
            check_int(self, name)
        check_number(self, "p")
        if not (isinstance(self.step, int | float) and self.step > 0 and (self.candidates - 1) * self.step < 1):
            raise RecipeError(f"range_search needs 0 < step and (candidates - 1) x step < 1 (every factor "
                              f"positive), got step {self.step!r} with {self.candidates} candidates")

    @property
    def factors(self) -> torch.Tensor:
        return 1.0 - self.step * torch.arange(self.candidates, dtype=torch.float32)

    def apply(self, job: QuantizationJob) -> None:
        if not callable(job.calibration):
            raise CalibrationRequiredError("range_search replays the calibration data: pass diffquant.quantize a "
                                           "calibration function, not collected statistics")
        job.calibrate()
        targets = {name: layer for name, layer in job.layers.items() if lsq_supports(layer.input_quantizer)}
        if targets:
            RangeScorer(self, targets, job.require_stats()).run(job.model, job.calibration)


class RangeScorer:
    """Accumulates each candidate's error per (layer, step) during one replay, then installs the best."""

    def __init__(self, config: RangeSearch, layers: dict[str, QuantizedLayer], stats: ActivationStats) -> None:
        self.config, self.layers = config, layers
        self.generator = torch.Generator().manual_seed(config.seed)
        self.candidates: dict[tuple[str, int | None], tuple[torch.Tensor, torch.Tensor | None]] = {}
        for name, layer in layers.items():
            layer_stats = stats.require(name)
            if layer.smooth is not None:
                layer_stats = layer_stats.divided(layer.smooth)
            ranges = layer_stats.per_step if layer.input_quantizer.spec.per_step else {None: layer_stats.overall}
            for step, rng in ranges.items():
                self.candidates[name, step] = self._candidate_qparams(layer, rng)
        self.errors = {key: torch.zeros(config.candidates, _ranges(layers[key[0]]), dtype=torch.float64)
                       for key in self.candidates}

    def _candidate_qparams(self, layer: QuantizedLayer, rng: ChannelRange) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scales [A, 1, n] and zero points (or None) of the shrunk ranges, n = 1 or channels."""
        shrunk = [layer.input_quantizer.qparams_for(ChannelRange(a * rng.lo, a * rng.hi)) for a in self.config.factors]
        scales = torch.stack([s.reshape(1, -1) for s, _ in shrunk])
        zeros = None if shrunk[0][1] is None else torch.stack([z.reshape(1, -1) for _, z in shrunk])
        return scales, zeros

    def hook(self, name: str):
        layer = self.layers[name]

        def score(module: nn.Module, args: tuple) -> None:
            key = (name, current_step() if layer.input_quantizer.spec.per_step else None)
            if key not in self.candidates:
                return
            x = feature_last_2d(module, args[0].detach()).float()
            if layer.smooth is not None:
                x = x / layer.smooth.float()
            x = x[torch.randperm(x.shape[0], generator=self.generator)[: self.config.rows].to(x.device)]
            quantizer, channels = layer.input_quantizer, x.shape[-1]
            scales, zeros = self.candidates[key]
            scales = quantizer.per_channel(scales.to(x.device), channels)
            zeros = None if zeros is None else quantizer.per_channel(zeros.to(x.device), channels)
            q = fake_quantize(x[None], scales, zeros, quantizer.spec.qformat)
            error, split = (q - x[None]).abs().pow(self.config.p), quantizer.split_at
            per_range = (error.sum(dim=(1, 2))[:, None] if split is None else
                         torch.stack([error[..., :split].sum(dim=(1, 2)), error[..., split:].sum(dim=(1, 2))], dim=1))
            self.errors[key] += per_range.double().cpu()  # [A, ranges]

        return score

    @torch.no_grad()
    def run(self, model: nn.Module, calibration) -> None:
        handles = [layer.register_forward_pre_hook(self.hook(name)) for name, layer in self.layers.items()]
        try:
            with quantizers_disabled(model):
                calibration(model)
        finally:
            for handle in handles:
                handle.remove()
        self.install()

    def install(self) -> None:
        for (name, step), errors in self.errors.items():
            if not errors.any():
                continue  # never ran in the replay
            best = errors.argmin(dim=0)  # per independent range: [1], or [2] for a split quantizer
            scales, zeros = self.candidates[name, step]
            quantizer = self.layers[name].input_quantizer
            row = (slice(None),) if step is None else (step,)
            quantizer.scale[row] = _chosen(scales, best).reshape(quantizer.scale[row].shape)
            if zeros is not None:
                quantizer.zero_point[row] = _chosen(zeros, best).reshape(quantizer.zero_point[row].shape)


def _ranges(layer: QuantizedLayer) -> int:
    """Ranges whose factor is chosen independently: 2 for a split input quantizer, else 1."""
    return 1 if layer.input_quantizer.split_at is None else 2


def _chosen(candidates: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """Candidates [A, 1, n] at the best factor: [1, n] (one choice), or each range's own [n] (n = 2)."""
    if best.numel() == 1:
        return candidates[int(best)]
    return candidates[best, 0, torch.arange(best.numel())]
