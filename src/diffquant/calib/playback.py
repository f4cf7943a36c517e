"""A calibration set played back as a `calibration=` function (one sampling step per batch)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from diffquant.calib.sets import CalibrationSet
from diffquant.calib.steps import sampling_step


def replay(cal_set: CalibrationSet, batch_size: int = 64, progress: bool = False
           ) -> Callable[[nn.Module], None]:
    """A `calibration=` function for diffquant.quantize: runs the denoiser it is given on the set's
    batches (one step each, inside `sampling_step(step, total)`, under no_grad), inputs on its device;
    total is the captured run's step count (meta "steps"), None when the set does not record it."""
    total = cal_set.meta.get("steps")
    total = total if isinstance(total, int) else None

    def run(denoiser: nn.Module) -> None:
        param = next(denoiser.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        with torch.no_grad():
            for step, kwargs in tqdm(cal_set.batches(batch_size), desc="calibrate", disable=not progress):
                with sampling_step(step, total):
                    denoiser(**_to_device(kwargs, device))

    return run


def _to_device(tree: Any, device: torch.device) -> Any:
    if isinstance(tree, dict):
        return {k: _to_device(v, device) for k, v in tree.items()}
    return tree.to(device) if isinstance(tree, torch.Tensor) else tree
