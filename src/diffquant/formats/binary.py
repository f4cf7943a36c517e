"""The 1-bit sign format "binary" (BinaryDM, METHODS.md §7): every weight is ±σ of its block.

Grid values -1 and +1 (no zero: sign(0) is +1 here, so every code is one bit); stored codes are those
integers as int8, so an int8 GEMM multiplies them as they are (nn.packed_weight), and a checkpoint packs
them 8 per byte (tensors/packing.py, layout "bits"). Symmetric only (a zero point would leave the grid).

Its weight scale is fitted, not spanned: σ·sign(w) is closest to w in L2 at σ = mean |w| of the block
(XNOR-Net's closed form; BinaryDM's initialisation), where a range-spanning scale (max |w|) would put
every weight at the block's extreme. `weight_range` hands the calibration ±mean|w|, which the scale
format then rounds like any other extent (up, in float16 / bfloat16).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffquant.formats.base import IntegerCodes, QFormat, register_format


@dataclass(frozen=True)
class BinaryFormat(IntegerCodes):
    """Codes ±1: one bit per value (module docstring)."""

    @property
    def qmin(self) -> float:
        return -1.0

    @property
    def qmax(self) -> float:
        return 1.0

    @property
    def has_zero_point(self) -> bool:
        return False

    @property
    def for_activations(self) -> bool:
        return False

    def round(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    def storage_dtype(self) -> torch.dtype:
        return torch.int8

    def weight_range(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = blocks.detach().float().abs().mean(dim=-1, keepdim=True)
        return -sigma, sigma


@register_format(r"binary")
def _binary_format(match) -> QFormat:
    return BinaryFormat(name=match.group(0), bits=1)
