"""Float fallback: the integer codes as fp32, multiplied by the fp32 matmul. Correct on every CPU.

Notation (kernels/backend.py):

    a    int8 [M, K]      activation codes
    b    int8 [K, N]      weight codes (prepare() is a view; converted to fp32 per call)
    acc  float32 [M, N]   the integer sums, exact while every partial sum stays within 2**24
                          (always for K <= 1024), else ordinary float32 rounding

fp32 on purpose, never bf16: bf16 holds integers exactly only up to 256.
"""

from __future__ import annotations

import torch

from diffquant.kernels.backend import IntGemmBackend, register_backend


@register_backend
class FloatBackend(IntGemmBackend):
    name = "float"
    priority = 0
    prepare_free = True

    def prepare(self, b: torch.Tensor) -> torch.Tensor:
        return b

    def matmul(self, a: torch.Tensor, prepared: torch.Tensor) -> torch.Tensor:
        return a.float() @ prepared.float()
