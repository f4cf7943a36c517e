"""Per-layer floating-point format search (METHODS.md §9, arXiv 2408.06995): for every quantized layer,
the exponent/mantissa split of the spec's bit width and the maximum value (a clipping factor on the
absmax) with the lowest layer-output MSE on the layer's own calibration inputs.

Candidates, for a spec of b bits: the spec's own format first, then every fp{b}_e{E}m{M} (E + M = b - 1,
E >= 1) that the format registry builds (4 bits: E1M2, E2M1, E3M0; 6 bits: E1M4 … E5M0; 8 bits: E4M3,
E5M2), and int{b} only with `include_int`; `weight_formats` / `input_formats` name a side's candidates
instead (e.g. [fp4_e2m1]: the clipping alone, the fixed-format ablation; [int8]: INT8 inputs with searched
clipping). Each keeps the spec's layout (granularity, group size, scale format; floating-point candidates
are symmetric). Clipping factors: 1, 1 − clip_step, …

Search, in `prepare` on the full-precision model (two replays of the calibration function):

1. Weights: for every (format, factor) the weight is quantized with scales from factor × its range
   (per output channel or as the spec says), and Σ ‖X·(W − Q(W))ᵀ‖² is summed over a random subset of
   each call's input rows X (`rows`; a conv's input: enough whole images for `rows` pixels), seeded.
2. Inputs, given the chosen weight Q*(W): for every (format, factor) Σ ‖X·Wᵀ − Q(X)·Q*(W)ᵀ‖², with the
   static range factor × the input's calibrated range, per sampling step when the spec is per_step
   (dynamic specs: the format only, factor 1). The format is one per layer (the lowest sum over the
   steps of each step's best factor); the factor is per step.

The chosen formats rewrite the plan in place (so the layers are wrapped with them and checkpoints keep
them per layer); `apply` installs the chosen clipping as the weight quantizer's scales and the static
input ranges (factor × the calibrated range; qparams of ranges as calibration computes them). The
choices are the stage's report (`layers`: per layer format and factors; `formats`: counts).

Choices are made on the layers as they are before any stage's `apply`: list a transform stage
(smoothing, low-rank split) before this one and the clipping is installed on the transformed layer but
was chosen on the untransformed one. Layers the replay never runs keep their spec and ranges.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from diffquant.calib.stats import ChannelRange
from diffquant.calib.steps import current_step
from diffquant.formats.base import IntFormat, QFormat, SpecError, UnknownFormatError, get_format
from diffquant.formats.floating import FloatFormat
from diffquant.formats.ops import (
    block_range,
    fake_quantize,
    fake_quantize_dynamic,
    global_scale_from_range,
    qparams_from_range,
)
from diffquant.formats.spec import QuantSpec
from diffquant.job import CalibrationRequiredError, QuantizationJob
from diffquant.nn.layers import QuantizedLayer
from diffquant.nn.quantizers import ActivationQuantizer, WeightQuantizer
from diffquant.plan import LayerPlan
from diffquant.recipes.config import RecipeError, StageConfig, check_int, register_stage

Candidate = tuple[QuantSpec, float]  # (spec, clipping factor)


@register_stage
@dataclass(frozen=True)
class FormatSearch(StageConfig):
    """Per layer the FP exponent/mantissa split and clipping factor with the lowest layer-output MSE.
    weights / inputs: which side is searched; include_int: int{b} is a candidate too; weight_formats /
    input_formats: that side's candidates by name (of the spec's bit width; None: the automatic list);
    clips factors 1, 1 − clip_step, …; rows: input rows per call scored; seed: of the row subsets."""

    type: ClassVar[str] = "format_search"
    needs_calibration: ClassVar[bool] = True
    weights: bool = True
    inputs: bool = True
    include_int: bool = False
    weight_formats: tuple[str, ...] | None = None
    input_formats: tuple[str, ...] | None = None
    clips: int = 6
    clip_step: float = 0.1
    rows: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("weight_formats", "input_formats"):
            _check_format_names(self, name)
        for name in ("clips", "rows"):
            check_int(self, name)
        check_int(self, "seed", minimum=0)
        if not (isinstance(self.clip_step, int | float) and not isinstance(self.clip_step, bool)
                and math.isfinite(self.clip_step) and self.clip_step > 0 and (self.clips - 1) * self.clip_step < 1):
            raise RecipeError(f"format_search clip_step must be > 0 with (clips - 1) x clip_step < 1 (every factor "
                              f"positive), got clip_step {self.clip_step!r} with {self.clips} clips")
        if not (self.weights or self.inputs):
            raise RecipeError("format_search weights and inputs are both false: the stage would search nothing")

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()  # lists for YAML / JSON
        return {**data, **{k: list(data[k]) for k in ("weight_formats", "input_formats") if data[k] is not None}}

    @property
    def factors(self) -> list[float]:
        return [1.0 - self.clip_step * i for i in range(self.clips)]

    def prepare(self, job: QuantizationJob) -> None:
        if not callable(job.calibration):
            raise CalibrationRequiredError("format_search replays the calibration data: pass diffquant.quantize "
                                           "a calibration function, not collected statistics")
        searches = {name: LayerSearch(self, job.model.get_submodule(name), plan) for name, plan in job.plan.items()}
        searches = {name: s for name, s in searches.items() if s.weight_candidates or s.input_candidates}
        run_hooked(job, searches, LayerSearch.score_weights)
        for search in searches.values():
            search.choose_weight()
        run_hooked(job, {n: s for n, s in searches.items() if s.input_candidates}, LayerSearch.score_inputs)
        choices = {name: search.choice() for name, search in searches.items()}
        for name, choice in choices.items():
            plan = job.plan[name]
            job.plan[name] = dataclasses.replace(plan, weight=choice.pop("weight_spec"), input=choice.pop("input_spec"))
        job.report(self, layers=choices, formats=format_counts(job.plan, choices))

    def apply(self, job: QuantizationJob) -> None:
        # what prepare chose, kept in this stage's report (saved with the model)
        report = job.stage_reports[next(i for i, s in enumerate(job.recipe.stages) if s is self)]
        for name, choice in report["layers"].items():
            layer = job.layers[name]
            if "weight_clip" in choice and choice["weight_clip"] != 1.0:
                install_weight_clip(layer, choice["weight_clip"])
            if "input_clip" in choice:
                install_input_clips(job, name, layer, choice["input_clip"])


def _check_format_names(stage: FormatSearch, name: str) -> None:
    """A candidate list: None, or registered format names (stored as a tuple)."""
    names = getattr(stage, name)
    if names is None:
        return
    object.__setattr__(stage, name, tuple(names))
    if not names:
        raise RecipeError(f"format_search {name} is empty: leave it out for the automatic candidates")
    for fmt in names:
        try:
            get_format(fmt)
        except UnknownFormatError as exc:
            raise RecipeError(f"format_search {name}: {exc}") from None


def format_counts(plan: dict[str, LayerPlan], choices: dict[str, dict[str, Any]]) -> dict[str, dict[str, int]]:
    """How many searched layers took each format, per side."""
    return {side: dict(Counter(getattr(plan[name], attr).format for name, choice in choices.items() if side in choice))
            for side, attr in (("weight", "weight"), ("input", "input"))}


# -- candidates ------------------------------------------------------------------------------------


def _element(fmt: QFormat) -> tuple:
    """What identifies a format's grid apart from its layout (nvfp4 and fp4_e2m1 share E2M1)."""
    if isinstance(fmt, FloatFormat):
        return "fp", fmt.exponent_bits, fmt.mantissa_bits
    if isinstance(fmt, IntFormat):
        return "int", fmt.bits, fmt.is_signed
    return "other", fmt.name


