"""The frozen form of quantized layers: integer codes resident, integer GEMMs at run time.

`PackedLinear` / `PackedConv2d` replace a QLinear / QConv2d (see diffquant.freeze). They hold no float
weight. Per call they quantize the input to integer codes exactly as the fake-quant layer does
(dynamic per-token / per-group, or static per-tensor with the step of the sampling context, after
dividing by the smoothing vector), multiply codes by codes with int32 accumulation on the selected
kernel backend (diffquant.kernels), and rescale in float32:

    y = sum_s a_scale[m, s] * w_scale[s, n] * sum_{k in s} (a[m,k] - a_zero)(w[k,n] - w_zero) + bias
        (+ (x / smooth) @ L1 @ L2 when a low-rank branch is given)

where s runs over the K segments on which every scale is constant (one segment for per-token x
per-channel; K / 64 for group-64 scales; kh*kw for a convolution with per-pixel input scales;
kh*kw*c_in/gcd(c_in, c) for a split input (shortcut splitting: two static ranges, channels [:c] and
[c:], so the scale changes at c within each kernel position; padding holds each half's zero point):
kernels/segmented.py). The integer sums are exact, so the output equals the fake-quant layer's up to
the order of float rounding. Where the backend has fused kernels (`vnni`: kernels/vnni.py) and neither
side has a zero point, the whole sum runs in one kernel that rescales each segment in registers, and
dynamic symmetric inputs are quantized in one pass; otherwise per segment on `backend.matmul`.

Codes are offset-centred to signed int8: a format with codes c in [0, 2^b) (unsigned) is held as
c - 2^(b-1) with its zero point moved by the same offset, so every format meets the int8 GEMM.

What stays resident (weight bytes incl. scales / fp32 weight bytes; 4096 x 4096 Linear):
  * backends whose prepare() is free (int_mm on VNNI/AMX CPUs, float), and every weight-only layer:
    the codes in compact form: <= 4-bit formats two per byte in the K-halves layout
    (kernels/layouts.py), unpacked per call (~1 ms per 16M weights, ~3% of the int8 GEMM at 256
    tokens); 5-8 bit formats one int8 per weight. Scales stay in their stored dtype (fp16 in the
    presets). W8 per-channel 0.2501x, W4 per-channel 0.1251x, W4 group-64 0.1328x.
  * vnni (fused): the same bytes in the kernel's VNNI order (<= 4-bit two per byte; N padded to 16),
    unpacked per call into an L2-sized panel inside the kernel, never as a whole int8 copy.
  * fbgemm (AVX2 CPUs): fbgemm's prepacked int8 copy only (our codes are dropped and recovered with
    unpack() for saving): W8 0.2504x, W4 per-channel 0.2504x, W4 group-64 0.2734x (one prepacked
    block and its column offsets per group). Keeping nibbles and prepacking per call instead would
    cost ~80 ms per 4096 x 4096 weight per call, more than the GEMM itself.
tests/nn/test_packed.py asserts W8 <= 0.27x and W4 <= 0.14x for the selected backend where its
prepare() is free.

Paths (registry `PATHS`, chosen at construction, shown by repr):
  "int":   integer GEMM as above. Needs integer formats and a scale that is constant along K within a
           segment: per-input-channel static activation ranges are not, and use "float".
  "float": dequantize the weight per call and run the float matmul / conv in `float_dtype` (default
           the machine's fastest: bf16 where native, else fp32) on the fake-quantized (or, weight-only,
           the plain) input. Weight-only W4A16 / W8A16 layers always use it.

Convolutions: nn/packed_conv.py (PackedConv2d, registered in PACKED_TYPES there).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffquant.formats.base import IntFormat, QFormat
from diffquant.formats.ops import quantize, quantize_blocks
from diffquant.formats.spec import QuantSpec
from diffquant.kernels import (
    FusedKernels,
    IntGemmBackend,
    SegmentZeroPoints,
    fastest_float_dtype,
    segmented_matmul,
    select_backend,
)
from diffquant.kernels.layouts import pack_int4_halves, unpack_int4_halves
from diffquant.nn.layers import QConv2d, QLinear, linear_low_rank
from diffquant.nn.quantizers import ActivationQuantizer, WeightQuantizer

# -- codes ----------------------------------------------------------------------------------------


def code_offset(fmt: QFormat) -> int:
    """What to subtract from a format's codes to centre them on signed int8 (0 for signed formats)."""
    return 0 if fmt.signed else 2 ** (fmt.bits - 1)


