"""Group-wise scales on 8-bit hardware: per-segment integer GEMMs, rescaled and summed in float.

A scale that varies along K (weight groups, activation groups, or the per-pixel activation scales
a convolution's patch rows mix) cannot be pulled out of an integer sum. K is therefore cut into S
equal segments of L inputs on which every scale is constant, and

    y[m, n] = sum_s  a_scales[m, s] * b_scales[s, n] * acc_s[m, n]
    acc_s   = sum_{k in s} (a[m, k] - a_zero[m, s]) * (b[k, n] - b_zero[s, n])
            = a_s @ b_s  -  a_zero * colsum_s(b)  -  b_zero * rowsum_s(a)  +  L * a_zero * b_zero

int4 codes live in int8 containers, so W4A4 and W4A8 run on the same int8 GEMM as W8A8.

Notation (see also kernels/backend.py):

    a          int8 [M, S*L]        activation codes (padding positions hold the row's zero point)
    prepared   list of S prepared weights, segment s made from b[s*L:(s+1)*L] (int8 [L, N])
    a_scales   float32 [M, S] or [1, S]
    b_scales   float32 [S, N]
    a_zero     float32 [M, S] or [1, S], or None (symmetric)
    b_zero     float32 [S, N], or None (symmetric)
    b_sums     float32 [S, N]: colsum of each weight segment (needed iff a_zero is given)
    y          float32 [M, N]

Cost: the integer work equals one GEMM, but each segment is a GEMM with only L MACs per output
element (low arithmetic intensity), and each segment adds ~3 float passes over the [M, N] output
(int32 -> float, scale, accumulate). With L = 64 and K = 4096 that is 64 small GEMMs and ~190 passes
over M x N floats; benchmarks/kernels/bench_linear.py measures it (W4A4 rows) against fp32.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from diffquant.kernels.backend import IntGemmBackend


@dataclass(frozen=True)
class SegmentZeroPoints:
    """Zero points of a segmented product (either side may be None = symmetric)."""

    a_zero: torch.Tensor | None = None  # [M, S] or [1, S]
    b_zero: torch.Tensor | None = None  # [S, N]
    b_sums: torch.Tensor | None = None  # [S, N], required with a_zero

    def __post_init__(self) -> None:
        if self.a_zero is not None and self.b_sums is None:
            raise ValueError("an activation zero point needs the weight segments' column sums (b_sums)")


def segment_accumulations(
    backend: IntGemmBackend, a: torch.Tensor, prepared: Sequence[Any]
) -> Iterator[torch.Tensor]:
    """acc_s = a_s @ b_s for each segment s, from the backend (int32 or float32 holding int32)."""
    length = a.shape[1] // len(prepared)
    for s, weight in enumerate(prepared):
        yield backend.matmul(a[:, s * length:(s + 1) * length], weight)


def _zero_point_terms(acc: torch.Tensor, a_seg: torch.Tensor, s: int, zp: SegmentZeroPoints) -> torch.Tensor:
    """acc_s corrected for zero points (float32)."""
    a_zero = None if zp.a_zero is None else zp.a_zero[:, s:s + 1]
    if a_zero is not None:
        acc = acc - a_zero * zp.b_sums[s]
    if zp.b_zero is not None:
        b_zero = zp.b_zero[s]
        acc = acc - a_seg.sum(dim=1, keepdim=True, dtype=torch.int32).float() * b_zero
        if a_zero is not None:
            acc = acc + a_seg.shape[1] * a_zero * b_zero
    return acc


def segmented_matmul(
    backend: IntGemmBackend,
    a: torch.Tensor,
    prepared: Sequence[Any],
    a_scales: torch.Tensor,
    b_scales: torch.Tensor,
    zero_points: SegmentZeroPoints | None = None,
) -> torch.Tensor:
    """y = sum_s a_scales[:, s] * b_scales[s] * acc_s (zero points applied): float32 [M, N]."""
    length = a.shape[1] // len(prepared)
    y = None
    for s, acc in enumerate(segment_accumulations(backend, a, prepared)):
        acc = acc.float()
        if zero_points is not None:
            acc = _zero_point_terms(acc, a[:, s * length:(s + 1) * length], s, zero_points)
        term = acc.mul_(a_scales[:, s:s + 1])
        y = term.mul_(b_scales[s]) if y is None else y.addcmul_(term, b_scales[s])
    return y
