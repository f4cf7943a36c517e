"""Quantized layers: nn.Linear and nn.Conv2d with a weight quantizer and an input quantizer.

Either quantizer may be absent (weight-only or activation-only). An optional per-input-channel
`smooth` divisor (SmoothQuant, SVDQuant) is applied to the input before its quantization; the
matching factor is folded into the weight by the smoothing stage.

Weights are quantized as a [out, K] matrix with the input axis last. For Conv2d, K is ordered
(kh, kw, c_in) with c_in fastest, so a quantization group of g inputs covers g input channels at
one kernel position — the same channels an input group of g covers at one pixel.

A layer holds its weight either as a float parameter (fake quantization, trainable) or, after
`store_codes()` / loading a checkpoint, as integer codes [out, K] plus qparams: both paths
evaluate the same expression, so outputs are bitwise identical.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffquant.formats.spec import QuantSpec
from diffquant.nn.quantizers import ActivationQuantizer, WeightQuantizer


class QuantizedLayer(nn.Module):
    """Shared logic of QLinear and QConv2d. Subclasses define the weight view and the matmul."""

    feature_axis: int = -1

    def __init__(self, weight_spec: QuantSpec | None, input_spec: QuantSpec | None) -> None:
        super().__init__()
        self.weight_quantizer = WeightQuantizer(weight_spec) if weight_spec is not None else None
        self.input_quantizer = ActivationQuantizer(input_spec) if input_spec is not None else None
        self.register_buffer("smooth", None)
        self.register_buffer("weight_codes", None)
        self.quant_enabled = True  # False: compute in full precision (smoothing kept), for checks

    # -- weight views -------------------------------------------------------------------------
    def weight_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def weight_from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix

    @property
    def weight_shape(self) -> torch.Size:
        return self.weight.shape if self.weight is not None else self._stored_weight_shape

    def calibrate_weight(self) -> None:
        if self.weight_quantizer is not None:
            self.weight_quantizer.calibrate(self.weight_matrix(self.weight.detach()))

    def effective_weight(self) -> torch.Tensor:
        """The weight the layer computes with: fake-quantized, or decoded from stored codes."""
        if self.weight_codes is not None:
            return self._decode_weight()
        if self.weight_quantizer is None or not self.quant_enabled:
            return self.weight
        return self.weight_from_matrix(self.weight_quantizer(self.weight_matrix(self.weight)))

    def _decode_weight(self) -> torch.Tensor:
        return self.weight_from_matrix(self.weight_quantizer.decode(self.weight_codes))

    def store_codes(self) -> None:
        """Replace the float weight by its integer codes [out, K] — what a checkpoint holds."""
        if self.weight_quantizer is None or self.weight_codes is not None:
            return
        codes = self.weight_quantizer.codes(self.weight_matrix(self.weight.detach()))
        self.hold_codes(codes.to(self.weight_quantizer.spec.qformat.storage_dtype()))

    def hold_codes(self, codes: torch.Tensor) -> None:
        """Keep the weight as integer codes [out, K] and drop the float parameter."""
        self._stored_weight_shape = torch.Size(self.weight.shape)
        self.weight_codes = codes
        del self.weight
        self.weight = None

    def input_channel_view(self, per_channel: torch.Tensor) -> torch.Tensor:
        """Reshape a per-input-channel vector to broadcast against the weight."""
        return per_channel.reshape(1, -1, *([1] * (self.weight.dim() - 2)))

    def weight_input_absmax(self) -> torch.Tensor:
        """max |W[:, j]| per input channel j (over outputs and kernel positions)."""
        w = self.weight.detach().abs().transpose(0, 1)
        return w.reshape(w.shape[0], -1).amax(dim=1)

    @torch.no_grad()
    def fold_input_scale(self, factor: torch.Tensor) -> None:
        """Divide the input by `factor` per channel and multiply the weight's columns by it.

        Function-preserving in full precision: (x / λ) · (W · diag(λ))ᵀ = x · Wᵀ. Applied before the
        weight is calibrated; repeated calls compose.
        """
        if self.weight_codes is not None or self.weight_quantizer_calibrated:
            raise RuntimeError("fold_input_scale must run before the weight is quantized")
        if getattr(self, "groups", 1) != 1:
            raise NotImplementedError("input-channel scaling of grouped convolutions")
        factor = factor.to(self.weight.dtype)
        self.weight.mul_(self.input_channel_view(factor))
        self.smooth = factor.clone() if self.smooth is None else self.smooth * factor

    @property
    def weight_quantizer_calibrated(self) -> bool:
        return self.weight_quantizer is not None and self.weight_quantizer.scale is not None

    # -- forward --------------------------------------------------------------------------------
    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth is None and self.input_quantizer is None:
            return x
        if self.feature_axis != -1:
            x = x.movedim(self.feature_axis, -1)
        if self.smooth is not None:
            x = x / self.smooth.to(x.dtype)
        if self.input_quantizer is not None and self.quant_enabled:
            x = self.input_quantizer(x)
        if self.feature_axis != -1:
            x = x.movedim(-1, self.feature_axis)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(self.quantize_input(x), self.effective_weight().to(x.dtype))

    def matmul(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        w = self.weight_quantizer.spec.format if self.weight_quantizer else "fp"
        a = self.input_quantizer.spec.format if self.input_quantizer else "fp"
        return f"w={w}, a={a}, smooth={self.smooth is not None}, stored={self.weight_codes is not None}"


class QLinear(QuantizedLayer):
    feature_axis = -1

    def __init__(self, linear: nn.Linear, weight_spec: QuantSpec | None, input_spec: QuantSpec | None):
        super().__init__(weight_spec, input_spec)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias

    def matmul(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)


class QConv2d(QuantizedLayer):
    feature_axis = 1

    def __init__(self, conv: nn.Conv2d, weight_spec: QuantSpec | None, input_spec: QuantSpec | None):
        super().__init__(weight_spec, input_spec)
        if conv.padding_mode != "zeros":
            raise NotImplementedError(f"Conv2d padding_mode {conv.padding_mode!r} is not supported")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, conv.stride, conv.padding
        self.dilation, self.groups = conv.dilation, conv.groups
        self.weight = conv.weight
        self.bias = conv.bias

    def weight_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)

    def weight_from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        out, cin_g = self.out_channels, self.in_channels // self.groups
        kh, kw = self.kernel_size
        return matrix.reshape(out, kh, kw, cin_g).permute(0, 3, 1, 2)

    def matmul(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


QUANTIZED_LAYER_TYPES: dict[type[nn.Module], type[QuantizedLayer]] = {nn.Linear: QLinear, nn.Conv2d: QConv2d}


def wrap_layer(module: nn.Module, weight_spec: QuantSpec | None, input_spec: QuantSpec | None) -> QuantizedLayer:
    """Wrap a float layer (sharing its parameters) into its quantized counterpart."""
    cls = QUANTIZED_LAYER_TYPES.get(type(module))
    if cls is None:
        raise TypeError(f"no quantized layer for {type(module).__name__}")
    layer = cls(module, weight_spec, input_spec)
    layer.train(module.training)
    return layer
