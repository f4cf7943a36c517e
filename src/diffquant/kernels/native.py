"""diffquant's own CPU kernels in C (vnni.c for AVX-512 VNNI, avx2.c for AVX2): building and loading them,
their resident weight layout, and the fused-kernel interface they share (FusedKernels, kernels/backend.py).

Build: the system C compiler ($CC, default `cc`) compiles a source with its build's flags into
$DIFFQUANT_CACHE_DIR/kernels (default ~/.cache/diffquant/kernels), keyed by a hash of the source, the
headers it includes (dq_runtime.h, dq_items.h, dq_quantize.h) and the flags, into a temporary file renamed into place
(concurrent builds never see half a file), with a sidecar `<library>.sha256` written first: a cached
library is loaded only if it still has that hash and is the user's own, not writable by others; one that
was replaced or edited is rebuilt, never loaded. Then loads it with ctypes. First with OpenMP, so the kernels'
threads are torch's own pool (dq_runtime.h, parallel()), then without it (pthreads). Without a compiler,
or when every build fails, the library is a sentence saying why (logged, and shown by `diffquant kernels`)
and its backend is unavailable.

Weight layout (notation of kernels/backend.py: b int8 [K, N] signed codes of a `bits`-bit format): strips
of `strip` outputs (N padded with code 0), each the K codes of its outputs in quads of 4 consecutive inputs,
stored as u = b + offset (mod 256) in uint8:
    bits <= 4: [NB, K/8, strip, 4], two codes per byte: low nibble from quad 2p, high nibble from quad 2p + 1
               (K % 8 == 0; offset 8)
    bits > 4:  [NB, K/4, strip, 4], one code per byte (offset 128 for vpdpbusd; 0 for avx2.c's sign transfer)
with NB = ceil(N / strip). The C sources spell the same layout with their strip width (16: vnni.c, 8: avx2.c).
A nibble may also be an index into 16 signed integer levels (the fused matmul's `levels`, e.g. FP4 E2M1 x 2):
packed the same way (b = index - 8); the kernels decode the panels they unpack per item through the table
u = levels - min(levels) and subtract offset = -min(levels) from the sums, so weights stay 4-bit resident.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from diffquant.atomic import atomic_file, write_text_atomic
from diffquant.folders import sha256_of

HERE = Path(__file__).parent
HEADERS = ("dq_runtime.h", "dq_items.h", "dq_quantize.h")
CACHE_ENV = "DIFFQUANT_CACHE_DIR"
# Threads from torch's OpenMP pool; a compiler without OpenMP gets the pthread build.
THREADING = (("openmp", ("-fopenmp",)), ("pthreads", ()))
BASE_FLAGS = ("-O3", "-shared", "-fPIC", "-pthread")
log = logging.getLogger("diffquant.kernels")

_p, _i64, _i32, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_float
GEMM_ARGS = [_p, _i64, _p, _i32, _i32, _p, _i64, _p, _i64, _p, _p, _i64, _p, _i64, _i32, _i64, _i64, _i64, _i64, _i32,
             _p]  # ..., threads, lut (uint8 [16] or NULL)
QUANTIZE_ARGS = [_p, _i64, _i32, _i64, _i64, _i64, _i64, _f32, _f32, _p, _p, _p, _i32]


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV)
    return (Path(root) if root else Path.home() / ".cache" / "diffquant") / "kernels"


class NativeLibrary:
    """A C source of this folder built with `flags` on first use (module docstring). `load()` returns the
    ctypes library (its threading in `.threading`) or the reason there is none; the result is cached."""

    def __init__(self, source: str, flags: tuple[str, ...], signatures: dict[str, list]) -> None:
        self.source, self.flags, self.signatures = HERE / source, flags, signatures
        self._loaded: ctypes.CDLL | str | None = None

    def load(self) -> ctypes.CDLL | str:
        if self._loaded is None:
            self._loaded = self._load()
        return self._loaded

    def cache_clear(self) -> None:
        self._loaded = None

    def require(self) -> ctypes.CDLL:
        lib = self.load()
        if isinstance(lib, str):
            raise RuntimeError(f"the {self.source.stem} kernels are unavailable: {lib}")
        return lib

    def _load(self) -> ctypes.CDLL | str:
        compiler = shutil.which(os.environ.get("CC", "cc"))
        if compiler is None or not self.source.is_file():
            return "no C compiler found ($CC or cc)" if compiler is None else f"kernel source {self.source.name} is missing"
        failure = ""
        for threading, extra in THREADING:
            try:
                lib = self._build(compiler, (*BASE_FLAGS, *self.flags, *extra))
                break
            except (OSError, subprocess.SubprocessError) as exc:
                detail = getattr(exc, "stderr", "") or str(exc)
                log.warning("diffquant kernels: building %s with %s failed: %s", self.source.name, threading,
                            detail[-500:])
                failure = f"building {self.source.name} failed: {type(exc).__name__}"
        else:
            return failure
        for name, argtypes in self.signatures.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, ctypes.c_int
        lib.threading = threading
        return lib

    def _build(self, compiler: str, flags: tuple[str, ...]) -> ctypes.CDLL:
        text = b"".join((HERE / name).read_bytes() for name in (self.source.name, *HEADERS))
        key = hashlib.sha256(text + " ".join(flags).encode()).hexdigest()[:16]
        target = cache_dir() / f"{self.source.stem}-{key}.so"
        if not _cached_intact(target):
            _compile(compiler, flags, self.source, target)
        return ctypes.CDLL(str(target))


def _sidecar(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _cached_intact(target: Path) -> bool:
    """The cached library is as this process family built it: the recorded hash, owned by this user and
    writable by nobody else (a library another user could replace would run their code here)."""
    try:
        info = target.stat()
        recorded = _sidecar(target).read_text().strip()
    except OSError:
        return False
    if info.st_uid != os.getuid() or info.st_mode & 0o022:
        log.warning("diffquant kernels: %s is not this user's own or is writable by others; rebuilding it",
                    target)
        return False
    if sha256_of(target) != recorded:
        log.warning("diffquant kernels: %s does not match the hash recorded when it was built; rebuilding it",
                    target)
        return False
    return True


def _compile(compiler: str, flags: tuple[str, ...], source: Path, target: Path) -> None:
    """Compile into a temporary file next to `target`, record its hash, then rename: concurrent builds
    never see half a file, nor a library without its hash."""
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with atomic_file(target) as tmp:
        subprocess.run([compiler, *flags, str(source), "-o", str(tmp)], check=True, capture_output=True, text=True,
                       timeout=300)
        os.chmod(tmp, 0o755)
        write_text_atomic(_sidecar(target), sha256_of(tmp))  # lands before the library does


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def row_stride(t: torch.Tensor) -> int:
    """Elements between rows of a 2-D tensor with unit column stride (a single row may report any stride)."""
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


def check_status(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"kernel {what} rejected its arguments or ran out of memory")


# -- weight layout (plain torch: also the layout's test oracle) ---------------------------------------------


def dpbusd_offset(bits: int) -> int:
    """What makes a signed code of `bits` bits unsigned for vpdpbusd: 8 (a nibble) or 128 (a byte)."""
    return 8 if bits <= 4 else 128


LEVEL_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)


def level_table(levels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """16 signed integer levels -> the kernels' decode table u = levels - min(levels) (uint8 [16]) and the
    offset -min(levels) the accumulators take off again."""
    low = int(levels.min())
    return (levels.to(torch.int64) - low).to(torch.uint8).contiguous(), -low


def pack_strips(b: torch.Tensor, bits: int, strip: int, offset: int) -> torch.Tensor:
    """int8 [K, N] signed codes -> uint8 strips (module docstring)."""
    if bits <= 4 and offset != 8:
        raise ValueError(f"nibbles hold codes plus 8, not plus {offset}")
    k, n = b.shape
    strips = -(-n // strip)
    u = F.pad((b.to(torch.int16) + offset) & 0xFF, (0, strips * strip - n), value=offset).to(torch.uint8)
    if bits > 4:
        return u.reshape(k // 4, 4, strips, strip).permute(2, 0, 3, 1).contiguous()
    u = u.reshape(k // 8, 2, 4, strips, strip).permute(3, 0, 4, 2, 1)  # [NB, K/8, strip, 4, half]
    return (u[..., 0] | (u[..., 1] << 4)).contiguous()


def unpack_strips(packed: torch.Tensor, k: int, n: int, bits: int, offset: int) -> torch.Tensor:
    """Inverse of pack_strips: int8 [K, N]."""
    strips, strip = packed.shape[0], packed.shape[2]
    if bits > 4:
        u = packed.permute(1, 3, 0, 2).reshape(k, strips * strip)
    else:
        halves = torch.stack([packed & 0xF, packed >> 4], dim=-1)  # [NB, K/8, strip, 4, 2]
        u = halves.permute(1, 4, 3, 0, 2).reshape(k, strips * strip)
    signed = (u[:, :n].to(torch.int16) - offset + 128) % 256 - 128
    return signed.to(torch.int8).contiguous()


# -- the fused kernels ------------------------------------------------------------------------------------


class NativeFusedKernels:
    """FusedKernels (kernels/backend.py) on a NativeLibrary: its `gemm` entry point (GEMM_ARGS: the
    group-wise product with bias and output cast as its epilogue) and `dq_quantize_symmetric`, on the strip
    layout above with `offsets(bits)` added to the codes. level_span: the widest decode table (max(u)) its
    products stay exact with: 255 for vpdpbusd (u is a byte), 127 for vpmaddubsw (int16 pair sums against
    |a| <= 128, avx2.c)."""

    def __init__(self, name: str, library: NativeLibrary, gemm: str, strip: int,
                 offsets: Callable[[int], int], level_span: int = 255) -> None:
        self.name, self.library, self.gemm, self.strip, self.offsets = name, library, gemm, strip, offsets
        self.level_span = level_span

    def __deepcopy__(self, memo: dict) -> NativeFusedKernels:
        return self  # one per process, like the library it calls (a copied module shares it)

    @staticmethod
    def supports(bits: int, length: int, k: int) -> bool:
        """Can the fused GEMM take a weight of `bits` bits with segments of `length` over K = k?"""
        return bits <= 8 and length % 4 == 0 and k % length == 0 and (bits > 4 or k % 8 == 0)

    def accepts(self, b: torch.Tensor, bits: int) -> bool:
        """Can these codes be stored with this library's offset? Sign transfer (offset 0) negates the codes, so
        -128 has no place there."""
        return self.offsets(bits) != 0 or b.numel() == 0 or int(b.min()) > -128

    def takes_levels(self, levels: torch.Tensor) -> bool:
        """Can matmul decode nibbles through these 16 signed integer levels? Their span max - min is the
        unsigned table's largest entry, which must fit this library's products (level_span)."""
        if levels.dtype not in LEVEL_DTYPES or levels.shape != (16,):
            return False
        return int(levels.max()) - int(levels.min()) <= self.level_span

    def pack(self, b: torch.Tensor, bits: int) -> torch.Tensor:
        return pack_strips(b, bits, self.strip, self.offsets(bits))

    def unpack(self, packed: torch.Tensor, k: int, n: int, bits: int) -> torch.Tensor:
        return unpack_strips(packed, k, n, bits, self.offsets(bits))

    def matmul(self, a: torch.Tensor, packed: torch.Tensor, n: int, bits: int, length: int, a_scales: torch.Tensor,
               b_scales: torch.Tensor, bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
               addend: torch.Tensor | None = None, levels: torch.Tensor | None = None) -> torch.Tensor:
        """y [M, N] = sum_s a_scales[:, s] * b_scales[s] * (a_s @ b_s) + addend + bias, accumulated in float32
        and cast to out_dtype once; float32 and bfloat16 outputs are written by the kernel. addend: float32
        [M, N] with unit column stride (a low-rank branch's output), or None. levels: 16 signed integers
        (bits <= 4, a table `takes_levels` takes): b = levels[nibble] with the nibbles `pack` stored."""
        m, k = a.shape
        lut, offset = None, self.offsets(bits)
        if levels is not None:
            if bits > 4 or not self.takes_levels(levels):
                shown = levels.tolist() if levels.numel() <= 16 else tuple(levels.shape)
                raise ValueError(f"the {self.name} kernels decode <= 4-bit codes through 16 integer levels spanning "
                                 f"at most {self.level_span} (max - min), not {bits}-bit codes through {levels.dtype} "
                                 f"levels {shown}")
            lut, offset = level_table(levels)
        if addend is not None and (addend.dtype != torch.float32 or addend.shape != (m, n) or addend.stride(1) != 1):
            raise ValueError(f"the epilogue adds a float32 [{m}, {n}] addend with unit column stride, "
                             f"not {addend.dtype} {tuple(addend.shape)}")
        a = a if a.stride(1) == 1 else a.contiguous()
        a_scales = a_scales.float().contiguous()
        width = packed.shape[0] * self.strip
        b_scales = F.pad(b_scales.float().expand(-1, n), (0, width - n)).contiguous()
        direct = out_dtype in (torch.float32, torch.bfloat16)
        y = torch.empty(m, n, dtype=out_dtype if direct else torch.float32)
        bias = None if bias is None else bias.float().contiguous()
        with torch.profiler.record_function(f"diffquant::{self.name}_gemm"):  # named in profiles; ~1 us otherwise
            status = getattr(self.library.require(), self.gemm)(
                _ptr(a), row_stride(a), _ptr(packed), int(bits <= 4), offset,
                _ptr(a_scales), 0 if a_scales.shape[0] == 1 else a_scales.stride(0), _ptr(b_scales), width,
                None if bias is None else _ptr(bias), None if addend is None else _ptr(addend),
                0 if addend is None else row_stride(addend), _ptr(y), n, int(y.dtype == torch.bfloat16), m, n, k,
                length, torch.get_num_threads(), None if lut is None else _ptr(lut))
        check_status(status, f"{self.name} {self.gemm}")
        return y if direct else y.to(out_dtype)

    def quantize(self, x: torch.Tensor, length: int, qmin: int, qmax: int,
                 divisor: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Symmetric dynamic codes of x [M, C] (divided by `divisor` [C] first, as torch's x / divisor in x's
        dtype) in blocks of `length` along C: codes int8 [M, G*length] (zero-padded), scales float32 [M, G];
        None when x's dtype is not float32 / bfloat16."""
        if x.dtype not in (torch.float32, torch.bfloat16):
            return None
        if divisor is not None:  # the smoothing vector as x's dtype has it, handed over as float32
            divisor = divisor.to(x.dtype).float().contiguous()
        x = x if x.stride(-1) == 1 else x.contiguous()
        m, c = x.shape
        groups = -(-c // length)
        codes = torch.empty(m, groups * length, dtype=torch.int8)
        scales = torch.empty(m, groups, dtype=torch.float32)
        if m:
            with torch.profiler.record_function(f"diffquant::{self.name}_quantize"):
                status = self.library.require().dq_quantize_symmetric(
                    _ptr(x), row_stride(x), int(x.dtype == torch.bfloat16), m, c, length, groups * length,
                    float(qmin), float(qmax), None if divisor is None else _ptr(divisor), _ptr(codes), _ptr(scales),
                    torch.get_num_threads())
            check_status(status, f"{self.name} dq_quantize_symmetric")
        return codes, scales
