"""Capture: run a sampler under a `CallRecorder` and return the calibration set and TDAC's features.

`capture` drives a model's sampler batch by batch, so it knows each call's trajectories; it needs only
what `SamplerModel` names (diffquant.zoo's LatentDiffusionModel has it), so the core does not depend
on the zoo. `capture_calls` records from any calibration function and infers them (calib.recording).
For a zoo model's `.calibration(...)` both give the same set.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from diffquant.calib.recording import CallRecorder
from diffquant.calib.sets import CalibrationSet
from diffquant.calib.tdac import StepFeatures


class SamplerModel(Protocol):
    """What `capture` needs of a model: its denoiser, label count, sampler settings, seeded noise and
    a sampler that runs every denoiser call inside `sampling_step`."""

    name: str
    num_classes: int
    guidance_scale: float
    default_steps: int

    @property
    def denoiser(self) -> nn.Module: ...

    def initial_noise(self, n: int, seed: int) -> torch.Tensor: ...

    def sample_latents(self, labels: torch.Tensor, noise: torch.Tensor, steps: int | None = None) -> torch.Tensor: ...


def resolve_feature_module(denoiser: nn.Module, name: str | None = None) -> tuple[str, nn.Module]:
    """The module whose output gives TDAC's features: `name` if given, else the middle transformer
    block of a DiT-like model (`transformer_blocks[len // 2]`, or `blocks[len // 2]` as in Wan),
    else a UNet's `mid_block`."""
    if name is not None:
        return name, denoiser.get_submodule(name)
    for attr in ("transformer_blocks", "blocks"):
        blocks = getattr(denoiser, attr, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return f"{attr}.{len(blocks) // 2}", blocks[len(blocks) // 2]
    if isinstance(getattr(denoiser, "mid_block", None), nn.Module):
        return "mid_block", denoiser.mid_block
    raise ValueError(f"{type(denoiser).__name__} has neither `transformer_blocks` / `blocks` nor a `mid_block`: "
                     "pass feature_module=<module name> to choose where TDAC's features come from")


def capture(
    model: SamplerModel,
    num_samples: int,
    steps: int | None = None,
    seed: int = 1234,
    batch_size: int = 64,
    feature_module: str | None = None,
    progress: bool = True,
) -> tuple[CalibrationSet, StepFeatures]:
    """Run the full-precision sampler and record every denoiser call, plus TDAC's step features.

    Labels and noise are those of `model.calibration` (balanced labels; seed 1234 by default, disjoint
    from evaluation's seeds). Every row of every call is kept (guided: cond and null rows), so the
    set holds num_samples x steps (x 2 with guidance) rows; select() picks from it. Features come
    from the conditional rows only (where: `resolve_feature_module`; `feature_module` names another).
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples}, {batch_size}")
    denoiser = model.denoiser
    module_name, module = resolve_feature_module(denoiser, feature_module)
    labels = torch.arange(num_samples) % model.num_classes
    noise = model.initial_noise(num_samples, seed)
    recorder = CallRecorder(denoiser)
    with recorder.hooks(denoiser, module):
        for start in tqdm(range(0, num_samples, batch_size), desc="capture", disable=not progress):
            sl = slice(start, start + batch_size)
            recorder.batch, recorder.offset = len(labels[sl]), start
            model.sample_latents(labels[sl], noise[sl], steps)
    meta = {"model": model.name, "num_samples": num_samples, "steps": model.default_steps if steps is None else steps,
            "seed": seed, "guidance_scale": model.guidance_scale, "feature_module": module_name}
    return recorder.calibration_set(meta), recorder.step_features(module_name, num_samples)


def capture_calls(
    calibration: Callable[[nn.Module], object],
    denoiser: nn.Module,
    feature_module: str | None = None,
    features: bool = True,
) -> tuple[CalibrationSet, StepFeatures | None]:
    """Run `calibration(denoiser)` (any calibration function: a zoo model's `.calibration(...)`,
    diffquant.calib.pipeline_calibration, replay, your own sampler) under no_grad and record every
    denoiser call, plus TDAC's step features (None with features=False; then no feature module is
    needed). Every call must run inside a sampling step. Sample ids and guidance are inferred
    (calib.recording); for a zoo model's `.calibration(n, ...)` the set and features equal `capture(model,
    n, ...)`'s. meta: "num_samples" (trajectories seen), "steps" (the run's step count when every
    call reported the same one, else None), "guided_calls", "feature_module".
    """
    module_name, module = resolve_feature_module(denoiser, feature_module) if features else (None, None)
    recorder = CallRecorder(denoiser, explicit=False, features=features)
    with recorder.hooks(denoiser, module), torch.no_grad():
        calibration(denoiser)
    if recorder.calls == 0:
        raise ValueError("the calibration function never called the denoiser")
    totals = recorder.totals
    meta = {"source": "calibration function", "num_samples": recorder.offset + recorder.batch,
            "steps": next(iter(totals)) if len(totals) == 1 else None,
            "guided_calls": recorder.guided_calls, "feature_module": module_name}
    feats = recorder.step_features(module_name) if module_name is not None else None
    return recorder.calibration_set(meta), feats
