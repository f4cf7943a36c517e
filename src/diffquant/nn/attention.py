"""Quantization of the matmuls inside attention: Q·Kᵀ and softmax(Q·Kᵀ)·V.

Projections (to_q/to_k/to_v/to_out) are ordinary layers that QLinear already covers; what it cannot
reach are the two activation-by-activation products inside the attention kernel. This module gives
them operands to quantize: `query`, `key`, `value` (after the head split and any q/k norm, feature
axis last = head_dim) and `probs` (the softmax output, feature axis last = key length).

    config = AttentionQuantConfig(query=int8_token, key=int8_token, value=int8_token, probs=uint8_static)
    install_attention_quantizers(unet, config)        # every diffusers `Attention`
    with torch.no_grad(), observe_attention_operands(unet) as stats:
        run_calibration()                              # full-precision attention, operands recorded
    calibrate_attention_quantizers(unet, stats)        # static ranges; dynamic specs need none

diffusers keeps attention processors as plain attributes, so the quantizers live as a submodule
`matmul_quantizers` of each `Attention` (in its state_dict, moved by .to()) and the installed
`QuantAttnProcessor` reads them from there. Only the classic `diffusers...attention_processor.Attention`
with its default processor (AttnProcessor2_0 / AttnProcessor) is supported; the per-model attention
classes (Flux, Wan, ...) compute attention in their own processors and raise NotImplementedError.

The attention is computed explicitly (scores in float32), so it materializes the [B, heads, Lq, Lk]
score matrix: no flash/memory-efficient kernel. That is inherent in quantizing the softmax output.

In a recipe, the `attention:` field (Recipe.attention, an AttentionQuantConfig) asks for this:
diffquant.quantize instruments the supported attention modules whose q/k/v projections the plan
quantizes (`planned_attention`; unsupported ones stay in full precision with a warning), records the
operand statistics in the same calibration run as the layer inputs and calibrates static ranges
(per step where a spec says per_step); block reconstruction learns their step sizes (LSQ);
checkpoints store the quantizers' buffers and configs; freeze keeps them (fake quantization in float:
the two matmuls are not packed into integer kernels). `quant_enabled` switches a module's operand
quantizers off, as for layers (full-precision reference passes).

Methods that need another quantizer for an operand (e.g. a log2 quantizer of `probs`) register a
factory for their format names with `register_operand_quantizer`, without touching this file.
diffusers itself is imported lazily, only when a model is instrumented.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffquant.calib.stats import ActivationStats, LayerStats
from diffquant.calib.steps import current_step
from diffquant.configs import reject_unknown_keys
from diffquant.formats.spec import QuantSpec, SpecError
from diffquant.nn.layers import QuantizedLayer
from diffquant.nn.quantizers import ActivationQuantizer

log = logging.getLogger("diffquant.attention")

OPERANDS = ("query", "key", "value", "probs")
SHORT_NAMES = {"query": "q", "key": "k", "value": "v", "probs": "probs"}  # in labels
MATMUL_QUANTIZERS = "matmul_quantizers"  # submodule name on each instrumented Attention

AttentionSelector = Callable[[str, nn.Module], bool]
OperandQuantizerFactory = Callable[[QuantSpec], nn.Module]


def _select_all(name: str, attn: nn.Module) -> bool:
    return True


# -- configuration --------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionQuantConfig:
    """Which attention operands are quantized and how; None leaves an operand in full precision."""

    query: QuantSpec | None = None
    key: QuantSpec | None = None
    value: QuantSpec | None = None
    probs: QuantSpec | None = None

    def __post_init__(self) -> None:
        for operand in OPERANDS:
            spec = getattr(self, operand)
            if spec is None:
                continue
            if not isinstance(spec, QuantSpec):
                raise SpecError(f"attention operand {operand!r} takes a QuantSpec or None, got {type(spec).__name__}")
            spec.validate_for_activation()

    def specs(self) -> dict[str, QuantSpec]:
        """The quantized operands and their specs."""
        return {op: spec for op in OPERANDS if (spec := getattr(self, op)) is not None}

    def calibrated_operands(self) -> tuple[str, ...]:
        """The operands with static (calibrated) ranges: those whose statistics calibration must record."""
        return tuple(op for op, spec in self.specs().items() if not spec.dynamic)

    @property
    def label(self) -> str:
        """The quantized operands by format, e.g. "q,k,v int4; probs uint8" ("none" when none is)."""
        by_format: dict[str, list[str]] = {}
        for op, spec in self.specs().items():
            kind = spec.format + (" dynamic" if spec.dynamic else "")
            by_format.setdefault(kind, []).append(SHORT_NAMES[op])
        return "; ".join(f"{','.join(ops)} {kind}" for kind, ops in by_format.items()) or "none"

    def to_dict(self) -> dict[str, Any]:
        return {op: None if (spec := getattr(self, op)) is None else spec.to_dict() for op in OPERANDS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AttentionQuantConfig:
        if not isinstance(data, Mapping):
            raise SpecError(f"attention maps operands ({', '.join(OPERANDS)}) to specs, got {data!r}")
        reject_unknown_keys("attention operand", data, cls, SpecError)
        for operand, spec in data.items():
            if spec is not None and not isinstance(spec, Mapping | QuantSpec):
                raise SpecError(f"attention operand {operand!r} takes a spec mapping or null (full precision), "
                                f"got {spec!r}")
        return cls(**{
            op: spec if spec is None or isinstance(spec, QuantSpec) else QuantSpec.from_dict(spec)
            for op, spec in data.items()
        })


# -- operand quantizer registry -------------------------------------------------------------------
_OPERAND_QUANTIZERS: list[tuple[re.Pattern[str], frozenset[str], OperandQuantizerFactory]] = []


def register_operand_quantizer(
    format_pattern: str, factory: OperandQuantizerFactory | None = None, *, operands: Iterable[str] = OPERANDS
) -> Any:
    """Build the quantizer of `operands` whose spec format fully matches `format_pattern` with `factory`.

    `factory(spec)` returns a module with the ActivationQuantizer interface: `forward(x)` on a
    feature-last tensor, `calibrate(LayerStats)`, and a `spec` attribute. The latest matching
    registration wins; without one an operand gets an ActivationQuantizer. Usable as a decorator:

        @register_operand_quantizer(r"log2_\\d+", operands=("probs",))
        class Log2Quantizer(nn.Module): ...
    """
    ops = frozenset(operands)
    if not ops or not ops <= set(OPERANDS):
        raise ValueError(f"operands must be a non-empty subset of {OPERANDS}, got {sorted(ops)}")
    pattern = re.compile(format_pattern)

    def register(fn: OperandQuantizerFactory) -> OperandQuantizerFactory:
        _OPERAND_QUANTIZERS.append((pattern, ops, fn))
        return fn

    return register if factory is None else register(factory)


def make_operand_quantizer(operand: str, spec: QuantSpec) -> nn.Module:
    """The quantizer module for one attention operand (registered factory, else ActivationQuantizer)."""
    if operand not in OPERANDS:
        raise ValueError(f"unknown attention operand {operand!r}; known: {OPERANDS}")
    for pattern, ops, factory in reversed(_OPERAND_QUANTIZERS):
        if operand in ops and pattern.fullmatch(spec.format):
            return factory(spec)
    return ActivationQuantizer(spec)


# -- quantizer container --------------------------------------------------------------------------
class AttentionQuantizers(nn.Module):
    """The operand quantizers of one attention module: submodules `query`, `key`, `value`, `probs`,
    each a quantizer module or None (full precision). `quant_enabled` = False lets every operand pass
    unquantized (full-precision reference passes), like QuantizedLayer.quant_enabled."""

    def __init__(self, config: AttentionQuantConfig) -> None:
        super().__init__()
        self.config = config
        self.quant_enabled = True  # False: operands pass unquantized (the switch nn.layers.quantization_enabled sets)
        for operand in OPERANDS:
            spec = getattr(config, operand)
            self.register_module(operand, None if spec is None else make_operand_quantizer(operand, spec))

    def quantizers(self) -> dict[str, nn.Module]:
        """The present operand quantizers by operand name."""
        return {op: q for op in OPERANDS if (q := self._modules[op]) is not None}

    @property
    def calibrated(self) -> bool:
        return all(getattr(q, "calibrated", True) for q in self.quantizers().values())

    def quantize(self, operand: str, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize one operand (feature axis last); identity when the operand has no quantizer."""
        quantizer = self._modules[operand]
        return x if quantizer is None or not self.quant_enabled else quantizer(x)

    def calibrate(self, stats_by_operand: Mapping[str, LayerStats]) -> None:
        """Set the static ranges from operand statistics keyed by operand name ("query", ..., "probs")."""
        for operand, quantizer in self.quantizers().items():
            spec = getattr(quantizer, "spec", None)
            if spec is not None and spec.dynamic:
                continue
            stats = stats_by_operand.get(operand)
            if stats is None or stats.overall is None:
                raise KeyError(f"no calibration statistics for attention operand {operand!r}")
            quantizer.calibrate(stats)

    def extra_repr(self) -> str:
        full_precision = [op for op in OPERANDS if self._modules[op] is None]
        return f"fp: {', '.join(full_precision)}" if full_precision else ""


