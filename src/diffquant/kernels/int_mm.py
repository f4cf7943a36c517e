"""`torch._int_mm`: int8 x int8 -> int32 GEMM, for CPUs with AVX-512 VNNI or AMX.

Notation (kernels/backend.py):

    a    int8 [M, K]      activation codes (any M >= 1; a column slice of a wider matrix is fine)
    b    int8 [K, N]      weight codes, contiguous (prepare() is a view; no repacking)
    acc  int32 [M, N]     exact

Constraints, measured on torch 2.13.0+cpu: none. Every M >= 1 and every K, N (odd ones included)
gives exact results, and odd sizes cost no more than aligned ones. (The M > 16, K and N multiples of
8 rules are CUDA's.) A contiguous [K, N] b runs ~1.5x faster than a transposed [N, K] view, so b is
kept K-major. Without VNNI/AMX this op runs at 1-6 GOP/s (0.01-0.05x fp32): pathological there.
"""

from __future__ import annotations

import torch

from diffquant.kernels.backend import IntGemmBackend, register_backend
from diffquant.kernels.cpu import CpuFeatures


@register_backend
class IntMmBackend(IntGemmBackend):
    name = "int_mm"
    priority = 30
    prepare_free = True

    def pathological(self, cpu: CpuFeatures) -> str | None:
        if cpu.int8_dot_product:
            return None
        return f"torch._int_mm runs at 1-6 GOP/s without AVX-512 VNNI or AMX (this CPU: {cpu.instruction_set})"

    def prepare(self, b: torch.Tensor) -> torch.Tensor:
        return b if b.is_contiguous() else b.contiguous()

    def matmul(self, a: torch.Tensor, prepared: torch.Tensor) -> torch.Tensor:
        return torch._int_mm(a, prepared)

