"""What bench_linear.py and bench_denoiser.py share: time limits, timing, peak memory, machine description.

Timing: every case is guarded by a time limit. A probe on a small input predicts the full case and
skips it as "timeout" when it would exceed the limit (a pathological path is reported, not waited for);
the timed runs stop at the limit too (checked between Python operations), keeping the runs that finished. Each time is the minimum of
several runs, measured in wall-clock time (the other threads of a multi-threaded kernel count).

Peak memory: the process's peak resident set (VmHWM) is reset before a case (/proc/self/clear_refs) and
read after it; the figure is the peak above what was resident when the case started.

Contention (`beside`): N other single-thread processes multiplying fp32 matrices for the whole run, the
"one other job on the machine" a user's laptop or a shared server has; recorded with the results.

Machine: the CPU, its dot-product flags, and the environment variables that restrict torch's, MKL's, oneDNN's
and fbgemm's kernels to an instruction set (an AVX-512 machine standing in for an AVX2 one), so a table
says which code paths its figures came from.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffquant.kernels import active_backend, detect_cpu

PROC_STATUS, CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


class Skip(Exception):
    """The method does not apply on this machine (reason in the message)."""


class CaseTimeout(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise CaseTimeout after `seconds` (between Python operations; one long C++ call finishes first)."""
    def expire(_signum, _frame):
        raise CaseTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# -- memory ----------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    if not PROC_STATUS.is_file():
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", PROC_STATUS.read_text(), re.M)
    return int(match.group(1)) if match else None


@contextlib.contextmanager
def peak_memory() -> Iterator[dict[str, float]]:
    """Yields a dict that holds, afterwards, 'peak_mib': the peak RSS above the RSS at entry (or nothing
    where /proc does not allow resetting the peak)."""
    out: dict[str, float] = {}
    try:
        CLEAR_REFS.write_text("5")  # reset VmHWM to the current RSS
        start = _status_kib("VmRSS")
    except OSError:
        start = None
    try:
        yield out
    finally:
        peak = _status_kib("VmHWM")
        if start is not None and peak is not None:
            out["peak_mib"] = max(peak - start, 0) / 1024


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds, looking inside tensor subclasses (torchao / quanto quantized tensors)."""
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    if isinstance(t, torch.nn.Parameter) and type(t.data) is not torch.Tensor:
        return tensor_bytes(t.data)
    return t.numel() * t.element_size()


def module_bytes(module: torch.nn.Module) -> int:
    """Parameters and buffers of a module (each storage counted once)."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t)
    return total


# -- timing ----------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """runs: timed calls after a warm-up; limit: seconds per case; clock: "wall" or "thread" (this thread's
    CPU time: with one torch thread, a kernel's own cost, robust to other processes on a shared machine)."""

    runs: int
    limit: float
    clock: str = "wall"


CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}


def _timed(fn: Callable[[], Any], clock: Callable[[], float] = time.perf_counter) -> tuple[float, Any]:
    start = clock()
    out = fn()
    return clock() - start, out


@torch.no_grad()
def time_case(full: Callable[[], Any], probe: Callable[[], Any] | None, scale: float,
              timing: Timing) -> dict[str, Any]:
    """Probe (predicted full time = probe time x scale), warm up, then time up to `runs` calls.
    Returns status, ms (min), runs_ms, peak_mib and the last output."""
    clock = CLOCKS[timing.clock]
    if probe is not None:
        with deadline(timing.limit):
            probe_s, _ = _timed(probe, clock)
        if probe_s * scale > timing.limit:
            return {"status": "timeout", "note": f"predicted {probe_s * scale:.3g} s from a probe"}
    times, started, out = [], time.perf_counter(), None
    try:
        with deadline(timing.limit), peak_memory() as memory:
            _, out = _timed(full)  # warm-up
            for _ in range(timing.runs):
                times.append(_timed(full, clock)[0])
                if time.perf_counter() - started > timing.limit:
                    break
    except CaseTimeout:
        if not times:
            raise
    return {"status": "ok", "ms": 1e3 * min(times), "runs_ms": [1e3 * t for t in times], **memory, "output": out}


