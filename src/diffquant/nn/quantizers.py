"""Quantizer modules: hold quantization parameters and fake-quantize with a gradient path."""

from __future__ import annotations

import torch
from torch import nn

from diffquant.calib.stats import ChannelRange, LayerStats
from diffquant.calib.steps import step_rows
from diffquant.formats.ops import (
    block_range,
    block_view,
    decode_codes,
    fake_quantize,
    fake_quantize_dynamic,
    global_scale_from_range,
    qparams_from_range,
    quantize,
    unblock_view,
)
from diffquant.formats.spec import QuantSpec


class WeightQuantizer(nn.Module):
    """Round-to-nearest weight quantizer over a [out, K] weight matrix (input axis last).

    Buffers: scale [blocks, 1] and zero_point [blocks, 1] (asymmetric only), block layout as
    formats.block_view(granularity); global_scale [1] (float32) for two-level scale formats (e4m3),
    whose scale is then (E4M3 value) x global_scale. Calibrated once from the weight; methods that
    learn the scales (LSQ) make them parameters.
    """

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        spec.validate_for_weight()
        self.spec = spec
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)
        self.register_buffer("global_scale", None)

    def calibrate(self, weight2d: torch.Tensor) -> None:
        lo, hi = block_range(self._blocks(weight2d))
        spec = self.spec
        self.global_scale = global_scale_from_range(lo, hi, spec.qformat, spec.symmetric, spec.scale_format)
        self.scale, self.zero_point = qparams_from_range(
            lo, hi, spec.qformat, spec.symmetric, spec.scale_format, self.global_scale
        )

    def _blocks(self, weight2d: torch.Tensor) -> torch.Tensor:
        return block_view(weight2d, self.spec.granularity, self.spec.group_size)

    def codes(self, weight2d: torch.Tensor) -> torch.Tensor:
        """Stored codes [out, K] in the weight matrix's own layout, in the format's storage dtype
        (QFormat.encode: the integers themselves for integer formats, bit patterns for fp formats)."""
        self._check_calibrated()
        blocks = quantize(self._blocks(weight2d.detach()), self.scale, self.zero_point, self.spec.qformat)
        return self.spec.qformat.encode(unblock_view(blocks, weight2d.shape, self.spec.granularity))

    def decode(self, codes2d: torch.Tensor) -> torch.Tensor:
        """Dequantize stored codes [out, K]; the same expression as forward(), so bitwise equal."""
        self._check_calibrated()
        return decode_codes(codes2d, self.scale, self.zero_point, self.spec)

    def forward(self, weight2d: torch.Tensor) -> torch.Tensor:
        self._check_calibrated()
        fq = fake_quantize(self._blocks(weight2d), self.scale, self.zero_point, self.spec.qformat)
        return unblock_view(fq, weight2d.shape, self.spec.granularity)

    def _check_calibrated(self) -> None:
        if self.scale is None:
            raise RuntimeError("weight quantizer used before calibrate(weight)")

    def extra_repr(self) -> str:
        return f"{self.spec.format}, {self.spec.granularity}" + (
            f"({self.spec.group_size})" if self.spec.group_size else ""
        )


class ActivationQuantizer(nn.Module):
    """Quantizer of a layer's input, feature axis last.

    Dynamic specs compute the range from each input. Static specs hold calibrated buffers:
    scale/zero_point of shape [C] (per input channel) or [1] (per tensor), with a leading step axis
    [S, ...] when per_step, read at the sampling step of the current context (calib.steps.step_rows:
    interpolated per spec.step_interpolation when the run has another number of steps).
    """

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        spec.validate_for_activation()
        self.spec = spec
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)

    @property
    def calibrated(self) -> bool:
        return self.spec.dynamic or self.scale is not None

    def calibrate(self, stats: LayerStats) -> None:
        """Set the static range from streamed calibration statistics."""
        if self.spec.dynamic:
            return
        if self.spec.per_step:
            if not stats.per_step:
                raise ValueError("per-step activation ranges need calibration run with sampling steps set")
            missing = [s for s in range(stats.num_steps) if s not in stats.per_step]
            if missing:
                raise ValueError(f"calibration saw no data for sampling steps {missing}")
            ranges = [stats.per_step[s] for s in range(stats.num_steps)]
        else:
            if stats.overall is None:
                raise ValueError("no calibration statistics: the layer never ran during calibration")
            ranges = [stats.overall]
        qparams = [self._qparams(r) for r in ranges]
        self.scale = torch.stack([s for s, _ in qparams])
        zps = [z for _, z in qparams]
        self.zero_point = None if zps[0] is None else torch.stack(zps)
        if not self.spec.per_step:
            self.scale = self.scale[0]
            self.zero_point = None if self.zero_point is None else self.zero_point[0]

    def _qparams(self, rng: ChannelRange) -> tuple[torch.Tensor, torch.Tensor | None]:
        lo, hi = rng.lo, rng.hi
        if self.spec.granularity == "tensor":
            lo, hi = lo.amin().reshape(1), hi.amax().reshape(1)
        spec = self.spec
        return qparams_from_range(lo, hi, spec.qformat, spec.symmetric, spec.scale_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.dynamic:
            return fake_quantize_dynamic(x, self.spec)
        scale, zero_point = self.static_qparams()
        return fake_quantize(x, scale.to(x.dtype), None if zero_point is None else zero_point.to(x.dtype),
                             self.spec.qformat)

    def static_qparams(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The calibrated scale / zero point in force: the current sampling step's when per-step (an
        interpolated scale is used as computed, in float32, not rounded again to scale_dtype)."""
        if self.scale is None:
            raise RuntimeError("static activation quantizer used before calibration")
        scale, zero_point = self.scale, self.zero_point
        if self.spec.per_step:
            scale, zero_point = step_qparams(scale, zero_point, self.spec.step_interpolation)
        return scale, zero_point

    def extra_repr(self) -> str:
        kind = "dynamic" if self.spec.dynamic else ("static/step" if self.spec.per_step else "static")
        return f"{self.spec.format}, {self.spec.granularity}, {kind}"


def step_qparams(scale: torch.Tensor, zero_point: torch.Tensor | None,
                 mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The current sampling step's rows of per-step scale / zero point [S, ...] (calib.steps.step_rows);
    an interpolated zero point is rounded back onto the integer grid (half to even), straight-through
    so that a learned zero point keeps its gradient."""
    if zero_point is None:
        return step_rows(scale, mode), None
    zero = step_rows(zero_point, mode)
    return step_rows(scale, mode), zero + (torch.round(zero) - zero).detach()
