"""Shared pieces of the training-based stages (EfficientDM, QAT): run identity and checkpoints,
learning-rate decay, the training loop, the training clock and progress callbacks.

Progress callbacks let a caller measure a model *while* a stage trains it (e.g. quality against
training time, benchmarks/efficientdm/time_to_quality.py) without a fork of the training code:

    with progress_callback(lambda p: print(p.stage, p.done, p.cpu_s), points=8):
        diffquant.quantize(model, "efficientdm-w4a4", calibration=...)

A stage reports after every step (EfficientDM: after every round) and once before the first; the
callbacks that want that point run with the training clock paused, the RNG state restored afterwards
(training is the same with or without them), and the model computing exactly what the finished stage
would leave: quantization on, the learned quantizers as written back, no training hook firing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from diffquant.nn.layers import QuantizedLayer
from diffquant.nn.learnable import LSQActivation, LSQWeight
from diffquant.train_utils import Checkpointer, default_checkpoint_dir


def stage_checkpointer(stage, layers: dict[str, QuantizedLayer]) -> Checkpointer | None:
    """Where a training stage keeps its resumable state: `stage.checkpoint_dir`, or (None) a cache
    folder named by a hash of the stage config and the layers' starting state (weights, quantizer
    specs and parameters), so rerunning the same quantization resumes and anything else (another
    recipe around the same stage included) starts afresh; "" disables checkpoints."""
    if stage.checkpoint_dir == "":
        return None
    digest = hashlib.sha256(json.dumps(stage.cache_key(), sort_keys=True).encode())
    for name, layer in sorted(layers.items()):
        digest.update(f"{name}|{layer.extra_repr()}".encode())
        for key, tensor in sorted(layer.state_dict().items()):
            digest.update(f"{key}|{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    run = digest.hexdigest()[:16]
    folder = Path(stage.checkpoint_dir) if stage.checkpoint_dir else default_checkpoint_dir(f"{stage.type}-{run}")
    return Checkpointer(folder, meta={"run": run})


def module_key(name: str) -> str:
    """A module path as an nn.ModuleDict key (keys cannot contain dots), for the learned-module dicts that
    training checkpoints save."""
    return name.replace(".", "/")


def round_sampler(calibration: Callable[[nn.Module], object], seed: int) -> Callable[[nn.Module], object]:
    """The calibration function for one training round: from fresh noise where it has `reseeded(seed)`
    (zoo models, diffquant.calib.pipeline_calibration), else as it is (a replay gives the same inputs)."""
    return calibration.reseeded(seed) if hasattr(calibration, "reseeded") else calibration


def adam_with_decay(groups: list[dict]) -> torch.optim.Adam:
    """Adam over parameter groups that remember their initial rate (see `decay_linearly`)."""
    groups = [g for g in groups if g["params"]]
    for group in groups:
        group["initial_lr"] = group["lr"]
    return torch.optim.Adam(groups)


def decay_linearly(optimizer: torch.optim.Optimizer, progress: float) -> None:
    """Every group's rate at (1 − progress) of its initial rate; progress in [0, 1]."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] * (1.0 - progress)


# -- the training clock ---------------------------------------------------------------------------


class TrainingClock:
    """Seconds spent training, wall and CPU of the calling thread (the one that trains: at one torch
    thread all of its work; other processes on the machine do not count), with `paused()` blocks left
    out. A resumed run starts the wall clock at the checkpoint's elapsed time; CPU counts this process."""

    def __init__(self, wall_s: float = 0.0) -> None:
        self._wall0, self._cpu0 = time.perf_counter() - wall_s, time.thread_time()

    @property
    def wall_s(self) -> float:
        return time.perf_counter() - self._wall0

    @property
    def cpu_s(self) -> float:
        return time.thread_time() - self._cpu0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        wall, cpu = self.wall_s, self.cpu_s
        try:
            yield
        finally:  # restart both clocks where they stood
            self._wall0, self._cpu0 = time.perf_counter() - wall, time.thread_time() - cpu


