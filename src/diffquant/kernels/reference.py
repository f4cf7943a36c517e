"""Plain-torch references: the test oracle of every integer GEMM backend and of the segmented path.

Notation as in kernels/backend.py; S segments of L rows of K (K = S*L):

    a          int8 [M, K]    activation codes
    b          int8 [K, N]    weight codes
    a_scales   float [M, S]   (or [1, S]) activation scale of each row in each segment
    b_scales   float [S, N]   (or [S, 1]) weight scale of each output in each segment
    a_zero     float [M, S]   (or [1, S]) activation zero point, or None
    b_zero     float [S, N]   weight zero point, or None

Integer sums use int64 (exact for any K a model has); the rescale uses float64.
"""

from __future__ import annotations

import torch


def reference_int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact a @ b on integer codes: int64 [M, N]."""
    return a.to(torch.int64) @ b.to(torch.int64)


def reference_levels(b: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """The integers that <= 4-bit codes b = index - 8 stand for through 16 levels (FusedKernels' `levels`):
    int64 [K, N] = levels[b + 8], for the references below."""
    return levels.to(torch.int64)[b.to(torch.int64) + 8]


def reference_segment_accumulations(a: torch.Tensor, b: torch.Tensor, length: int) -> torch.Tensor:
    """Exact per-segment sums: int64 [S, M, N], acc[s] = a[:, s*L:(s+1)*L] @ b[s*L:(s+1)*L]."""
    m, k = a.shape
    segments = k // length
    a3 = a.to(torch.int64).reshape(m, segments, length).transpose(0, 1)
    return torch.bmm(a3, b.to(torch.int64).reshape(segments, length, -1))


def reference_segmented_matmul(
    a: torch.Tensor,
    b: torch.Tensor,
    length: int,
    a_scales: torch.Tensor,
    b_scales: torch.Tensor,
    a_zero: torch.Tensor | None = None,
    b_zero: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum_s a_scales[:, s] b_scales[s] sum_{k in s} (a - a_zero)(b - b_zero), in float64 [M, N]."""
    m, k = a.shape
    segments = k // length
    a3 = a.double().reshape(m, segments, length)
    b3 = b.double().reshape(segments, length, -1)
    if a_zero is not None:
        a3 = a3 - a_zero.double().reshape(-1, segments, 1)
    if b_zero is not None:
        b3 = b3 - b_zero.double().reshape(segments, 1, -1)
    acc = torch.einsum("msl,sln->smn", a3, b3)
    scales = a_scales.double().t().unsqueeze(-1) * b_scales.double().unsqueeze(1)  # [S, M, N]
    return (acc * scales).sum(0)