def candidate_specs(spec: QuantSpec, include_int: bool, names: tuple[str, ...] | None = None) -> list[QuantSpec]:
    """`names` in the spec's layout, each of the spec's bit width (RecipeError otherwise); without names, the
    spec's own format (unless it is an integer format without include_int) and every other floating-point
    split of its bit width the registry builds, int{b} with include_int."""
    if names is not None:
        return [_candidate(spec, name, explicit=True) for name in names]
    bits = spec.bits
    own = spec.qformat
    names = tuple(f"fp{bits}_e{e}m{bits - 1 - e}" for e in range(1, bits)) + ((f"int{bits}",) if include_int else ())
    specs = [spec] if isinstance(own, FloatFormat) or include_int else []
    seen = {_element(own)}
    for name in names:
        try:
            fmt = get_format(name)
            if _element(fmt) in seen:
                continue
            specs.append(_candidate(spec, name))
            seen.add(_element(fmt))
        except (UnknownFormatError, SpecError):
            continue  # a split the registry does not build (fp8_e3m4) or a layout it does not take
    return specs


def _candidate(spec: QuantSpec, name: str, explicit: bool = False) -> QuantSpec:
    """The spec with format `name`, its layout kept (symmetric where the format has no zero point)."""
    fmt = get_format(name)
    if explicit and fmt.bits != spec.bits:
        raise RecipeError(f"format_search candidate {name} has {fmt.bits} bits; the recipe's spec "
                          f"{spec.format} has {spec.bits}: the search keeps the bit width")
    if fmt == spec.qformat:
        return spec
    layout = {"granularity": spec.granularity, "group_size": spec.group_size, "scale_dtype": spec.scale_dtype}
    return spec.with_changes(format=name, symmetric=spec.symmetric or not fmt.has_zero_point, **layout)


