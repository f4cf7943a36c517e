"""Quantizer modules: hold quantization parameters and fake-quantize with a gradient path."""

from __future__ import annotations

import torch
from torch import nn

from diffquant.calib.stats import ChannelRange, LayerStats
from diffquant.calib.steps import step_rows
from diffquant.formats.ops import (
    decode_codes,
    fake_quantize,
    fake_quantize_dynamic,
    global_scale_from_range,
    qparams_from_range,
    quantize,
)
from diffquant.formats.spec import QuantSpec

# A static input range per channel never narrower than 2^-20 of its tensor's median channel: channels seen
# only at 0 (a SiLU underflowed, a time embedding's dead unit) would otherwise get float32's smallest step
MIN_RELATIVE_EXTENT = 2.0**-20


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a float16 / bfloat16 tensor is fake-quantized in: float32 (a float16 scale underflows
    to 0 and x / scale overflows; a two-level scale is float32 anyway); wider dtypes as they are."""
    return torch.promote_types(x.dtype, torch.float32)


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
        spec = self.spec
        lo, hi = spec.qformat.weight_range(self._blocks(weight2d))
        self.global_scale = global_scale_from_range(lo, hi, spec.qformat, spec.symmetric, spec.scale_format)
        self.scale, self.zero_point = qparams_from_range(
            lo, hi, spec.qformat, spec.symmetric, spec.scale_format, self.global_scale
        )

    def _blocks(self, weight2d: torch.Tensor) -> torch.Tensor:
        return self.spec.grain.view(weight2d, self.spec.group_size)

    def codes(self, weight2d: torch.Tensor) -> torch.Tensor:
        """Stored codes [out, K] in the weight matrix's own layout, in the format's storage dtype
        (QFormat.encode: the integers themselves for integer formats, bit patterns for fp formats)."""
        self._check_calibrated()
        blocks = quantize(self._blocks(weight2d.detach()), self.scale, self.zero_point, self.spec.qformat)
        return self.spec.qformat.encode(self.spec.grain.unview(blocks, weight2d.shape))

    def decode(self, codes2d: torch.Tensor) -> torch.Tensor:
        """Dequantize stored codes [out, K]; the same expression as forward(), so bitwise equal."""
        self._check_calibrated()
        return decode_codes(codes2d, self.scale, self.zero_point, self.spec)

    def forward(self, weight2d: torch.Tensor) -> torch.Tensor:
        self._check_calibrated()
        fq = fake_quantize(self._blocks(weight2d), self.scale, self.zero_point, self.spec.qformat)
        return self.spec.grain.unview(fq, weight2d.shape)

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

    Split input (Q-Diffusion's shortcut splitting, spec.split_shortcut; METHODS.md §12): a static
    per-tensor quantizer of a layer that reads a UNet decoder's skip concatenation cat([hidden, skip])
    is given the channel c where the skip begins (`set_split(c)`, before calibration; the int64 buffer
    `split` keeps it, so checkpoints carry it). It then holds one range per half, scale / zero_point
    [2] (or [S, 2] per step): index 0 for channels [:c], 1 for [c:], each calibrated from its own
    channels' statistics, and applied per channel (`per_channel`). Per-channel ranges need no split;
    dynamic specs are not split: per-group ranges stay within one half wherever the split is a multiple
    of the group size (UNet channel counts are), while a per-token range still spans both halves of a
    token (splitting it is not implemented; README: Recipe files).
    """

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        spec.validate_for_activation()
        self.spec = spec
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)
        self.register_buffer("split", None)

    # -- shortcut splitting ---------------------------------------------------------------------------
    @property
    def splits_input(self) -> bool:
        """Whether the spec asks for shortcut splitting and can have it (static, per tensor)."""
        spec = self.spec
        return spec.split_shortcut and not spec.dynamic and spec.grain.splittable

    def set_split(self, channel: int) -> None:
        """Two ranges from now on: input channels [:channel] and [channel:] (before calibrate)."""
        if not self.splits_input:
            raise ValueError(f"a {self.extra_repr()} quantizer without split_shortcut has one range per "
                             "tensor / channel / token: it cannot be split")
        if self.scale is not None:
            raise RuntimeError("set_split must run before the quantizer is calibrated")
        if isinstance(channel, bool) or not isinstance(channel, int) or channel < 1:
            raise ValueError(f"the split channel must be a positive integer, got {channel!r}")
        self.split = torch.tensor(channel, dtype=torch.int64)

    @property
    def split_at(self) -> int | None:
        """The channel where the second range begins, or None (one range). Read from the `split`
        buffer once per buffer object (a loaded or moved buffer is read again), not per call."""
        split = self.split
        if split is None:
            return None
        cached = self.__dict__.get("_split_cache")
        if cached is None or cached[0] is not split:
            cached = (split, int(split))
            object.__setattr__(self, "_split_cache", cached)
        return cached[1]

    def per_channel(self, values: torch.Tensor | None, channels: int) -> torch.Tensor | None:
        """Split qparams [..., 2] -> [..., channels], each half's value on its own channels (keeps the
        gradient, for LSQ); unsplit qparams, and None, are returned as they are."""
        split = self.split_at
        if values is None or split is None:
            return values
        if not 0 < split < channels:
            raise ValueError(f"input split at channel {split} does not fit a {channels}-channel input")
        index = (torch.arange(channels, device=values.device) >= split).long()
        return values.index_select(-1, index)

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
        qparams = [self.qparams_for(r) for r in ranges]
        self.scale = torch.stack([s for s, _ in qparams])
        zps = [z for _, z in qparams]
        self.zero_point = None if zps[0] is None else torch.stack(zps)
        if not self.spec.per_step:
            self.scale = self.scale[0]
            self.zero_point = None if self.zero_point is None else self.zero_point[0]

    def qparams_for(self, rng: ChannelRange) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scale and zero point this quantizer takes for the input range `rng` (its split, if any, applied)."""
        lo, hi = rng.lo, rng.hi
        split = self.split_at
        if split is not None:
            if not 0 < split < lo.numel():
                raise ValueError(f"input split at channel {split} does not fit a {lo.numel()}-channel input")
            lo = torch.stack([lo[:split].amin(), lo[split:].amin()])
            hi = torch.stack([hi[:split].amax(), hi[split:].amax()])
        else:
            lo, hi = self.spec.grain.static_range(lo, hi)
        spec = self.spec
        return qparams_from_range(lo, hi, spec.qformat, spec.symmetric, spec.scale_format,
                                  relative_floor=MIN_RELATIVE_EXTENT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc = x.to(compute_dtype(x))
        if self.spec.dynamic:
            return fake_quantize_dynamic(xc, self.spec).to(x.dtype)
        scale, zero_point = self.static_qparams()
        scale, zero_point = self.per_channel(scale, x.shape[-1]), self.per_channel(zero_point, x.shape[-1])
        return fake_quantize(xc, scale.to(xc.dtype), None if zero_point is None else zero_point.to(xc.dtype),
                             self.spec.qformat).to(x.dtype)

    def static_qparams(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The calibrated scale / zero point in force: the current sampling step's when per-step (an
        interpolated scale is used as computed, in float32, not rounded again to scale_dtype); [2]
        for a split quantizer (per_channel expands them)."""
        if self.scale is None:
            raise RuntimeError("static activation quantizer used before calibration")
        scale, zero_point = self.scale, self.zero_point
        if self.spec.per_step:
            scale, zero_point = step_qparams(scale, zero_point, self.spec.step_interpolation)
        return scale, zero_point

    def extra_repr(self) -> str:
        kind = "dynamic" if self.spec.dynamic else ("static/step" if self.spec.per_step else "static")
        split = "" if self.split is None else f", split at {self.split_at}"
        return f"{self.spec.format}, {self.spec.granularity}, {kind}{split}"


def step_qparams(scale: torch.Tensor, zero_point: torch.Tensor | None,
                 mode: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The current sampling step's rows of per-step scale / zero point [S, ...] (calib.steps.step_rows);
    an interpolated zero point is rounded back onto the integer grid (half to even), straight-through
    so that a learned zero point keeps its gradient."""
    if zero_point is None:
        return step_rows(scale, mode), None
    zero = step_rows(zero_point, mode)
    return step_rows(scale, mode), zero + (torch.round(zero) - zero).detach()
