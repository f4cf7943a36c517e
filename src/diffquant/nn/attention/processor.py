"""QuantAttnProcessor: diffusers' AttnProcessor2_0 computed explicitly, operands quantized."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from diffquant.nn.attention.quantizers import MATMUL_QUANTIZERS, AttentionQuantizers


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

        query, key, value = self.project(attn, hidden_states, encoder_hidden_states, batch_size)
        head_dim = key.shape[-1]
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

    @staticmethod
    def project(
        attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None, batch_size: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as [batch, heads, tokens, head_dim], after the head split and any q/k norm."""
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
        return query, key, value

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
