"""Generic training tools: per-step seeding, the learning-rate schedule, resumable checkpoints, the
progress loop. Used by the training-based stages (algorithms/training.py) and the zoo's trainers.

Every source of randomness in a step (batch indices, augmentation, dropout, VAE sampling) is drawn
after reseeding from (seed, step), so a run resumed from a checkpoint replays exactly the steps an
uninterrupted run would have taken, without having to persist RNG states.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from diffquant.atomic import atomic_directory

CACHE_ROOT_ENV = "DIFFQUANT_CACHE_DIR"


def default_checkpoint_dir(name: str) -> Path:
    """Training checkpoints live outside the repository: ~/.cache/diffquant/train/<name>."""
    root = os.environ.get(CACHE_ROOT_ENV) or Path.home() / ".cache" / "diffquant"
    return Path(root) / "train" / name


def step_seed(seed: int, step: int) -> int:
    # Large odd multiplier keeps (seed, step) pairs from colliding across nearby seeds.
    return (seed * 1_000_003 + step) % (2**63 - 1)


def step_generator(seed: int, step: int) -> torch.Generator:
    """Reseed the global RNG (dropout, sampling) and return a generator for data choices."""
    s = step_seed(seed, step)
    torch.manual_seed(s)
    return torch.Generator().manual_seed(s)


def cosine_lr(step: int, total: int, base_lr: float, warmup: int = 0, final_frac: float = 0.02) -> float:
    """Linear warmup then cosine decay to final_frac * base_lr; a pure function of step (no state)."""
    if warmup and step < warmup:
        return base_lr * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@dataclass
class Checkpointer:
    """Keeps the latest training state in a cache directory (never in the repository).

    Model weights go to safetensors, the step and metadata to JSON; the optimizer state is saved with
    torch.save only here and read back with weights_only=True.
    """

    directory: Path
    meta: dict = field(default_factory=dict)  # run identity (config, seed, steps); a mismatch restarts

    def _path(self) -> Path:
        return Path(self.directory) / "latest"

    def save(
        self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, elapsed: float
    ) -> None:
        with atomic_directory(self._path(), overwrite=True) as tmp:
            state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
            save_file(state, str(tmp / "model.safetensors"))
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            (tmp / "state.json").write_text(
                json.dumps({"step": step, "elapsed_s": elapsed, "meta": self.meta})
            )

    def run(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        step_fn: Callable[[int], dict[str, float]],
        total_steps: int,
        resume: bool = True,
        checkpoint_every: int = 200,
        desc: str = "train",
    ) -> float:
        """Resume from the latest checkpoint (if `resume`), train to `total_steps` saving as it goes;
        return the total wall time across resumes."""
        start, elapsed = self.load(model, optimizer) if resume else (0, 0.0)
        return run_loop(step_fn, total_steps, start, elapsed,
                        on_checkpoint=lambda s, e: self.save(s, model, optimizer, e),
                        checkpoint_every=checkpoint_every, desc=desc)

    def load(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, float]:
        """Restore the latest state if it belongs to the same run; return (next step, elapsed seconds)."""
        path = self._path()
        if not (path / "state.json").is_file():
            return 0, 0.0
        state = json.loads((path / "state.json").read_text())
        if state.get("meta") != self.meta:
            tqdm.write(f"checkpoint in {path} is from a different run configuration; starting afresh")
            return 0, 0.0
        model.load_state_dict(load_file(str(path / "model.safetensors")))
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        return int(state["step"]), float(state.get("elapsed_s", 0.0))


def run_loop(
    step_fn: Callable[[int], dict[str, float]],
    total_steps: int,
    start_step: int = 0,
    elapsed: float = 0.0,
    on_checkpoint: Callable[[int, float], None] | None = None,
    checkpoint_every: int = 200,
    desc: str = "train",
) -> float:
    """Run step_fn(step) for steps [start_step, total_steps) under a tqdm bar; return total wall time.

    on_checkpoint(next_step, elapsed) is called every checkpoint_every steps and at the end.
    Wall time accumulates across resumes so the model card reports the full training cost.
    """
    t0 = time.perf_counter() - elapsed
    bar = tqdm(
        range(start_step, total_steps), initial=start_step, total=total_steps, desc=desc, mininterval=5
    )
    for step in bar:
        metrics = step_fn(step)
        bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
        done = step + 1
        if on_checkpoint and (done % checkpoint_every == 0 or done == total_steps):
            on_checkpoint(done, time.perf_counter() - t0)
    bar.close()
    return time.perf_counter() - t0


def cpu_name() -> str:
    """CPU model for model cards (platform.processor() is empty on most Linux systems)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine() or "unknown CPU"


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
