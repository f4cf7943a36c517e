"""What this CPU can do: torch's dispatch capability and the instruction-set flags of /proc/cpuinfo.

Kernel selection reads a `CpuFeatures`, never the machine directly, so tests can fake any CPU:

    CpuFeatures(capability="AVX2", flags=frozenset({"avx2", "fma"}))

Facts the predicates encode (measured, see shared/docs/CPU-KERNELS.md): integer dot products are
fast only with VNNI (`vpdpbusd`, AVX-512 VNNI) or AMX; without them `torch._int_mm` runs at 1-6 GOP/s
(0.01-0.05x fp32) and bf16 matmuls at 0.15-0.2x fp32. fbgemm's pre-VNNI kernels multiply u8 x s8 pairs
with `vpmaddubsw`, which saturates the int16 sum of each adjacent pair.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")
# FBGEMM_ENABLE_INSTRUCTIONS values that force fbgemm onto kernels without VNNI (fbgemm/src/Utils.cc).
FBGEMM_NON_VNNI_ISAS = ("AVX2", "AVX512", "AVX512_256")


@dataclass(frozen=True)
class CpuFeatures:
    """capability: torch.backends.cpu.get_cpu_capability() ("DEFAULT", "AVX2", "AVX512", ...).
    flags: lower-case instruction-set flags (/proc/cpuinfo). model: CPU model name. cores: usable cores."""

    capability: str
    flags: frozenset[str]
    model: str = "unknown"
    cores: int = 1

    @property
    def int8_dot_product(self) -> bool:
        """Native int8 dot products into int32 (AVX-512 VNNI or AMX) behind torch's AVX-512 dispatch."""
        native = "avx512_vnni" in self.flags or "amx_int8" in self.flags
        return native and self.capability.startswith("AVX512")

    @property
    def native_bf16(self) -> bool:
        """bf16 matmuls run natively (AVX-512 BF16 or AMX) rather than by emulation."""
        native = "avx512_bf16" in self.flags or "amx_bf16" in self.flags
        return native and self.capability.startswith("AVX512")

    @property
    def fbgemm_int16_saturation(self) -> bool:
        """fbgemm sums u8 x s8 pairs in saturating int16 (`vpmaddubsw`): true unless it uses VNNI."""
        forced = os.environ.get("FBGEMM_ENABLE_INSTRUCTIONS", "").upper()
        return "avx512_vnni" not in self.flags or forced in FBGEMM_NON_VNNI_ISAS

    @property
    def instruction_set(self) -> str:
        """Short label for reports, e.g. "AVX512 (vnni, bf16)" or "AVX2"."""
        extras = [name for name, on in (("vnni", "avx512_vnni" in self.flags), ("amx", "amx_int8" in self.flags),
                                         ("bf16", "avx512_bf16" in self.flags)) if on]
        return self.capability + (f" ({', '.join(extras)})" if extras else "")


def _cpuinfo_field(text: str, field: str) -> str:
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == field:
            return value.strip()
    return ""


@functools.lru_cache(maxsize=1)
def detect_cpu() -> CpuFeatures:
    """This machine's features (cached: the answer does not change within a process)."""
    text = CPUINFO.read_text() if CPUINFO.is_file() else ""
    flags = frozenset(_cpuinfo_field(text, "flags").lower().split())
    model = _cpuinfo_field(text, "model name") or platform.processor() or "unknown"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return CpuFeatures(torch.backends.cpu.get_cpu_capability(), flags, model, cores)


def fastest_float_dtype(cpu: CpuFeatures | None = None, device: str | torch.device | None = None) -> torch.dtype:
    """bf16 where the CPU computes it natively, else fp32 (bf16 is 5-7x slower than fp32 on AVX2); on a
    CUDA device bf16, or fp16 where the GPU lacks bf16."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    cpu = detect_cpu() if cpu is None else cpu
    return torch.bfloat16 if cpu.native_bf16 else torch.float32


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with `n` torch intra-op threads (small problems lose to thread overhead)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
