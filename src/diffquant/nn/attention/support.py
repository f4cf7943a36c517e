"""Which modules are attention modules, and which of them attention-matmul quantization can
instrument (the classic diffusers Attention with its default processor). diffusers loads lazily."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

from diffquant.nn.attention.processor import QuantAttnProcessor
from diffquant.nn.attention.quantizers import AttentionQuantizers

AttentionSelector = Callable[[str, nn.Module], bool]


def select_all(name: str, attn: nn.Module) -> bool:
    return True


@functools.cache
def diffusers_classes() -> dict[str, type | None]:
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


def looks_like_attention(module: nn.Module) -> bool:
    classes = diffusers_classes()
    mixin = classes["AttentionModuleMixin"]
    return (
        isinstance(module, classes["Attention"])
        or (mixin is not None and isinstance(module, mixin))
        or (hasattr(module, "processor") and callable(getattr(module, "set_processor", None)))
        or all(isinstance(getattr(module, p, None), nn.Module) for p in ("to_q", "to_k", "to_v"))
    )


def original_processor(processor: Any) -> Any:
    return processor.replaced if isinstance(processor, QuantAttnProcessor) else processor


def unsupported_reason(name: str, module: nn.Module) -> str | None:
    """Why attention-matmul quantization cannot instrument `module` (None: it can)."""
    classes = diffusers_classes()
    attention = classes["Attention"]
    where = f"attention module {name or '<root>'!r}"
    if not isinstance(module, attention) or type(module).forward is not attention.forward:
        return (f"{where} is a {type(module).__name__}: attention-matmul quantization supports only the classic "
                f"diffusers Attention class (diffusers.models.attention_processor.Attention)")
    processor = original_processor(module.processor)
    if processor is not None and type(processor) not in (classes["AttnProcessor2_0"], classes["AttnProcessor"]):
        return (f"{where} runs the processor {type(processor).__name__}: attention-matmul quantization replaces "
                f"only AttnProcessor2_0 / AttnProcessor")
    return None


def _check_supported(name: str, module: nn.Module) -> None:
    reason = unsupported_reason(name, module)
    if reason is not None:
        raise NotImplementedError(f"{reason}; exclude it with `select`")


def selected_attention(model: nn.Module, select: AttentionSelector) -> dict[str, nn.Module]:
    """Selected attention modules of `model` by path; NotImplementedError for unsupported ones."""
    selected = {}
    for name, module in model.named_modules():
        if isinstance(module, AttentionQuantizers) or not looks_like_attention(module):
            continue
        if select(name, module):
            _check_supported(name, module)
            selected[name] = module
    return selected