def clipped_weight_qparams(spec: QuantSpec, matrix: torch.Tensor,
                           factor: float) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(scale, zero point, global scale) of a weight matrix [out, K] for factor × its range: what
    WeightQuantizer.calibrate computes for the unclipped range."""
    lo, hi = block_range(spec.grain.view(matrix, spec.group_size))
    lo, hi = lo * factor, hi * factor
    global_scale = global_scale_from_range(lo, hi, spec.qformat, spec.symmetric, spec.scale_format)
    scale, zero_point = qparams_from_range(lo, hi, spec.qformat, spec.symmetric, spec.scale_format, global_scale)
    return scale, zero_point, global_scale


def quantized_weight_matrix(spec: QuantSpec, matrix: torch.Tensor, factor: float) -> torch.Tensor:
    scale, zero_point, _ = clipped_weight_qparams(spec, matrix, factor)
    blocks = spec.grain.view(matrix, spec.group_size)
    return spec.grain.unview(fake_quantize(blocks, scale, zero_point, spec.qformat), matrix.shape)


# -- the layer's own maths (a Linear or a Conv2d, without bias) ---------------------------------------


def weight_matrix(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """[out, K], K in (kh, kw, c_in) order for a conv: the view QConv2d quantizes."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1) if weight.dim() == 4 else weight


