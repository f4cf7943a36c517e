"""diffquant's own AVX-512 VNNI kernels (vnni.c): a group-wise integer GEMM with the rescale fused in, and
symmetric dynamic activation quantization. Backend "vnni": CPUs with AVX-512 VNNI + BW + VL only.

Why: a scale that changes along K (W4A4's group-64 weights and activations; per-pixel activation scales
inside a convolution's im2col rows) splits the product into S segments. Through torch._int_mm that is S
small GEMMs plus ~3 float passes over the [M, N] output per segment (kernels/segmented.py): 0.8-1.3x fp32
for W4A4 at 4096 x 4096. vnni.c keeps each segment's int32 accumulators in registers and folds
a_scale * w_scale into a float accumulator every L inputs, so W4A4 runs at the speed of one int8 GEMM.

Notation (kernels/backend.py, kernels/segmented.py):

    a         int8 [M, K]      activation codes, K = S * L, L % 4 == 0
    b         int8 [K, N]      weight codes of a signed symmetric format of `bits` bits
    packed    uint8            b + offset in VNNI order (offset 8 for bits <= 4, else 128), resident:
                                 bits <= 4: [NB, K/8, 16, 4], two codes per byte (K % 8 == 0)
                                 bits > 4:  [NB, K/4, 16, 4], one code per byte
                               NB = ceil(N / 16) strips of 16 outputs (N padded with code 0)
    levels    int [16] or None bits <= 4: a nibble is an index, b = levels[nibble] (FP4 E2M1 x 2, ...):
                               max - min <= 255 (vnni.c decodes u = levels - min(levels) per panel)
    a_scales  float32 [M, S] or [1, S]
    b_scales  float32 [S, N] or [S, 1]
    y         float32 [M, N] = sum_s a_scales[:, s] * b_scales[s] * (a_s @ b_s), integer sums exact

Only weights without zero points and inputs without zero points are fused; the rest use the int_mm path.
Plain int8 GEMMs (`matmul`) are torch._int_mm, as in the "int_mm" backend.

Built on first use and loaded as kernels/native.py says; without a compiler, or if the build fails, the
backend is unavailable (the reason is logged and shown by `diffquant kernels`) and selection falls back to
"int_mm".
"""

from __future__ import annotations

import torch

from diffquant.kernels.backend import register_backend
from diffquant.kernels.cpu import CpuFeatures
from diffquant.kernels.int_mm import IntMmBackend
from diffquant.kernels.native import (
    GEMM_ARGS,
    QUANTIZE_ARGS,
    NativeFusedKernels,
    NativeLibrary,
    dpbusd_offset,
    pack_strips,
    unpack_strips,
)

FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma")
REQUIRED_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_vnni"})
STRIP = 16  # outputs per zmm register
LIBRARY = NativeLibrary("vnni.c", FLAGS, {"dq_vnni_gemm": GEMM_ARGS, "dq_quantize_symmetric": QUANTIZE_ARGS})


def pack_weight(b: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 [K, N] signed codes -> uint8 VNNI layout (module docstring)."""
    return pack_strips(b, bits, STRIP, dpbusd_offset(bits))


def unpack_weight(packed: torch.Tensor, k: int, n: int, bits: int) -> torch.Tensor:
    """Inverse of pack_weight: int8 [K, N]."""
    return unpack_strips(packed, k, n, bits, dpbusd_offset(bits))


VnniKernels = NativeFusedKernels("vnni", LIBRARY, "dq_vnni_gemm", STRIP, dpbusd_offset)


@register_backend
class VnniBackend(IntMmBackend):
    """torch._int_mm for plain int8 GEMMs, plus the fused kernels of vnni.c (`fused`)."""

    name = "vnni"
    priority = 40
    prepare_free = True
    fused = VnniKernels

    def available(self, cpu: CpuFeatures) -> bool:
        return cpu.flags >= REQUIRED_FLAGS and not isinstance(LIBRARY.load(), str)

    def details(self) -> str:
        lib = LIBRARY.load()
        return "" if isinstance(lib, str) else f"threads: {lib.threading}"

    def unavailable_reason(self, cpu: CpuFeatures) -> str | None:
        missing = sorted(REQUIRED_FLAGS - cpu.flags)
        if missing:
            return f"the CPU lacks {', '.join(missing)}"
        lib = LIBRARY.load()
        return lib if isinstance(lib, str) else None
