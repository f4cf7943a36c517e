"""Activation codes of a frozen layer's input: the same expression as the fake-quant ActivationQuantizer,
offset-centred to signed int8 for the integer GEMM (nn/packed.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffquant.formats.base import QFormat
from diffquant.formats.ops import quantize, quantize_blocks
from diffquant.formats.scales import get_scale_format
from diffquant.formats.spec import QuantSpec
from diffquant.kernels import IntGemmBackend
from diffquant.nn.packed_weight import code_offset, integer_codes
from diffquant.nn.quantizers import ActivationQuantizer

FLOAT32_SCALES = get_scale_format(torch.float32)  # what the backends' fused quantizers compute

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
        shape = (rows, -1) if spec.grain.ranges_per_row else (1, 1)
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
    if (fused is None or not spec.dynamic or not spec.symmetric or not spec.grain.ranges_per_row or not fmt.signed
            or not integer_codes(spec) or spec.scale_format != FLOAT32_SCALES):
        return None
    segment = spec.grain.segment(spec.group_size)
    length = x2d.shape[1] if segment is None else segment
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


def needs_input_sums(input_quantizer: ActivationQuantizer | None) -> bool:
    if input_quantizer is None:
        return False
    spec = input_quantizer.spec
    return not spec.symmetric or not spec.qformat.signed

