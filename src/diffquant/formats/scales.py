"""Scale formats (QuantSpec.scale_dtype): how block scales are rounded, held in memory and stored.

    float32 | float16 | bfloat16   rounded *up* to the dtype (round_scale), so no block's extreme value
                                   clips; stored in that dtype.
    e4m3                           two-level, as NVIDIA's NVFP4: stored as uint8 E4M3 bit patterns
                                   (formats/floating.py) plus one float32 global scale per tensor.
    e8m0                           one-level powers of two, as the OCP MX formats (mxfp4, ...): one
                                   uint8 per block, the biased exponent.

Two-level scaling. E4M3 spans 2^-9 .. 448 with 3 mantissa bits, while block scales (absmax / 6 for
fp4 values) of a weight sit around 1e-3 and those of activations anywhere. One float32 global scale
g per tensor maps the largest block scale onto E4M3's maximum:

    g = amax / (6 * 448),    s_b' = E4M3(s_b / g),     scale the maths uses: s_b' * g (float32)

so every block scale keeps E4M3's relative precision (3 mantissa bits) over the ~15 binades below
the largest one, then subnormal precision for ~3 more.
"Tensor" is whatever one qparams computation sees: the whole weight, the whole input of a call
for dynamic activations (its blocks' scales then depend on the other rows of the batch through g,
as with any per-tensor range), one calibrated range for static ones.

Rounding of s_b / g: to the nearest E4M3 value (ties to even), as NVIDIA's conversion does, not up.
Up would guarantee that no block's absmax clips (it would land in [6/1.125, 6] instead of up to
6/0.9375 = 6.4), but E4M3's steps are up to 12.5% wide: shrinking every block's grid by up to 12.5%
costs more than the rare clipping of a block's largest value to 6, which then errs by at most
0.4 code units, less than half the 4 -> 6 step it sits in anyway. Measured with nvfp4 on seeded
N(0, 1) [256, 1024]: 20.4 dB SQNR nearest, 20.0 dB up, 20.5 dB with exact float32 block scales
(Student-t, 3 degrees of freedom: 20.8 vs 20.0); tests/formats/test_fp4.py pins the comparison.
The largest block's scale maps to 448, so the tensor's absmax never clips. Subnormal E4M3 values
are used (a block scale under 2^-6 * g, i.e. 1/28672 of the largest, keeps some precision instead
of being clamped up to the smallest normal); blocks of zeros get the smallest positive value (their
codes are 0 either way; no scale is ever 0). Global scale, block scale bytes and codes agree
bitwise with torchao's nvfp4_quantize (checked once on Gaussian tensors without such tiny blocks).

E8M0 (OCP MX v1.0): a block scale is 2^x, x in [-127, 127], stored as the byte x + 127 (255, the
spec's NaN, is never written). Its rounding is the spec's: x = floor(log2(block absmax)) - emax_elem,
emax_elem = floor(log2(element max)), the exponent of the element format's largest normal (E2M1 2,
E2M3 2, E3M2 4, E4M3 8, E5M2 15); elements saturate to +-max. A block's absmax / 2^x then lies in
[2^emax, 2^(emax+1)): up to max (6 for E2M1) on the grid, above it (6..8) clipped to max. The rule
needs the block's absmax, not the raw scale absmax / max that `round` gets (where that is a float32
subnormal its rounding moves blocks across a power of two: 2^-118 / 448 * 448 < 2^-118), so
qparams_from_range calls `block_scales(extent, code_extent)`: the other formats round
extent / code_extent there as before; e8m0 reads the absmax's exponent exactly (frexp) and emax from
code_extent (the element max when symmetric; on an integer grid floor(log2 qmax), e.g. 2^(e - 6) for
int8, MXINT8's scale). `round` alone (a learned step size: LSQ's write-back) rounds *up* to a power
of two (torchao's "CEIL" mode), so nothing clips. Exponents are clamped to [-127, 127]: an all-zero
block gets 2^-127 (codes 0), and blocks below 2^(emax - 127) keep that smallest scale. Powers of two
waste up to a binade of the element range: on seeded N(0, 1) [256, 1024] MXFP4 measures 1.7 dB
below NVFP4 (tests/formats/test_mx.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from diffquant.formats.base import SpecError, get_format
from diffquant.formats.floating import FloatFormat

_EPS = torch.finfo(torch.float32).tiny


def round_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round scales to their storage dtype, upwards, so the block's extreme value never clips.

    Returned in float32 (values exactly representable in `dtype`), clamped to dtype's smallest normal.
    """
    if dtype == torch.float32:
        return scale
    tiny = torch.finfo(dtype).tiny
    rounded = scale.clamp(min=tiny).to(dtype)
    low = rounded.float() < scale
    rounded = torch.where(low, torch.nextafter(rounded, torch.full_like(rounded, float("inf"))), rounded)
    return rounded.float()


