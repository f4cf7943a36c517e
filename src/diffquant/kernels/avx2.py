"""diffquant's own AVX2 kernels (avx2.c) for CPUs without AVX-512 VNNI: the group-wise integer GEMM with the
rescale, bias and output cast fused in, an exact int32 GEMM, and symmetric dynamic activation quantization.

Backends (kernels/backend.py; both prefer no split, no copy and no float pass per segment):
    avx2      AVX2 + FMA (every x86 CPU since Haswell / Zen 1). Products from vpmaddubsw: <= 4-bit weights
              as unsigned nibbles with int16 sums of as many quads as cannot saturate; 8-bit weights by sign
              transfer, |a| x sign(a)*w, exact in one GEMM, with sign(a)*w read from small tables of each
              weight quad's 16 sign variants (avx2.c says why). Chosen on AVX2 CPUs without AVX-VNNI.
    avx_vnni  The same kernels with vpdpbusd on ymm registers: VEX-encoded on CPUs with AVX-VNNI (flag
              `avx_vnni`: Intel client cores since Alder Lake, AMD Zen 5), chosen there. AVX-512 VNNI CPUs
              can run the EVEX encoding of the same instruction; there `vnni` (zmm) wins the selection, and
              `DIFFQUANT_KERNEL_BACKEND=avx_vnni` runs this code path (how it is tested on such machines).

Notation and weight layout: kernels/native.py, with strips of 8 outputs (one ymm of int32). Offsets: 8 for
<= 4-bit codes; for 8-bit codes 128 (vpdpbusd) or 0 (sign transfer, which has no place for -128: the fused
path declines such weights and the plain GEMM adds them back from a second, 1-bit-valued part). Nibbles
decoded through 16 levels (FP4): levels spanning <= 255 with vpdpbusd, <= 127 with vpmaddubsw (a pair of
products at |a| = 128 must fit int16).

Resident bytes: both backends keep weights in this layout (<= 4-bit two per byte): W8 0.25x fp32, W4 group-64
with fp16 scales 0.133x. Plain int8 GEMMs (`matmul`, the zero-point paths of kernels/segmented.py) run on
the same kernel (dq_int_gemm, exact int32); `prepare` packs a weight into the layout once (not free).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffquant.kernels.backend import IntGemmBackend, register_backend
from diffquant.kernels.cpu import CpuFeatures, detect_cpu
from diffquant.kernels.native import (
    GEMM_ARGS,
    QUANTIZE_ARGS,
    NativeFusedKernels,
    NativeLibrary,
    check_status,
    dpbusd_offset,
    row_stride,
)

STRIP = 8  # outputs per ymm register
NIBBLE_MIN, NIBBLE_MAX = -8, 7
_p, _i64, _i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
SIGNATURES = {
    "dq_gemm": GEMM_ARGS,
    "dq_int_gemm": [_p, _i64, _i64, _p, _i32, _i32, _p, _i64, _i64, _i64, _i64, _i32],
    "dq_quantize_symmetric": QUANTIZE_ARGS,
}
AVX2_FLAGS = ("-mavx2", "-mfma")
VEX_VNNI, EVEX_VNNI = ("-mavxvnni",), ("-mavx512vnni", "-mavx512vl")


def sign_transfer_offset(bits: int) -> int:
    """8 for nibbles (unsigned for vpmaddubsw); 0 for bytes, which sign transfer takes signed."""
    return 8 if bits <= 4 else 0


def int_matmul(kernels: NativeFusedKernels, a: torch.Tensor, packed: torch.Tensor, n: int, bits: int,
               k_pad: int) -> torch.Tensor:
    """Exact int32 [M, N] = a [M, K] @ b, b packed (k_pad >= K rows, the rows past K zero)."""
    m = a.shape[0]
    a = a if a.stride(1) == 1 else a.contiguous()
    y = torch.empty(m, n, dtype=torch.int32)
    if m == 0 or n == 0:
        return y.zero_()
    with torch.profiler.record_function(f"diffquant::{kernels.name}_int_gemm"):
        status = kernels.library.require().dq_int_gemm(
            a.data_ptr(), row_stride(a), a.shape[1], packed.data_ptr(), int(bits <= 4), kernels.offsets(bits),
            y.data_ptr(), n, m, n, k_pad, torch.get_num_threads())
    check_status(status, f"{kernels.name} dq_int_gemm")
    return y


@dataclass(frozen=True)
class PackedPart:
    packed: torch.Tensor  # uint8, kernels/native.py layout
    bits: int             # 4: nibbles, 8: bytes


@dataclass(frozen=True)
class Avx2Weight:
    """A weight prepared for the plain GEMM: b = sum of its parts' codes (two parts only where sign transfer
    must split off -128)."""

    parts: tuple[PackedPart, ...]
    k: int
    n: int


class Avx2Family(IntGemmBackend):
    """What `avx2` and `avx_vnni` share: the layout, the plain GEMM and the fused kernels of one build."""

    prepare_free = False
    required: frozenset[str]

    def library(self) -> NativeLibrary:
        return self.fused.library

    def available(self, cpu: CpuFeatures) -> bool:
        return self.cpu_fits(cpu) and not isinstance(self.library().load(), str)

    def cpu_fits(self, cpu: CpuFeatures) -> bool:
        return cpu.flags >= self.required

    def unavailable_reason(self, cpu: CpuFeatures) -> str | None:
        if not self.cpu_fits(cpu):
            return f"the CPU lacks {', '.join(sorted(self.required - cpu.flags))}"
        lib = self.library().load()
        return lib if isinstance(lib, str) else None

    def details(self) -> str:
        lib = self.library().load()
        return "" if isinstance(lib, str) else f"{self.dot_product}, threads: {lib.threading}"

    dot_product = ""

    def prepare(self, b: torch.Tensor) -> Avx2Weight:
        k, n = b.shape
        nibbles = b.numel() == 0 or (int(b.min()) >= NIBBLE_MIN and int(b.max()) <= NIBBLE_MAX)
        bits = 4 if nibbles else 8
        if self.fused.accepts(b, bits):
            return Avx2Weight((self._part(b, bits),), k, n)
        rest = torch.where(b == -128, -1, 0).to(torch.int8)  # b = clamp(b, -127) + rest: -128 as -127 - 1
        return Avx2Weight((self._part(b.clamp(min=-127), bits), self._part(rest, 4)), k, n)

    def _part(self, b: torch.Tensor, bits: int) -> PackedPart:
        k = b.shape[0]
        padded = F.pad(b, (0, 0, 0, -k % (8 if bits <= 4 else 4)))
        return PackedPart(self.fused.pack(padded, bits), bits)

    def matmul(self, a: torch.Tensor, prepared: Avx2Weight) -> torch.Tensor:
        acc = None
        for part in prepared.parts:
            k_pad = part.packed.shape[1] * (8 if part.bits <= 4 else 4)
            y = int_matmul(self.fused, a, part.packed, prepared.n, part.bits, k_pad)
            acc = y if acc is None else acc.add_(y)
        return acc

    def unprepare(self, prepared: Avx2Weight) -> torch.Tensor:
        codes = None
        for part in prepared.parts:
            k_pad = part.packed.shape[1] * (8 if part.bits <= 4 else 4)
            b = self.fused.unpack(part.packed, k_pad, prepared.n, part.bits)[:prepared.k].to(torch.int16)
            codes = b if codes is None else codes + b
        return codes.to(torch.int8)

    def prepared_nbytes(self, prepared: Avx2Weight) -> int:
        return sum(part.packed.numel() for part in prepared.parts)


@register_backend
class Avx2Backend(Avx2Family):
    """AVX2 + FMA, products from vpmaddubsw (sign transfer for 8-bit weights)."""

    name = "avx2"
    priority = 25
    required = frozenset({"avx2", "fma"})
    fused = NativeFusedKernels("avx2", NativeLibrary("avx2.c", AVX2_FLAGS, SIGNATURES), "dq_gemm", STRIP,
                               sign_transfer_offset, level_span=127)
    dot_product = "vpmaddubsw, sign transfer by variant tables"


def _dpbusd_encoding(cpu: CpuFeatures) -> tuple[str, ...]:
    """AVX-VNNI's VEX encoding where the CPU has it, else the EVEX one of AVX-512 VNNI + VL."""
    return VEX_VNNI if "avx_vnni" in cpu.flags else EVEX_VNNI


