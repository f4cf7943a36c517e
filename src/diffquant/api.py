"""The library's front door: quantize a model with a recipe."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from torch import nn

from diffquant.arch.base import quantizable_layers
from diffquant.arch.skips import observe_skip_concats, up_blocks
from diffquant.calib.stats import (
    ActivationStats,
    check_given_stats,
    collect_activation_stats,
    modules_by_name,
)
from diffquant.finite import check_finite
from diffquant.job import (  # noqa: F401  (re-exported: diffquant.api is where users import them from)
    QUANTIZER_STATE_TYPES,
    STATE_ATTR,
    Calibration,
    CalibrationRequiredError,
    QuantizationJob,
    QuantizationState,
    TrainingDataRequiredError,
    TrainingObjective,
    UnsupportedModelError,
    quantization_state,
    quantized_layers,
    quantizers_disabled,
    set_quantization_state,
    wants_splits,
)
from diffquant.lora import require_detached
from diffquant.nn.attention import observe_attention_operands, operand_key, planned_attention
from diffquant.plan import LayerPlan, plan_layers
from diffquant.recipes.config import Recipe
from diffquant.recipes.presets import resolve_recipe


def gather_stats(model: nn.Module, plan: dict[str, LayerPlan], calibration: Calibration,
                 sample_rows: int = 0, attention: Collection[str] = (),
                 operands: Collection[str] = ()) -> ActivationStats:
    """Statistics of the planned layers' inputs; sample_rows: input rows per layer to keep a sample of.
    attention / operands: attention modules whose `operands` (nn.attention.OPERANDS) are recorded in
    the same run, under "<attention path>.<operand>" (nn.attention.operand_key)."""
    operand_keys = [operand_key(a, op) for a in attention for op in operands]
    if isinstance(calibration, ActivationStats):
        missing = [n for n in [*plan, *operand_keys] if n not in calibration]
        if missing:
            raise ValueError(f"calibration statistics lack {len(missing)} planned layers or attention operands, "
                             f"e.g. {missing[:3]}")
        check_given_stats(calibration, modules_by_name(model, plan))
        if wants_splits(plan) and calibration.channel_splits is None and up_blocks(model):
            raise ValueError(
                "the recipe splits skip concatenations (split_shortcut) but the statistics do not say which layers "
                "read one: pass a calibration function, or set stats.channel_splits = "
                "diffquant.arch.skip_concat_splits(model, run) for the run that collected them")
        return calibration
    if not callable(calibration):
        raise TypeError(
            "calibration must be ActivationStats or a function that runs the sampler on the model, "
            f"got {type(calibration).__name__}"
        )
    stats = ActivationStats()
    selected = set(attention)

    def run() -> None:
        with (observe_attention_operands(model, stats, select=lambda name, _module: name in selected, operands=operands)
              if operand_keys else contextlib.nullcontext()):
            calibration(model)

    with observe_skip_concats(model) if wants_splits(plan) else contextlib.nullcontext() as splits:
        stats = collect_activation_stats(modules_by_name(model, plan), run, stats, sample_rows=sample_rows)
    if splits is not None:
        stats.channel_splits = dict(splits)
    missing = [n for n in [*plan, *operand_keys] if n not in stats]
    if missing:
        raise ValueError(f"{len(missing)} planned layers or attention operands never ran during calibration, "
                         f"e.g. {missing[:3]}")
    return stats


def quantize(
    model: nn.Module,
    recipe: str | Path | Recipe,
    calibration: Calibration | None = None,
    progress: bool = True,
    training: TrainingObjective | None = None,
) -> nn.Module:
    """Quantize `model` in place with `recipe` (preset name, Recipe, or recipe file) and return it.

    calibration: needed by recipes with static input ranges or data-driven stages (SmoothQuant):
    ActivationStats collected on this model, or a function running the FP sampler on the model.
    training: needed by recipes whose stages train on data (QAT): objective(model, i) -> loss of batch
    i, e.g. diffquant.zoo.training.diffusion_objective(zoo_model).
    A recipe's `attention` instruments the supported attention modules whose q/k/v projections are
    planned (nn.attention.planned_attention: unsupported ones stay in full precision with a warning,
    not an error); their operand statistics come from the same calibration run as the layers'.
    Refused before the model changes: an attached LoRA, PEFT layers, non-finite parameters (check_model),
    no layer to quantize, non-finite calibration inputs or given statistics of another width
    (calib.stats). 16-bit models quantize in their dtype; quantizers and low-rank branches compute in float32.
    """
    recipe = resolve_recipe(recipe)
    if quantization_state(model) is not None:
        raise ValueError("model is already quantized; start from the full-precision model")
    check_model(model)
    plan = plan_layers(model, recipe)
    if not plan:
        raise UnsupportedModelError(_no_layer_message(model, recipe))
    if recipe.needs_calibration and calibration is None:
        raise CalibrationRequiredError(
            f"recipe {recipe.name!r} needs calibration (static input ranges or a data-driven stage): pass "
            "calibration=diffquant.calib.pipeline_calibration(pipe, ...) or your own sampling function"
        )
    if recipe.needs_training_data and training is None:
        raise TrainingDataRequiredError(
            f"recipe {recipe.name!r} trains on data: pass training=objective, a function (model, i) -> loss of "
            "batch i (for zoo models diffquant.zoo.training.diffusion_objective(model))"
        )
    attention = tuple(planned_attention(model, plan)) if recipe.attention is not None else ()
    job = QuantizationJob(model, recipe, plan, progress=progress, calibration=calibration, training=training,
                          attention=attention)
    for stage, report in zip(recipe.stages, job.stage_reports, strict=True):
        with _timed(report):
            stage.prepare(job)
    if job.calibration is not None and recipe.needs_calibration:
        operands = recipe.attention.calibrated_operands() if recipe.attention is not None else ()
        job.stats = gather_stats(model, plan, job.calibration, recipe.calibration_rows, attention, operands)
    job.wrap()
    for stage, report in zip(recipe.stages, job.stage_reports, strict=True):
        with _timed(report):
            stage.apply(job)
    job.calibrate()
    job.check_finite()
    set_quantization_state(model, QuantizationState(recipe, plan, job.stage_reports))
    return model


def check_model(model: nn.Module) -> None:
    """Refuse, before anything changes, a model quantize would get wrong: an attached diffquant LoRA
    (quantizing would drop it and leave it impossible to detach), PEFT-wrapped layers (their LoRA
    factors would be quantized as layers and the checkpoint could not be reloaded), and non-finite
    parameters (NaN scales that save and reload without a word)."""
    require_detached(model, "quantize")
    for name, module in model.named_modules():
        if is_peft_layer(module):
            raise UnsupportedModelError(
                f"layer {name!r} is a PEFT LoRA layer ({type(module).__module__}.{type(module).__name__}): "
                "quantizing would quantize its LoRA factors as layers and write a checkpoint that cannot be "
                "reloaded. Merge the adapter (merge_and_unload()) or unload it first; to run a LoRA on the "
                "quantized model, attach its state dict afterwards with diffquant.lora.attach")
    for name, param in model.named_parameters():
        check_finite(f"parameter {name!r}", param, "the model is broken before quantization: reload or "
                     "repair its weights (its full-precision output is not finite either)")


def is_peft_layer(module: nn.Module) -> bool:
    """A layer PEFT wrapped or injected (peft's BaseTunerLayer and its LoRA layers), told by its class's
    module or by PEFT's attributes, so peft need not be installed or imported."""
    if any(cls.__module__.split(".")[0] == "peft" for cls in type(module).__mro__):
        return True
    return hasattr(module, "base_layer") and any(hasattr(module, a) for a in ("lora_A", "lora_B"))


def _no_layer_message(model: nn.Module, recipe: Recipe) -> str:
    found = quantizable_layers(model)
    if found:
        return (f"recipe {recipe.name!r} leaves every one of the {len(found)} quantizable layers of "
                f"{type(model).__name__} in full precision (e.g. {list(found)[:3]}): nothing to quantize; "
                "check the recipe's overrides, or the model's layer roles (a model no adapter knows has its "
                "first and last layer kept in full precision)")
    kinds = sorted({type(m).__name__ for m in model.modules() if m is not model and not list(m.children())})
    return (f"{type(model).__name__} has no layer diffquant quantizes (nn.Linear, nn.Conv2d); its layers are "
            f"{kinds[:8] or 'none'}: quantizing it would give a model with 0 quantized layers")


@contextlib.contextmanager
def _timed(report: dict[str, Any]) -> Iterator[None]:
    """Add the block's wall time to report["seconds"] (a stage's prepare and apply together) and the process's
    CPU time, all threads, to report["cpu_seconds"]: the work itself, which other jobs on the machine do not
    stretch as they stretch the wall time."""
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        report["seconds"] = round(report["seconds"] + time.perf_counter() - start, 3)
        report["cpu_seconds"] = round(report["cpu_seconds"] + time.process_time() - cpu_start, 3)
