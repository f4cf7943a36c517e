"""Installing operand quantizers and QuantAttnProcessors on a model's attention modules, removing
them, and finding the installed ones."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from diffquant.nn.attention.config import AttentionQuantConfig, summary_of
from diffquant.nn.attention.processor import QuantAttnProcessor
from diffquant.nn.attention.quantizers import MATMUL_QUANTIZERS, AttentionQuantizers
from diffquant.nn.attention.support import (
    AttentionSelector,
    diffusers_classes,
    original_processor,
    select_all,
    selected_attention,
)
from diffquant.nn.layers import QuantizedLayer


def new_processor(attn: nn.Module, observer: Callable[[str, torch.Tensor], None] | None = None) -> QuantAttnProcessor:
    replaced = original_processor(attn.processor)
    sdpa = replaced is None or isinstance(replaced, diffusers_classes()["AttnProcessor2_0"])
    return QuantAttnProcessor(replaced=replaced, observer=observer, sdpa_scale=sdpa)


def install_attention_quantizers(
    model: nn.Module, config: AttentionQuantConfig, select: AttentionSelector = select_all
) -> dict[str, AttentionQuantizers]:
    """Give every selected diffusers `Attention` of `model` operand quantizers and a QuantAttnProcessor.

    The quantizers are registered as the submodule `matmul_quantizers` of each attention module
    (replacing any earlier ones). `select(name, module)` picks modules by path; an unsupported
    attention class or processor that is selected raises NotImplementedError. Returns the new
    quantizers by attention path. Static specs still need `calibrate_attention_quantizers`.
    """
    installed = {}
    for name, attn in selected_attention(model, select).items():
        quantizers = AttentionQuantizers(config)
        quantizers.train(attn.training)
        attn.add_module(MATMUL_QUANTIZERS, quantizers)
        attn.set_processor(new_processor(attn))
        installed[name] = quantizers
    return installed


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
            module.set_processor(original if original is not None else diffusers_classes()["AttnProcessor2_0"]())
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
