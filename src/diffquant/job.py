"""The quantization job: a model being quantized, what it was given, and what it keeps afterwards.

Low in the package on purpose: the stages (algorithms/), the recipe configs that declare them
(recipes/), `api.quantize`, `checkpoint` and `freeze` all import the job, its errors and the state
accessor from here, so none of them needs another's module (or an import inside a function).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from diffquant.calib.stats import ActivationStats
from diffquant.finite import check_finite
from diffquant.nn.attention import (
    calibrate_attention_quantizers,
    install_attention_quantizers,
    quantization_switches,
)
from diffquant.nn.layers import QuantizedLayer, quantization_enabled, wrap_layer
from diffquant.nn.quantizers import ActivationQuantizer, WeightQuantizer
from diffquant.plan import LayerPlan
from diffquant.recipes.config import Recipe, StageConfig

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


def quantization_state(model: nn.Module) -> QuantizationState | None:
    """The state `quantize` (or `load_quantized`) left on `model`; None for a full-precision model."""
    return getattr(model, STATE_ATTR, None)


def set_quantization_state(model: nn.Module, state: QuantizationState) -> None:
    setattr(model, STATE_ATTR, state)


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


def replace_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at dotted `path` of `model` (e.g. a layer's quantized wrapper in its place)."""
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attr, module)


def wants_splits(plan: dict[str, LayerPlan]) -> bool:
    """Whether some planned input spec asks for shortcut splitting (QuantSpec.split_shortcut)."""
    return any(p.input is not None and p.input.split_shortcut for p in plan.values())


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
    reference: nn.Module | None = field(default=None, init=False)  # see keep_reference()

    def __post_init__(self) -> None:
        self.stage_reports = [{"type": stage.type, "seconds": 0.0, "cpu_seconds": 0.0} for stage in self.recipe.stages]

    def report(self, stage: StageConfig, **summary: Any) -> None:
        """Record a JSON-serialisable summary of what `stage` did (e.g. which calibration samples it
        kept); saved with the model (checkpoint manifest "stage_reports"), so results stay reviewable."""
        index = next(i for i, s in enumerate(self.recipe.stages) if s is stage)
        self.stage_reports[index].update(summary)

    def keep_reference(self) -> nn.Module:
        """A frozen copy of the model as it is now, made once per job: called from a stage's prepare (the
        full-precision model), for stages that distil from it after other stages changed the weights
        (block reconstruction replaces them by their decoded codes). Costs a second copy of the model."""
        if self.reference is None:
            reference = copy.deepcopy(self.model).eval().requires_grad_(False)
            for module in reference.modules():  # a copy of the plain function: the caller's hooks stay on theirs
                module._forward_pre_hooks.clear()
                module._forward_hooks.clear()
            self.reference = reference
        return self.reference

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
            layer = wrap_layer(self.model.get_submodule(name), plan.weight, plan.input)
            replace_submodule(self.model, name, layer)
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
