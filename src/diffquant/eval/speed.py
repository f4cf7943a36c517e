"""Generation time of frozen (packed-kernel) models against full precision, side by side in one process on
this machine: what `diffquant demo` reports as "smaller and faster", or why not.

Each quantized folder is loaded and frozen (diffquant.freeze: integer codes resident, the selected kernel
backend's GEMMs); then, for `rounds` rounds, the FP reference and every frozen model generate the same
labels from the same noise, interleaved so that a change in machine load hits all of them alike. The best
round of each counts. Both run in the zoo model's float32 (the float path of AVX2 CPUs; where bf16 is
native the line says so, and benchmarks/kernels compares against bf16).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffquant.configs import positive_or_default
from diffquant.eval.evaluation import EvalTarget
from diffquant.eval.runner import balanced_labels
from diffquant.eval.targets import recipe_and_bits, resolve_target, weight_bytes
from diffquant.zoo.model import LatentDiffusionModel, generate


@dataclass(frozen=True)
class SpeedRow:
    recipe: str
    bits: str
    frozen_s: float
    fp_s: float
    bytes_vs_fp: float            # denoiser weight bytes over the 16-bit FP denoiser's (eval's weight_bytes)
    paths: dict[str, int]         # packed layers per path: "int" (integer kernels), "float", "emulated"

    @property
    def speedup(self) -> float:
        return self.fp_s / self.frozen_s


@dataclass(frozen=True)
class SpeedReport:
    rows: list[SpeedRow]
    samples: int
    steps: int
    rounds: int
    backend: str
    machine: str
    float_note: str

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "steps": self.steps, "rounds": self.rounds, "backend": self.backend,
                "machine": self.machine, "float_note": self.float_note,
                "rows": [{**row.__dict__, "speedup": row.speedup} for row in self.rows]}


def _freeze(target: EvalTarget) -> dict[str, int]:
    from diffquant.freeze import freeze, packed_layers

    freeze(target.model.denoiser)
    return dict(sorted(Counter(layer.path for layer in packed_layers(target.model.denoiser).values()).items()))


def _seconds(model: LatentDiffusionModel, labels: torch.Tensor, steps: int, seed: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        generate(model, labels, seed, steps, batch_size=len(labels), progress=False)
    return time.perf_counter() - start


def _machine() -> tuple[str, str, str]:
    """(backend name, machine line, note on the float baseline)."""
    from diffquant.kernels import active_backend, detect_cpu, fastest_float_dtype

    cpu = detect_cpu()
    machine = f"{cpu.model}, {cpu.instruction_set}, {torch.get_num_threads()} threads"
    float_note = ("float32 is this CPU's fastest float path" if fastest_float_dtype() == torch.float32 else
                  f"{str(fastest_float_dtype()).removeprefix('torch.')} is faster than float32 on this CPU: "
                  "benchmarks/kernels compares against it")
    return active_backend().name, machine, float_note


def time_frozen_against_fp(folders: Sequence[str | Path], samples: int = 64, steps: int | None = None,
                           rounds: int = 2, seed: int = 0) -> SpeedReport:
    """Generation seconds of each frozen quantized zoo folder and of its FP reference (module docstring)."""
    if samples < 1 or rounds < 1:
        raise ValueError("speed measurement needs at least one sample and one round")
    targets = [resolve_target(folder) for folder in folders]
    if not targets:
        raise ValueError("no quantized folders to time")
    if len({t.reference.name for t in targets}) != 1:
        raise ValueError("time folders of one zoo model at a time (they share its FP reference)")
    reference = targets[0].reference
    steps = positive_or_default("steps", steps, reference.default_steps)
    sizes = [weight_bytes(t.model.denoiser, t.folder)[0] for t in targets]  # before freezing repacks
    fp_bytes = weight_bytes(reference.denoiser)[0]
    paths = [_freeze(t) for t in targets]
    labels = balanced_labels(samples, reference.num_classes)
    fp_s, frozen_s = float("inf"), [float("inf")] * len(targets)
    for _ in range(rounds):
        fp_s = min(fp_s, _seconds(reference, labels, steps, seed))
        frozen_s = [min(best, _seconds(t.model, labels, steps, seed)) for best, t in zip(frozen_s, targets, strict=True)]
    rows = [SpeedRow(*recipe_and_bits(t.model.denoiser), q_s, fp_s, size / fp_bytes, p)
            for t, q_s, size, p in zip(targets, frozen_s, sizes, paths, strict=True)]
    return SpeedReport(rows, samples, steps, rounds, *_machine())


# Why a frozen model may not beat FP here: the first reason that applies is given.
SLOWER_BECAUSE: list[tuple[Callable[[SpeedReport, SpeedRow], bool], str]] = [
    (lambda report, row: report.backend == "float",
     "no integer kernel runs on this CPU (backend 'float': codes multiplied as float32)"),
    (lambda report, row: row.paths.get("int", 0) == 0,
     "none of its layers runs on the integer kernels (weight-only or non-integer formats are dequantized "
     "per call)"),
    (lambda report, row: True,
     "the model is small (the zoo's are 256 wide): activation quantization and per-layer dispatch cost "
     "about what its small integer GEMMs save; real-size layers and denoiser steps are in benchmarks/kernels"),
]


def verdict(report: SpeedReport, row: SpeedRow) -> str:
    size = f"{row.bytes_vs_fp:.2f}x the 16-bit FP weight bytes"
    if row.speedup > 1:
        return f"{row.recipe}: smaller and faster: {size}, {row.speedup:.2f}x FP's generation speed"
    reason = next(text for applies, text in SLOWER_BECAUSE if applies(report, row))
    return f"{row.recipe}: smaller ({size}) but {1 / row.speedup:.2f}x slower than FP here: {reason}"


def format_speed(report: SpeedReport) -> str:
    lines = [f"Generation time, frozen (packed kernels) vs FP, side by side: {report.samples} samples x "
             f"{report.steps} steps, best of {report.rounds}; {report.machine}; kernel backend "
             f"{report.backend}; {report.float_note}.", "",
             "| recipe | bits | FP s | frozen s | speed-up | weight bytes vs 16-bit FP | layers on integer kernels |",
             "|---|---|---|---|---|---|---|"]
    for row in report.rows:
        layers = sum(row.paths.values())
        lines.append(f"| `{row.recipe}` | {row.bits} | {row.fp_s:.2f} | {row.frozen_s:.2f} | {row.speedup:.2f}x | "
                     f"{row.bytes_vs_fp:.2f}x | {row.paths.get('int', 0)} of {layers} |")
    return "\n".join([*lines, "", *(verdict(report, row) for row in report.rows)])
