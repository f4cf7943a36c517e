"""Integer GEMM backends: the interface, the registry, and the choice by what the CPU can do.

Notation (every backend):

    M   rows of the activation matrix (tokens, or output pixels of a convolution)
    K   reduction length (input features; kh*kw*c_in for a convolution)
    N   output features
    a   int8 [M, K]   activation codes (signed, offset-centred: see nn/packed.py)
    b   int8 [K, N]   weight codes, contiguous, the layout `prepare` takes
    acc [M, N]        exact int32 accumulations sum_k a[m, k] * b[k, n]: dtype int32, or float32
                      holding the same integers (exact while |acc| <= 2**24, i.e. always for K <= 1024)

A backend prepares a weight once (`prepare`, possibly into its own layout) and multiplies many times
(`matmul`). Selection picks the highest-priority backend that is available and not pathological on
this CPU; `DIFFQUANT_KERNEL_BACKEND=<name>` or an explicit name overrides it, but a backend that is
pathological here (e.g. `int_mm` without VNNI) is refused rather than silently run 20-100x slowly.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Protocol

import torch

from diffquant.kernels.cpu import CpuFeatures, detect_cpu
from diffquant.kernels.reference import reference_int_matmul

ENV_BACKEND = "DIFFQUANT_KERNEL_BACKEND"
log = logging.getLogger("diffquant.kernels")


class BackendUnavailableError(RuntimeError):
    """A requested backend cannot run (or would run pathologically slowly) on this CPU."""


class FusedKernels(Protocol):
    """A backend's fused group-wise product on its own resident weight layout (kernels/vnni.py has the
    notation): y = sum_s a_scales[:, s] * b_scales[s] * (a_s @ b_s) without per-segment passes over y,
    with `+ addend` (float32 [M, N]: a low-rank branch's output), `+ bias` and the cast to `out_dtype` as
    its epilogue (float32 accumulation, one rounding), and symmetric dynamic activation quantization (of
    x / divisor: the smoothing vector folded in). Packed modules use them where `supports` says so of the
    shape and `accepts` of the codes (int8 [K, N]), and neither side has a zero point; everything else goes
    through `matmul` (kernels/segmented.py).

    levels: 16 signed integers (int8 / int16 [16]) that <= 4-bit codes index: `pack(index - 8, bits)` stores
    the index, and matmul multiplies by levels[index] instead of the code (FP4 E2M1 x 2 =
    [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, ..., -12]), exactly, with the weight still 4-bit resident;
    `takes_levels` says whether these kernels can (a table they cannot take is a ValueError in matmul)."""

    def supports(self, bits: int, length: int, k: int) -> bool: ...

    def accepts(self, b: torch.Tensor, bits: int) -> bool: ...

    def pack(self, b: torch.Tensor, bits: int) -> torch.Tensor: ...

    def unpack(self, packed: torch.Tensor, k: int, n: int, bits: int) -> torch.Tensor: ...

    def matmul(self, a: torch.Tensor, packed: torch.Tensor, n: int, bits: int, length: int,
               a_scales: torch.Tensor, b_scales: torch.Tensor, bias: torch.Tensor | None = None,
               out_dtype: torch.dtype = torch.float32, addend: torch.Tensor | None = None,
               levels: torch.Tensor | None = None) -> torch.Tensor: ...

    def takes_levels(self, levels: torch.Tensor) -> bool: ...

    def quantize(self, x: torch.Tensor, length: int, qmin: int, qmax: int,
                 divisor: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None: ...


class IntGemmBackend(ABC):
    """One way of computing acc = a @ b on int8 codes. Subclasses register with @register_backend.

    priority:     higher wins when several run well on a CPU.
    device_type:  the torch device type of the tensors it multiplies ("cpu", or "cuda" for triton).
    prepare_free: True when `prepare` only makes views (no copy, no repacking). Packed modules then
                  keep their own compact codes resident (int4 stays two per byte) and prepare per
                  call; otherwise they keep the prepared weight resident and drop their codes.
    fused:        the backend's FusedKernels, or None.
    """

    name: ClassVar[str]
    priority: ClassVar[int]
    prepare_free: ClassVar[bool]
    device_type: ClassVar[str] = "cpu"
    fused: ClassVar[FusedKernels | None] = None

    def available(self, cpu: CpuFeatures) -> bool:
        """Runs correctly on this CPU (perhaps slowly)."""
        return True

    def unavailable_reason(self, cpu: CpuFeatures) -> str | None:
        """Why `available` is False here (None when it is True or no reason is known)."""
        return None

    def pathological(self, cpu: CpuFeatures) -> str | None:
        """Why this backend is far slower than fp32 on this CPU, or None."""
        return None

    def details(self) -> str:
        """How this backend runs here, for `diffquant kernels` (e.g. its threading); "" when nothing to say."""
        return ""

    @abstractmethod
    def prepare(self, b: torch.Tensor) -> Any:
        """b: int8 [K, N] -> this backend's weight object."""

    @abstractmethod
    def matmul(self, a: torch.Tensor, prepared: Any) -> torch.Tensor:
        """a: int8 [M, K], prepared from b [K, N] -> acc [M, N] (int32, or float32 holding int32)."""

    def reference(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Plain-torch oracle of matmul(a, prepare(b)): exact int64 [M, N]."""
        return reference_int_matmul(a, b)

    def unprepare(self, prepared: Any) -> torch.Tensor:
        """The int8 [K, N] codes a prepared weight was made from."""
        return prepared

    def prepared_nbytes(self, prepared: Any) -> int:
        """Bytes the prepared weight keeps resident (0 for views of codes held elsewhere)."""
        return 0

    def prepare_segments(self, b: torch.Tensor, length: int) -> list[Any]:
        """One prepared weight per block of `length` rows of b [S*length, N]."""
        return [self.prepare(b[s:s + length]) for s in range(0, b.shape[0], length)]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


BACKENDS: dict[str, IntGemmBackend] = {}


def register_backend(cls: type[IntGemmBackend]) -> type[IntGemmBackend]:
    BACKENDS[cls.name] = cls()
    return cls


def get_backend(name: str) -> IntGemmBackend:
    if name not in BACKENDS:
        raise BackendUnavailableError(f"unknown kernel backend {name!r}; registered: {sorted(BACKENDS)}")
    return BACKENDS[name]


def usable_backends(cpu: CpuFeatures | None = None, device: str | torch.device = "cpu") -> list[IntGemmBackend]:
    """Backends that run well on this machine for tensors on `device` (a type: "cpu", "cuda"), best first."""
    cpu = detect_cpu() if cpu is None else cpu
    kind = torch.device(device).type
    good = [b for b in BACKENDS.values()
            if b.device_type == kind and b.available(cpu) and b.pathological(cpu) is None]
    return sorted(good, key=lambda b: -b.priority)


def _checked(backend: IntGemmBackend, cpu: CpuFeatures, device: str | torch.device | None) -> IntGemmBackend:
    if device is not None and torch.device(device).type != backend.device_type:
        raise BackendUnavailableError(f"kernel backend {backend.name!r} multiplies {backend.device_type} tensors, "
                                      f"not {torch.device(device).type} ones; freeze the model on the device it "
                                      f"runs on, or name a {torch.device(device).type} backend")
    if not backend.available(cpu):
        why = backend.unavailable_reason(cpu)
        raise BackendUnavailableError(f"kernel backend {backend.name!r} is not available on this CPU "
                                      f"({cpu.instruction_set})" + (f": {why}" if why else ""))
    reason = backend.pathological(cpu)
    if reason is not None:
        raise BackendUnavailableError(f"kernel backend {backend.name!r} is pathological on this CPU: {reason}")
    return backend


def select_backend(
    backend: str | IntGemmBackend | None = None, cpu: CpuFeatures | None = None,
    device: str | torch.device | None = None,
) -> IntGemmBackend:
    """The backend to use: `backend` if given, else $DIFFQUANT_KERNEL_BACKEND, else the best usable one for
    tensors on `device` (default: the CPU). A named backend for another device type is refused."""
    cpu = detect_cpu() if cpu is None else cpu
    if isinstance(backend, IntGemmBackend):
        return _checked(backend, cpu, device)
    if backend:
        return _checked(get_backend(backend), cpu, device)
    from_env = os.environ.get(ENV_BACKEND)
    if from_env and (device is None or get_backend(from_env).device_type == torch.device(device).type):
        return _checked(get_backend(from_env), cpu, device)  # the override names a backend of one device type
    usable = usable_backends(cpu, "cpu" if device is None else device)
    if not usable:
        raise BackendUnavailableError(f"no kernel backend runs on this machine for {device or 'cpu'} tensors "
                                      f"({cpu.instruction_set})")
    return usable[0]


_ACTIVE: IntGemmBackend | None = None


def active_backend() -> IntGemmBackend:
    """The process-wide default backend (select_backend() on this machine), logged once when chosen."""
    global _ACTIVE
    if _ACTIVE is None:
        _ACTIVE = select_backend()
        cpu = detect_cpu()
        source = f"${ENV_BACKEND}" if os.environ.get(ENV_BACKEND) else "auto"
        log.info("diffquant kernels: backend %r (%s) on %s, %s, %d cores", _ACTIVE.name, source, cpu.model,
                 cpu.instruction_set, cpu.cores)
    return _ACTIVE


def reset_active_backend() -> None:
    """Forget the cached choice (after changing $DIFFQUANT_KERNEL_BACKEND)."""
    global _ACTIVE
    _ACTIVE = None