@dataclass(frozen=True)
class ScaleFormat:
    """How block scales are rounded (`round`), held (`torch_dtype`) and stored (`encode` / `decode`).

    Scales are always the ones the maths multiplies by (float32 values). Two-level formats also take
    the tensor's global scale (`global_scale`, float32 [1]); one-level formats take None there.
    """

    name: str

    @property
    def torch_dtype(self) -> torch.dtype:
        """dtype in which the scales the maths uses are exactly representable."""
        raise NotImplementedError

    @property
    def two_level(self) -> bool:
        return False

    def global_scale(self, extent: torch.Tensor, code_extent: float) -> torch.Tensor | None:
        """The per-tensor global scale (None: one-level format) for a tensor whose largest block
        extent (absmax when symmetric) maps onto `code_extent` code units (6 for fp4)."""
        return None

    def round(self, scale: torch.Tensor, global_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Raw (positive or zero) block scales -> representable scales, float32, never 0."""
        raise NotImplementedError

    def block_scales(self, extent: torch.Tensor, code_extent: float,
                     global_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Representable scales of blocks whose `extent` (absmax when symmetric) maps onto
        `code_extent` code units: round(extent / code_extent) unless a format rounds from the extent."""
        return self.round(extent / code_extent, global_scale)

    def encode(self, scale: torch.Tensor, global_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Rounded scales -> what a checkpoint stores."""
        raise NotImplementedError

    def decode(self, stored: torch.Tensor, global_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Inverse of encode: bitwise the rounded scales."""
        raise NotImplementedError


@dataclass(frozen=True)
class DtypeScale(ScaleFormat):
    """Scales in a torch float dtype, rounded up (round_scale)."""

    dtype: torch.dtype = torch.float32

    @property
    def torch_dtype(self) -> torch.dtype:
        return self.dtype

    def round(self, scale: torch.Tensor, global_scale: torch.Tensor | None = None) -> torch.Tensor:
        return round_scale(scale.clamp(min=_EPS), self.dtype)

    def encode(self, scale: torch.Tensor, global_scale: torch.Tensor | None = None) -> torch.Tensor:
        return scale.to(self.dtype)

    def decode(self, stored: torch.Tensor, global_scale: torch.Tensor | None = None) -> torch.Tensor:
        return stored.float()


@dataclass(frozen=True)
class TwoLevelScale(ScaleFormat):
    """Block scales on a small float grid (`element`, e.g. fp8_e4m3) times a float32 global scale."""

    element: FloatFormat | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float32  # grid value x global scale: a float32 product

    @property
    def two_level(self) -> bool:
        return True

    def global_scale(self, extent: torch.Tensor, code_extent: float) -> torch.Tensor:
        # one division by 6 * 448, as NVIDIA's reference (amax / (448 * 6)): the same float32 bits
        peak = extent.detach().float().reshape(1)
        return torch.where(peak > 0, peak / (code_extent * self.element.qmax), torch.ones_like(peak))

    def grid_values(self, scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
        """Block scales in units of the global scale, on the element grid (nearest, ties to even)."""
        units = self.element.round(scale.float() / global_scale)
        return units.clamp(self.element.min_positive, self.element.qmax)

    def round(self, scale: torch.Tensor, global_scale: torch.Tensor | None = None) -> torch.Tensor:
        global_scale = _required(global_scale, self.name)
        return self.grid_values(scale, global_scale) * global_scale

    def encode(self, scale: torch.Tensor, global_scale: torch.Tensor | None = None) -> torch.Tensor:
        # scale = v * g rounded once in float32: scale / g is within a few float32 ulps of v, far
        # inside half an E4M3 step, so rounding it again recovers v exactly.
        return self.element.encode(self.grid_values(scale, _required(global_scale, self.name)))

    def decode(self, stored: torch.Tensor, global_scale: torch.Tensor | None = None) -> torch.Tensor:
        return self.element.decode(stored) * _required(global_scale, self.name)


def _required(global_scale: torch.Tensor | None, name: str) -> torch.Tensor:
    if global_scale is None:
        raise ValueError(f"{name} scales are two-level: the tensor's global scale is needed")
    return global_scale.float()


# E8M0: float32 bits of 2^(code - 127). Codes 1..254 are normal float32 powers of two (the biased
# exponents agree); code 0 is 2^-127, a float32 subnormal; 255 is the spec's NaN.
_E8M0_BIAS = 127
_E8M0_NAN = 255
_FLOAT32_MANTISSA_BITS = 23
_FLOAT32_2_POW_M127 = 1 << (_FLOAT32_MANTISSA_BITS - 1)


@dataclass(frozen=True)
class PowerOfTwoScale(ScaleFormat):
    """OCP MX E8M0 scales: 2^x, x in [-127, 127], stored as the uint8 x + 127 (module docstring)."""

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float32  # every 2^x, x in [-127, 127], is a float32 (2^-127 a subnormal)

    def round(self, scale: torch.Tensor, global_scale: torch.Tensor | None = None) -> torch.Tensor:
        mantissa, exponent = torch.frexp(scale.detach().float())  # scale = mantissa * 2^exponent, [0.5, 1)
        ceil_log2 = exponent - (mantissa == 0.5).to(exponent.dtype)
        return self._from_exponents(ceil_log2, scale > 0)

    def block_scales(self, extent: torch.Tensor, code_extent: float,
                     global_scale: torch.Tensor | None = None) -> torch.Tensor:
        emax = math.frexp(code_extent)[1] - 1  # floor(log2(code_extent)): 2 for E2M1's 6
        floor_log2 = torch.frexp(extent.detach().float())[1] - 1
        return self._from_exponents(floor_log2 - emax, extent > 0)

    def _from_exponents(self, exponent: torch.Tensor, nonzero: torch.Tensor) -> torch.Tensor:
        exponent = torch.where(nonzero, exponent.clamp(-_E8M0_BIAS, _E8M0_BIAS), -_E8M0_BIAS)
        return self.decode((exponent + _E8M0_BIAS).to(torch.uint8))

    def encode(self, scale: torch.Tensor, global_scale: torch.Tensor | None = None) -> torch.Tensor:
        bits = scale.detach().float().view(torch.int32)
        codes = torch.where(bits == _FLOAT32_2_POW_M127, 0, bits >> _FLOAT32_MANTISSA_BITS)
        codes = codes.clamp(0, _E8M0_NAN - 1).to(torch.uint8)
        if not torch.equal(self.decode(codes), scale.detach().float()):
            raise ValueError(f"{self.name}: encode() takes powers of two 2^-127 .. 2^127 (rounded scales)")
        return codes

    def decode(self, stored: torch.Tensor, global_scale: torch.Tensor | None = None) -> torch.Tensor:
        if stored.dtype != torch.uint8:
            raise ValueError(f"{self.name} scales are stored as uint8 biased exponents, got {stored.dtype}")
        if bool((stored == _E8M0_NAN).any()):
            raise ValueError(f"{self.name} scale code {_E8M0_NAN} is NaN (never written by diffquant)")
        codes = stored.to(torch.int32)
        bits = torch.where(codes == 0, _FLOAT32_2_POW_M127, codes << _FLOAT32_MANTISSA_BITS)
        return bits.view(torch.float32)


_SCALE_FORMATS: dict[str, ScaleFormat] = {}


def register_scale_format(fmt: ScaleFormat) -> ScaleFormat:
    _SCALE_FORMATS[fmt.name] = fmt
    return fmt


for _dtype in (torch.float32, torch.float16, torch.bfloat16):
    register_scale_format(DtypeScale(name=str(_dtype).removeprefix("torch."), dtype=_dtype))
register_scale_format(TwoLevelScale(name="e4m3", element=get_format("fp8_e4m3")))
register_scale_format(PowerOfTwoScale(name="e8m0"))


def known_scale_formats() -> list[str]:
    return list(_SCALE_FORMATS)


def get_scale_format(name: str | torch.dtype | ScaleFormat) -> ScaleFormat:
    """A scale format by name ('float16', 'e4m3'); torch dtypes and ScaleFormats are accepted too."""
    if isinstance(name, ScaleFormat):
        return name
    key = str(name).removeprefix("torch.") if isinstance(name, torch.dtype) else name
    if key not in _SCALE_FORMATS:
        raise SpecError(f"scale_dtype must be one of {known_scale_formats()}, got {name!r}")
    return _SCALE_FORMATS[key]
