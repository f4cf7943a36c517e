"""The current sampling step, set explicitly by the sampler.

Per-step quantizer state (per-step activation ranges, temporal LSQ) reads the step index from this
context. It is never inferred by counting forward calls: with classifier-free guidance, recomputation
or a different sampler, a counter silently drifts. Set it yourself in your own sampling loop:

    for i, t in enumerate(scheduler.timesteps):
        with diffquant.sampling_step(i):
            eps = model(x, t, ...)

or let `track_pipeline_steps` derive it from the timestep a diffusers pipeline passes its denoiser.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

_CURRENT_STEP: contextvars.ContextVar[int | None] = contextvars.ContextVar("diffquant_step", default=None)


class StepContextError(RuntimeError):
    """Per-step state was needed but no sampling step is set."""


@contextlib.contextmanager
def sampling_step(index: int | None) -> Iterator[None]:
    """Mark the code inside as running sampling step `index` (0 = first denoising step)."""
    if index is not None and index < 0:
        raise ValueError(f"sampling step index must be >= 0, got {index}")
    token = _CURRENT_STEP.set(index)
    try:
        yield
    finally:
        _CURRENT_STEP.reset(token)


def current_step() -> int | None:
    return _CURRENT_STEP.get()


def require_step() -> int:
    step = _CURRENT_STEP.get()
    if step is None:
        raise StepContextError(
            "this model has per-step quantizer state but no sampling step is set: wrap the denoiser "
            "call in `with diffquant.sampling_step(i):` or run it through diffquant.track_pipeline_steps"
        )
    return step


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
    different step counts map correctly.
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
        tokens.append(_CURRENT_STEP.set(index))

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
