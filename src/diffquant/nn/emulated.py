"""Frozen layers for weights the integer GEMM cannot hold: emulated, decoded to float per call.

Floating-point formats (nvfp4, fp8_e4m3, ...) and two-level (e4m3) scales have no CPU kernel here.
Their frozen layers keep the weight exactly as a checkpoint stores it — packed codes (tensors/
packing.py: fp4 two per byte), scales in their scale format (uint8 E4M3 bit patterns + the float32
global scale) — and per call decode it to a float matrix and run the float path of nn/packed.py
(`path="emulated"`, input fake-quantized by the layer's own quantizer, product in `float_dtype`):

    y = Q(x / smooth) @ decode(codes, scales)^T + bias (+ (x / smooth) @ L1 @ L2)

Same numbers as the fake-quant layer up to the float dtype of the product; what a real FP4 kernel
(NVIDIA Blackwell) would compute, at float speed and with 4.5 resident bits per nvfp4 weight.
`packed_type(layer)` is what freeze() asks for the packed module of a layer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from diffquant.formats.ops import decode_codes
from diffquant.formats.spec import QuantSpec
from diffquant.nn.layers import QConv2d, QLinear, QuantizedLayer
from diffquant.nn.packed import FLOAT_PATH, PACKED_TYPES, PATHS, KernelPath, PackedLayer, PackedLinear
from diffquant.nn.packed_conv import ConvGeometry, PackedConv2d
from diffquant.nn.packed_weight import gemm_weight
from diffquant.nn.quantizers import ActivationQuantizer, WeightQuantizer
from diffquant.tensors.packing import pack_format_codes, unpack_format_codes

EMULATED = "emulated"
# decode, then the float matmul / conv of PackedLinear / PackedConv2d
EMULATED_PATH = PATHS[EMULATED] = KernelPath(EMULATED, integer=False, product=FLOAT_PATH.product)


def needs_emulation(spec: QuantSpec) -> bool:
    """Weights the integer GEMM cannot hold (nn/packed_weight.py, gemm_weight): grids that are not integers
    times one power of two (FP8, FP6; FP4 is: CodeLevels), and two-level scales."""
    return not gemm_weight(spec)


class EmulatedWeight(nn.Module):
    """A frozen weight [N, K] as a checkpoint stores it; `dequantized` decodes it per call.

    Buffers: `codes` (packed stored codes, tensors/packing.py: uint8 [N, ceil(K/2)] for <= 4-bit
    formats, else [N, K]), `scale` (the scale format's storage of the [blocks, 1] block scales:
    uint8 E4M3 bit patterns for e4m3), `zero_point` (storage dtype [blocks, 1], or None),
    `global_scale` (float32 [1] for two-level scales, or None). `shape` / `dtype` / `device` answer
    like a float weight's; `prepared` is None (no kernel-side copy).
    """

    def __init__(self, codes: torch.Tensor, quantizer: WeightQuantizer, shape: torch.Size,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        spec, fmt = quantizer.spec, quantizer.spec.qformat
        self.spec, self.shape, self.dtype = spec, torch.Size(shape), dtype
        self.out_features, self.in_features = codes.shape
        self.prepared = None
        self.register_buffer("codes", pack_format_codes(codes, fmt))
        self.register_buffer("global_scale", _clone(quantizer.global_scale))
        self.register_buffer("scale", spec.scale_format.encode(quantizer.scale, quantizer.global_scale))
        zero = None if quantizer.zero_point is None else quantizer.zero_point.to(fmt.storage_dtype())
        self.register_buffer("zero_point", zero)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def layer_codes(self) -> torch.Tensor:
        """Stored codes [N, K] in the format's storage dtype, as a QuantizedLayer holds them."""
        return unpack_format_codes(self.codes, self.spec.qformat, self.in_features)

    def quantizer(self) -> WeightQuantizer:
        """A WeightQuantizer with this weight's qparams (the float32 scales the maths uses)."""
        quantizer = WeightQuantizer(self.spec)
        quantizer.scale = self.spec.scale_format.decode(self.scale, self.global_scale)
        quantizer.zero_point = None if self.zero_point is None else self.zero_point.float()
        quantizer.global_scale = _clone(self.global_scale)
        return quantizer

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The fake-quant layer's weight matrix, transposed: [K, N] in `dtype` (as PackedWeight's)."""
        scale = self.spec.scale_format.decode(self.scale, self.global_scale)
        zero = None if self.zero_point is None else self.zero_point.float()
        return decode_codes(self.layer_codes(), scale, zero, self.spec).t().to(dtype)

    def resident_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def extra_repr(self) -> str:
        spec = self.spec
        group = f"({spec.group_size})" if spec.group_size else ""
        return (f"{spec.format} {spec.granularity}{group}, {spec.bits}-bit codes, {spec.scale_dtype} scales, "
                f"emulated: decoded to float per call")


def _clone(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().clone()


class EmulatedPackedLinear(PackedLinear):
    """PackedLinear on the emulated path: an EmulatedWeight, always the float product.

    Same arguments as PackedLinear; `backend` is not used (there is no integer GEMM to run).
    """

    def __init__(self, codes: torch.Tensor, weight_quantizer: WeightQuantizer,
                 input_quantizer: ActivationQuantizer | None = None, bias: torch.Tensor | None = None,
                 smooth: torch.Tensor | None = None, low_rank: tuple[torch.Tensor, torch.Tensor] | None = None,
                 backend: object = None, float_dtype: torch.dtype | None = None) -> None:
        PackedLayer.__init__(self)  # not PackedLinear's: it would build the integer GEMM's weight
        self.out_features, self.in_features = codes.shape
        self.kernel = EMULATED_PATH
        weight = EmulatedWeight(codes, weight_quantizer, codes.shape)
        self._setup(weight, input_quantizer, bias, smooth, None, float_dtype)
        self._set_low_rank(low_rank)


class EmulatedPackedConv2d(PackedConv2d):
    """PackedConv2d on the emulated path (see EmulatedPackedLinear)."""

    def __init__(self, codes: torch.Tensor, weight_quantizer: WeightQuantizer, geometry: ConvGeometry,
                 input_quantizer: ActivationQuantizer | None = None, bias: torch.Tensor | None = None,
                 smooth: torch.Tensor | None = None, backend: object = None,
                 float_dtype: torch.dtype | None = None,
                 low_rank: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        PackedLayer.__init__(self)
        self.geometry = geometry
        self.kernel = EMULATED_PATH
        weight = EmulatedWeight(codes, weight_quantizer, geometry.weight_shape)
        self._setup(weight, input_quantizer, bias, smooth, None, float_dtype)
        self._set_low_rank(low_rank)


EMULATED_TYPES: dict[type[nn.Module], Callable[..., PackedLayer]] = {
    QLinear: EmulatedPackedLinear.from_layer,
    QConv2d: EmulatedPackedConv2d.from_layer,
}


def packed_type(layer: QuantizedLayer) -> Callable[..., PackedLayer]:
    """The packed-module factory for a layer with a weight quantizer: the integer GEMM's
    (nn/packed.py) where it can hold the weight, else the emulated one."""
    types = EMULATED_TYPES if needs_emulation(layer.weight_quantizer.spec) else PACKED_TYPES
    return types[type(layer)]
