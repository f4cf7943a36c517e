"""GPTQ (Frantar et al. 2022, arXiv 2210.17323): round a weight column by column and push each column's
rounding error onto the columns not yet rounded, weighted by the inverse Hessian of the layer's
inputs, so that ‖X·Wᵀ − X·Qᵀ‖² grows as little as possible.

Notation: W [N, K] the weight (N outputs, K inputs, input axis last), X [n, K] the inputs the weight
multiplies, H = 2·XᵀX / n [K, K], g the quantizer's group length along K, B the block length.

    H ← H + damping · mean(diag H) · I          (dead inputs, diag H = 0: H_jj = 1, W[:, j] = 0 first)
    U = upper Cholesky factor of H⁻¹            (H⁻¹ = Uᵀ·U)
    for j = 0 … K − 1:
        at the start of j's group: that group's scale (and zero point) from the group's current
        columns — already error-compensated — by the quantizer's own range rule (qparams_from_range)
        q_j = Q(w_j);  e_j = (w_j − q_j) / U_jj;  w_{j+1:} −= e_j · U_{j, j+1:}

Columns are processed in blocks of B (lazy batch updates: inside a block the update stays in the
block; the columns after it get the block's errors in one matmul). A group that reaches past its
block sees its later columns as they stand (the block's errors not yet applied); with B a multiple
of g (128 and 64 or 16, as the recipes use) no group does. The reference code (gptq.py, groups
without static_groups) reads a group's range from W, which lags the updates inside the block; this
module reads the up-to-date values, which are the ones rounded. No act-order (columns in order).

Arithmetic: H, its Cholesky factors and the running weight in float64: the damped Hessian of 4-bit
layers' smoothed inputs spans many decades and a float32 Cholesky of it fails or loses the small
directions; the matrices here (K ≤ a few thousand) cost little on a CPU either way. Each column is
rounded in float32 with float32 qparams, exactly as formats.ops rounds a weight, so the result lies on
the quantizer's grid bit for bit. With a diagonal H (white inputs) U is diagonal, no error moves and
the result is round-to-nearest exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffquant.formats.ops import (
    block_range,
    dequantize,
    global_scale_from_range,
    qparams_from_range,
    quantize,
)
from diffquant.formats.spec import QuantSpec
from diffquant.nn.quantizers import WeightQuantizer

DAMPING, BLOCK_SIZE = 0.01, 128


@dataclass(frozen=True)
class GPTQResult:
    """The dequantized weight [N, K] (float32) and its codes in code units [N, K] (float32: grid values,
    not yet QFormat.encode'd); the quantizer given to `gptq` now holds the scales they go with."""

    weight: torch.Tensor
    codes: torch.Tensor


def hessian(x: torch.Tensor) -> torch.Tensor:
    """H = 2·XᵀX / n [K, K] in float64 of inputs x [n, K]."""
    x = x.detach().double()
    return 2 * x.t() @ x / x.shape[0]


def inverse_cholesky(h: torch.Tensor, damping: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damping·mean(diag H)·I)⁻¹ (float64; H must have no zero diagonal)."""
    h = h.double().clone()
    h.diagonal().add_(damping * h.diagonal().mean())
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(hinv, upper=True)


class GroupGrid:
    """The quantizer's grid, one group of columns at a time: `start` fixes a group's qparams from its
    current columns, `round` puts a column on the grid; `install` gives the quantizer all of them."""

    def __init__(self, spec: QuantSpec, weight: torch.Tensor) -> None:
        self.spec = spec
        # two-level scales: one global scale over the blocks of all of W, as WeightQuantizer.calibrate
        lo, hi = block_range(spec.grain.view(weight, spec.group_size))
        self.global_scale = global_scale_from_range(lo, hi, spec.qformat, spec.symmetric, spec.scale_format)
        self.scales: list[torch.Tensor] = []
        self.zero_points: list[torch.Tensor | None] = []

    @property
    def group_size(self) -> int | None:
        """Columns per group; None: one group over all columns (per-channel or per-tensor)."""
        return self.spec.grain.segment(self.spec.group_size)

    def start(self, columns: torch.Tensor) -> None:
        """Qparams of the group whose current columns are `columns` [N, g] (float32): per row, or one
        for the whole tensor, by the same range rule as WeightQuantizer.calibrate."""
        lo, hi = block_range(self.spec.grain.column_blocks(columns))
        spec = self.spec
        scale, zero_point = qparams_from_range(lo, hi, spec.qformat, spec.symmetric, spec.scale_format,
                                               self.global_scale)
        self.scales.append(scale)
        self.zero_points.append(zero_point)

    def round(self, column: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, dequantized values) [N] of one float32 column on the current group's grid."""
        scale, zero_point = self.scales[-1], self.zero_points[-1]
        codes = quantize(column.reshape(-1, 1), scale, zero_point, self.spec.qformat)
        return codes.reshape(-1), dequantize(codes, scale, zero_point).reshape(-1)

    def install(self, quantizer: WeightQuantizer) -> None:
        """The groups' qparams as the quantizer's buffers, block_view's layout [blocks, 1]."""
        quantizer.global_scale = self.global_scale
        quantizer.scale = torch.cat(self.scales, dim=1).reshape(-1, 1)
        zero_points = self.zero_points
        quantizer.zero_point = None if zero_points[0] is None else torch.cat(zero_points, dim=1).reshape(-1, 1)


def _drop_dead_inputs(weight: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs that never fire (diag H = 0): H_jj = 1 and W[:, j] = 0, as GPTQ does."""
    dead = h.diagonal() == 0
    if not dead.any():
        return weight, h
    weight, h = weight.clone(), h.clone()
    weight[:, dead] = 0
    h[dead, dead] = 1
    return weight, h


def _group_columns(w: torch.Tensor, block: torch.Tensor, end: int, i: int, g: int) -> torch.Tensor:
    """The g columns from column i of `block` on (then from column `end` of w), float32."""
    columns = block[:, i:i + g]
    if columns.shape[1] < g:
        columns = torch.cat([columns, w[:, end:end + g - columns.shape[1]]], dim=1)
    return columns.float()


def _quantize_block(w: torch.Tensor, u: torch.Tensor, start: int, end: int, grid: GroupGrid,
                    out: GPTQResult) -> torch.Tensor:
    """Columns [start, end) of w quantized into `out`, their errors compensated inside the block; the
    block's scaled errors [N, end − start] are returned for the columns after it."""
    block = w[:, start:end].clone()
    errors = torch.zeros_like(block)
    g = w.shape[1] if grid.group_size is None else grid.group_size
    for i in range(end - start):
        j = start + i
        if j % g == 0:
            grid.start(_group_columns(w, block, end, i, g))
        out.codes[:, j], out.weight[:, j] = grid.round(block[:, i].float())
        errors[:, i] = (block[:, i] - out.weight[:, j].double()) / u[j, j]
        block[:, i + 1:] -= errors[:, i:i + 1] @ u[j:j + 1, j + 1:end]
    return errors


@torch.no_grad()
def gptq(weight: torch.Tensor, h: torch.Tensor, quantizer: WeightQuantizer, block_size: int = BLOCK_SIZE,
         damping: float = DAMPING) -> GPTQResult:
    """GPTQ-quantize `weight` [N, K] for inputs with Hessian `h` [K, K] (`hessian`) on the grid of
    `quantizer` (any weight spec: per-tensor, per-channel or groups along K), which ends calibrated with
    the qparams GPTQ chose: quantizer(result.weight) == result.weight and quantizer.codes(result.weight)
    == QFormat.encode(result.codes), bit for bit."""
    if h.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"Hessian {tuple(h.shape)} does not fit a weight with {weight.shape[1]} inputs")
    w, h = _drop_dead_inputs(weight.detach().to(torch.float64, copy=True), h.double())  # w is updated in place
    u = inverse_cholesky(h, damping)
    grid = GroupGrid(quantizer.spec, w.float())
    out = GPTQResult(torch.zeros_like(w, dtype=torch.float32), torch.zeros_like(w, dtype=torch.float32))
    for start in range(0, w.shape[1], block_size):
        end = min(start + block_size, w.shape[1])
        errors = _quantize_block(w, u, start, end, grid, out)
        w[:, end:] -= errors @ u[start:end, end:]
    grid.install(quantizer)
    return out
