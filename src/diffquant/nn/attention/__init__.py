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

The package, one module per job: `config` (AttentionQuantConfig, the recipe-level choice),
`quantizers` (the operand-quantizer registry and the per-module container), `processor` (the
diffusers processor that applies them), `support` (which modules are attention and which can be
instrumented), `install` (putting quantizers and processors in and taking them out), `planning`
(which modules a recipe's plan selects) and `calibration` (operand statistics and static ranges).
"""

from diffquant.nn.attention.calibration import (
    calibrate_attention_quantizers,
    observe_attention_operands,
    operand_key,
    operand_stats,
)
from diffquant.nn.attention.config import OPERANDS, SHORT_NAMES, AttentionQuantConfig, summary_of
from diffquant.nn.attention.install import (
    attention_quantizers,
    attention_summary,
    install_attention_quantizers,
    quantization_switches,
    remove_attention_quantizers,
)
from diffquant.nn.attention.planning import planned_attention
from diffquant.nn.attention.processor import QuantAttnProcessor
from diffquant.nn.attention.quantizers import (
    MATMUL_QUANTIZERS,
    AttentionQuantizers,
    OperandQuantizerFactory,
    make_operand_quantizer,
    register_operand_quantizer,
)
from diffquant.nn.attention.support import AttentionSelector

__all__ = [
    "MATMUL_QUANTIZERS",
    "OPERANDS",
    "SHORT_NAMES",
    "AttentionQuantConfig",
    "AttentionQuantizers",
    "AttentionSelector",
    "OperandQuantizerFactory",
    "QuantAttnProcessor",
    "attention_quantizers",
    "attention_summary",
    "calibrate_attention_quantizers",
    "install_attention_quantizers",
    "make_operand_quantizer",
    "observe_attention_operands",
    "operand_key",
    "operand_stats",
    "planned_attention",
    "quantization_switches",
    "register_operand_quantizer",
    "remove_attention_quantizers",
    "summary_of",
]
