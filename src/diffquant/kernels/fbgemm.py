"""fbgemm int8 GEMM through torch's quantized ops: the path for AVX2 CPUs (also correct with VNNI).

Notation (kernels/backend.py):

    a    int8 [M, K]      activation codes
    b    int8 [K, N]      weight codes; prepare() repacks them into fbgemm's layout (a resident
                          int8 copy of about K*N bytes plus N int32 column offsets)
    acc  float32 [M, N]   the exact int32 accumulations, converted to float32 by fbgemm (exact while
                          |acc| <= 2**24, always for K <= 1024; beyond, ordinary float32 rounding)

What torch 2.13 offers: `quantized::linear_prepack(qint8 weight)` packs a weight for fbgemm;
`quantized::linear_with_input_q_dq_qweight_dq_output_fp32(X, X_scale, X_zero_point, W)` quantizes a
float X per tensor to uint8 (round(X / X_scale) + X_zero_point), runs fbgemm's u8 x s8 -> int32 GEMM
and returns fp32 = X_scale * W_scale * (acc - zero-point terms). With X = codes as float, X_scale = 1,
W_scale = 1 it returns the accumulations themselves. (`linear_dynamic` chooses its own per-tensor
activation range, so it cannot take our per-token codes; `quantized::linear` requantizes its output.)

Saturation: without VNNI, fbgemm multiplies u8 x s8 pairs with `vpmaddubsw`, whose int16 sum of two
adjacent products saturates. fbgemm's own answer, `reduce_range=True`, quantizes activations to 7 bits
-- different codes from the spec's, so not used here. Instead, when an exact answer is not guaranteed
(max|u8| * 2 * max|b| > 32767 for u8 = a - min(a)), a is split into its positive and negative parts,
each in [0, 128], and acc = GEMM(a+) - GEMM(a-): exact at twice the cost. This only happens for 8-bit
activations against weights with codes beyond +-64 (W8A8); W4 weights and 4-bit activations never
split. With VNNI (`vpdpbusd`) products accumulate straight into int32 and nothing is split.

Quantized tensors (`_make_per_tensor_quantized_tensor`) are deprecated in torch 2.13 (a warning,
silenced here, points to pytorch issue 184982): this backend needs replacing when torch drops them.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from diffquant.kernels.backend import IntGemmBackend, register_backend
from diffquant.kernels.cpu import CpuFeatures, detect_cpu

INT16_MAX = 32767


@dataclass(frozen=True)
class FbgemmWeight:
    packed: Any  # torch.classes.quantized.LinearPackedParamsBase
    k: int
    n: int
    max_abs: int  # max |b|, to decide whether u8 x s8 pairs can saturate


@contextlib.contextmanager
def _fbgemm_engine() -> Iterator[None]:
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = "fbgemm"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            yield
    finally:
        torch.backends.quantized.engine = previous


def _fbgemm_linear(x: torch.Tensor, zero_point: int, weight: FbgemmWeight) -> torch.Tensor:
    op = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32
    return op(x, 1.0, zero_point, weight.packed)


@register_backend
class FbgemmBackend(IntGemmBackend):
    name = "fbgemm"
    priority = 20
    prepare_free = False

    def available(self, cpu: CpuFeatures) -> bool:
        return "fbgemm" in torch.backends.quantized.supported_engines and "avx2" in cpu.flags

    def prepare(self, b: torch.Tensor) -> FbgemmWeight:
        k, n = b.shape
        with _fbgemm_engine():
            qweight = torch._make_per_tensor_quantized_tensor(b.t().contiguous(), 1.0, 0)
            packed = torch.ops.quantized.linear_prepack(qweight, None)
        return FbgemmWeight(packed, k, n, int(b.to(torch.int16).abs().max()) if b.numel() else 0)

    def matmul(self, a: torch.Tensor, prepared: FbgemmWeight) -> torch.Tensor:
        lo, hi = (int(v) for v in torch.aminmax(a))
        if not self.may_saturate(hi - lo, prepared.max_abs):
            return _fbgemm_linear(a.float(), -lo, prepared)
        positive = a.clamp(min=0).float()
        negative = a.to(torch.int16).neg_().clamp_(min=0).float()
        return _fbgemm_linear(positive, 0, prepared) - _fbgemm_linear(negative, 0, prepared)

    @staticmethod
    def may_saturate(u8_max: int, b_max_abs: int, cpu: CpuFeatures | None = None) -> bool:
        """Can an adjacent pair u8*s8 + u8*s8 leave int16 in fbgemm's kernel on this CPU?"""
        cpu = detect_cpu() if cpu is None else cpu
        return cpu.fbgemm_int16_saturation and u8_max * 2 * b_max_abs > INT16_MAX

    def unprepare(self, prepared: FbgemmWeight) -> torch.Tensor:
        with _fbgemm_engine():
            qweight, _ = prepared.packed.unpack()
        return qweight.int_repr().t().contiguous()

    def prepared_nbytes(self, prepared: FbgemmWeight) -> int:
        """fbgemm keeps the weight as int8 in its blocked layout plus int32 column offsets."""
        return prepared.k * prepared.n + 4 * prepared.n
