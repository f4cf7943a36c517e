"""The packed weight of a frozen layer: offset-centred integer codes, the segment plan that cuts K where a
scale changes, and the epilogue after a product (nn/packed.py: the run-time and the resident forms)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from diffquant.formats.base import QFormat
from diffquant.formats.floating import FloatFormat
from diffquant.formats.spec import QuantSpec
from diffquant.kernels import FusedKernels, IntGemmBackend
from diffquant.kernels.layouts import pack_int4_halves, unpack_int4_halves
from diffquant.nn.quantizers import WeightQuantizer

# -- codes ----------------------------------------------------------------------------------------


def code_offset(fmt: QFormat) -> int:
    """What to subtract from a format's codes to centre them on signed int8 (0 for signed formats)."""
    return 0 if fmt.signed else 2 ** (fmt.bits - 1)


def integer_codes(spec: QuantSpec) -> bool:
    """Codes that an int8 GEMM can multiply: integer formats of at most 8 bits."""
    return spec.qformat.integer_codes and spec.bits <= 8


@dataclass(frozen=True)
class CodeLevels:
    """A floating-point format whose values are integers times one power of two: table[code] is the int8
    integer a stored code multiplies as, `unit` the value of integer 1 (so decode(code) = table[code] * unit).
    E2M1: {0, .5, 1, 1.5, 2, 3, 4, 6} = {0, 1, 2, 3, 4, 6, 8, 12} / 2, so FP4 weights run exactly on the int8 GEMM."""

    table: torch.Tensor
    unit: float


@functools.cache
def code_levels(fmt: QFormat) -> CodeLevels | None:
    """The CodeLevels of a floating-point format of at most 4 bits (nibble codes, one 16-entry table) whose
    scaled values fit int8; None for every other format (integer formats are their own codes)."""
    if not isinstance(fmt, FloatFormat) or fmt.bits > 4:
        return None
    values = fmt.decode(torch.arange(2 ** fmt.bits)).double()
    for shift in range(8):
        scaled = values * 2 ** shift
        if torch.equal(scaled, scaled.round()) and float(scaled.abs().max()) <= 127:
            return CodeLevels(scaled.to(torch.int8), 2.0 ** -shift)
    return None


def gemm_weight(spec: QuantSpec) -> bool:
    """Weights a PackedWeight holds for the int8 GEMM: integer formats and FP formats with CodeLevels, with
    one-level scales (it keeps one scale per group, no global scale)."""
    return (integer_codes(spec) or code_levels(spec.qformat) is not None) and not spec.scale_format.two_level


