"""The frozen form of quantized layers: integer codes resident, integer GEMMs at run time.

`PackedLinear` / `PackedConv2d` replace a QLinear / QConv2d (see diffquant.freeze). They hold no float
weight. Per call they quantize the input to integer codes exactly as the fake-quant layer does
(dynamic per-token / per-group, or static per-tensor with the step of the sampling context, after
dividing by the smoothing vector), multiply codes by codes with int32 accumulation on the selected
kernel backend (diffquant.kernels), and rescale in float32:

    y = sum_s a_scale[m, s] * w_scale[s, n] * sum_{k in s} (a[m,k] - a_zero)(w[k,n] - w_zero) + bias
        (+ (x / smooth) @ L1 @ L2 when a low-rank branch is given)

where s runs over the K segments on which every scale is constant (one segment for per-token x
per-channel; K / 64 for group-64 scales; kh*kw for a convolution with per-pixel input scales;
kh*kw*c_in/gcd(c_in, c) for a split input (shortcut splitting: two static ranges, channels [:c] and
[c:], so the scale changes at c within each kernel position; padding holds each half's zero point):
kernels/segmented.py). The integer sums are exact, so the output equals the fake-quant layer's up to
the order of float rounding. Where the backend has fused kernels (`vnni`: kernels/vnni.py) and neither
side has a zero point, the whole sum runs in one kernel that rescales each segment in registers, and
dynamic symmetric inputs are quantized in one pass; otherwise per segment on `backend.matmul`.

Codes are offset-centred to signed int8: a format with codes c in [0, 2^b) (unsigned) is held as
c - 2^(b-1) with its zero point moved by the same offset, so every format meets the int8 GEMM.

What stays resident (weight bytes incl. scales / fp32 weight bytes; 4096 x 4096 Linear):
  * backends whose prepare() is free (int_mm on VNNI/AMX CPUs, float), and every weight-only layer:
    the codes in compact form: <= 4-bit formats two per byte in the K-halves layout
    (kernels/layouts.py), unpacked per call (~1 ms per 16M weights, ~3% of the int8 GEMM at 256
    tokens); 5-8 bit formats one int8 per weight. Scales stay in their stored dtype (fp16 in the
    presets). W8 per-channel 0.2501x, W4 per-channel 0.1251x, W4 group-64 0.1328x.
  * vnni (fused): the same bytes in the kernel's VNNI order (<= 4-bit two per byte; N padded to 16),
    unpacked per call into an L2-sized panel inside the kernel, never as a whole int8 copy.
  * fbgemm (AVX2 CPUs): fbgemm's prepacked int8 copy only (our codes are dropped and recovered with
    unpack() for saving): W8 0.2504x, W4 per-channel 0.2504x, W4 group-64 0.2734x (one prepacked
    block and its column offsets per group). Keeping nibbles and prepacking per call instead would
    cost ~80 ms per 4096 x 4096 weight per call, more than the GEMM itself.
tests/nn/test_packed.py asserts W8 <= 0.27x and W4 <= 0.14x for the selected backend where its
prepare() is free.

Paths (KernelPath objects in the registry `PATHS`, chosen at construction as `layer.kernel`, named by
`layer.path` and shown by repr):
  "int":   integer GEMM as above. Needs integer formats and a scale that is constant along K within a
           segment (Granularity.integer_activations): per-input-channel static activation ranges are
           not, and use "float".
  "float": dequantize the weight per call and run the float matmul / conv in `float_dtype` (default
           the machine's fastest: bf16 where native, else fp32) on the fake-quantized (or, weight-only,
           the plain) input. Weight-only W4A16 / W8A16 layers always use it.

Convolutions: nn/packed_conv.py (PackedConv2d, registered in PACKED_TYPES there). The packed weight, the
segment plan and the epilogue: nn/packed_weight.py; the input's codes: nn/packed_activation.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from diffquant.kernels import (
    IntGemmBackend,
    SegmentZeroPoints,
    fastest_float_dtype,
    segmented_matmul,
    select_backend,
)
from diffquant.nn.layers import QConv2d, QLinear, linear_low_rank
from diffquant.nn.packed_activation import ActivationCodes, fit_codes, needs_input_sums, quantize_activation
from diffquant.nn.packed_weight import (
    Epilogue,
    PackedWeight,
    SegmentPlan,
    compact,
    group_len,
    integer_codes,
    plan_segments,
)
from diffquant.nn.quantizers import ActivationQuantizer, WeightQuantizer

# -- modules --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelPath:
    """How a packed layer computes its product (module docstring: Paths). integer: the product is the
    integer GEMM (inputs quantized to codes, the weight prepared for the backend). product: (layer, input as
    its forward hands it, epilogue) -> output; PackedLinear hands over x and divides by its smoothing vector
    inside (fused into the quantizer), PackedConv2d hands over x / smooth."""

    name: str
    integer: bool
    product: Callable[[PackedLayer, torch.Tensor, Epilogue], torch.Tensor]


INT_PATH = KernelPath("int", True, lambda layer, x, epilogue: layer.int_product(x, epilogue))
FLOAT_PATH = KernelPath("float", False, lambda layer, x, epilogue: layer.float_product(x, epilogue))
PATHS: dict[str, KernelPath] = {path.name: path for path in (INT_PATH, FLOAT_PATH)}


class PackedLayer(nn.Module):
    """Shared run-time of PackedLinear / PackedConv2d. Subclasses define the int and float products and
    set `kernel`, the KernelPath their forward takes."""

    kernel: KernelPath

    @property
    def path(self) -> str:
        """The kernel path's name ("int", "float", "emulated"): what reports count."""
        return self.kernel.name

    def _setup(self, weight: PackedWeight, input_quantizer: ActivationQuantizer | None, bias: torch.Tensor | None,
               smooth: torch.Tensor | None, backend: IntGemmBackend, float_dtype: torch.dtype | None) -> None:
        self.weight = weight
        self.input_quantizer = input_quantizer
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("smooth", None if smooth is None else smooth.detach().clone())
        self.backend = backend
        self.float_dtype = fastest_float_dtype(device=weight.device) if float_dtype is None else float_dtype

    def smoothed(self, x: torch.Tensor) -> torch.Tensor:
        """x (feature axis last) divided by the smoothing vector, as QuantizedLayer.quantize_input."""
        return x if self.smooth is None else x / self.smooth.to(x.dtype)

    def check_device(self, x: torch.Tensor) -> None:
        """The integer path's kernels take tensors of one device type: say so instead of crashing in them."""
        if x.device.type != self.backend.device_type:
            raise RuntimeError(f"this layer was frozen for kernel backend {self.backend.name!r} "
                               f"({self.backend.device_type} tensors) but got a {x.device.type} input: freeze the "
                               f"model on the device it runs on (model.to(device) before diffquant.freeze)")

    def integer_product(self, act: ActivationCodes, a: torch.Tensor, epilogue: Epilogue) -> torch.Tensor:
        """Rescaled segmented GEMM of codes a [M, K_pad] with the weight, then the epilogue: [M, N]."""
        plan = self.weight.plan
        if self.weight.fused is not None:  # symmetric on both sides: one pass, no per-segment float passes
            return self.weight.fused_matmul(a, plan.act_scales(act.scale), epilogue)
        zero_points = self._zero_points(act)
        y = segmented_matmul(self.backend, a.contiguous(), self.weight.segments(), plan.act_scales(act.scale),
                             self.weight.segment_scales(), zero_points)
        return epilogue.apply(y)

    def _zero_points(self, act: ActivationCodes) -> SegmentZeroPoints | None:
        weight = self.weight
        if act.zero is None and weight.zero_point is None:
            return None
        a_zero = None if act.zero is None else weight.plan.act_scales(act.zero)
        sums = None if weight.segment_sums is None else weight.segment_sums.float()
        return SegmentZeroPoints(a_zero, weight.segment_zero(), sums)

    def resident_bytes(self) -> int:
        """Bytes this module keeps alive: codes, scales, backend copies, bias, smoothing, quantizer state."""
        own = sum(t.numel() * t.element_size() for n, t in self.named_buffers() if not n.startswith("weight."))
        return own + self.weight.resident_bytes()

    def extra_repr(self) -> str:
        a = "fp" if self.input_quantizer is None else self.input_quantizer.spec.format
        engine = f"backend={self.backend.name}" if self.kernel.integer else f"dtype={self.float_dtype}"
        return f"path={self.path}, {engine}, a={a}, smooth={self.smooth is not None}"


