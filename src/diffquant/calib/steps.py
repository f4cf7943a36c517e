"""The current sampling step, set explicitly by the sampler.

Per-step quantizer state (per-step activation ranges, temporal LSQ) reads the step index from this
context. It is never inferred by counting forward calls: with classifier-free guidance, recomputation
or a different sampler, a counter silently drifts. Set it yourself in your own sampling loop:

    for i, t in enumerate(scheduler.timesteps):
        with diffquant.sampling_step(i, total=len(scheduler.timesteps)):
            eps = model(x, t, ...)

or let `track_pipeline_steps` derive it from the timestep a diffusers pipeline passes its denoiser.

The context also carries the run's number of steps (`total`; None = unknown), so state held for S
trained / calibrated steps serves a run of another length (`step_rows`): step i of `total` sits at
position p = i * (S - 1) / (total - 1) on the trained steps (p = 0 for a one-step run: its only step
starts from pure noise, like trained step 0), so the first and last steps always map onto the first
and last trained ones. State is then interpolated linearly between rows floor(p) and ceil(p), or
taken from the nearest row (round half up). With total == S, or total unknown, step i reads row i
itself. This assumes runs of either length spread their timesteps alike over the schedule (as
diffusers' spacings do), so equal fractions of the run mean similar timesteps.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction

import torch

from diffquant.formats.spec import STEP_INTERPOLATIONS


@dataclass(frozen=True)
class _Step:
    index: int
    total: int | None


_CURRENT_STEP: contextvars.ContextVar[_Step | None] = contextvars.ContextVar("diffquant_step", default=None)


class StepContextError(RuntimeError):
    """Per-step state was needed but no sampling step is set."""


def _step(index: int | None, total: int | None) -> _Step | None:
    if index is not None and index < 0:
        raise ValueError(f"sampling step index must be >= 0, got {index}")
    if total is not None and (total < 1 or index is None or index >= total):
        raise ValueError(f"sampling step {index} is not a step of a {total}-step run")
    return None if index is None else _Step(index, total)


@contextlib.contextmanager
def sampling_step(index: int | None, total: int | None = None) -> Iterator[None]:
    """Mark the code inside as running sampling step `index` (0 = first denoising step) of a run of
    `total` steps (None: unknown; per-step state then needs a row for every index)."""
    token = _CURRENT_STEP.set(_step(index, total))
    try:
        yield
    finally:
        _CURRENT_STEP.reset(token)


def current_step() -> int | None:
    step = _CURRENT_STEP.get()
    return None if step is None else step.index


def current_total_steps() -> int | None:
    """The number of steps of the current run, when the sampler told (else None)."""
    step = _CURRENT_STEP.get()
    return None if step is None else step.total


def require_step() -> int:
    step = current_step()
    if step is None:
        raise StepContextError(
            "this model has per-step quantizer state but no sampling step is set: wrap the denoiser "
            "call in `with diffquant.sampling_step(i):` or run it through diffquant.track_pipeline_steps"
        )
    return step


def _trained_position(trained: int) -> Fraction:
    """Position of the current step on `trained` per-step rows (module docstring): the step index
    itself when the run's total is unknown or equal to `trained`."""
    step, total = require_step(), current_total_steps()
    if total is None or total == trained:
        if step >= trained:
            raise IndexError(f"sampling step {step} but ranges were calibrated for {trained} steps")
        return Fraction(step)
    return Fraction(step * (trained - 1), max(total - 1, 1))


def step_rows(values: torch.Tensor, mode: str = "linear") -> torch.Tensor:
    """The current step's row of per-step `values` [S, ...]: values[i] for a run of S steps (or of
    unknown length), else interpolated ("linear", differentiable: the two neighbour rows get
    gradient weights 1 - frac and frac) or the "nearest" row, as the module docstring describes."""
    if mode not in STEP_INTERPOLATIONS:
        raise ValueError(f"unknown step interpolation {mode!r}; choose one of {STEP_INTERPOLATIONS}")
    position = _trained_position(values.shape[0])
    row, frac = int(position), position - int(position)
    if frac == 0:
        return values[row]
    if mode == "nearest":
        return values[row + (frac >= Fraction(1, 2))]
    return torch.lerp(values[row], values[row + 1], float(frac))


def _timestep_value(args: tuple, kwargs: dict) -> float | None:
    t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return float(t.flatten()[0])
    return float(t)


@contextlib.contextmanager
def track_pipeline_steps(pipe) -> Iterator[None]:
    """Inside, every call of the pipeline's denoiser runs in the step matching its timestep argument.

    The index is the position of the timestep in `pipe.scheduler.timesteps` (the sampler's own
    schedule), looked up afresh for each call, so classifier-free-guidance batches, extra calls and
    different step counts map correctly; the run's total is the schedule's length.
    """
    denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    if denoiser is None:
        raise ValueError("pipeline has neither a `transformer` nor a `unet` component")
    tokens: list[contextvars.Token] = []

    def pre_hook(_module, args, kwargs):
        t = _timestep_value(args, kwargs)
        schedule = pipe.scheduler.timesteps
        if t is None or schedule is None:
            raise StepContextError("cannot find the timestep argument of the denoiser call")
        index = int(torch.argmin((schedule.float() - t).abs()))
        tokens.append(_CURRENT_STEP.set(_Step(index, len(schedule))))

    def post_hook(_module, _args, _kwargs, _output):
        _CURRENT_STEP.reset(tokens.pop())

    handles = [
        denoiser.register_forward_pre_hook(pre_hook, with_kwargs=True),
        denoiser.register_forward_hook(post_hook, with_kwargs=True),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
