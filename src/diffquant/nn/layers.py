"""Quantized layers: nn.Linear and nn.Conv2d with a weight quantizer and an input quantizer.

Either quantizer may be absent (weight-only or activation-only). An optional per-input-channel
`smooth` divisor (SmoothQuant, SVDQuant) is applied to the input before its quantization; the
matching factor is folded into the weight by the smoothing stage.

An optional low-rank branch (SVDQuant) adds the smoothed, unquantized input through two float
factors, L1 = `low_rank_down` [K, r] and L2 = `low_rank_up` [r, out], K the weight matrix's inputs:

    Y = Q(X / smooth) · Q(W)ᵀ + (X / smooth) · L1 · L2 + b

where W is then the residual that `split_low_rank` left in the weight. For an (ungrouped) Conv2d the
product is over im2col patches: L1 is stored in the same GEMM view as the weight matrix ([kh·kw·c_in, r],
K in (kh, kw, c_in) order) and runs as a conv with the layer's kernel, stride, padding and dilation
(c_in -> r), followed by a 1x1 conv with L2 (r -> out): `conv_low_rank`. Keeping both layers' factors
2-D with the same meaning lets checkpoints, freezing, thawing and SVDQuant's fit treat them alike.

Weights are quantized as a [out, K] matrix with the input axis last. For Conv2d, K is ordered
(kh, kw, c_in) with c_in fastest, so a quantization group of g inputs covers g input channels at
one kernel position — the same channels an input group of g covers at one pixel.

A layer holds its weight either as a float parameter (fake quantization, trainable) or, after
`store_codes()` / loading a checkpoint, as integer codes [out, K] plus qparams: both paths
evaluate the same expression, so outputs are bitwise identical.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

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
        self.register_parameter("low_rank_down", None)
        self.register_parameter("low_rank_up", None)
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
        dtype = self.weight.dtype
        if torch.finfo(dtype).bits < 32:
            # float16 holds λ and W·λ only up to 65504: cap λ there (still exact, x / λ and W·λ share it)
            limit = torch.finfo(dtype).max / 2
            factor = torch.minimum(factor.float(), limit / self.weight_input_absmax().float().clamp_min(1.0))
        factor = factor.to(dtype)
        self.weight.mul_(self.input_channel_view(factor))
        self.smooth = factor.clone() if self.smooth is None else self.smooth * factor

    @property
    def weight_quantizer_calibrated(self) -> bool:
        return self.weight_quantizer is not None and self.weight_quantizer.scale is not None

    # -- low-rank branch ----------------------------------------------------------------------------
    taps: int = 1  # channel vectors per row of the weight matrix (a conv's kh·kw kernel positions)

    @property
    def supports_low_rank(self) -> bool:
        return False

    @property
    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(L1 [K, r], L2 [r, out]) of the low-rank branch, or None."""
        return None if self.low_rank_down is None else (self.low_rank_down, self.low_rank_up)

    def set_low_rank(self, down: torch.Tensor, up: torch.Tensor) -> None:
        """Install the branch factors as they are (no change to the weight): for loading."""
        if not self.supports_low_rank:
            raise NotImplementedError(f"{type(self).__name__} has no low-rank branch (Linear layers and "
                                      "ungrouped convolutions only)")
        inputs, outputs = self.low_rank_shape
        if down.dim() != 2 or up.dim() != 2 or down.shape[0] != inputs or up.shape[1] != outputs \
                or down.shape[1] != up.shape[0]:
            raise ValueError(f"low-rank factors {tuple(down.shape)} x {tuple(up.shape)} do not fit a "
                             f"{inputs} -> {outputs} layer")
        # contiguous: a transposed view would pick another GEMM kernel (other rounding) than the
        # contiguous tensors a checkpoint reloads, and the reload would not be bitwise identical
        self.low_rank_down = nn.Parameter(down.detach().clone(memory_format=torch.contiguous_format),
                                          requires_grad=False)
        self.low_rank_up = nn.Parameter(up.detach().clone(memory_format=torch.contiguous_format), requires_grad=False)

    @torch.no_grad()
    def split_low_rank(self, down: torch.Tensor, up: torch.Tensor) -> None:
        """Move L1·L2 out of the (smoothed) weight into the branch: W ← W − (L1·L2)ᵀ.

        Function-preserving in full precision. Runs before the weight is quantized, so the weight
        quantizer calibrates on the residual.
        """
        if self.weight_codes is not None or self.weight_quantizer_calibrated:
            raise RuntimeError("split_low_rank must run before the weight is quantized")
        if self.low_rank_down is not None:
            raise RuntimeError("the layer already has a low-rank branch")
        self.set_low_rank(down, up)
        product = low_rank_product(self.low_rank_down, self.low_rank_up)
        self.weight.sub_(self.weight_from_matrix(product).to(self.weight.dtype))

    @property
    def low_rank_shape(self) -> tuple[int, int]:
        """(K, outputs) the branch factors must fit."""
        raise NotImplementedError

    def low_rank_output(self, xs: torch.Tensor) -> torch.Tensor:
        """The branch on the smoothed input xs (the layer's own input layout)."""
        raise NotImplementedError

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
        if self.low_rank_down is not None:
            return self.forward_low_rank(x)
        return self.matmul(self.quantize_input(x), self.effective_weight().to(x.dtype))

    def forward_low_rank(self, x: torch.Tensor) -> torch.Tensor:
        """Q(x̂)·Q(W)ᵀ + b + x̂·L1·L2 with x̂ = x / smooth (the branch reads x̂ unquantized)."""
        axis = self._axis(x)
        xs = x if self.smooth is None else x / self.smooth.reshape(-1, *[1] * (-1 - axis)).to(x.dtype)
        xq = xs
        if self.input_quantizer is not None and self.quant_enabled:
            xq = self.input_quantizer(xs.movedim(axis, -1)).movedim(-1, axis)
        y = self.matmul(xq, self.effective_weight().to(x.dtype))
        return y + self.low_rank_output(xs)

    def _axis(self, x: torch.Tensor) -> int:
        """The feature axis as a negative index (what movedim / broadcasting the smooth vector need)."""
        return self.feature_axis - x.dim() if self.feature_axis >= 0 else self.feature_axis

    def matmul(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        w = self.weight_quantizer.spec.format if self.weight_quantizer else "fp"
        a = self.input_quantizer.spec.format if self.input_quantizer else "fp"
        rank = "" if self.low_rank_down is None else f", low_rank={self.low_rank_down.shape[1]}"
        return f"w={w}, a={a}, smooth={self.smooth is not None}, stored={self.weight_codes is not None}{rank}"


def low_rank_product(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """(L1 · L2)ᵀ: the branch as an [out, in] weight matrix."""
    return (down @ up).t()


def branch_dtype(xs: torch.Tensor) -> torch.dtype:
    """What the low-rank branch computes in: float32 for a float16 / bfloat16 input. Its factors are
    kept in float32 where float16 would overflow, and the rank-r hidden xs·L1 carries the norm of a
    whole output row (up to √out times its largest value), so float16 overflows it to Inf / NaN."""
    return torch.promote_types(xs.dtype, torch.float32)


def linear_low_rank(xs: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The Linear branch (xs @ L1) @ L2 in xs's dtype (computed in branch_dtype): two thin GEMMs, never the
    [in, out] product."""
    dtype = branch_dtype(xs)
    return ((xs.to(dtype) @ down.to(dtype)) @ up.to(dtype)).to(xs.dtype)


def conv_low_rank(xs: torch.Tensor, down: torch.Tensor, up: torch.Tensor, conv) -> torch.Tensor:
    """A conv layer's branch on x̂ [B, c_in, H, W]: L1 [kh·kw·c_in, r] (K in (kh, kw, c_in) order) as a
    [r, c_in, kh, kw] kernel with `conv`'s stride / padding / dilation, then L2 [r, out] as a 1x1 conv.
    Equal to patches(x̂) · L1 · L2 at every output pixel, in x̂'s dtype (computed in branch_dtype, as
    linear_low_rank). conv: a QConv2d or ConvGeometry."""
    dtype = branch_dtype(xs)
    down, up = down.to(dtype), up.to(dtype)
    rank = down.shape[1]
    kernel = down.t().reshape(rank, *conv.kernel_size, -1).permute(0, 3, 1, 2)
    hidden = F.conv2d(xs.to(dtype), kernel, None, conv.stride, conv.padding, conv.dilation)
    return F.conv2d(hidden, up.t().reshape(up.shape[1], rank, 1, 1)).to(xs.dtype)


class QLinear(QuantizedLayer):
    feature_axis = -1

    def __init__(self, linear: nn.Linear, weight_spec: QuantSpec | None, input_spec: QuantSpec | None):
        super().__init__(weight_spec, input_spec)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias

    @property
    def supports_low_rank(self) -> bool:
        return True

    @property
    def low_rank_shape(self) -> tuple[int, int]:
        return self.in_features, self.out_features

    def low_rank_output(self, xs: torch.Tensor) -> torch.Tensor:
        return linear_low_rank(xs, self.low_rank_down, self.low_rank_up)

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

    @property
    def taps(self) -> int:
        return self.kernel_size[0] * self.kernel_size[1]

    @property
    def supports_low_rank(self) -> bool:
        return self.groups == 1  # a grouped conv's weight matrix is not one GEMM over the patches

    @property
    def low_rank_shape(self) -> tuple[int, int]:
        return self.taps * self.in_channels, self.out_channels

    def low_rank_output(self, xs: torch.Tensor) -> torch.Tensor:
        return conv_low_rank(xs, self.low_rank_down, self.low_rank_up, self)

    def matmul(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


@contextlib.contextmanager
def quantization_enabled(layers: Iterable[QuantizedLayer], enabled: bool) -> Iterator[None]:
    """The layers' quantizers on or off inside (off: full precision, transforms such as smoothing and
    low-rank splits kept); the previous switches are restored on exit."""
    layers = list(layers)
    previous = [layer.quant_enabled for layer in layers]
    for layer in layers:
        layer.quant_enabled = enabled
    try:
        yield
    finally:
        for layer, flag in zip(layers, previous, strict=True):
            layer.quant_enabled = flag


QUANTIZED_LAYER_TYPES: dict[type[nn.Module], type[QuantizedLayer]] = {nn.Linear: QLinear, nn.Conv2d: QConv2d}


def wrap_layer(module: nn.Module, weight_spec: QuantSpec | None, input_spec: QuantSpec | None) -> QuantizedLayer:
    """Wrap a float layer (sharing its parameters) into its quantized counterpart."""
    cls = QUANTIZED_LAYER_TYPES.get(type(module))
    if cls is None:
        raise TypeError(f"no quantized layer for {type(module).__name__}")
    layer = cls(module, weight_spec, input_spec)
    layer.train(module.training)
    return layer
