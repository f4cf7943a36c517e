"""Number formats: the grid a quantized value lives on.

A format knows its code range and how to put a real number (already divided by the scale and shifted
by the zero point) onto its grid. Formats are registered by a name pattern, so floating-point,
logarithmic and binary formats are new registry entries, not new code paths (formats/floating.py
registers the floating-point family that way):

    @register_format(r"log4")
    def _(match): return LogFormat(...)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

_FORMATS: list[tuple[re.Pattern[str], Callable[[re.Match[str]], QFormat]]] = []


class SpecError(ValueError):
    """An invalid quantization spec or recipe entry."""


class UnknownFormatError(SpecError):
    """Raised for a format name no registry entry understands."""


@dataclass(frozen=True)
class QFormat:
    """A quantization grid. Subclasses define the code range and the rounding onto the grid.

    Two views of a quantized value: its grid value in code units (what quantize() returns and
    dequantize() scales; integers for integer formats, E2M1 values for fp4) and its stored code,
    the bit pattern a checkpoint keeps (`encode` / `decode`; the same integers for integer formats).

    spec_defaults: QuantSpec fields the format fixes, as (field, value) pairs — a block format such
    as nvfp4 names its block size and scale format, so a spec need only say `format: nvfp4`.
    """

    name: str
    bits: int
    spec_defaults: tuple[tuple[str, Any], ...] = field(default=(), kw_only=True)

    @property
    def qmin(self) -> float:
        raise NotImplementedError

    @property
    def qmax(self) -> float:
        raise NotImplementedError

    @property
    def signed(self) -> bool:
        return self.qmin < 0

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest grid value to x (x already in code units); no clamping."""
        raise NotImplementedError

    def storage_dtype(self) -> torch.dtype:
        """Integer dtype that holds one code (before any sub-byte packing)."""
        raise NotImplementedError

    @property
    def codes_signed(self) -> bool:
        """Whether stored codes are two's complement (else plain binary): what packing needs."""
        return self.storage_dtype().is_signed

    @property
    def has_zero_point(self) -> bool:
        """Whether affine (asymmetric) ranges make sense: a zero point shifts codes on the grid."""
        return True

    @property
    def for_activations(self) -> bool:
        """Whether a layer input may take this format (binary's fitted scale is a weight's)."""
        return True

    @property
    def integer_codes(self) -> bool:
        """Whether the stored codes are the grid values as integers, which an int8 GEMM multiplies as they are."""
        return False

    def weight_range(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, hi) [blocks, 1] a weight's scale is calibrated from: the blocks' own range, unless the
        format fits its scale otherwise (binary: ±mean |w|)."""
        blocks = blocks.detach()
        return blocks.amin(dim=-1, keepdim=True), blocks.amax(dim=-1, keepdim=True)

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        """Grid values (in code units, within [qmin, qmax]) -> stored codes in storage_dtype()."""
        raise NotImplementedError

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Stored codes -> grid values as float32; decode(encode(v)) == v exactly."""
        raise NotImplementedError


@dataclass(frozen=True)
class IntegerCodes(QFormat):
    """A format whose stored codes are its grid values as integers (int8 / uint8), which an int8 GEMM
    multiplies as they are."""

    @property
    def integer_codes(self) -> bool:
        return True

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        return values.to(self.storage_dtype())

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.float()


@dataclass(frozen=True)
class IntFormat(IntegerCodes):
    """Two's-complement (signed) or plain binary (unsigned) integers of 2-8 bits."""

    is_signed: bool = True

    @property
    def qmin(self) -> float:
        return float(-(2 ** (self.bits - 1))) if self.is_signed else 0.0

    @property
    def qmax(self) -> float:
        return float(2 ** (self.bits - 1) - 1) if self.is_signed else float(2**self.bits - 1)

    def round(self, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)  # round-half-to-even, as torch.round

    def storage_dtype(self) -> torch.dtype:
        return torch.int8 if self.is_signed else torch.uint8


def register_format(pattern: str) -> Callable:
    """Register a factory for format names fully matching `pattern` (a regular expression)."""

    def wrap(factory: Callable[[re.Match[str]], QFormat]) -> Callable:
        _FORMATS.append((re.compile(pattern), factory))
        return factory

    return wrap


@register_format(r"(u?)int(\d+)")
def _int_format(match: re.Match[str]) -> QFormat:
    bits = int(match.group(2))
    if not 2 <= bits <= 8:
        raise UnknownFormatError(
            f"unsupported bit width {bits} in format {match.group(0)!r}: integer formats take 2-8 bits"
        )
    return IntFormat(name=match.group(0), bits=bits, is_signed=match.group(1) != "u")


def get_format(name: str) -> QFormat:
    """Parse a format name such as 'int8', 'uint4' into its QFormat."""
    for pattern, factory in _FORMATS:
        match = pattern.fullmatch(name)
        if match:
            return factory(match)
    patterns = ", ".join(known_format_patterns())
    raise UnknownFormatError(f"unknown number format {name!r}; known name patterns: {patterns}")


def known_format_patterns() -> list[str]:
    return [p.pattern for p, _ in _FORMATS]
