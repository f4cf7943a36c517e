"""Which attention modules a recipe's `attention` config applies to under a layer plan."""

from __future__ import annotations

import logging
from collections.abc import Collection

from torch import nn

from diffquant.nn.attention.quantizers import AttentionQuantizers
from diffquant.nn.attention.support import looks_like_attention, unsupported_reason

log = logging.getLogger("diffquant.attention")


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
        if isinstance(module, AttentionQuantizers) or not looks_like_attention(module):
            continue
        prefix = f"{name}." if name else ""
        if not any(f"{prefix}{proj}" in planned for proj in ("to_q", "to_k", "to_v")):
            continue
        reason = unsupported_reason(name, module)
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