def input_split(input_quantizer: ActivationQuantizer | None, kernel: KernelPath) -> int | None:
    """The channel where a split input quantizer's second range begins, on the integer path."""
    return None if input_quantizer is None or not kernel.integer else input_quantizer.split_at


def choose_path(input_quantizer: ActivationQuantizer | None, integer_ok: bool) -> KernelPath:
    """The integer path where the layer (integer_ok) and its input's codes and ranges allow, else float."""
    if input_quantizer is None or not integer_ok:
        return FLOAT_PATH
    spec = input_quantizer.spec
    return INT_PATH if integer_codes(spec) and spec.grain.integer_activations else FLOAT_PATH


def packed_weight(codes: torch.Tensor, weight_quantizer: WeightQuantizer, plan: SegmentPlan, kernel: KernelPath,
                  backend: IntGemmBackend, input_quantizer: ActivationQuantizer | None,
                  shape: torch.Size) -> PackedWeight:
    """The layer's PackedWeight: prepared for the backend, with column sums where the input has a zero point,
    on the integer path; a weight only ever dequantized on the others."""
    if not kernel.integer:
        return PackedWeight(codes, weight_quantizer, plan, None, shape)
    return PackedWeight(codes, weight_quantizer, plan, backend, shape, with_sums=needs_input_sums(input_quantizer))