# -- the processor --------------------------------------------------------------------------------
class QuantAttnProcessor:
    """diffusers attention processor computing AttnProcessor2_0's attention explicitly, with the
    `matmul_quantizers` of the attention module applied to q, k, v and the softmax output.

    replaced:   the processor this one replaced; `remove_attention_quantizers` puts it back.
    observer:   when set, `observer(operand, x)` receives each operand and no quantizer is applied
                (calibration runs the attention in full precision).
    sdpa_scale: scale scores by head_dim**-0.5 as torch SDPA (i.e. AttnProcessor2_0) does, instead of
                `attn.scale` as AttnProcessor does; the two differ only for scale_qk=False.
    """

    def __init__(
        self,
        replaced: Any = None,
        observer: Callable[[str, torch.Tensor], None] | None = None,
        sdpa_scale: bool = True,
    ) -> None:
        self.replaced = replaced
        self.observer = observer
        self.sdpa_scale = sdpa_scale

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        # Mirrors AttnProcessor2_0.__call__ step by step, with the SDPA call made explicit in `attend`.
        # (The deprecated positional / `scale` arguments are ignored, as there.)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)

        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, sequence_length, _ = context.shape

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = self.attend(attn, query, key, value, attention_mask)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)  # linear projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def attend(
        self,
        attn: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """softmax(q·kᵀ·scale + mask)·v on [batch, heads, tokens, head_dim] tensors, operands quantized."""
        quantizers = None if self.observer is not None else attn._modules.get(MATMUL_QUANTIZERS)
        query = self._operand(quantizers, "query", query)
        key = self._operand(quantizers, "key", key)
        value = self._operand(quantizers, "value", value)

        scale = query.shape[-1] ** -0.5 if self.sdpa_scale else attn.scale
        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:  # SDPA semantics: True = attend
                scores = scores.masked_fill(~attention_mask, float("-inf"))
            else:
                scores = scores + attention_mask.float()
        probs = self._operand(quantizers, "probs", scores.softmax(dim=-1))
        return torch.matmul(probs.to(value.dtype), value)

    def _operand(self, quantizers: AttentionQuantizers | None, operand: str, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer(operand, x)
        return x if quantizers is None else quantizers.quantize(operand, x)


# -- model instrumentation ------------------------------------------------------------------------
@functools.cache
def _diffusers_classes() -> dict[str, type | None]:
    from diffusers.models import attention_processor as ap

    try:
        from diffusers.models.attention import AttentionModuleMixin
    except ImportError:  # older diffusers
        AttentionModuleMixin = None  # noqa: N806
    return {
        "Attention": ap.Attention,
        "AttnProcessor": ap.AttnProcessor,
        "AttnProcessor2_0": ap.AttnProcessor2_0,
        "AttentionModuleMixin": AttentionModuleMixin,
    }


def _looks_like_attention(module: nn.Module) -> bool:
    classes = _diffusers_classes()
    mixin = classes["AttentionModuleMixin"]
    return (
        isinstance(module, classes["Attention"])
        or (mixin is not None and isinstance(module, mixin))
        or (hasattr(module, "processor") and callable(getattr(module, "set_processor", None)))
        or all(isinstance(getattr(module, p, None), nn.Module) for p in ("to_q", "to_k", "to_v"))
    )


def _original_processor(processor: Any) -> Any:
    return processor.replaced if isinstance(processor, QuantAttnProcessor) else processor


def _unsupported_reason(name: str, module: nn.Module) -> str | None:
    """Why attention-matmul quantization cannot instrument `module` (None: it can)."""
    classes = _diffusers_classes()
    attention = classes["Attention"]
    where = f"attention module {name or '<root>'!r}"
    if not isinstance(module, attention) or type(module).forward is not attention.forward:
        return (f"{where} is a {type(module).__name__}: attention-matmul quantization supports only the classic "
                f"diffusers Attention class (diffusers.models.attention_processor.Attention)")
    processor = _original_processor(module.processor)
    if processor is not None and type(processor) not in (classes["AttnProcessor2_0"], classes["AttnProcessor"]):
        return (f"{where} runs the processor {type(processor).__name__}: attention-matmul quantization replaces "
                f"only AttnProcessor2_0 / AttnProcessor")
    return None


def _check_supported(name: str, module: nn.Module) -> None:
    reason = _unsupported_reason(name, module)
    if reason is not None:
        raise NotImplementedError(f"{reason}; exclude it with `select`")


def _selected_attention(model: nn.Module, select: AttentionSelector) -> dict[str, nn.Module]:
    """Selected attention modules of `model` by path; NotImplementedError for unsupported ones."""
    selected = {}
    for name, module in model.named_modules():
        if isinstance(module, AttentionQuantizers) or not _looks_like_attention(module):
            continue
        if select(name, module):
            _check_supported(name, module)
            selected[name] = module
    return selected


def _new_processor(attn: nn.Module, observer: Callable[[str, torch.Tensor], None] | None = None) -> QuantAttnProcessor:
    replaced = _original_processor(attn.processor)
    sdpa = replaced is None or isinstance(replaced, _diffusers_classes()["AttnProcessor2_0"])
    return QuantAttnProcessor(replaced=replaced, observer=observer, sdpa_scale=sdpa)


def install_attention_quantizers(
    model: nn.Module, config: AttentionQuantConfig, select: AttentionSelector = _select_all
) -> dict[str, AttentionQuantizers]:
    """Give every selected diffusers `Attention` of `model` operand quantizers and a QuantAttnProcessor.

    The quantizers are registered as the submodule `matmul_quantizers` of each attention module
    (replacing any earlier ones). `select(name, module)` picks modules by path; an unsupported
    attention class or processor that is selected raises NotImplementedError. Returns the new
    quantizers by attention path. Static specs still need `calibrate_attention_quantizers`.
    """
    installed = {}
    for name, attn in _selected_attention(model, select).items():
        quantizers = AttentionQuantizers(config)
        quantizers.train(attn.training)
        attn.add_module(MATMUL_QUANTIZERS, quantizers)
        attn.set_processor(_new_processor(attn))
        installed[name] = quantizers
    return installed


def planned_attention(model: nn.Module, planned_layers: Collection[str]) -> list[str]:
    """Paths of the attention modules a recipe's `attention` config applies to under a layer plan.

    An attention module is selected when the plan quantizes one of its input projections (`to_q`,
    `to_k`, `to_v`), so overrides that skip a block or a role (e.g. "role:cross_attn.*") keep its
    matmuls in full precision as well. Selected modules of an unsupported class or processor (Flux,
    Wan, SD3 joint attention, ...) are left in full precision with a logged warning rather than
    failing the whole recipe; so is a model in which no attention module ends up selected.
    """
    planned = set(planned_layers)
    selected, unsupported = [], {}
    for name, module in model.named_modules():
        if isinstance(module, AttentionQuantizers) or not _looks_like_attention(module):
            continue
        prefix = f"{name}." if name else ""
        if not any(f"{prefix}{proj}" in planned for proj in ("to_q", "to_k", "to_v")):
            continue
        reason = _unsupported_reason(name, module)
        if reason is None:
            selected.append(name)
        else:
            unsupported[name] = reason
    if unsupported:
        first = next(iter(unsupported.values()))
        log.warning("attention-matmul quantization: %d attention modules of %s are not supported and stay in "
                    "full precision, e.g. %s", len(unsupported), type(model).__name__, first)
    if not selected:
        log.warning("attention-matmul quantization: no attention module of %s is both supported and has "
                    "planned q/k/v projections; all its attention matmuls stay in full precision",
                    type(model).__name__)
    return selected


def summary_of(configs: Iterable[AttentionQuantConfig]) -> str | None:
    """The distinct labels of attention configs joined by " | ", e.g. "q,k,v int4; probs uint8"; None
    for no config."""
    labels = dict.fromkeys(config.label for config in configs)
    return " | ".join(labels) if labels else None


def attention_summary(model: nn.Module) -> str | None:
    """What the installed operand quantizers of `model` quantize (as installed, not as a recipe asked:
    None where none are, also when the model's attention classes are unsupported). A bits label WxAy
    counts the layers' weights and inputs only; this names the attention operands beside it."""
    return summary_of(q.config for q in attention_quantizers(model).values())


def remove_attention_quantizers(model: nn.Module) -> list[str]:
    """Undo install_attention_quantizers: drop the quantizers and restore the replaced processor
    (AttnProcessor2_0 when unknown). Returns the paths of the attention modules restored."""
    restored = []
    for name, module in list(model.named_modules()):
        processor = getattr(module, "processor", None)
        has_quantizers = isinstance(module._modules.get(MATMUL_QUANTIZERS), AttentionQuantizers)
        if not (has_quantizers or isinstance(processor, QuantAttnProcessor)):
            continue
        if has_quantizers:
            delattr(module, MATMUL_QUANTIZERS)
        if isinstance(processor, QuantAttnProcessor):
            original = processor.replaced
            module.set_processor(original if original is not None else _diffusers_classes()["AttnProcessor2_0"]())
        restored.append(name)
    return restored


def attention_quantizers(model: nn.Module) -> dict[str, AttentionQuantizers]:
    """The installed AttentionQuantizers of `model` by attention path."""
    return {
        name: q for name, module in model.named_modules()
        if isinstance(q := module._modules.get(MATMUL_QUANTIZERS), AttentionQuantizers)
    }


def quantization_switches(model: nn.Module) -> list[nn.Module]:
    """What a full-precision pass of `model` (or of one of its blocks) turns off with
    nn.layers.quantization_enabled: its quantized layers and its attention operand quantizers."""
    return [m for m in model.modules() if isinstance(m, QuantizedLayer | AttentionQuantizers)]


# -- calibration ----------------------------------------------------------------------------------
def operand_key(attn_name: str, operand: str) -> str:
    """Statistics key of one operand of the attention module at `attn_name`: "<path>.<operand>"."""
    return f"{attn_name}.{operand}" if attn_name else operand


@contextlib.contextmanager
def observe_attention_operands(
    model: nn.Module,
    stats: ActivationStats | None = None,
    *,
    select: AttentionSelector = _select_all,
    operands: Iterable[str] = OPERANDS,
) -> Iterator[ActivationStats]:
    """Record attention operand ranges into `stats` (keys "<attn path>.<operand>") while the model runs.

    Inside, the selected attention modules compute in full precision (installed operand quantizers
    are bypassed, so it can run right after install); the processors in place before are restored
    on exit. Ranges are per feature (head_dim for q/k/v, key position for probs), over all tokens,
    heads and calls, and per sampling step when one is set.
    """
    stats = ActivationStats() if stats is None else stats
    wanted = frozenset(operands)
    if not wanted <= set(OPERANDS):
        raise ValueError(f"unknown attention operands {sorted(wanted - set(OPERANDS))}; known: {OPERANDS}")

    def recorder(attn_name: str) -> Callable[[str, torch.Tensor], None]:
        def record(operand: str, x: torch.Tensor) -> None:
            if operand in wanted:
                key = operand_key(attn_name, operand)
                stats.setdefault(key, LayerStats()).observe(x.reshape(-1, x.shape[-1]), current_step(), name=key)

        return record

    saved: dict[nn.Module, Any] = {}
    try:
        for name, attn in _selected_attention(model, select).items():
            saved[attn] = attn.processor
            attn.set_processor(_new_processor(attn, observer=recorder(name)))
        yield stats
    finally:
        for attn, processor in saved.items():
            attn.set_processor(processor)


def operand_stats(stats: Mapping[str, LayerStats], attn_name: str) -> dict[str, LayerStats]:
    """The statistics of one attention module's operands, keyed by operand name."""
    return {op: stats[key] for op in OPERANDS if (key := operand_key(attn_name, op)) in stats}


def calibrate_attention_quantizers(model: nn.Module, stats: Mapping[str, LayerStats]) -> None:
    """Calibrate the static operand ranges of every installed AttentionQuantizers of `model`."""
    for name, quantizers in attention_quantizers(model).items():
        try:
            quantizers.calibrate(operand_stats(stats, name))
        except KeyError as err:
            raise KeyError(f"attention module {name!r}: {err.args[0]} (did it run during calibration?)") from None