def weight_from_matrix(weight: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    if weight.dim() == 4:
        out, cin, kh, kw = weight.shape
        return matrix.reshape(out, kh, kw, cin).permute(0, 3, 1, 2)
    return matrix


def layer_op(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Conv2d):
        return F.conv2d(x, weight, None, module.stride, module.padding, module.dilation, module.groups)
    return F.linear(x, weight)


class LayerSearch:
    """One layer's candidates and their accumulated output errors."""

    def __init__(self, config: FormatSearch, module: nn.Module, plan: LayerPlan) -> None:
        self.config, self.module, self.plan = config, module, plan
        self.conv = isinstance(module, nn.Conv2d)
        self.generator = torch.Generator().manual_seed(config.seed)
        w = module.weight.detach().float()
        self.weight = w
        self.weight_candidates: list[Candidate] = []
        if plan.weight is not None and config.weights:
            self.weight_candidates = [(s, f) for s in candidate_specs(plan.weight, config.include_int,
                                                                         config.weight_formats)
                                      for f in config.factors]
        self.weight_errors = torch.zeros(len(self.weight_candidates), dtype=torch.float64)
        self.weight_choice: Candidate | None = None if plan.weight is None else (plan.weight, 1.0)
        self.input_candidates: list[Candidate] = []
        if plan.input is not None and config.inputs:
            factors = [1.0] if plan.input.dynamic else config.factors
            self.input_candidates = [(s, f) for s in candidate_specs(plan.input, config.include_int, config.input_formats)
                                     for f in factors]
        self.ranges: dict[int | None, ChannelRange] = {}
        self.input_errors: dict[int | None, torch.Tensor] = {}

    # -- the calls ---------------------------------------------------------------------------------
    def _feature_last(self, x: torch.Tensor) -> torch.Tensor:
        return x.movedim(1, -1) if self.conv else x

    def _subset(self, x: torch.Tensor) -> torch.Tensor:
        """A random subset of the call's rows: `rows` tokens, or a conv's images holding >= `rows` pixels."""
        if self.conv:
            images = min(x.shape[0], math.ceil(self.config.rows / max(1, x.shape[-1] * x.shape[-2])))
            return x[torch.randperm(x.shape[0], generator=self.generator)[:images].to(x.device)]
        x = x.reshape(-1, x.shape[-1])
        return x[torch.randperm(x.shape[0], generator=self.generator)[: self.config.rows].to(x.device)]

    def _step_key(self) -> int | None:
        return current_step() if self.plan.input is not None and self.plan.input.per_step else None

    def _unstepped(self, key: int | None) -> bool:
        """A call outside any sampling step of a layer whose input ranges are per step: not scored
        (calibration refuses per-step ranges without steps)."""
        return key is None and self.plan.input is not None and self.plan.input.per_step

    def score_weights(self, x: torch.Tensor) -> None:
        """Record the input range; add every weight candidate's output error on a subset of x."""
        if self.plan.input is not None and not self.plan.input.dynamic:
            x2d = self._feature_last(x).reshape(-1, x.shape[1] if self.conv else x.shape[-1])
            key = self._step_key()
            if key in self.ranges:
                self.ranges[key].update(x2d)
            elif not self._unstepped(key):
                self.ranges[key] = ChannelRange.of(x2d)
        if not self.weight_candidates:
            return
        xs, w = self._subset(x), self.weight.to(x.device)
        matrix = weight_matrix(self.module, w)
        for i, (spec, factor) in enumerate(self.weight_candidates):
            delta = w - weight_from_matrix(w, quantized_weight_matrix(spec, matrix, factor))
            self.weight_errors[i] += float(layer_op(self.module, xs, delta).double().square().sum())

    def choose_weight(self) -> None:
        if self.weight_candidates and self.weight_errors.any():
            self.weight_choice = self.weight_candidates[int(self.weight_errors.argmin())]
        if self.weight_choice is None:
            self.chosen_weight = self.weight
        else:
            spec, factor = self.weight_choice
            self.chosen_weight = weight_from_matrix(self.weight, quantized_weight_matrix(
                spec, weight_matrix(self.module, self.weight), factor))

    def _quantized_input(self, x: torch.Tensor, spec: QuantSpec, factor: float, key: int | None) -> torch.Tensor:
        xf = self._feature_last(x)
        if spec.dynamic:
            q = fake_quantize_dynamic(xf, spec)
        else:
            rng = self.ranges[key]
            scale, zero_point = ActivationQuantizer(spec).qparams_for(ChannelRange(rng.lo * factor, rng.hi * factor))
            q = fake_quantize(xf, scale.to(xf.device), None if zero_point is None else zero_point.to(xf.device),
                              spec.qformat)
        return q.movedim(-1, 1) if self.conv else q

    def score_inputs(self, x: torch.Tensor) -> None:
        key = self._step_key()
        if not self.plan.input.dynamic and key not in self.ranges:
            return  # a step the first replay never ran, or no step at all
        xs = self._subset(x)
        reference = layer_op(self.module, xs, self.weight.to(x.device))
        weight = self.chosen_weight.to(x.device)
        errors = self.input_errors.setdefault(key, torch.zeros(len(self.input_candidates), dtype=torch.float64))
        for i, (spec, factor) in enumerate(self.input_candidates):
            out = layer_op(self.module, self._quantized_input(xs, spec, factor, key), weight)
            errors[i] += float((out - reference).double().square().sum())

    # -- the result -----------------------------------------------------------------------------------
    def choice(self) -> dict[str, Any]:
        """The chosen specs (weight_spec / input_spec) and, for the report, formats and factors."""
        result: dict[str, Any] = {"weight_spec": self.plan.weight, "input_spec": self.plan.input}
        if self.weight_candidates and self.weight_choice is not None and self.weight_errors.any():
            spec, factor = self.weight_choice
            result.update(weight_spec=spec, weight=spec.format, weight_clip=factor)
        if self.input_candidates and self.input_errors:
            result.update(self._input_choice())
        return result

    def _input_choice(self) -> dict[str, Any]:
        specs = list(dict.fromkeys(s for s, _ in self.input_candidates))
        per_format = len(self.input_candidates) // len(specs)
        keys = sorted(self.input_errors, key=lambda k: -1 if k is None else k)
        errors = torch.stack([self.input_errors[k].reshape(len(specs), per_format) for k in keys])  # [keys, F, A]
        best = int(errors.amin(dim=2).sum(dim=0).argmin())
        factors = [self.input_candidates[best * per_format + int(a)][1] for a in errors[:, best].argmin(dim=1)]
        clip: float | list[float] = factors[0]
        if keys != [None]:
            by_step = dict(zip(keys, factors, strict=True))
            clip = [by_step.get(s, 1.0) for s in range(max(keys) + 1)]
        return {"input_spec": specs[best], "input": specs[best].format, "input_clip": clip}


def run_hooked(job: QuantizationJob, searches: dict[str, LayerSearch], score) -> None:
    """Replay the calibration function on the full-precision model with `score` hooked on each layer."""
    if not searches:
        return
    handles = [s.module.register_forward_pre_hook(lambda _m, args, s=s: score(s, args[0].detach().float()))
               for s in searches.values()]
    try:
        with torch.no_grad():
            job.calibration(job.model)
    finally:
        for handle in handles:
            handle.remove()


# -- installing the chosen clipping ---------------------------------------------------------------------


@torch.no_grad()
def install_weight_clip(layer: QuantizedLayer, factor: float) -> None:
    """The weight quantizer's scales for factor × the weight's range (it then counts as calibrated)."""
    quantizer: WeightQuantizer = layer.weight_quantizer
    matrix = layer.weight_matrix(layer.weight.detach())
    quantizer.scale, quantizer.zero_point, quantizer.global_scale = clipped_weight_qparams(
        quantizer.spec, matrix, factor)


@torch.no_grad()
def install_input_clips(job: QuantizationJob, name: str, layer: QuantizedLayer, clip: float | list[float]) -> None:
    """Static input ranges: factor × the calibrated range (per sampling step with a per-step spec)."""
    quantizer = layer.input_quantizer
    if quantizer.spec.dynamic:
        return
    stats = job.require_stats().require(name)
    if layer.smooth is not None:
        stats = stats.divided(layer.smooth)
    quantizer.calibrate(stats)
    steps = [(None, stats.overall, clip)] if not quantizer.spec.per_step else [
        (s, stats.per_step[s], factor) for s, factor in enumerate(clip) if s in stats.per_step]
    for step, rng, factor in steps:
        if factor == 1.0:
            continue
        scale, zero_point = quantizer.qparams_for(ChannelRange(rng.lo * factor, rng.hi * factor))
        row = (slice(None),) if step is None else (step,)
        quantizer.scale[row] = scale.reshape(quantizer.scale[row].shape)
        if zero_point is not None:
            quantizer.zero_point[row] = zero_point.reshape(quantizer.zero_point[row].shape)