# -- progress callbacks -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    """Where a training stage stands when a progress callback runs. done / total: optimizer steps (or
    EfficientDM's rounds) taken / planned, 0 before the first; wall_s / cpu_s: TrainingClock readings;
    model: the model being trained, computing what the finished stage would leave."""

    stage: str
    done: int
    total: int
    wall_s: float
    cpu_s: float
    model: nn.Module


@dataclass(frozen=True)
class ProgressCallback:
    """fn(progress) at every point (points None) or at `points` + 1 evenly spaced points
    done = round(k·total/points), k = 0..points (the start and the end included)."""

    fn: Callable[[Progress], None]
    points: int | None = None

    def __post_init__(self) -> None:
        if self.points is not None and self.points < 1:
            raise ValueError(f"progress callback points must be >= 1, got {self.points}")

    def wants(self, done: int, total: int) -> bool:
        if self.points is None:
            return True
        return any(done == round(k * total / self.points) for k in range(self.points + 1))


_CALLBACKS: list[ProgressCallback] = []


@contextlib.contextmanager
def progress_callback(fn: Callable[[Progress], None], points: int | None = None) -> Iterator[ProgressCallback]:
    """Call fn(Progress) from the training stages that run inside the block (see the module docstring)."""
    callback = ProgressCallback(fn, points)
    _CALLBACKS.append(callback)
    try:
        yield callback
    finally:
        _CALLBACKS.remove(callback)


@dataclass(frozen=True)
class Observed:
    """A training stage as progress callbacks see it: its name, the model and `finished()`, the context
    in which the model computes what the finished stage would leave."""

    stage: str
    model: nn.Module
    finished: Callable[[], AbstractContextManager]

    def report(self, done: int, total: int, clock: TrainingClock) -> None:
        """Run the callbacks that want this point: clock paused, RNG state restored, inside finished()."""
        wanted = [c for c in _CALLBACKS if c.wants(done, total)]
        if not wanted:
            return
        progress = Progress(self.stage, done, total, clock.wall_s, clock.cpu_s, self.model)
        with clock.paused(), torch.random.fork_rng(devices=[]), self.finished():
            for callback in wanted:
                callback.fn(progress)


@contextlib.contextmanager
def written_back(layers: Iterable[QuantizedLayer]) -> Iterator[None]:
    """Inside, each LSQ quantizer of `layers` is replaced by its base quantizer holding what write_back
    would leave (learned values rounded to the spec's formats) — the finished layer, bit for bit (LSQ's
    own forward differs in the last bits: the gradient-scaling trick, the float zero point); the LSQ
    quantizers and the bases' previous values are put back on exit."""
    swapped = []
    try:
        for layer in layers:
            for attr in ("weight_quantizer", "input_quantizer"):
                lsq = getattr(layer, attr)
                if isinstance(lsq, LSQActivation | LSQWeight):
                    swapped.append((layer, attr, lsq, {k: v.clone() for k, v in lsq.base.state_dict().items()}))
                    lsq.write_back()
                    setattr(layer, attr, lsq.base)
        yield
    finally:
        for layer, attr, lsq, saved in swapped:
            lsq.base.load_state_dict(saved)
            setattr(layer, attr, lsq)


# -- the loop -------------------------------------------------------------------------------------


def train_steps(step_fn: Callable[[int], dict[str, float]], total: int, learned: nn.Module,
                optimizer: torch.optim.Optimizer, ckpt: Checkpointer | None, observed: Observed) -> TrainingClock:
    """step_fn(i) for i < total under a progress bar, resuming from and saving to `ckpt` (every 100
    steps) when there is one (removed once finished), reporting progress after every step. Returns
    the training clock (callbacks left out)."""
    start, elapsed = ckpt.load(learned, optimizer) if ckpt is not None else (0, 0.0)
    clock = TrainingClock(elapsed)
    observed.report(start, total, clock)
    bar = tqdm(range(start, total), initial=start, total=total, desc=observed.stage, mininterval=5)
    for i in bar:
        metrics = step_fn(i)
        bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
        if ckpt is not None and ((i + 1) % 100 == 0 or i + 1 == total):
            ckpt.save(i + 1, learned, optimizer, clock.wall_s)
        observed.report(i + 1, total, clock)
    bar.close()
    if ckpt is not None:
        shutil.rmtree(ckpt.directory, ignore_errors=True)
    return clock
