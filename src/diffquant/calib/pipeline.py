"""Calibration through a diffusers pipeline: run the full-precision sampler over N conditions.

`pipeline_calibration(pipe, ...)` returns the function `diffquant.quantize(..., calibration=...)`
calls with the model being quantized; the pipeline's denoiser must be that model. Each pipeline
class gets its conditions from a registered builder (class labels for DiT, prompts for text-to-
image); pass `inputs=[...]` to give the call arguments yourself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from diffquant.calib.steps import track_pipeline_steps

# Pipeline class name -> (pipeline, number of conditions, seed) -> keyword arguments of one pipeline
# call per condition (without generator / steps, which pipeline_calibration adds).
ConditionBuilder = Callable[[Any, int, int], list[dict[str, Any]]]
_CONDITION_BUILDERS: dict[str, ConditionBuilder] = {}

DEFAULT_PROMPTS = (
    "a photo of a cat", "a red car on a street", "a bowl of fruit on a table", "a mountain lake at dawn",
    "a portrait of an old man", "a city skyline at night", "a dog running on the beach", "a vase of flowers",
)


def register_condition_builder(pipeline_class: str) -> Callable:
    def wrap(builder: ConditionBuilder) -> Callable:
        _CONDITION_BUILDERS[pipeline_class] = builder
        return builder

    return wrap


@register_condition_builder("DiTPipeline")
def _class_labels(pipe: Any, n: int, seed: int) -> list[dict[str, Any]]:
    num_classes = pipe.transformer.config.num_embeds_ada_norm or 1000
    g = torch.Generator().manual_seed(seed)
    return [{"class_labels": [int(c)]} for c in torch.randint(0, num_classes, (n,), generator=g)]


def _prompts(pipe: Any, n: int, seed: int) -> list[dict[str, Any]]:
    return [{"prompt": DEFAULT_PROMPTS[(seed + i) % len(DEFAULT_PROMPTS)]} for i in range(n)]


def conditions_for(pipe: Any, n: int, seed: int) -> list[dict[str, Any]]:
    """Default calibration conditions for a pipeline (class labels or prompts)."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in _CONDITION_BUILDERS:
            return _CONDITION_BUILDERS[cls.__name__](pipe, n, seed)
    return _prompts(pipe, n, seed)


def pipeline_calibration(
    pipe: Any,
    num_samples: int = 8,
    num_inference_steps: int = 20,
    seed: int = 0,
    inputs: list[dict[str, Any]] | None = None,
    progress: bool = True,
    **call_kwargs: Any,
) -> Callable[[torch.nn.Module], None]:
    """A calibration function running `pipe` over `num_samples` conditions at every sampling step.

    Steps are tracked from the timestep the pipeline gives its denoiser (per-step statistics). The
    function's `reseeded(seed)` runs the same conditions from other noise (for training stages).
    """
    inputs = inputs if inputs is not None else conditions_for(pipe, num_samples, seed)
    if not inputs:
        raise ValueError("calibration needs at least one condition")

    def run(model: torch.nn.Module) -> None:
        denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
        if denoiser is not model:
            raise ValueError("the model being quantized is not this pipeline's denoiser")
        previous_bar = dict(getattr(pipe, "_progress_bar_config", {}))
        pipe.set_progress_bar_config(disable=True)  # one bar over conditions instead of one per call
        try:
            for i, kwargs in enumerate(tqdm(inputs, desc="calibrate", disable=not progress)):
                generator = torch.Generator().manual_seed(seed + i)
                with track_pipeline_steps(pipe):
                    pipe(**kwargs, num_inference_steps=num_inference_steps, generator=generator,
                         output_type="latent", **call_kwargs)
        finally:
            pipe._progress_bar_config = previous_bar

    run.reseeded = lambda new_seed: pipeline_calibration(pipe, num_samples, num_inference_steps, new_seed, inputs,
                                                         False, **call_kwargs)
    return run
