"""Integer GEMM kernels for frozen models, chosen by what the CPU can do.

    backend = diffquant.kernels.active_backend()      # chosen once per process, logged
    acc = backend.matmul(a_int8_MxK, backend.prepare(b_int8_KxN))

Backends (registry `BACKENDS`, best first where usable):
    vnni     torch._int_mm plus diffquant's own fused group-wise GEMM and activation quantizer
             (vnni.c, compiled on first use): CPUs with AVX-512 VNNI + BW + VL and a C compiler.
    avx_vnni diffquant's own AVX2 kernels (avx2.c) with AVX-VNNI's vpdpbusd: Intel client CPUs (flag avx_vnni).
    int_mm   torch._int_mm, int8 x int8 -> int32: CPUs with AVX-512 VNNI or AMX only.
    avx2     diffquant's own AVX2 kernels (avx2.c: exact vpmaddubsw products, fused group-wise GEMM and
             activation quantizer): AVX2 + FMA CPUs without VNNI, with a C compiler.
    fbgemm   fbgemm u8 x s8 GEMM via torch's quantized ops: AVX2 CPUs without a C compiler (int16
             saturation handled by splitting activations).
    float    codes as fp32 through the fp32 matmul: always correct.
    triton   CUDA tensors (kernels/gpu_triton.py): int8 tensor-core GEMMs with the group-wise rescale fused,
             where triton imports and a GPU is visible. Models frozen on a GPU pick it.
Override with $DIFFQUANT_KERNEL_BACKEND or select_backend(name). Every backend's `reference` is the
plain-torch oracle (kernels/reference.py); segmented.py adds group-wise scales on top of any backend;
a backend's `fused` kernels (FusedKernels) do the same in one pass where it has them.
"""

from diffquant.kernels import avx2, fbgemm, float_fallback, gpu_triton, int_mm, vnni  # noqa: F401  (register the backends)
from diffquant.kernels.backend import (
    BACKENDS,
    ENV_BACKEND,
    BackendUnavailableError,
    FusedKernels,
    IntGemmBackend,
    active_backend,
    get_backend,
    register_backend,
    reset_active_backend,
    select_backend,
    usable_backends,
)
from diffquant.kernels.cpu import CpuFeatures, detect_cpu, fastest_float_dtype
from diffquant.kernels.reference import (
    reference_int_matmul,
    reference_segment_accumulations,
    reference_segmented_matmul,
)
from diffquant.kernels.segmented import SegmentZeroPoints, segment_accumulations, segmented_matmul

__all__ = [
    "BACKENDS",
    "ENV_BACKEND",
    "BackendUnavailableError",
    "CpuFeatures",
    "FusedKernels",
    "IntGemmBackend",
    "SegmentZeroPoints",
    "active_backend",
    "detect_cpu",
    "fastest_float_dtype",
    "get_backend",
    "reference_int_matmul",
    "reference_segment_accumulations",
    "reference_segmented_matmul",
    "register_backend",
    "reset_active_backend",
    "segment_accumulations",
    "segmented_matmul",
    "select_backend",
    "usable_backends",
]
