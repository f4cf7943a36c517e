"""Calibration of attention operands: record their ranges while the model runs in full precision,
then set the static ranges of the installed quantizers."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from diffquant.calib.stats import ActivationStats, LayerStats
from diffquant.calib.steps import current_step
from diffquant.nn.attention.config import OPERANDS
from diffquant.nn.attention.install import attention_quantizers, new_processor
from diffquant.nn.attention.support import AttentionSelector, select_all, selected_attention


def operand_key(attn_name: str, operand: str) -> str:
    """Statistics key of one operand of the attention module at `attn_name`: "<path>.<operand>"."""
    return f"{attn_name}.{operand}" if attn_name else operand


@contextlib.contextmanager
def observe_attention_operands(
    model: nn.Module,
    stats: ActivationStats | None = None,
    *,
    select: AttentionSelector = select_all,
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
        for name, attn in selected_attention(model, select).items():
            saved[attn] = attn.processor
            attn.set_processor(new_processor(attn, observer=recorder(name)))
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
