"""Frozen convolutions: `PackedConv2d` replaces a QConv2d (see nn/packed.py for the shared run-time,
the segment plan and the resident forms). The integer path multiplies the im2col patches of the input's
int8 codes, in (kh, kw, c_in) order like QConv2d's weight matrix, with the packed weight; per-pixel
input scales become kh*kw segments of the patch rows.

Conv2d decision (smoke scale; this 2-core AVX-512 VNNI machine while it trained models, so noisy;
torch 2.13, 1 thread, min of 7 runs, ms; fp32 / bf16 = F.conv2d; int = im2col over int8 codes in
(kh, kw, c_in) order + _int_mm, S segments; float = dequantized fp32 weight + fake-quantized input +
F.conv2d; every column includes quantizing the input):

    | conv, batch 2          | fp32 | bf16 | W8A8 tensor int / float | W8A8 token int / float | W4A4 g64 int / float |
    |------------------------|------|------|-------------------------|------------------------|----------------------|
    | 128->128 3x3 @ 32x32   | 10.8 |  7.2 |  8.3 / 12.9 (S=1)       | 10.8 / 11.2 (S=9)      | 17.2 / 11.7 (S=18)   |
    | 320->320 3x3 @ 32x32   | 72.5 | 39.8 | 24.7 / 84.0 (S=1)       | 48.4 / 87.2 (S=9)      | 71.3 / 86.4 (S=45)   |
    | 320->320 1x1 @ 32x32   |  6.2 |  2.6 |  4.3 /  9.8 (S=1)       |  8.2 / 16.3 (S=1)      |  9.4 / 16.0 (S=5)    |

The integer path is used for every ungrouped convolution with integer activation codes: it beats or
ties the float path and fp32 everywhere except small-channel group-wise W4A4 (many short segments;
native bf16 is competitive at 128 channels), and its im2col copy is
int8 (a quarter of an fp32 unfold); 1x1 convs need no copy at all (the patches are the pixels).
Grouped / depthwise convolutions, "same"/"valid" string padding and per-channel static inputs use
"float". Revisit with the full benchmark on an idle machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffquant.kernels import IntGemmBackend, select_backend
from diffquant.nn.layers import QConv2d, conv_low_rank
from diffquant.nn.packed import (
    PACKED_TYPES,
    PackedLayer,
    choose_path,
    input_split,
    layer_codes,
    packed_weight,
    register_low_rank,
    thawed,
)
from diffquant.nn.packed_activation import ActivationCodes, fit_codes, quantize_activation
from diffquant.nn.packed_weight import Epilogue, group_len, plan_segments
from diffquant.nn.quantizers import ActivationQuantizer, WeightQuantizer


@dataclass(frozen=True)
class ConvGeometry:
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] | str
    dilation: tuple[int, int]
    groups: int

    @classmethod
    def of(cls, conv: nn.Module) -> ConvGeometry:
        return cls(conv.in_channels, conv.out_channels, tuple(conv.kernel_size), tuple(conv.stride),
                   conv.padding if isinstance(conv.padding, str) else tuple(conv.padding), tuple(conv.dilation),
                   conv.groups)

    @property
    def weight_shape(self) -> torch.Size:
        return torch.Size((self.out_channels, self.in_channels // self.groups, *self.kernel_size))

    @property
    def im2col_ok(self) -> bool:
        return self.groups == 1 and not isinstance(self.padding, str)


def im2col(x: torch.Tensor, geometry: ConvGeometry, pad_value: float | torch.Tensor = 0) -> torch.Tensor:
    """x [B, H, W, C] (any dtype) -> patches [B*Ho*Wo, kh*kw*C], K ordered (kh, kw, c) like QConv2d's
    weight matrix; padding holds pad_value (a number, or one per channel [C]). A 1x1, stride-1,
    unpadded conv returns a view (no copy)."""
    (kh, kw), (sh, sw), (dh, dw) = geometry.kernel_size, geometry.stride, geometry.dilation
    ph, pw = geometry.padding
    if (ph or pw) and isinstance(pad_value, torch.Tensor):
        padded = pad_value.to(x.dtype).expand(x.shape[0], x.shape[1] + 2 * ph, x.shape[2] + 2 * pw, -1).clone()
        padded[:, ph:ph + x.shape[1], pw:pw + x.shape[2]] = x
        x = padded
    elif ph or pw:
        x = F.pad(x, (0, 0, pw, pw, ph, ph), value=pad_value)
    batch, height, width, channels = x.shape
    out_h, out_w = (height - dh * (kh - 1) - 1) // sh + 1, (width - dw * (kw - 1) - 1) // sw + 1
    sb, s_h, s_w, sc = x.stride()
    view = x.as_strided((batch, out_h, out_w, kh, kw, channels), (sb, s_h * sh, s_w * sw, s_h * dh, s_w * dw, sc))
    return view.reshape(batch * out_h * out_w, kh * kw * channels)


class PackedConv2d(PackedLayer):
    """Frozen nn.Conv2d. codes: [out, kh*kw*c_in/groups] integer codes in (kh, kw, c_in) order;
    low_rank: optional (L1 [kh*kw*c_in, r], L2 [r, out]) float factors (ungrouped convs), adding the
    branch conv_low_rank(x / smooth) as QConv2d does."""

    def __init__(self, codes: torch.Tensor, weight_quantizer: WeightQuantizer, geometry: ConvGeometry,
                 input_quantizer: ActivationQuantizer | None = None, bias: torch.Tensor | None = None,
                 smooth: torch.Tensor | None = None, backend: str | IntGemmBackend | None = None,
                 float_dtype: torch.dtype | None = None,
                 low_rank: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__()
        backend = select_backend(backend, device=codes.device)
        self.geometry = geometry
        self.kernel = choose_path(input_quantizer, integer_ok=geometry.im2col_ok)
        in_spec = input_quantizer.spec if self.kernel.integer else None
        split = input_split(input_quantizer, self.kernel)
        per_pixel = in_spec is not None and (in_spec.grain.ranges_per_row or split is not None)
        period = geometry.in_channels if per_pixel else None
        plan = plan_segments(codes.shape[1], group_len(weight_quantizer.spec), period, group_len(in_spec), split)
        weight = packed_weight(codes, weight_quantizer, plan, self.kernel, backend, input_quantizer,
                               geometry.weight_shape)
        self._setup(weight, input_quantizer, bias, smooth, backend, float_dtype)
        self._set_low_rank(low_rank)

    def _set_low_rank(self, low_rank: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """The SVDQuant branch (QConv2d's GEMM view: L1 [kh*kw*c_in, r], L2 [r, out]), or none."""
        g = self.geometry
        if low_rank is not None and g.groups != 1:
            raise NotImplementedError("a low-rank branch on a grouped convolution")
        register_low_rank(self, low_rank, g.kernel_size[0] * g.kernel_size[1] * g.in_channels, g.out_channels)

    def add_low_rank(self, y: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        """y + the low-rank branch on the smoothed input xs [B, H, W, C] (nn.layers.conv_low_rank)."""
        if self.low_rank_down is None:
            return y
        return y + conv_low_rank(xs.movedim(-1, 1).to(y.dtype), self.low_rank_down, self.low_rank_up, self.geometry)

    @classmethod
    def from_layer(cls, layer: QConv2d, backend: str | IntGemmBackend | None = None,
                   float_dtype: torch.dtype | None = None) -> PackedConv2d:
        return cls(layer_codes(layer), layer.weight_quantizer, ConvGeometry.of(layer), layer.input_quantizer,
                   layer.bias, layer.smooth, backend, float_dtype, layer.low_rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = self.smoothed(x.movedim(1, -1))
        y = self.kernel.product(self, xs, Epilogue(x.dtype, self.bias))
        return self.add_low_rank(y, xs)

    def int_product(self, xs: torch.Tensor, epilogue: Epilogue) -> torch.Tensor:
        """xs [B, H, W, C] -> [B, N, Ho, Wo] (channels-last strides)."""
        self.check_device(xs)
        batch, height, width, channels = xs.shape
        act = quantize_activation(xs.reshape(-1, channels), self.input_quantizer, self.backend)
        per_tensor = act.scale.shape[0] == 1
        codes = act.codes[:, :channels].reshape(batch, height, width, channels)
        patches = im2col(codes, self.geometry, self._pad_code(act, per_tensor, channels))
        if not per_tensor:
            act = ActivationCodes(patches, self._patch_map(act.scale, xs.shape),
                                  None if act.zero is None else self._patch_map(act.zero, xs.shape))
        a = fit_codes(patches, self.weight.plan.k_pad, act.zero)
        y = self.integer_product(act, a, epilogue)
        out_h, out_w = self._output_size(height, width)
        return y.reshape(batch, out_h, out_w, -1).permute(0, 3, 1, 2)

    def _pad_code(self, act: ActivationCodes, per_tensor: bool, channels: int) -> float | torch.Tensor:
        """The code of zero in padding positions: the zero point of a per-tensor range, per channel for
        a split quantizer's two ranges; 0 where per-pixel scales are 0 in the padding (_patch_map)."""
        if act.zero is None or not per_tensor:
            return 0
        if act.zero.numel() == 1:
            return float(act.zero)
        return self.input_quantizer.per_channel(act.zero.reshape(-1), channels)

    def _patch_map(self, per_pixel: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Per-pixel block values [B*H*W, blocks] -> per patch row [M, kh*kw*blocks]."""
        return im2col(per_pixel.reshape(*shape[:3], -1), self.geometry, 0.0)

    def _output_size(self, height: int, width: int) -> tuple[int, int]:
        g = self.geometry
        sizes = []
        for size, k, s, p, d in zip((height, width), g.kernel_size, g.stride, g.padding, g.dilation, strict=True):
            sizes.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
        return sizes[0], sizes[1]

    def float_product(self, xs: torch.Tensor, epilogue: Epilogue) -> torch.Tensor:
        if self.input_quantizer is not None:
            xs = self.input_quantizer(xs)
        g, dtype = self.geometry, self.float_dtype
        out, (kh, kw) = g.out_channels, g.kernel_size
        weight = self.weight.dequantized(dtype).t().reshape(out, kh, kw, -1).permute(0, 3, 1, 2)
        y = F.conv2d(xs.movedim(-1, 1).to(dtype), weight, None, g.stride, g.padding, g.dilation, g.groups)
        return epilogue.apply(y, channel_dim=1)

    def to_quantized_layer(self) -> QConv2d:
        """The QConv2d holding this layer's codes (no float weight): what checkpoints save."""
        g = self.geometry
        conv = nn.Conv2d(g.in_channels, g.out_channels, g.kernel_size, g.stride, g.padding, g.dilation, g.groups,
                         bias=self.bias is not None, device="meta")
        return thawed(QConv2d(conv, self.weight.spec, None), self)

    def extra_repr(self) -> str:
        g = self.geometry
        rank = "" if self.low_rank_down is None else f", low_rank={self.low_rank_down.shape[1]}"
        return f"{g.in_channels} -> {g.out_channels}, kernel={g.kernel_size}, " + super().extra_repr() + rank


PACKED_TYPES[QConv2d] = PackedConv2d.from_layer