def guarded(run: Callable[[], dict[str, Any]], limit: float) -> dict[str, Any]:
    """run(), with a timeout or any error reported as a row instead of ending the benchmark."""
    try:
        return run()
    except CaseTimeout:
        return {"status": "timeout", "note": f"exceeded {limit:.3g} s"}
    except Skip as exc:
        return {"status": "skip", "note": str(exc)}
    except Exception as exc:  # a peer's API drift or a missing feature must not end the run
        return {"status": "error", "note": f"{type(exc).__name__}: {exc}"[:300]}


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean squared error / mean square of the reference (as in shared/docs/CPU-KERNELS.md)."""
    y, reference = y.double(), reference.double()
    return float((y - reference).pow(2).mean() / reference.pow(2).mean())


# -- machine ---------------------------------------------------------------------------------------------


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else []


ISA_ENVIRONMENT = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "FBGEMM_ENABLE_INSTRUCTIONS",
                   "DIFFQUANT_KERNEL_BACKEND")
DOT_PRODUCT_FLAGS = ("avx2", "fma", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8")


def machine() -> dict[str, Any]:
    cpu, backend = detect_cpu(), active_backend()
    return {"cpu": cpu.model, "instruction_set": cpu.instruction_set, "cores": cpu.cores,
            "cpu_flags": [f for f in DOT_PRODUCT_FLAGS if f in cpu.flags],
            "isa_environment": {k: os.environ[k] for k in ISA_ENVIRONMENT if k in os.environ},
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "kernel_backend": backend.name, "kernel_backend_details": backend.details(),
            "load_average_at_start": load_average(), "clock": "wall",
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}


BUSY_LOOP = "import torch\ntorch.set_num_threads(1)\na = torch.randn(1024, 1024)\nwhile True:\n    a @ a\n"


@contextlib.contextmanager
def beside(jobs: int) -> Iterator[None]:
    """Run the block with `jobs` single-thread fp32 matmul loops in other processes (module docstring)."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY_LOOP], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for _ in range(jobs)]
    try:
        if procs:
            time.sleep(3)  # past their imports: the contention is on when the first case starts
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def cpu_slug() -> str:
    """Short file-name tag of this CPU and its instruction set, e.g. "amd-epyc-avx512"."""
    cpu = detect_cpu()
    return re.sub(r"[^a-z0-9]+", "-", f"{cpu.model} {cpu.capability}".lower()).strip("-")


def machine_lines(info: dict[str, Any], command: str) -> list[str]:
    load = ", ".join(map(str, info.get("load_average_at_start", []))) or "n/a"
    end = ", ".join(map(str, info.get("load_average_at_end", []))) or "n/a"
    clock = "this thread's CPU time" if info.get("clock") == "thread" else "wall-clock time"
    return [f"`{command}`", "",
            f"CPU: {info['cpu']}, {info['instruction_set']}, {info['cores']} cores, {info['threads']} torch threads "
            f"(times in {clock}); "
            f"torch {info['torch']}; diffquant kernel backend: {info['kernel_backend']}"
            f"{' (' + info['kernel_backend_details'] + ')' if info.get('kernel_backend_details') else ''}; "
            f"{info['date']}; load average (1, 5, 15 min) at start {load}, at end {end}", "",
            *_conditions(info)]


def _conditions(info: dict[str, Any]) -> list[str]:
    lines = []
    if info.get("cpu_flags"):
        lines.append(f"CPU flags: {' '.join(info['cpu_flags'])}.")
    if info.get("isa_environment"):
        lines.append("Instruction sets restricted by " + ", ".join(f"`{k}={v}`" for k, v in info["isa_environment"].items())
                     + ".")
    if info.get("jobs_beside"):
        lines.append(f"{info['jobs_beside']} other single-thread fp32 matmul process(es) ran beside the whole run.")
    return [*lines, ""] if lines else []
