"""Floating-point element formats (fp4_e2m1, fp6_e2m3, fp6_e3m2, fp8_e4m3, fp8_e5m2, ...) and the
block formats built on them (nvfp4; the OCP MX formats mxfp8_e4m3, mxfp8_e5m2, mxfp6_e3m2,
mxfp6_e2m3, mxfp4).

A code with sign s, exponent field E (e bits) and mantissa field F (m bits) has the value

    (-1)^s * 2^(E - bias) * (1 + F / 2^m)     E >= 1 (normal)
    (-1)^s * 2^(1 - bias) * (F / 2^m)         E == 0 (subnormal),      bias = 2^(e-1) - 1

Which of the top codes are not finite follows each format's convention (`nonfinite_codes`, counted
from the largest magnitude down): OCP MX FP4/FP6 have none; FP8 E4M3 ("fn") keeps only S.1111.111
for NaN, so its maximum is 448; FP8 E5M2 is IEEE-like (its top exponent is inf/NaN), maximum 57344.

Stored code: the bit pattern, sign bit highest (sign-magnitude), in a uint8. For E2M1:

    code 0..7  ->  +{0, 0.5, 1, 1.5, 2, 3, 4, 6}        code 8..15  ->  the same, negated

Magnitude codes are ordered like their values, so encoding is a search in the table of magnitudes
and decoding one lookup in the table of all 2^bits codes (non-finite ones, never encoded, give NaN).

Rounding: to the nearest representable value, ties to the even code (mantissa LSB 0), i.e. IEEE
round-to-nearest-even as hardware conversions do (e.g. 5 -> 4 and 2.5 -> 2 in E2M1). It is
arithmetic, not a table search: in the binade 2^b of |x| (b not below the subnormal binade) the grid
spacing is 2^(b - m), read off x's float32 exponent bits, so round(x / 2^(b - m)) * 2^(b - m) with
torch.round's half-to-even picks the even code, including across a binade boundary (4 passes over x). No clamping, as QFormat.round promises: values past
the maximum land on the exponent-extended grid and quantize() clamps them to +-max, which is then
also the nearest finite value.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

from diffquant.formats.base import QFormat, UnknownFormatError, register_format

_FLOAT32_EXPONENT = 0x7F800000  # exponent field of a float32's bits

# Non-finite top codes of the OCP FP8 formats; every other split (the other 8-bit ones, E1M6 ... E6M1, which
# a format search may pick: METHODS.md §9; formats of fewer bits, OCP MX) has none.
_FP8_NONFINITE = {(4, 3): 1, (5, 2): 4}

# NVIDIA NVFP4: E2M1 values in blocks of 16 along the input axis, each block scaled by an E4M3 value,
# all of a tensor's blocks by one fp32 global scale (formats/scales.py).
NVFP4_SPEC = (("granularity", "group"), ("group_size", 16), ("scale_dtype", "e4m3"))

# OCP Microscaling (MX v1.0): blocks of 32 along the input axis, each scaled by a power of two (E8M0,
# formats/scales.py), no global scale. Elements are the OCP element formats above (FP8 E4M3 keeps its
# one NaN code, E5M2 its inf/NaN exponent; FP6 and FP4 have no non-finite codes).
MX_SPEC = (("granularity", "group"), ("group_size", 32), ("scale_dtype", "e8m0"))
MX_ELEMENTS = {"mxfp8_e4m3": (4, 3), "mxfp8_e5m2": (5, 2), "mxfp6_e3m2": (3, 2), "mxfp6_e2m3": (2, 3), "mxfp4": (2, 1)}


@dataclass(frozen=True)
class FloatFormat(QFormat):
    """Sign + exponent_bits + mantissa_bits, with subnormals; codes are sign-magnitude bit patterns."""

    exponent_bits: int
    mantissa_bits: int
    nonfinite_codes: int = 0

    @property
    def bias(self) -> int:
        return 2 ** (self.exponent_bits - 1) - 1

    @property
    def min_exponent(self) -> int:
        """Exponent of the lowest normal binade; subnormals share its spacing."""
        return 1 - self.bias

    @property
    def magnitudes(self) -> torch.Tensor:
        """float32 value of every finite magnitude code, indexed by the code (ascending)."""
        return _magnitudes(self.exponent_bits, self.mantissa_bits, self.nonfinite_codes)

    @property
    def qmax(self) -> float:
        return float(self.magnitudes[-1])

    @property
    def qmin(self) -> float:
        return -self.qmax

    @property
    def min_positive(self) -> float:
        """Smallest positive (subnormal) value."""
        return float(self.magnitudes[1])

    @property
    def has_zero_point(self) -> bool:
        return False  # a sign bit and a non-uniform grid: only symmetric ranges

    def storage_dtype(self) -> torch.dtype:
        return torch.uint8

    def round(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        # spacing 2^(binade - m) straight from x's float32 exponent field (the sign bit is not in it),
        # the binade no lower than the subnormals'; torch.round is symmetric, so no abs / copysign
        field = (xf.view(torch.int32) & _FLOAT32_EXPONENT).clamp_(min=(self.min_exponent + 127) << 23)
        spacing = field.sub_(self.mantissa_bits << 23).view(torch.float32)
        return (xf / spacing).round_().mul_(spacing).to(x.dtype)

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        table = self.magnitudes
        a = values.detach().float().abs()
        code = torch.searchsorted(table, a).clamp(max=table.numel() - 1)
        if not torch.equal(table[code], a):
            raise ValueError(f"{self.name}: encode() takes values on the format's grid (quantize() output)")
        sign = torch.signbit(values.detach()).to(torch.int64) << (self.bits - 1)
        return (code | sign).to(torch.uint8)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return _code_values(self.exponent_bits, self.mantissa_bits, self.nonfinite_codes)[codes.long()]

    @property
    def values(self) -> torch.Tensor:
        """Every finite value, ascending float32, -max .. max, zero once (as +0)."""
        return _signed_values(self.exponent_bits, self.mantissa_bits, self.nonfinite_codes)

    def neighbours(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, hi), float32: adjacent grid values with lo <= x <= hi, no value strictly between them.

        x on the grid gives lo = x and hi the next value up; from +-max on (|x| >= max) both are the
        saturated value, as quantize() clamps. x in code units, like round().
        """
        values = self.values
        last = values.numel() - 1
        xf = x.detach().float().contiguous()
        above = torch.searchsorted(values, xf, right=True)  # how many values are <= x
        hi = torch.where(xf <= values[0], values[0], values[above.clamp(max=last)])
        return values[(above - 1).clamp(0, last)], hi


