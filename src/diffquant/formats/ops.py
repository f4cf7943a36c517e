"""Reference quantization maths in plain torch: the oracle every fast kernel is tested against.

Conventions: tensors are laid out with the quantized feature axis LAST. Ranges are computed per
"block" by `block_view`, which reshapes x to [blocks, block_len]; scales and zero points then have
shape [blocks, 1] and broadcast against that view.

    codes = clamp(round(x / s) + z, qmin, qmax)      (z = 0 when symmetric)
    x_hat = (codes - z) * s

"codes" here are grid values in code units: integers for integer formats, values such as 1.5 or
-6 for fp4_e2m1. QFormat.encode / decode map them to and from the bit patterns a checkpoint stores.
"""

from __future__ import annotations

import torch

from diffquant.formats.base import QFormat
from diffquant.formats.granularity import Granularity, get_granularity
from diffquant.formats.scales import ScaleFormat, get_scale_format, round_scale  # noqa: F401  (round_scale: re-exported)
from diffquant.formats.spec import QuantSpec


def block_view(x: torch.Tensor, granularity: str | Granularity, group_size: int | None = None) -> torch.Tensor:
    """Reshape (feature axis last) to [blocks, block_len] so each row shares one range.

    "tensor": one block. "channel"/"token" along rows of the feature axis: one block per leading
    index (for a [out, K] weight that is per output channel; for activations, per token).
    "group": blocks of group_size along the feature axis. (Granularity.view; a name or the object.)
    """
    return get_granularity(granularity).view(x, group_size)


def unblock_view(xb: torch.Tensor, shape: torch.Size, granularity: str | Granularity) -> torch.Tensor:
    """Inverse of block_view for a tensor of the original `shape`."""
    return get_granularity(granularity).unview(xb, shape)


def range_extent(lo: torch.Tensor, hi: torch.Tensor, fmt: QFormat, symmetric: bool) -> tuple[torch.Tensor, float]:
    """(extent of [lo, hi], extent of the codes it maps onto): the unrounded scale is their ratio."""
    if not symmetric:
        lo = torch.minimum(lo, torch.zeros_like(lo))
        hi = torch.maximum(hi, torch.zeros_like(hi))
        return hi - lo, fmt.qmax - fmt.qmin
    if fmt.signed:
        return torch.maximum(lo.abs(), hi.abs()), fmt.qmax
    return hi.clamp(min=0), fmt.qmax  # unsigned symmetric: non-negative inputs, zero at code 0


def global_scale_from_range(
    lo: torch.Tensor, hi: torch.Tensor, fmt: QFormat, symmetric: bool, scale_format: ScaleFormat | torch.dtype
) -> torch.Tensor | None:
    """The per-tensor global scale of a two-level scale format over all these blocks (else None)."""
    extent, code_extent = range_extent(lo, hi, fmt, symmetric)
    return get_scale_format(scale_format).global_scale(extent.amax(), code_extent)


def qparams_from_range(
    lo: torch.Tensor, hi: torch.Tensor, fmt: QFormat, symmetric: bool, scale_format: ScaleFormat | torch.dtype,
    global_scale: torch.Tensor | None = None, relative_floor: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point (None when symmetric) covering [lo, hi] on the format's grid.

    scale_format: a ScaleFormat (QuantSpec.scale_format) or a torch float dtype. Two-level formats
    use `global_scale`, computed over all the given blocks when None (global_scale_from_range).
    relative_floor: no block's extent below this fraction of the median block's (blocks seen only at or
    near 0 are exact under either step, and a learned step's gradient divides by its square, which
    underflows to 0 at float32's smallest step).
    """
    scale_format = get_scale_format(scale_format)
    extent, code_extent = range_extent(lo, hi, fmt, symmetric)
    if relative_floor and extent.numel() > 1:
        extent = extent.clamp_min(extent.median() * relative_floor)
    if global_scale is None and scale_format.two_level:
        global_scale = scale_format.global_scale(extent.amax(), code_extent)
    scale = scale_format.block_scales(extent, code_extent, global_scale)  # e8m0 reads the extent itself
    if symmetric:
        return scale, None
    lo = torch.minimum(lo, torch.zeros_like(lo))
    zero_point = (fmt.qmin - torch.round(lo / scale)).clamp(fmt.qmin, fmt.qmax)
    return scale, zero_point


def round_ste(x: torch.Tensor, fmt: QFormat) -> torch.Tensor:
    """Round onto the format's grid with a straight-through (identity) gradient."""
    return x + (fmt.round(x) - x).detach()


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, fmt: QFormat) -> torch.Tensor:
    """Integer codes (as floats) of x; no gradient path."""
    codes = fmt.round(x / scale)
    if zero_point is not None:
        codes = codes + zero_point
    return codes.clamp(fmt.qmin, fmt.qmax)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    if zero_point is not None:
        codes = codes - zero_point
    return codes * scale


def decode_codes(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                 spec: QuantSpec) -> torch.Tensor:
    """Stored codes (QFormat.encode, feature axis last) -> the dequantized tensor of the same shape.

    Bitwise what fake_quantize gives for the tensor the codes were taken from.
    """
    blocks = spec.grain.view(spec.qformat.decode(codes), spec.group_size)
    return spec.grain.unview(dequantize(blocks, scale, zero_point), codes.shape)


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, fmt: QFormat
) -> torch.Tensor:
    """dequantize(quantize(x)) with a straight-through gradient inside the range, zero outside.

    Gradients also reach `scale` (and `zero_point`) when they require grad, as in LSQ.
    Computes exactly the same floating-point expression as quantize→dequantize, so a model
    reloaded from stored codes reproduces the fake-quantized outputs bitwise.
    """
    if not (x.requires_grad or scale.requires_grad):
        return dequantize(quantize(x, scale, zero_point, fmt), scale, zero_point)
    codes = round_ste(x / scale, fmt)
    if zero_point is not None:
        codes = codes + round_ste(zero_point, fmt)
        return (codes.clamp(fmt.qmin, fmt.qmax) - round_ste(zero_point, fmt)) * scale
    return codes.clamp(fmt.qmin, fmt.qmax) * scale


def block_range(xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (min, max) of a block view, detached."""
    xb = xb.detach()
    return xb.amin(dim=-1, keepdim=True), xb.amax(dim=-1, keepdim=True)


def fake_quantize_dynamic(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Fake-quantize x (feature axis last) with ranges computed from x itself."""
    xb = spec.grain.view(x, spec.group_size)
    lo, hi = block_range(xb)
    scale, zero_point = qparams_from_range(lo, hi, spec.qformat, spec.symmetric, spec.scale_format)
    return spec.grain.unview(fake_quantize(xb, scale, zero_point, spec.qformat), x.shape)


def quantize_blocks(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Codes [blocks, block_len], scale [blocks, 1], zero point [blocks, 1] or None for x (feature last)."""
    xb = spec.grain.view(x, spec.group_size)
    lo, hi = block_range(xb)
    scale, zero_point = qparams_from_range(lo, hi, spec.qformat, spec.symmetric, spec.scale_format)
    return quantize(xb, scale, zero_point, spec.qformat), scale, zero_point


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10·log10(Σ ref² / Σ (ref − approx)²)."""
    ref = reference.detach().double()
    noise = (ref - approx.detach().double()).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum() / noise))