@register_backend
class AvxVnniBackend(Avx2Family):
    """AVX-VNNI: vpdpbusd on ymm registers (module docstring)."""

    name = "avx_vnni"
    priority = 35
    required = frozenset({"avx2", "fma"})
    fused = NativeFusedKernels("avx_vnni", NativeLibrary("avx2.c", AVX2_FLAGS + _dpbusd_encoding(detect_cpu()),
                                                        SIGNATURES), "dq_gemm", STRIP, dpbusd_offset)

    def cpu_fits(self, cpu: CpuFeatures) -> bool:
        dpbusd = "avx_vnni" in cpu.flags or cpu.flags >= {"avx512_vnni", "avx512vl"}
        return super().cpu_fits(cpu) and dpbusd

    def unavailable_reason(self, cpu: CpuFeatures) -> str | None:
        if super().cpu_fits(cpu) and not self.cpu_fits(cpu):
            return "the CPU has neither AVX-VNNI (avx_vnni) nor AVX-512 VNNI with VL"
        return super().unavailable_reason(cpu)

    @property
    def dot_product(self) -> str:
        encoding = "VEX, AVX-VNNI" if "-mavxvnni" in self.fused.library.flags else "EVEX, AVX-512 VNNI + VL"
        return f"vpdpbusd ({encoding})"