def integer_codes(spec: QuantSpec) -> bool:
    """Codes that an int8 GEMM can multiply: integer formats of at most 8 bits."""
    return isinstance(spec.qformat, IntFormat) and spec.bits <= 8


def _compact(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """values in `dtype` if that is lossless (scales rounded to their storage dtype), else float32."""
    narrow = values.detach().to(dtype)
    return narrow if torch.equal(narrow.float(), values.detach().float()) else values.detach().float()


# -- segments -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentPlan:
    """K cut into `count` segments of `length` inputs, each with one activation and one weight scale.

    act_blocks[s]: index of segment s's scale among a row's activation blocks; weight_groups[s]: index
    of its weight group. k: the real K; k_pad = count * length >= k (padding holds zero codes).
    """

    k: int
    length: int
    count: int
    act_blocks: torch.Tensor
    weight_groups: torch.Tensor

    @property
    def k_pad(self) -> int:
        return self.length * self.count

    @functools.cached_property
    def _act_blocks_in_order(self) -> bool:  # computed once per plan, not per layer call
        return _is_arange(self.act_blocks)

    @functools.cached_property
    def _weight_groups_in_order(self) -> bool:
        return _is_arange(self.weight_groups)

    def act_scales(self, per_block: torch.Tensor) -> torch.Tensor:
        """Per-block activation values [R, B] -> per segment [R, S] (no gather, and no host-to-device copy
        of the index on a GPU, where segments and blocks coincide)."""
        same = self._act_blocks_in_order and len(self.act_blocks) == per_block.shape[1]
        return per_block if same else per_block[:, self.act_blocks]

    def weight_rows(self, per_group: torch.Tensor) -> torch.Tensor:
        """Per-group weight values [G, N] -> per segment [S, N] (as act_scales)."""
        same = self._weight_groups_in_order and len(self.weight_groups) == per_group.shape[0]
        return per_group if same else per_group[self.weight_groups]


def _is_arange(index: torch.Tensor) -> bool:
    return bool(torch.equal(index, torch.arange(len(index))))


def plan_segments(k: int, weight_group: int | None, act_period: int | None, act_group: int | None,
                  act_split: int | None = None) -> SegmentPlan:
    """Segments for a K axis where weight scales change every `weight_group` inputs and activation
    scales every `act_group` inputs within periods of `act_period` (a conv's c_in per kernel position).
    act_split (with act_period): a split input quantizer's two ranges, block 0 for the first act_split
    inputs of every period and block 1 for the rest (segments of gcd(period, split) inputs, so a 3x3
    conv reading 384 = 256 + 128 channels has 9 x 3 segments). None: no boundary of that kind."""
    if act_split is not None and (act_period is None or act_group is not None):
        raise ValueError("a split input has one range per half of each period (act_period, no act_group)")
    bounds = [v for v in (weight_group, act_period, act_group, act_split) if v is not None]
    length = math.gcd(*bounds) if bounds else k
    count = -(-k // length)
    starts = torch.arange(count) * length
    weights = starts // weight_group if weight_group else torch.zeros_like(starts)
    acts = _act_blocks(starts, act_period, act_group) if act_split is None else (starts % act_period >= act_split).long()
    return SegmentPlan(k, length, count, acts, weights)


def _act_blocks(starts: torch.Tensor, period: int | None, group: int | None) -> torch.Tensor:
    if period is None:
        return starts // group if group else torch.zeros_like(starts)
    if group is None:
        return starts // period
    return (starts // period) * -(-period // group) + (starts % period) // group


def group_len(spec: QuantSpec | None) -> int | None:
    return spec.group_size if spec is not None and spec.granularity == "group" else None


def per_row(spec: QuantSpec) -> bool:
    return spec.granularity in ("token", "group")


# -- activation codes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ActivationCodes:
    """codes int8 [R, W] (W = C, or groups * group_size); scale float32 [R, B] or [1, 1];
    zero float32 like scale, or None. Offset-centred (code_offset)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None


def quantize_activation(x2d: torch.Tensor, quantizer: ActivationQuantizer, backend: IntGemmBackend | None = None,
                        smooth: torch.Tensor | None = None) -> ActivationCodes:
    """Codes of x / smooth [R, C] with the same expression as the fake-quant ActivationQuantizer (in one pass
    on the backend's fused quantizer where it has one for the spec, the division included)."""
    spec = quantizer.spec
    rows = x2d.shape[0]
    fused = _fused_quantize(x2d, spec, backend, smooth)
    if fused is not None:
        return ActivationCodes(*fused, None)
    x2d = x2d if smooth is None else x2d / smooth.to(x2d.dtype)
    if spec.dynamic:
        codes, scale, zero = quantize_blocks(x2d, spec)
        shape = (rows, -1) if per_row(spec) else (1, 1)
        codes, scale = codes.reshape(rows, -1), scale.reshape(shape)
        zero = None if zero is None else zero.reshape(shape)
    else:  # per tensor: scale [1, 1]; a split quantizer's two ranges [1, 2] (expanded per channel here)
        scale, zero = quantizer.static_qparams()
        channels = x2d.shape[1]
        codes = quantize(x2d, quantizer.per_channel(scale, channels).to(x2d.dtype),
                         None if zero is None else quantizer.per_channel(zero, channels).to(x2d.dtype), spec.qformat)
        scale, zero = scale.reshape(1, -1), None if zero is None else zero.reshape(1, -1)
    return _centred(codes, scale.float(), zero, spec.qformat)


def _fused_quantize(x2d: torch.Tensor, spec: QuantSpec, backend: IntGemmBackend | None,
                    smooth: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(codes int8 [R, W], scale float32 [R, blocks]) from the backend's quantizer: signed symmetric
    dynamic per-token / per-group integer codes with float32 scales only; else None."""
    fused = None if backend is None else backend.fused
    fmt = spec.qformat
    if (fused is None or not spec.dynamic or not spec.symmetric or not per_row(spec) or not fmt.signed
            or not integer_codes(spec) or spec.scale_dtype != "float32"):
        return None
    length = spec.group_size if spec.granularity == "group" else x2d.shape[1]
    return fused.quantize(x2d, length, int(fmt.qmin), int(fmt.qmax), smooth)


def _centred(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, fmt: QFormat) -> ActivationCodes:
    offset = code_offset(fmt)
    if offset:
        codes = codes - offset
        zero = torch.full_like(scale, -offset) if zero is None else zero.float() - offset
    return ActivationCodes(codes.to(torch.int8), scale, None if zero is None else zero.float())


def fit_codes(codes: torch.Tensor, width: int, zero: torch.Tensor | None) -> torch.Tensor:
    """Crop codes [R, W] to `width` columns, or pad them with the row's zero-point code."""
    missing = width - codes.shape[1]
    if missing <= 0:
        return codes[:, :width]
    if zero is None:
        return F.pad(codes, (0, missing))
    fill = zero[:, -1:].expand(codes.shape[0], missing).to(torch.int8)
    return torch.cat([codes, fill], dim=1)


# -- packed weight --------------------------------------------------------------------------------


def _groups_by_output(blocks: torch.Tensor, spec: QuantSpec, out_features: int) -> torch.Tensor:
    """Weight qparams [blocks, 1] (block_view order) -> [groups, N], or [1, 1] per tensor."""
    if spec.granularity == "tensor":
        return blocks.reshape(1, 1)
    return blocks.reshape(out_features, -1).t().contiguous()


def _blocks_from_groups(groups: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Inverse of _groups_by_output."""
    return groups.reshape(1, 1) if spec.granularity == "tensor" else groups.t().reshape(-1, 1)


class PackedWeight(nn.Module):
    """A frozen weight: offset-centred codes as the GEMM's b [K_pad, N], scales [groups, N].

    backend: the integer GEMM the codes feed, or None for a weight only ever dequantized (float path).
    Buffers: `codes` (uint8 [K_pad/2, N] nibbles for <= 4-bit formats, else int8 [K_pad, N]; the
    backend's own layout when its fused kernels take this weight (`fused`, kernels/vnni.py); None
    when the backend keeps its own prepared copy), `scale` (stored dtype), `zero_point` (int8,
    centred; None when symmetric and signed), `segment_sums` (int32 [S, N], column sums per segment,
    only when the input has a zero point). `shape` / `dtype` / `device` answer like a float weight's.
    """

    def __init__(self, codes: torch.Tensor, quantizer: WeightQuantizer, plan: SegmentPlan,
                 backend: IntGemmBackend | None, shape: torch.Size, with_sums: bool = False,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        spec = quantizer.spec
        if not integer_codes(spec):
            raise NotImplementedError(f"packed weights need an integer format, got {spec.format!r}")
        self.spec, self.plan, self.backend, self.shape, self.dtype = spec, plan, backend, torch.Size(shape), dtype
        self.out_features = codes.shape[0]
        self.offset = code_offset(spec.qformat)
        b = torch.zeros(plan.k_pad + plan.k_pad % 2, self.out_features, dtype=torch.int8, device=codes.device)
        b[:plan.k] = (codes.t().to(torch.int16) - self.offset).to(torch.int8)
        self._store_qparams(quantizer)
        self.register_buffer("segment_sums", self._sums(b) if with_sums else None)
        self.fused = self._fused_kernels(backend, with_sums, b[:plan.k_pad])
        keep_codes = backend is None or backend.prepare_free or self.fused is not None
        self.nibbles = spec.bits <= 4 and keep_codes and self.fused is None
        if self.fused is not None:
            self.register_buffer("codes", self.fused.pack(b[:plan.k_pad], spec.bits))
        else:
            self.register_buffer("codes", (pack_int4_halves(b) if self.nibbles else b) if keep_codes else None)
        self.prepared = None if keep_codes else backend.prepare_segments(b[:plan.k_pad], plan.length)

    def _fused_kernels(self, backend: IntGemmBackend | None, with_sums: bool, b: torch.Tensor) -> FusedKernels | None:
        """The backend's fused kernels where they take this weight: no zero point on either side."""
        fused = None if backend is None else backend.fused
        if fused is None or with_sums or self.zero_point is not None:
            return None
        if not fused.supports(self.spec.bits, self.plan.length, self.plan.k_pad):
            return None
        return fused if fused.accepts(b, self.spec.bits) else None

    def _store_qparams(self, quantizer: WeightQuantizer) -> None:
        spec, n = quantizer.spec, self.out_features
        self.register_buffer("scale", _compact(_groups_by_output(quantizer.scale, spec, n), spec.torch_scale_dtype))
        zero = None if quantizer.zero_point is None else _groups_by_output(quantizer.zero_point.float(), spec, n)
        if self.offset:
            zero = torch.zeros_like(self.scale, dtype=torch.float32) if zero is None else zero
            zero = zero - self.offset
        self.register_buffer("zero_point", None if zero is None else zero.to(torch.int8))

    def _sums(self, b: torch.Tensor) -> torch.Tensor:
        plan = self.plan
        return b[:plan.k_pad].reshape(plan.count, plan.length, -1).sum(dim=1, dtype=torch.int32)

    @property
    def device(self) -> torch.device:
        return self.scale.device

    def int8_codes(self) -> torch.Tensor:
        """int8 [K_pad, N] (unpacked per call from nibbles, or recovered from the backend's copy)."""
        if self.codes is None:
            return torch.cat([self.backend.unprepare(p) for p in self.prepared])
        if self.fused is not None:
            return self.fused.unpack(self.codes, self.plan.k_pad, self.out_features, self.spec.bits)
        codes = unpack_int4_halves(self.codes) if self.nibbles else self.codes
        return codes[:self.plan.k_pad]

    def segments(self) -> list:
        """The backend's prepared weight per segment."""
        if self.prepared is not None:
            return self.prepared
        return self.backend.prepare_segments(self.int8_codes(), self.plan.length)

    def fused_matmul(self, a: torch.Tensor, a_scales: torch.Tensor, epilogue: Epilogue | None = None) -> torch.Tensor:
        """sum_s a_scales[:, s] * scale_s * (a_s @ codes_s) on the fused kernel: [M, N], float32 or, with an
        epilogue, + addend + bias in the epilogue's dtype (added and cast by the kernel where it can)."""
        if epilogue is None:
            return self.fused.matmul(a, self.codes, self.out_features, self.spec.bits, self.plan.length, a_scales,
                                     self.segment_scales())
        addend = epilogue.fusable_addend()
        y = self.fused.matmul(a, self.codes, self.out_features, self.spec.bits, self.plan.length, a_scales,
                              self.segment_scales(), epilogue.bias, epilogue.dtype, addend)
        return y if addend is not None or epilogue.addend is None else y + epilogue.addend.to(y.dtype)

    def segment_scales(self) -> torch.Tensor:
        """float32 [S, N] (or [S, 1] per tensor)."""
        return self.plan.weight_rows(self.scale.float())

    def segment_zero(self) -> torch.Tensor | None:
        return None if self.zero_point is None else self.plan.weight_rows(self.zero_point.float())

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """(codes - zero) * scale as [K, N] in `dtype`: the fake-quant layer's weight, transposed."""
        plan = self.plan
        w = self.int8_codes().float().reshape(plan.count, plan.length, -1)
        zero = self.segment_zero()
        if zero is not None:
            w = w - zero.unsqueeze(1)
        w = w * self.segment_scales().unsqueeze(1)
        return w.reshape(plan.k_pad, -1)[:plan.k].to(dtype)

    def layer_codes(self) -> torch.Tensor:
        """Codes [N, K] in the format's storage dtype, as a QuantizedLayer holds them."""
        codes = self.int8_codes()[:self.plan.k].t().to(torch.int16) + self.offset
        return codes.to(self.spec.qformat.storage_dtype()).contiguous()

    def quantizer(self) -> WeightQuantizer:
        """A WeightQuantizer with this weight's qparams (float32, block_view layout)."""
        quantizer = WeightQuantizer(self.spec)
        quantizer.scale = _blocks_from_groups(self.scale.float(), self.spec)
        if not self.spec.symmetric:
            quantizer.zero_point = _blocks_from_groups(self.zero_point.float() + self.offset, self.spec)
        return quantizer

    def resident_bytes(self) -> int:
        own = sum(t.numel() * t.element_size() for t in self.buffers())
        return own + sum(self.backend.prepared_nbytes(p) for p in self.prepared or ())

    def extra_repr(self) -> str:
        layout = "int4 nibbles" if self.nibbles else ("int8" if self.codes is not None else "prepared")
        layout = f"{self.backend.name} fused" if self.fused is not None else layout
        return f"{self.spec.format} {self.spec.granularity}, {layout}, segments={self.plan.count}x{self.plan.length}"


# -- modules --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Epilogue:
    """What follows a layer's product: + addend (a low-rank branch's output, [rows, N] in the product's
    layout), + bias (along the output channels), then the input's dtype. Fused kernels do it on their
    float32 accumulators (one rounding, no extra pass over the output) where the addend is float32; the
    other paths call apply()."""

    dtype: torch.dtype
    bias: torch.Tensor | None
    addend: torch.Tensor | None = None

    def fusable_addend(self) -> torch.Tensor | None:
        """The addend as a fused kernel takes it (float32, unit column stride), or None."""
        if self.addend is None or self.addend.dtype != torch.float32 or self.addend.stride(-1) != 1:
            return None
        return self.addend

    def apply(self, y: torch.Tensor, channel_dim: int = -1) -> torch.Tensor:
        y = y.to(self.dtype)
        if self.addend is not None:
            y = y + self.addend.reshape(y.shape).to(self.dtype)
        if self.bias is None:
            return y
        shape = [1] * y.dim()
        shape[channel_dim] = -1
        return y + self.bias.to(self.dtype).reshape(shape)


class PackedLayer(nn.Module):
    """Shared run-time of PackedLinear / PackedConv2d. Subclasses define the int and float products."""

    def _setup(self, weight: PackedWeight, input_quantizer: ActivationQuantizer | None, bias: torch.Tensor | None,
               smooth: torch.Tensor | None, backend: IntGemmBackend, float_dtype: torch.dtype | None) -> None:
        self.weight = weight
        self.input_quantizer = input_quantizer
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("smooth", None if smooth is None else smooth.detach().clone())
        self.backend = backend
        self.float_dtype = fastest_float_dtype(device=weight.device) if float_dtype is None else float_dtype

    def smoothed(self, x: torch.Tensor) -> torch.Tensor:
        """x (feature axis last) divided by the smoothing vector, as QuantizedLayer.quantize_input."""
        return x if self.smooth is None else x / self.smooth.to(x.dtype)

    def check_device(self, x: torch.Tensor) -> None:
        """The integer path's kernels take tensors of one device type: say so instead of crashing in them."""
        if x.device.type != self.backend.device_type:
            raise RuntimeError(f"this layer was frozen for kernel backend {self.backend.name!r} "
                               f"({self.backend.device_type} tensors) but got a {x.device.type} input: freeze the "
                               f"model on the device it runs on (model.to(device) before diffquant.freeze)")

    def integer_product(self, act: ActivationCodes, a: torch.Tensor, epilogue: Epilogue) -> torch.Tensor:
        """Rescaled segmented GEMM of codes a [M, K_pad] with the weight, then the epilogue: [M, N]."""
        plan = self.weight.plan
        if self.weight.fused is not None:  # symmetric on both sides: one pass, no per-segment float passes
            return self.weight.fused_matmul(a, plan.act_scales(act.scale), epilogue)
        zero_points = self._zero_points(act)
        y = segmented_matmul(self.backend, a.contiguous(), self.weight.segments(), plan.act_scales(act.scale),
                             self.weight.segment_scales(), zero_points)
        return epilogue.apply(y)

    def _zero_points(self, act: ActivationCodes) -> SegmentZeroPoints | None:
        weight = self.weight
        if act.zero is None and weight.zero_point is None:
            return None
        a_zero = None if act.zero is None else weight.plan.act_scales(act.zero)
        sums = None if weight.segment_sums is None else weight.segment_sums.float()
        return SegmentZeroPoints(a_zero, weight.segment_zero(), sums)

    def resident_bytes(self) -> int:
        """Bytes this module keeps alive: codes, scales, backend copies, bias, smoothing, quantizer state."""
        own = sum(t.numel() * t.element_size() for n, t in self.named_buffers() if not n.startswith("weight."))
        return own + self.weight.resident_bytes()

    def extra_repr(self) -> str:
        a = "fp" if self.input_quantizer is None else self.input_quantizer.spec.format
        engine = f"backend={self.backend.name}" if self.path == "int" else f"dtype={self.float_dtype}"
        return f"path={self.path}, {engine}, a={a}, smooth={self.smooth is not None}"


def needs_input_sums(input_quantizer: ActivationQuantizer | None) -> bool:
    if input_quantizer is None:
        return False
    spec = input_quantizer.spec
    return not spec.symmetric or not spec.qformat.signed


def input_split(input_quantizer: ActivationQuantizer | None, path: str) -> int | None:
    """The channel where a split input quantizer's second range begins, on the integer path."""
    return None if input_quantizer is None or path != "int" else input_quantizer.split_at


def choose_path(input_quantizer: ActivationQuantizer | None, integer_ok: bool) -> str:
    if input_quantizer is None or not integer_ok:
        return "float"
    spec = input_quantizer.spec
    return "int" if integer_codes(spec) and spec.granularity != "channel" else "float"


class PackedLinear(PackedLayer):
    """Frozen nn.Linear. codes: [out, in] integer codes (a QLinear's weight_codes);
    low_rank: optional (L1 [in, r], L2 [r, out]) float factors, adding (x / smooth) @ L1 @ L2."""

    def __init__(self, codes: torch.Tensor, weight_quantizer: WeightQuantizer,
                 input_quantizer: ActivationQuantizer | None = None, bias: torch.Tensor | None = None,
                 smooth: torch.Tensor | None = None, low_rank: tuple[torch.Tensor, torch.Tensor] | None = None,
                 backend: str | IntGemmBackend | None = None, float_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        backend = select_backend(backend, device=codes.device)
        self.out_features, self.in_features = codes.shape
        self.path = choose_path(input_quantizer, integer_ok=True)
        in_spec = input_quantizer.spec if self.path == "int" else None
        split = input_split(input_quantizer, self.path)
        plan = plan_segments(self.in_features, group_len(weight_quantizer.spec), None if split is None else
                             self.in_features, group_len(in_spec), split)
        weight = PackedWeight(codes, weight_quantizer, plan, backend if self.path == "int" else None, codes.shape,
                              with_sums=self.path == "int" and needs_input_sums(input_quantizer))
        self._setup(weight, input_quantizer, bias, smooth, backend, float_dtype)
        self._set_low_rank(low_rank)

    def _set_low_rank(self, low_rank: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        register_low_rank(self, low_rank, self.in_features, self.out_features)

    @classmethod
    def from_layer(cls, layer: QLinear, backend: str | IntGemmBackend | None = None,
                   float_dtype: torch.dtype | None = None,
                   low_rank: tuple[torch.Tensor, torch.Tensor] | None = None) -> PackedLinear:
        """low_rank: a branch to add; default the layer's own (QuantizedLayer.low_rank)."""
        low_rank = layer.low_rank if low_rank is None else low_rank
        return cls(layer_codes(layer), layer.weight_quantizer, layer.input_quantizer, layer.bias, layer.smooth,
                   low_rank, backend, float_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The products take x itself: the integer one folds the smoothing division into its activation
        quantizer, and the low-rank branch reads x through (L1 / smooth) (a [K, r] division per call, not
        an [M, K] one); the branch joins the product's epilogue (inside the fused kernel in float32)."""
        branch = None
        if self.low_rank_down is not None:
            branch = linear_low_rank(x, self.branch_down(x.dtype), self.low_rank_up).reshape(-1, self.out_features)
        return PATHS[self.path](self, x, Epilogue(x.dtype, self.bias, branch))

    def branch_down(self, dtype: torch.dtype) -> torch.Tensor:
        """L1 / smooth [K, r] in `dtype`: (x / smooth) @ L1 = x @ (L1 / smooth), up to float rounding."""
        down = self.low_rank_down.to(dtype)
        return down if self.smooth is None else down / self.smooth.to(dtype)[:, None]

    def int_product(self, x: torch.Tensor, epilogue: Epilogue) -> torch.Tensor:
        self.check_device(x)
        x2d = x.reshape(-1, self.in_features)
        act = quantize_activation(x2d, self.input_quantizer, self.backend, self.smooth)
        a = fit_codes(act.codes, self.weight.plan.k_pad, act.zero)
        return self.integer_product(act, a, epilogue).reshape(*x.shape[:-1], self.out_features)

    def float_product(self, x: torch.Tensor, epilogue: Epilogue) -> torch.Tensor:
        xs = self.smoothed(x)
        if self.input_quantizer is not None:
            xs = self.input_quantizer(xs)
        return epilogue.apply(xs.to(self.float_dtype) @ self.weight.dequantized(self.float_dtype))

    def to_quantized_layer(self) -> QLinear:
        """The QLinear holding this layer's codes (no float weight): what checkpoints save."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        return thawed(QLinear(linear, self.weight.spec, None), self)

    def extra_repr(self) -> str:
        rank = "" if self.low_rank_down is None else f", low_rank={self.low_rank_down.shape[1]}"
        return f"{self.in_features} -> {self.out_features}, " + super().extra_repr() + rank


# A layer's product on its path: (layer, input as its forward hands it, epilogue) -> output. PackedLinear hands
# over x and divides by its smoothing vector inside (fused into the quantizer); PackedConv2d hands over x / smooth.
PATHS: dict[str, Callable[[PackedLayer, torch.Tensor, Epilogue], torch.Tensor]] = {
    "int": lambda layer, x, epilogue: layer.int_product(x, epilogue),
    "float": lambda layer, x, epilogue: layer.float_product(x, epilogue),
}


def register_low_rank(layer: PackedLayer, low_rank: tuple[torch.Tensor, torch.Tensor] | None, inputs: int,
                       outputs: int) -> None:
    """Register the branch buffers (None without a branch) after checking L1 [inputs, r], L2 [r, outputs].
    Kept in float16 where that is lossless (SVDQuant rounds them to 16 bits), else float32; they are cast
    to the input's dtype per call."""
    down, up = (None, None) if low_rank is None else low_rank
    if low_rank is not None and (down.shape[0] != inputs or up.shape[1] != outputs or down.shape[1] != up.shape[0]):
        raise ValueError(f"low-rank factors {tuple(down.shape)} x {tuple(up.shape)} do not fit a "
                         f"{inputs} -> {outputs} layer")
    layer.register_buffer("low_rank_down", None if down is None else _half_if_exact(down))
    layer.register_buffer("low_rank_up", None if up is None else _half_if_exact(up))


def _half_if_exact(factor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of a low-rank factor, in float16 where that holds it exactly."""
    return _compact(factor, torch.float16).contiguous().clone()


def layer_codes(layer: QLinear | QConv2d) -> torch.Tensor:
    """The layer's integer weight codes [out, K]: stored ones, or computed from its float weight."""
    if layer.weight_quantizer is None:
        raise ValueError("a layer without a weight quantizer has no integer weight to pack")
    if layer.weight_codes is not None:
        return layer.weight_codes
    storage = layer.weight_quantizer.spec.qformat.storage_dtype()
    with torch.no_grad():
        return layer.weight_quantizer.codes(layer.weight_matrix(layer.weight)).to(storage)


def thawed(layer: QLinear | QConv2d, packed: PackedLayer) -> QLinear | QConv2d:
    layer.weight_quantizer = packed.weight.quantizer()
    layer.input_quantizer = packed.input_quantizer
    layer.hold_codes(packed.weight.layer_codes())
    layer.bias = None if packed.bias is None else nn.Parameter(packed.bias.clone(), requires_grad=False)
    layer.smooth = None if packed.smooth is None else packed.smooth.clone()
    if getattr(packed, "low_rank_down", None) is not None:
        layer.set_low_rank(packed.low_rank_down.float(), packed.low_rank_up.float())
    return layer.eval()


# The packed module of each quantized layer type (nn/packed_conv.py adds QConv2d).
PACKED_TYPES: dict[type[nn.Module], Callable[..., PackedLayer]] = {
    QLinear: PackedLinear.from_layer,
}
