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
    a_scales  float32 [M, S] or [1, S]
    b_scales  float32 [S, N] or [S, 1]
    y         float32 [M, N] = sum_s a_scales[:, s] * b_scales[s] * (a_s @ b_s), integer sums exact

Only weights without zero points and inputs without zero points are fused; the rest use the int_mm path.
Plain int8 GEMMs (`matmul`) are torch._int_mm, as in the "int_mm" backend.

The library is compiled on first use with the system C compiler ($CC, default `cc`) into
$DIFFQUANT_CACHE_DIR/kernels (default ~/.cache/diffquant/kernels), keyed by a hash of the source and
flags, and loaded with ctypes. Without a compiler, or if the build fails, the backend is unavailable (the
reason is logged and shown by `diffquant kernels`) and selection falls back to "int_mm".
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from diffquant.kernels.backend import register_backend
from diffquant.kernels.cpu import CpuFeatures
from diffquant.kernels.int_mm import IntMmBackend

SOURCE = Path(__file__).with_name("vnni.c")
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma", "-shared", "-fPIC", "-pthread")
# Threads from torch's OpenMP pool (vnni.c, parallel()); a compiler without OpenMP gets the pthread build.
THREADING = (("openmp", ("-fopenmp",)), ("pthreads", ()))
REQUIRED_FLAGS = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_vnni"})
CACHE_ENV = "DIFFQUANT_CACHE_DIR"
STRIP = 16  # outputs per zmm register
log = logging.getLogger("diffquant.kernels")

_p, _i64, _i32, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float
SIGNATURES = {
    "dq_vnni_gemm": [_p, _i64, _p, _i32, _i32, _p, _i64, _p, _i64, _p, _p, _i64, _i32, _i64, _i64, _i64, _i64,
                     _i32],
    "dq_quantize_symmetric": [_p, _i64, _i32, _i64, _i64, _i64, _i64, _f32, _f32, _p, _p, _i32],
}


# -- build and load ------------------------------------------------------------------------------------


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV)
    return (Path(root) if root else Path.home() / ".cache" / "diffquant") / "kernels"


def _compile(compiler: str, flags: tuple[str, ...], target: Path) -> None:
    """Compile into a temporary file next to `target`, then rename: concurrent builds never see half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *flags, str(SOURCE), "-o", tmp], check=True, capture_output=True, text=True,
                       timeout=300)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build(compiler: str, extra: tuple[str, ...]) -> ctypes.CDLL:
    flags = (*FLAGS, *extra)
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
    target = cache_dir() / f"vnni-{key}.so"
    if not target.is_file():
        _compile(compiler, flags, target)
    return ctypes.CDLL(str(target))


@functools.lru_cache(maxsize=1)
def load_library() -> ctypes.CDLL | str:
    """The compiled library (its threading in `.threading`), or why there is none (a sentence)."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None or not SOURCE.is_file():
        return "no C compiler found ($CC or cc)" if compiler is None else f"kernel source {SOURCE.name} is missing"
    failure = ""
    for threading, extra in THREADING:
        try:
            lib = _build(compiler, extra)
            break
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", "") or str(exc)
            log.warning("diffquant kernels: building %s with %s failed: %s", SOURCE.name, threading, detail[-500:])
            failure = f"building {SOURCE.name} failed: {type(exc).__name__}"
    else:
        return failure
    for name, argtypes in SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
    lib.threading = threading
    return lib


def library() -> ctypes.CDLL:
    lib = load_library()
    if isinstance(lib, str):
        raise RuntimeError(f"the vnni kernels are unavailable: {lib}")
    return lib


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _row_stride(t: torch.Tensor) -> int:
    """Elements between rows of a 2-D tensor with unit column stride (a single row may report any stride)."""
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


def _check(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"vnni kernel {what} rejected its arguments or ran out of memory")


# -- weight layout (plain torch: also the layout's test oracle) -----------------------------------------------


def code_offset(bits: int) -> int:
    """What makes a signed code of `bits` bits unsigned for vpdpbusd: 8 (a nibble) or 128 (a byte)."""
    return 8 if bits <= 4 else 128