class PackedLinear(PackedLayer):
    """Frozen nn.Linear. codes: [out, in] integer codes (a QLinear's weight_codes);
    low_rank: optional (L1 [in, r], L2 [r, out]) float factors, adding (x / smooth) @ L1 @ L2."""

    def __init__(self, codes: torch.Tensor, weight_quantizer: WeightQuantizer,
                 input_quantizer: ActivationQuantizer | None = None, bias: torch.Tensor | None = None,
                 smooth: torch.Tensor | None = None, low_rank: tuple[torch.Tensor, torch.Tensor] | None = None,
                 backend: str | IntGemmBackend | None = None, float_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        backend = select_backend(backend, device=codes.device)
        self.out_features, self.in_features = codes.shape
        self.kernel = choose_path(input_quantizer, integer_ok=True)
        in_spec = input_quantizer.spec if self.kernel.integer else None
        split = input_split(input_quantizer, self.kernel)
        plan = plan_segments(self.in_features, group_len(weight_quantizer.spec), None if split is None else
                             self.in_features, group_len(in_spec), split)
        weight = packed_weight(codes, weight_quantizer, plan, self.kernel, backend, input_quantizer, codes.shape)
        self._setup(weight, input_quantizer, bias, smooth, backend, float_dtype)
        self._set_low_rank(low_rank)

    def _set_low_rank(self, low_rank: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        register_low_rank(self, low_rank, self.in_features, self.out_features)

    @classmethod
    def from_layer(cls, layer: QLinear, backend: str | IntGemmBackend | None = None,
                   float_dtype: torch.dtype | None = None,
                   low_rank: tuple[torch.Tensor, torch.Tensor] | None = None) -> PackedLinear:
        """low_rank: a branch to add; default the layer's own (QuantizedLayer.low_rank)."""
        low_rank = layer.low_rank if low_rank is None else low_rank
        return cls(layer_codes(layer), layer.weight_quantizer, layer.input_quantizer, layer.bias, layer.smooth,
                   low_rank, backend, float_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The products take x itself: the integer one folds the smoothing division into its activation
        quantizer, and the low-rank branch reads x through (L1 / smooth) (a [K, r] division per call, not
        an [M, K] one); the branch joins the product's epilogue (inside the fused kernel in float32)."""
        branch = None
        if self.low_rank_down is not None:
            branch = linear_low_rank(x, self.branch_down(x.dtype), self.low_rank_up).reshape(-1, self.out_features)
        return self.kernel.product(self, x, Epilogue(x.dtype, self.bias, branch))

    def branch_down(self, dtype: torch.dtype) -> torch.Tensor:
        """L1 / smooth [K, r] in `dtype`: (x / smooth) @ L1 = x @ (L1 / smooth), up to float rounding."""
        down = self.low_rank_down.to(dtype)
        return down if self.smooth is None else down / self.smooth.to(dtype)[:, None]

    def int_product(self, x: torch.Tensor, epilogue: Epilogue) -> torch.Tensor:
        self.check_device(x)
        x2d = x.reshape(-1, self.in_features)
        act = quantize_activation(x2d, self.input_quantizer, self.backend, self.smooth)
        a = fit_codes(act.codes, self.weight.plan.k_pad, act.zero)
        return self.integer_product(act, a, epilogue).reshape(*x.shape[:-1], self.out_features)

    def float_product(self, x: torch.Tensor, epilogue: Epilogue) -> torch.Tensor:
        xs = self.smoothed(x)
        if self.input_quantizer is not None:
            xs = self.input_quantizer(xs)
        return epilogue.apply(xs.to(self.float_dtype) @ self.weight.dequantized(self.float_dtype))

    def to_quantized_layer(self) -> QLinear:
        """The QLinear holding this layer's codes (no float weight): what checkpoints save."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        return thawed(QLinear(linear, self.weight.spec, None), self)

    def extra_repr(self) -> str:
        rank = "" if self.low_rank_down is None else f", low_rank={self.low_rank_down.shape[1]}"
        return f"{self.in_features} -> {self.out_features}, " + super().extra_repr() + rank


def register_low_rank(layer: PackedLayer, low_rank: tuple[torch.Tensor, torch.Tensor] | None, inputs: int,
                       outputs: int) -> None:
    """Register the branch buffers (None without a branch) after checking L1 [inputs, r], L2 [r, outputs].
    Kept in float16 where that is lossless (SVDQuant rounds them to 16 bits), else float32; they are cast
    to the input's dtype per call."""
    down, up = (None, None) if low_rank is None else low_rank
    if low_rank is not None and (down.shape[0] != inputs or up.shape[1] != outputs or down.shape[1] != up.shape[0]):
        raise ValueError(f"low-rank factors {tuple(down.shape)} x {tuple(up.shape)} do not fit a "
                         f"{inputs} -> {outputs} layer")
    layer.register_buffer("low_rank_down", None if down is None else _half_if_exact(down))
    layer.register_buffer("low_rank_up", None if up is None else _half_if_exact(up))


def _half_if_exact(factor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of a low-rank factor, in float16 where that holds it exactly."""
    return compact(factor, torch.float16).contiguous().clone()


def layer_codes(layer: QLinear | QConv2d) -> torch.Tensor:
    """The layer's integer weight codes [out, K]: stored ones, or computed from its float weight."""
    if layer.weight_quantizer is None:
        raise ValueError("a layer without a weight quantizer has no integer weight to pack")
    if layer.weight_codes is not None:
        return layer.weight_codes
    storage = layer.weight_quantizer.spec.qformat.storage_dtype()
    with torch.no_grad():
        return layer.weight_quantizer.codes(layer.weight_matrix(layer.weight)).to(storage)


def thawed(layer: QLinear | QConv2d, packed: PackedLayer) -> QLinear | QConv2d:
    layer.weight_quantizer = packed.weight.quantizer()
    layer.input_quantizer = packed.input_quantizer
    layer.hold_codes(packed.weight.layer_codes())
    layer.bias = None if packed.bias is None else nn.Parameter(packed.bias.clone(), requires_grad=False)
    layer.smooth = None if packed.smooth is None else packed.smooth.clone()
    if getattr(packed, "low_rank_down", None) is not None:
        layer.set_low_rank(packed.low_rank_down.float(), packed.low_rank_up.float())
    return layer.eval()


# The packed module of each quantized layer type (nn/packed_conv.py adds QConv2d).
PACKED_TYPES: dict[type[nn.Module], Callable[..., PackedLayer]] = {
    QLinear: PackedLinear.from_layer,
}
