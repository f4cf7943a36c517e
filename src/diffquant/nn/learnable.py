"""Learnable quantizers for reconstruction (BRECQ / Q-Diffusion / EDA-DM, METHODS.md §4, §12).

Each is a drop-in for a QuantizedLayer's quantizer (LSQActivation also for an attention operand
quantizer, nn.attention), installed only while a block is reconstructed;
afterwards the layer holds ordinary round-to-nearest-format state again, so saving, freezing and
packing need to know nothing about how it was made.

AdaRound (weights), over the quantizer's block view [blocks, len] with its scale s and zero point z.
W/s lies between two neighbouring grid values lo ≤ W/s ≤ hi (`grid_neighbours`), and

    W_soft = s · (clamp(lo + h(V)·(hi − lo) + z, qmin, qmax) − z),
    h(V)   = clamp(sigmoid(V)·(ζ − γ) + γ, 0, 1),   ζ = 1.1, γ = −0.1  (rectified sigmoid)

On an integer grid lo = floor(W/s) and hi = lo + 1: AdaRound's floor(W/s) + h(V), bitwise (the range
is clamped after the zero point is added). On a floating-point grid (fp4_e2m1, fp8_*, nvfp4, the MX
formats; symmetric, no zero point) lo and hi are the adjacent representable values around W/s, both
±max past the range (hi − lo = 0 there, nothing to learn); the grid is not uniform, so hi − lo
varies with |W/s|. Block scales (NVFP4's E4M3 block scales and global scale, MX's E8M0 scales) stay
as calibrated: only the element rounding is learned.

V starts where h(V) = (W/s − lo) / (hi − lo), so W_soft = W inside the grid's range. The rounding
regulariser Σ 1 − |2h − 1|^β pushes every h to 0 or 1; hardening rounds up where V ≥ 0 (h ≥ ½).
Scales are never changed: the hardened values are lo or hi exactly, codes of the format, clamped to
its range.

LSQ (static input step sizes): the calibrated scale becomes a parameter; rounding is straight-through
and the step size's gradient is scaled by 1/√(N·Q_P) (N inputs per step size, Q_P = qmax), as in LSQ.
`write_back` rounds it to the spec's scale format and copies it into the quantizer's buffer (the
current sampling step's row of per-step scales is the one a batch trains). With `learn_zero_point`
(EfficientDM's temporal LSQ) the zero point is a float parameter too, rounded straight-through in the
forward pass and rounded onto the format's range on write-back.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from diffquant.formats.base import IntFormat, QFormat
from diffquant.formats.floating import FloatFormat
from diffquant.formats.ops import dequantize, fake_quantize
from diffquant.formats.spec import QuantSpec
from diffquant.nn.layers import QuantizedLayer
from diffquant.nn.quantizers import ActivationQuantizer, WeightQuantizer, compute_dtype, step_qparams

ZETA, GAMMA = 1.1, -0.1
_TINY = torch.finfo(torch.float32).tiny
# A learned step never below 2^-10 of its calibrated value: Adam's updates are absolute (~lr), so a small
# step size (a time embedding's per input channel, ~1e-4) can be carried through 0 (then NaN)
LSQ_MIN_SHARE = 2.0**-10


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """AdaRound's h(V) = clamp(sigmoid(V)·(ζ − γ) + γ, 0, 1): reaches exactly 0 and 1."""
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    """V with h(V) = h, for h in [0, 1]."""
    return torch.log((h - GAMMA) / (ZETA - h))


def rounding_regularizer(h: torch.Tensor, beta: float) -> torch.Tensor:
    """Σ 1 − |2h − 1|^β: zero only when every h is 0 or 1; large β leaves the middle flat."""
    return (1 - (2 * h - 1).abs().pow(beta)).sum()


def grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x in the forward pass, its gradient multiplied by `factor` (LSQ's step-size gradient scale)."""
    scaled = x * factor
    return (x - scaled).detach() + scaled


class OverQuantizer(nn.Module):
    """Base of the modules installed over a layer's quantizer while something is learned: `base` is
    that quantizer, whose spec they follow."""

    base: nn.Module

    @property
    def spec(self) -> QuantSpec:
        return self.base.spec


class OnFixedGrid(OverQuantizer):
    """An OverQuantizer that keeps the base quantizer's grid (its scales) fixed."""

    @property
    def scale(self) -> torch.Tensor:
        return self.base.scale


class AdaRoundWeight(OnFixedGrid):
    """Learned up/down rounding of one weight matrix [out, K] on its WeightQuantizer's fixed grid.

    Installed as the layer's weight_quantizer; forward ignores the weight it is given (the rounding
    was fixed from it at construction) except for its dtype and shape.
    """

    def __init__(self, base: WeightQuantizer, weight2d: torch.Tensor) -> None:
        super().__init__()
        if base.scale is None:
            raise RuntimeError("AdaRound needs a calibrated weight quantizer (round-to-nearest scales first)")
        if not adaround_supports(base.spec):
            raise NotImplementedError(f"AdaRound needs an integer or floating-point grid, got format "
                                      f"{base.spec.format!r}")
        self.base = base
        self.shape = torch.Size(weight2d.shape)
        blocks = base.spec.grain.view(weight2d.detach().float(), base.spec.group_size)
        scaled = blocks / base.scale
        lo, hi = grid_neighbours(base.spec.qformat, scaled)
        self.register_buffer("lo", lo)
        self.register_buffer("step", hi - lo)  # exact: both on the grid; 0 where saturated
        position = torch.where(self.step > 0, (scaled - lo) / self.step, torch.zeros_like(scaled))
        self.v = nn.Parameter(inverse_rectified_sigmoid(position.clamp(0.0, 1.0)))

    def soft_rounding(self) -> torch.Tensor:
        return rectified_sigmoid(self.v)

    def hard_rounding(self) -> torch.Tensor:
        return (self.v >= 0).to(self.lo.dtype)

    def regularizer(self, beta: float) -> torch.Tensor:
        return rounding_regularizer(self.soft_rounding(), beta)

    def _grid_codes(self, rounding: torch.Tensor) -> torch.Tensor:
        """lo + rounding·(hi − lo) (+ zero point), clamped to the format: codes in block_view layout."""
        fmt, zero_point = self.spec.qformat, self.base.zero_point
        codes = self.lo + rounding * self.step  # hard rounding: lo or hi exactly
        if zero_point is not None:
            codes = codes + zero_point
        return codes.clamp(fmt.qmin, fmt.qmax)

    def _dequantized(self, rounding: torch.Tensor) -> torch.Tensor:
        weight = dequantize(self._grid_codes(rounding), self.base.scale, self.base.zero_point)
        return self.spec.grain.unview(weight, self.shape)

    def forward(self, weight2d: torch.Tensor) -> torch.Tensor:
        return self._dequantized(self.soft_rounding()).to(weight2d.dtype)

    @torch.no_grad()
    def hard_codes(self) -> torch.Tensor:
        """Hardened codes [out, K] in the format's storage dtype (what WeightQuantizer.codes stores)."""
        codes = self._grid_codes(self.hard_rounding())
        return self.spec.qformat.encode(self.spec.grain.unview(codes, self.shape))


class HardenedWeight(OnFixedGrid):
    """Fixed codes [out, K] on the base quantizer's grid, decoded exactly as a checkpoint decodes them.

    Holds a finished layer's AdaRound result (1 byte per weight) while later blocks are reconstructed,
    leaving the float weight untouched for the full-precision passes.
    """

    def __init__(self, base: WeightQuantizer, codes: torch.Tensor) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("codes", codes)

    def forward(self, weight2d: torch.Tensor) -> torch.Tensor:
        return self.base.decode(self.codes).to(weight2d.dtype)


class LearnedStep(OverQuantizer):
    """A calibrated quantizer's step sizes as a parameter (LSQ), kept above LSQ_MIN_SHARE of their calibration."""

    def __init__(self, base: ActivationQuantizer | WeightQuantizer) -> None:
        super().__init__()
        self.base = base
        self.scale = nn.Parameter(base.scale.detach().clone())
        # in float32: a float16 weight scale's floor (and _TINY) would round to 0
        self.register_buffer("floor", (base.scale.detach().float() * LSQ_MIN_SHARE).clamp_min(_TINY),
                             persistent=False)

    def step_in_force(self) -> torch.Tensor:
        """The learned step sizes, none below its floor."""
        return torch.maximum(self.scale, self.floor)


class LSQActivation(LearnedStep):
    """A static ActivationQuantizer with a learnable step size (LSQ); the zero point stays fixed."""

    def __init__(self, base: ActivationQuantizer, learn_zero_point: bool = False) -> None:
        if not lsq_supports(base):
            raise ValueError("LSQ learns calibrated static step sizes with a one-level scale format")
        super().__init__(base)
        learn_zero_point = learn_zero_point and base.zero_point is not None
        # a learned zero point is a float; fake_quantize rounds it straight-through
        self.zero_point = nn.Parameter(base.zero_point.detach().float().clone()) if learn_zero_point else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.step_in_force()
        zero_point = self.base.zero_point if self.zero_point is None else self.zero_point
        if self.spec.per_step:
            scale, zero_point = step_qparams(scale, zero_point, self.spec.step_interpolation)
        per_scale = max(x.numel() // scale.numel(), 1)
        scale = grad_scale(scale, 1.0 / math.sqrt(per_scale * self.spec.qformat.qmax))
        scale, zero_point = self.base.per_channel(scale, x.shape[-1]), self.base.per_channel(zero_point, x.shape[-1])
        xc = x.to(compute_dtype(x))  # float16: _TINY and small step sizes would round to 0
        return fake_quantize(xc, scale.to(xc.dtype), None if zero_point is None else zero_point.to(xc.dtype),
                             self.spec.qformat).to(x.dtype)

    @torch.no_grad()
    def write_back(self) -> None:
        """The learned step sizes, rounded to the spec's scale format (and learned zero points, rounded
        onto the format's range), into the base quantizer."""
        self.base.scale.copy_(self.spec.scale_format.round(self.step_in_force().detach().float()))
        if self.zero_point is not None:
            fmt = self.spec.qformat
            zero = self.zero_point.detach().round().clamp(fmt.qmin, fmt.qmax)
            self.base.zero_point.copy_(zero.to(self.base.zero_point.dtype))


class LSQWeight(LearnedStep):
    """A weight quantizer whose calibrated step sizes are learnable (LSQ, for QAT); zero points fixed.

    Installed as the layer's weight_quantizer while the float weight itself trains; `write_back`
    rounds the learned scales to the spec's scale format into the base quantizer.
    """

    def __init__(self, base: WeightQuantizer) -> None:
        if base.scale is None or base.spec.scale_format.two_level:
            raise ValueError("LSQ learns calibrated weight step sizes with a one-level scale format")
        super().__init__(base)

    def forward(self, weight2d: torch.Tensor) -> torch.Tensor:
        spec = self.spec
        blocks = spec.grain.view(weight2d, spec.group_size)
        scale = grad_scale(self.step_in_force(), 1.0 / math.sqrt(blocks.shape[-1] * spec.qformat.qmax))
        zero_point = self.base.zero_point
        bc = blocks.to(compute_dtype(blocks))
        fq = fake_quantize(bc, scale.to(bc.dtype), None if zero_point is None else zero_point.to(bc.dtype),
                           spec.qformat)
        return spec.grain.unview(fq.to(blocks.dtype), weight2d.shape)

    @torch.no_grad()
    def write_back(self) -> None:
        self.base.scale.copy_(self.spec.scale_format.round(self.step_in_force().detach().float()))


def adaround_supports(spec: QuantSpec) -> bool:
    return isinstance(spec.qformat, IntFormat | FloatFormat)


def grid_neighbours(fmt: QFormat, scaled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi): the neighbouring grid values around W/s that AdaRound chooses between (module
    docstring). Integers: floor and floor + 1, unclamped (the zero point is added and the range clamped
    afterwards, as quantize() does). Floating point: FloatFormat.neighbours (±max past the range)."""
    if isinstance(fmt, FloatFormat):
        return fmt.neighbours(scaled)
    if isinstance(fmt, IntFormat):
        lo = torch.floor(scaled)
        return lo, lo + 1
    raise NotImplementedError(f"no learned rounding on the grid of format {fmt.name!r}")


def lsq_supports(quantizer: nn.Module | None) -> bool:
    return (type(quantizer) is ActivationQuantizer and not quantizer.spec.dynamic
            and quantizer.scale is not None and not quantizer.spec.scale_format.two_level)


# -- installing on a layer ------------------------------------------------------------------------


def install_adaround(layer: QuantizedLayer) -> AdaRoundWeight:
    ada = AdaRoundWeight(layer.weight_quantizer, layer.weight_matrix(layer.weight.detach()))
    layer.weight_quantizer = ada
    return ada


def install_lsq_weight(layer: QuantizedLayer) -> LSQWeight:
    lsq = LSQWeight(layer.weight_quantizer)
    layer.weight_quantizer = lsq
    return lsq


def install_lsq(layer: QuantizedLayer, learn_zero_point: bool = False) -> LSQActivation:
    return install_lsq_on(layer, "input_quantizer", learn_zero_point)


def install_lsq_on(owner: nn.Module, attr: str, learn_zero_point: bool = False) -> LSQActivation:
    """LSQActivation over the static ActivationQuantizer `owner.<attr>` (a layer's input quantizer, an
    attention operand quantizer of nn.attention.AttentionQuantizers), installed in its place; put
    `lsq.base` back after `write_back`."""
    lsq = LSQActivation(getattr(owner, attr), learn_zero_point)
    setattr(owner, attr, lsq)
    return lsq


def harden(layer: QuantizedLayer) -> None:
    """AdaRoundWeight -> HardenedWeight (codes fixed, float weight kept for full-precision passes)."""
    ada = layer.weight_quantizer
    layer.weight_quantizer = HardenedWeight(ada.base, ada.hard_codes())


@torch.no_grad()
def commit_weight(layer: QuantizedLayer) -> None:
    """HardenedWeight -> the base quantizer, with the float weight replaced by the decoded codes, so
    that round-to-nearest of the new weight gives back exactly these codes (an ordinary RTN layer)."""
    hardened = layer.weight_quantizer
    weight = layer.weight_from_matrix(hardened.base.decode(hardened.codes))
    layer.weight.copy_(weight.to(layer.weight.dtype))
    layer.weight_quantizer = hardened.base


def restore(layer: QuantizedLayer) -> None:
    """Put the base quantizers back without keeping anything learned (after a failure)."""
    for attr in ("weight_quantizer", "input_quantizer"):
        quantizer = getattr(layer, attr)
        if isinstance(quantizer, AdaRoundWeight | HardenedWeight | LSQActivation | LSQWeight):
            setattr(layer, attr, quantizer.base)