def pack_weight(b: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 [K, N] signed codes -> uint8 VNNI layout (module docstring)."""
    k, n = b.shape
    strips = -(-n // STRIP)
    u = F.pad(b.to(torch.int16) + code_offset(bits), (0, strips * STRIP - n), value=code_offset(bits))
    if bits > 4:
        return u.to(torch.uint8).reshape(k // 4, 4, strips, STRIP).permute(2, 0, 3, 1).contiguous()
    u = u.to(torch.uint8).reshape(k // 8, 2, 4, strips, STRIP).permute(3, 0, 4, 2, 1)  # [NB, K/8, 16, 4, half]
    return (u[..., 0] | (u[..., 1] << 4)).contiguous()


def unpack_weight(packed: torch.Tensor, k: int, n: int, bits: int) -> torch.Tensor:
    """Inverse of pack_weight: int8 [K, N]."""
    strips = packed.shape[0]
    if bits > 4:
        u = packed.permute(1, 3, 0, 2).reshape(k, strips * STRIP)
    else:
        halves = torch.stack([packed & 0xF, packed >> 4], dim=-1)  # [NB, K/8, 16, 4, 2]
        u = halves.permute(1, 4, 3, 0, 2).reshape(k, strips * STRIP)
    return (u[:, :n].to(torch.int16) - code_offset(bits)).to(torch.int8).contiguous()


# -- kernels -------------------------------------------------------------------------------------------------


class VnniKernels:
    """The fused operations a PackedWeight / PackedLayer use when the backend offers them."""

    @staticmethod
    def supports(bits: int, length: int, k: int) -> bool:
        """Can the fused GEMM take a weight of `bits` bits with segments of `length` over K = k?"""
        return bits <= 8 and length % 4 == 0 and k % length == 0 and (bits > 4 or k % 8 == 0)

    pack = staticmethod(pack_weight)
    unpack = staticmethod(unpack_weight)

    @staticmethod
    def matmul(a: torch.Tensor, packed: torch.Tensor, n: int, bits: int, length: int, a_scales: torch.Tensor,
               b_scales: torch.Tensor, bias: torch.Tensor | None = None,
               out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """y [M, N] = sum_s a_scales[:, s] * b_scales[s] * (a_s @ b_s) + bias, accumulated in float32 and
        cast to out_dtype once (module docstring); float32 and bfloat16 outputs are written by the kernel."""
        m, k = a.shape
        a = a if a.stride(1) == 1 else a.contiguous()
        a_scales = a_scales.float().contiguous()
        width = packed.shape[0] * STRIP
        b_scales = F.pad(b_scales.float().expand(-1, n), (0, width - n)).contiguous()
        direct = out_dtype in (torch.float32, torch.bfloat16)
        y = torch.empty(m, n, dtype=out_dtype if direct else torch.float32)
        bias = None if bias is None else bias.float().contiguous()
        with torch.profiler.record_function("diffquant::vnni_gemm"):  # named in profiles; ~1 us otherwise
            status = library().dq_vnni_gemm(
                _ptr(a), _row_stride(a), _ptr(packed), int(bits <= 4), code_offset(bits),
                _ptr(a_scales), 0 if a_scales.shape[0] == 1 else a_scales.stride(0), _ptr(b_scales), width,
                None if bias is None else _ptr(bias), _ptr(y), n, int(y.dtype == torch.bfloat16), m, n, k, length,
                torch.get_num_threads())
        _check(status, "dq_vnni_gemm")
        return y if direct else y.to(out_dtype)

    @staticmethod
    def quantize(x: torch.Tensor, length: int, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Symmetric dynamic codes of x [M, C] in blocks of `length` along C: codes int8 [M, G*length]
        (zero-padded), scales float32 [M, G]; None when x's dtype is not float32 / bfloat16."""
        if x.dtype not in (torch.float32, torch.bfloat16):
            return None
        x = x if x.stride(-1) == 1 else x.contiguous()
        m, c = x.shape
        groups = -(-c // length)
        codes = torch.empty(m, groups * length, dtype=torch.int8)
        scales = torch.empty(m, groups, dtype=torch.float32)
        if m:
            with torch.profiler.record_function("diffquant::vnni_quantize"):
                status = library().dq_quantize_symmetric(
                    _ptr(x), _row_stride(x), int(x.dtype == torch.bfloat16), m, c, length, groups * length,
                    float(qmin), float(qmax), _ptr(codes), _ptr(scales), torch.get_num_threads())
            _check(status, "dq_quantize_symmetric")
        return codes, scales


@register_backend
class VnniBackend(IntMmBackend):
    """torch._int_mm for plain int8 GEMMs, plus the fused kernels of vnni.c (`fused`)."""

    name = "vnni"
    priority = 40
    prepare_free = True
    fused = VnniKernels()

    def available(self, cpu: CpuFeatures) -> bool:
        return cpu.flags >= REQUIRED_FLAGS and not isinstance(load_library(), str)

    def details(self) -> str:
        lib = load_library()
        return "" if isinstance(lib, str) else f"threads: {lib.threading}"

    def unavailable_reason(self, cpu: CpuFeatures) -> str | None:
        missing = sorted(REQUIRED_FLAGS - cpu.flags)
        if missing:
            return f"the CPU lacks {', '.join(missing)}"
        lib = load_library()
        return lib if isinstance(lib, str) else None
