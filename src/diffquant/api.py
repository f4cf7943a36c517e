"""The library's front door: quantize a model with a recipe."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from diffquant.arch.base import quantizable_layers
from diffquant.arch.skips import observe_skip_concats, up_blocks
from diffquant.calib.stats import (
    ActivationStats,
    check_given_stats,
    collect_activation_stats,
    modules_by_name,
)
from diffquant.finite import check_finite
from diffquant.lora import require_detached
from diffquant.nn.attention import (
    calibrate_attention_quantizers,
    install_attention_quantizers,
    observe_attention_operands,
    operand_key,
    planned_attention,
    quantization_switches,
)
from diffquant.nn.layers import QuantizedLayer, quantization_enabled, wrap_layer
from diffquant.nn.quantizers import ActivationQuantizer, WeightQuantizer
from diffquant.plan import LayerPlan, plan_layers
from diffquant.recipes.config import Recipe, StageConfig
from diffquant.recipes.presets import resolve_recipe

# What `calibration` may be: statistics already collected on this model, or a function that runs
# the full-precision sampler on the model it is given (e.g. from diffquant.calib.pipeline_calibration).
Calibration = ActivationStats | Callable[[nn.Module], object]
# Training data for stages that train on it: objective(model, i) is the loss of batch i (e.g. a zoo
# model's diffquant.zoo.training.diffusion_objective).
TrainingObjective = Callable[[nn.Module, int], object]

STATE_ATTR = "_diffquant_state"
# modules whose own tensors (weights, qparams, smoothing, branch factors) a quantized model computes with
QUANTIZER_STATE_TYPES = (QuantizedLayer, WeightQuantizer, ActivationQuantizer)
log = logging.getLogger("diffquant.quantize")


class CalibrationRequiredError(ValueError):
    """A recipe with static ranges or data-driven stages was given no calibration."""


class TrainingDataRequiredError(ValueError):
    """A recipe with a stage that trains on data was given no training objective."""


class UnsupportedModelError(ValueError):
    """A model quantize cannot take as it is (no quantizable layer, PEFT-wrapped layers)."""


@dataclass
class QuantizationState:
    """What a quantized model remembers of how it was made (saved into checkpoints)."""

    recipe: Recipe
    plan: dict[str, LayerPlan]
    # one entry per recipe stage, what it reported (QuantizationJob.report) plus its wall time
    stage_reports: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class QuantizationJob:
    """A model being quantized: the plan, its wrapped layers and the calibration statistics."""

    model: nn.Module
    recipe: Recipe
    plan: dict[str, LayerPlan]
    stats: ActivationStats | None = None
    layers: dict[str, QuantizedLayer] = field(default_factory=dict)
    progress: bool = True
    calibration: Calibration | None = None  # what quantize() was given, for stages that replay it
    training: TrainingObjective | None = None  # for stages that train on data
    attention: tuple[str, ...] = ()  # attention modules that get the recipe's operand quantizers
    stage_reports: list[dict[str, Any]] = field(init=False)  # one per recipe stage, see report()

    def __post_init__(self) -> None:
        self.stage_reports = [{"type": stage.type, "seconds": 0.0} for stage in self.recipe.stages]

    def report(self, stage: StageConfig, **summary: Any) -> None:
        """Record a JSON-serialisable summary of what `stage` did (e.g. which calibration samples it
        kept); saved with the model (checkpoint manifest "stage_reports"), so results stay reviewable."""
        index = next(i for i, s in enumerate(self.recipe.stages) if s is stage)
        self.stage_reports[index].update(summary)

    def require_training(self) -> TrainingObjective:
        if self.training is None:
            raise TrainingDataRequiredError(f"recipe {self.recipe.name!r} trains on data: pass training=...")
        return self.training

    def require_stats(self) -> ActivationStats:
        if self.stats is None:
            raise CalibrationRequiredError(f"recipe {self.recipe.name!r} needs calibration statistics")
        return self.stats

    def wrap(self) -> None:
        """Replace every planned layer by its quantized wrapper (sharing the parameters)."""
        for name, plan in self.plan.items():
            parent, attr = _parent_of(self.model, name)
            layer = wrap_layer(getattr(parent, attr), plan.weight, plan.input)
            setattr(parent, attr, layer)
            self.layers[name] = layer
        self.split_inputs()
        self.wrap_attention()

    def split_inputs(self) -> None:
        """Input quantizers with split_shortcut get the split of the skip concatenation that the
        calibration run saw their layer read (arch/skips.py); other layers keep one range."""
        if not wants_splits(self.plan):
            return
        splits = {} if self.stats is None else self.stats.channel_splits or {}
        split = []
        for name, layer in self.layers.items():
            quantizer = layer.input_quantizer
            if name in splits and quantizer is not None and quantizer.splits_input:
                quantizer.set_split(splits[name])
                split.append(name)
        log.info("shortcut splitting: %d layers read a skip concatenation and get two input ranges", len(split))

    def wrap_attention(self) -> None:
        """Give the job's attention modules the recipe's operand quantizers (nn.attention). Their static
        ranges are calibrated at once: they come from full-precision q, k, v and softmax statistics,
        which the (function-preserving) transform stages do not change."""
        config = self.recipe.attention
        if config is None or not self.attention:
            return
        selected = set(self.attention)
        install_attention_quantizers(self.model, config, select=lambda name, _module: name in selected)
        if config.calibrated_operands():
            calibrate_attention_quantizers(self.model, self.require_stats())

    def calibrate(self) -> None:
        """Weight qparams by round-to-nearest; static input ranges from the (smoothed) statistics."""
        for name, layer in tqdm(self.layers.items(), desc="quantize layers", disable=not self.progress):
            if layer.weight_quantizer is not None and not layer.weight_quantizer_calibrated:
                layer.calibrate_weight()
            quantizer = layer.input_quantizer
            if quantizer is not None and not quantizer.calibrated:
                stats = self.require_stats().require(name)
                if layer.smooth is not None:
                    stats = stats.divided(layer.smooth)
                quantizer.calibrate(stats)

    def check_finite(self) -> None:
        """Every layer's qparams, smoothing vector and branch factors finite (NonFiniteError). A backstop:
        weights and statistics were checked where they entered, so a failure here is an overflow."""
        hint = (f"recipe {self.recipe.name!r} overflowed on this layer (a float16 model: quantize it in float32); "
                "the model was modified in place: reload it before trying again")
        for name, module in self.model.named_modules():
            if isinstance(module, QUANTIZER_STATE_TYPES):
                for key, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                    check_finite(f"{type(module).__name__} {name!r} {key}", tensor, hint)


def wants_splits(plan: dict[str, LayerPlan]) -> bool:
    """Whether some planned input spec asks for shortcut splitting (QuantSpec.split_shortcut)."""
    return any(p.input is not None and p.input.split_shortcut for p in plan.values())


def _parent_of(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), attr


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
    if getattr(model, STATE_ATTR, None) is not None:
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
    setattr(model, STATE_ATTR, QuantizationState(recipe, plan, job.stage_reports))
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
    """Add the block's wall time to report["seconds"] (a stage's prepare and apply together)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        report["seconds"] = round(report["seconds"] + time.perf_counter() - start, 3)


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLayer)}


@contextlib.contextmanager
def quantizers_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run a quantized model in full precision (transforms such as smoothing stay applied; attention
    operands pass unquantized)."""
    layers = list(quantized_layers(model).values())
    if any(layer.weight_codes is not None for layer in layers):
        raise RuntimeError("a model loaded from stored codes has no full-precision weights to disable to")
    with quantization_enabled(quantization_switches(model), False):
        yield model