def compact(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """values in `dtype` if that is lossless (scales rounded to their storage dtype), else float32."""
    narrow = values.detach().to(dtype)
    return narrow if torch.equal(narrow.float(), values.detach().float()) else values.detach().float()


def stored_scales(spec: QuantSpec, scale: torch.Tensor) -> torch.Tensor:
    """Scales as the spec's one-level scale format stores them where that is lossless (fp16 values, E8M0
    exponent bytes: one byte per MXFP4 block of 32), else float32."""
    values = scale.detach().float()
    try:
        stored = spec.scale_format.encode(values)
    except ValueError:  # not representable (e.g. a learned scale that is no power of two)
        return values
    return stored if torch.equal(spec.scale_format.decode(stored), values) else values


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
    weights = torch.zeros_like(starts) if weight_group is None else starts // weight_group
    acts = _act_blocks(starts, act_period, act_group) if act_split is None else (starts % act_period >= act_split).long()
    return SegmentPlan(k, length, count, acts, weights)


def _act_blocks(starts: torch.Tensor, period: int | None, group: int | None) -> torch.Tensor:
    if period is None:
        return torch.zeros_like(starts) if group is None else starts // group
    if group is None:
        return starts // period
    return (starts // period) * -(-period // group) + (starts % period) // group


def group_len(spec: QuantSpec | None) -> int | None:
    """Inputs along K that share one of the spec's scales (None: all of K, or no spec)."""
    return None if spec is None else spec.grain.segment(spec.group_size)


# -- epilogue -------------------------------------------------------------------------------------


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



# -- packed weight --------------------------------------------------------------------------------


class PackedWeight(nn.Module):
    """A frozen weight: offset-centred codes as the GEMM's b [K_pad, N], scales [groups, N].

    backend: the integer GEMM the codes feed, or None for a weight only ever dequantized (float path).
    FP formats with CodeLevels (FP4: E2M1, E1M2, E3M0; MXFP4) keep their stored codes as the nibbles; the
    GEMM multiplies levels.table[code] (decoded per call, or by the fused kernel's nibble table) and the
    scales take the levels' power-of-two unit.
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
        if not gemm_weight(spec):
            raise NotImplementedError(f"packed weights need an integer format or FP4 levels, got {spec.format!r}")
        self.spec, self.plan, self.backend, self.shape, self.dtype = spec, plan, backend, torch.Size(shape), dtype
        self.out_features = codes.shape[0]
        levels = code_levels(spec.qformat)
        # FP codes sit in the nibbles as code - 8 (stored code = nibble), like an int4's
        self.offset = 8 if levels is not None else code_offset(spec.qformat)
        self.register_buffer("levels", None if levels is None else levels.table.to(codes.device))
        self.unit = 1.0 if levels is None else levels.unit
        b = torch.zeros(plan.k_pad + plan.k_pad % 2, self.out_features, dtype=torch.int8, device=codes.device)
        b[:plan.k] = (codes.t().to(torch.int16) - self.offset).to(torch.int8)
        self._store_qparams(quantizer)
        self.register_buffer("segment_sums", self._sums(self._decoded(b)) if with_sums else None)
        self.fused = self._fused_kernels(backend, with_sums, b[:plan.k_pad])
        # levels keep the stored codes: the decoded integers cannot give back -0's code
        own_layout = backend is None or backend.prepare_free or self.fused is not None
        keep_codes = own_layout or self.levels is not None
        self.nibbles = spec.bits <= 4 and keep_codes and self.fused is None
        if self.fused is not None:
            self.register_buffer("codes", self.fused.pack(b[:plan.k_pad], spec.bits))
        else:
            self.register_buffer("codes", (pack_int4_halves(b) if self.nibbles else b) if keep_codes else None)
        self.prepared = None if own_layout else backend.prepare_segments(self._decoded(b[:plan.k_pad]), plan.length)

    def _decoded(self, b: torch.Tensor) -> torch.Tensor:
        """The integers the GEMM multiplies, from offset-centred stored codes (themselves without levels)."""
        return b if self.levels is None else self.levels[b.long() + self.offset]

    def _fused_kernels(self, backend: IntGemmBackend | None, with_sums: bool, b: torch.Tensor) -> FusedKernels | None:
        """The backend's fused kernels where they take this weight: no zero point on either side."""
        fused = None if backend is None else backend.fused
        if fused is None or with_sums or self.zero_point is not None:
            return None
        if not fused.supports(self.spec.bits, self.plan.length, self.plan.k_pad):
            return None
        if self.levels is not None and not fused.takes_levels(self.levels):
            return None
        return fused if fused.accepts(b, self.spec.bits) else None

    def _store_qparams(self, quantizer: WeightQuantizer) -> None:
        spec, n = quantizer.spec, self.out_features
        self.register_buffer("scale", stored_scales(spec, spec.grain.by_output(quantizer.scale, n)))
        zero = None if quantizer.zero_point is None else spec.grain.by_output(quantizer.zero_point.float(), n)
        if code_offset(spec.qformat):  # an unsigned format's zero point moves with its codes
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
        """The integers the GEMM multiplies, int8 [K_pad, N] (unpacked per call from nibbles and decoded
        through the levels, or recovered from the backend's copy)."""
        return self._decoded(self.stored_codes())

    def stored_codes(self) -> torch.Tensor:
        """The offset-centred stored codes, int8 [K_pad, N]: resident, or (integer formats only: levels keep
        their codes) recovered from the backend's copy."""
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
                                     self.segment_scales(), levels=self.levels)
        addend = epilogue.fusable_addend()
        y = self.fused.matmul(a, self.codes, self.out_features, self.spec.bits, self.plan.length, a_scales,
                              self.segment_scales(), epilogue.bias, epilogue.dtype, addend, levels=self.levels)
        return y if addend is not None or epilogue.addend is None else y + epilogue.addend.to(y.dtype)

    def segment_scales(self) -> torch.Tensor:
        """float32 [S, N] (or [S, 1] per tensor), times the levels' unit (a power of two: exact)."""
        scale = self.scale_values()
        return self.plan.weight_rows(scale if self.unit == 1.0 else scale * self.unit)

    def scale_values(self) -> torch.Tensor:
        """The scales the maths multiplies by, float32 (decoded from E8M0 bytes where stored so)."""
        return self.scale.float() if self.scale.is_floating_point() else self.spec.scale_format.decode(self.scale)

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
        codes = self.stored_codes()[:self.plan.k].t().to(torch.int16) + self.offset
        return codes.to(self.spec.qformat.storage_dtype()).contiguous()

    def quantizer(self) -> WeightQuantizer:
        """A WeightQuantizer with this weight's qparams (float32, block_view layout)."""
        quantizer = WeightQuantizer(self.spec)
        quantizer.scale = self.spec.grain.from_output(self.scale_values())
        if not self.spec.symmetric:
            quantizer.zero_point = self.spec.grain.from_output(self.zero_point.float() + self.offset)
        return quantizer

    def resident_bytes(self) -> int:
        own = sum(t.numel() * t.element_size() for t in self.buffers())
        return own + sum(self.backend.prepared_nbytes(p) for p in self.prepared or ())

    def extra_repr(self) -> str:
        layout = "int4 nibbles" if self.nibbles else ("int8" if self.codes is not None else "prepared")
        layout = f"{self.backend.name} fused" if self.fused is not None else layout
        levels = "" if self.levels is None else f", codes x {self.unit:g} = int8 levels"
        return (f"{self.spec.format} {self.spec.granularity}, {layout}{levels}, "
                f"segments={self.plan.count}x{self.plan.length}")

