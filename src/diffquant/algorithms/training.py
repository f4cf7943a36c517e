"""Shared pieces of the training-based stages (EfficientDM, QAT): run identity and checkpoints,
learning-rate decay, the training loop."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from diffquant.nn.layers import QuantizedLayer
from diffquant.zoo.train_utils import Checkpointer, default_checkpoint_dir, run_loop


def stage_checkpointer(stage, layers: dict[str, QuantizedLayer]) -> Checkpointer | None:
    """Where a training stage keeps its resumable state: `stage.checkpoint_dir`, or (None) a cache
    folder named by a hash of the stage config and the layers' starting state (weights, quantizer
    specs and parameters), so rerunning the same quantization resumes and anything else (another
    recipe around the same stage included) starts afresh; "" disables checkpoints."""
    if stage.checkpoint_dir == "":
        return None
    digest = hashlib.sha256(json.dumps(stage.to_dict(), sort_keys=True).encode())
    for name, layer in sorted(layers.items()):
        digest.update(f"{name}|{layer.extra_repr()}".encode())
        for key, tensor in sorted(layer.state_dict().items()):
            digest.update(f"{key}|{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    run = digest.hexdigest()[:16]
    folder = Path(stage.checkpoint_dir) if stage.checkpoint_dir else default_checkpoint_dir(f"{stage.type}-{run}")
    return Checkpointer(folder, meta={"run": run})


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


def train_steps(step_fn, total: int, learned: torch.nn.Module, optimizer: torch.optim.Optimizer,
                ckpt: Checkpointer | None, desc: str) -> float:
    """step_fn(i) for i < total under a progress bar, resuming from and saving to `ckpt` (every 100
    steps) when there is one; the checkpoint is removed once finished. Returns the wall time."""
    if ckpt is None:
        return run_loop(step_fn, total, desc=desc)
    wall = ckpt.run(learned, optimizer, step_fn, total, resume=True, checkpoint_every=100, desc=desc)
    shutil.rmtree(ckpt.directory, ignore_errors=True)
    return wall