@functools.cache
def _code_values(exponent_bits: int, mantissa_bits: int, nonfinite: int) -> torch.Tensor:
    """float32 value of every code, sign bit included; non-finite codes (never encoded) give NaN."""
    finite = _magnitudes(exponent_bits, mantissa_bits, nonfinite)
    magnitudes = torch.cat([finite, torch.full((nonfinite,), float("nan"))])
    return torch.cat([magnitudes, -magnitudes])


@functools.cache
def _signed_values(exponent_bits: int, mantissa_bits: int, nonfinite: int) -> torch.Tensor:
    magnitudes = _magnitudes(exponent_bits, mantissa_bits, nonfinite)
    return torch.cat([-magnitudes[1:].flip(0), magnitudes])


@functools.cache
def _magnitudes(exponent_bits: int, mantissa_bits: int, nonfinite: int) -> torch.Tensor:
    codes = torch.arange(2 ** (exponent_bits + mantissa_bits) - nonfinite, dtype=torch.float64)
    field, mantissa = torch.div(codes, 2**mantissa_bits, rounding_mode="floor"), codes % 2**mantissa_bits
    bias = 2 ** (exponent_bits - 1) - 1
    normal = (2**mantissa_bits + mantissa) * torch.pow(2.0, field - bias - mantissa_bits)
    subnormal = mantissa * 2.0 ** (1 - bias - mantissa_bits)
    return torch.where(field == 0, subnormal, normal).float()


@register_format(r"fp(\d)_e(\d)m(\d)")
def _float_format(match: re.Match[str]) -> FloatFormat:
    bits, exponent_bits, mantissa_bits = (int(g) for g in match.groups())
    name = match.group(0)
    if bits != 1 + exponent_bits + mantissa_bits or exponent_bits < 1:
        raise UnknownFormatError(f"format {name!r}: sign + e{exponent_bits} + m{mantissa_bits} is not {bits} bits")
    if not 3 <= bits <= 8:
        raise UnknownFormatError(f"unsupported floating-point format {name!r}: 3-8 bits")
    nonfinite = _FP8_NONFINITE.get((exponent_bits, mantissa_bits), 0)
    return FloatFormat(name=name, bits=bits, exponent_bits=exponent_bits, mantissa_bits=mantissa_bits,
                       nonfinite_codes=nonfinite)


@register_format(r"nvfp4")
def _nvfp4(match: re.Match[str]) -> FloatFormat:
    return FloatFormat(name="nvfp4", bits=4, exponent_bits=2, mantissa_bits=1, spec_defaults=NVFP4_SPEC)


@register_format(r"mxfp8_e4m3|mxfp8_e5m2|mxfp6_e3m2|mxfp6_e2m3|mxfp4")
def _mx(match: re.Match[str]) -> FloatFormat:
    name = match.group(0)
    exponent_bits, mantissa_bits = MX_ELEMENTS[name]
    bits = 1 + exponent_bits + mantissa_bits
    return FloatFormat(name=name, bits=bits, exponent_bits=exponent_bits, mantissa_bits=mantissa_bits,
                       nonfinite_codes=_FP8_NONFINITE[(exponent_bits, mantissa_bits)] if bits == 8 else 0,
                       spec_defaults=MX_SPEC)
