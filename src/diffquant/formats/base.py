"""Number formats: the grid a quantized value lives on.

A format knows its code range and how to put a real number (already divided by the scale and shifted
by the zero point) onto its grid. Formats are registered by a name pattern, so floating-point,
logarithmic and binary formats are added later as new registry entries, not new code paths:

    @register_format(r"fp8_e4m3")
    def _(match): return FloatFormat(...)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

_FORMATS: list[tuple[re.Pattern[str], Callable[[re.Match[str]], QFormat]]] = []


class SpecError(ValueError):
    """An invalid quantization spec or recipe entry."""


class UnknownFormatError(SpecError):
    """Raised for a format name no registry entry understands."""


@dataclass(frozen=True)
class QFormat:
    """A quantization grid. Subclasses define the code range and the rounding onto the grid."""

    name: str
    bits: int

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


@dataclass(frozen=True)
class IntFormat(QFormat):
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
