"""Scaling sites: places in a diffusers model where channel c of an activation can be multiplied by f
and every layer reading it divides its input column c by f, so the model computes the same function.

A site pairs a *producer* (what makes the channel: a norm's affine parameters, adaLN modulation rows,
a Linear's output rows) with its *readers* (the Linear / Conv2d layers whose input is exactly that
activation). Finders are registered per building block and recognise diffusers' structure by type and
attributes, never by a model family's name, so they apply to every model made of those blocks:

- `norm`:  affine LayerNorm of a transformer block (norm1/2/3) -> attention q/k/v, FFN up
           (UNet transformer blocks); affine GroupNorm of a Transformer2DModel -> proj_in.
- `adaln`: adaLN-Zero modulation (DiT): the shift and scale rows of norm1.linear -> attn1 q/k/v
           and ff up (shift_msa/scale_msa and shift_mlp/scale_mlp).
- `attention_values`: attention values (to_v, and add_v_proj of joint attention) -> to_out
           (and to_add_out): softmax(QK^T)·V is linear in each value channel.
- `gated_ffn`: the hidden half of a GEGLU projection -> FFN down: hidden * gelu(gate) is linear in
           each hidden channel.

What is not linear between producer and reader (SiLU before a ResBlock conv, GELU between FFN up and
down) has no site. With power-of-two factors every rescaling is exact in floating point.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

SITE_KINDS = ("norm", "adaln", "attention_values", "gated_ffn")
# Sites where the channel passes through a linear map pair: scaling it *down* puts the factor into the
# readers' weight columns instead (long weight tails) without touching a normalisation.
PAIR_KINDS = frozenset({"attention_values", "gated_ffn"})


class SiteError(ValueError):
    """A site used on a model whose layers are no longer the float modules it was found on."""


@dataclass(frozen=True)
class ScalingSite:
    """Channels [0, width) of one activation: `scale_producer(channels, factors)` multiplies them at
    their source; `readers` are the paths of the layers whose input columns take the inverse."""

    path: str
    kind: str
    width: int
    scale_producer: Callable[[torch.Tensor, torch.Tensor], None]
    readers: tuple[str, ...]

    @torch.no_grad()
    def apply(self, modules: dict[str, nn.Module], channels: torch.Tensor, factors: torch.Tensor) -> None:
        """Channel channels[i] times factors[i] at the producer, readers' input columns divided by it."""
        for path in self.readers:
            _check_float_layer(path, modules[path])
        self.scale_producer(channels, factors)
        for path in self.readers:
            weight = modules[path].weight
            weight[:, channels] /= factors.to(weight.dtype).view(-1, *([1] * (weight.dim() - 2)))


def _check_float_layer(path: str, module: nn.Module) -> None:
    if type(module) not in (nn.Linear, nn.Conv2d):
        raise SiteError(f"{path} is a {type(module).__name__}, not a float Linear/Conv2d: apply outlier "
                        "profiles to the full-precision model, before quantization")


def _scale_rows(linear: nn.Linear, rows: torch.Tensor, factors: torch.Tensor) -> None:
    f = factors.to(linear.weight.dtype)
    linear.weight[rows] *= f[:, None]
    if linear.bias is not None:
        linear.bias[rows] *= f


def _scale_affine(norm: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], None]:
    def scale(channels: torch.Tensor, factors: torch.Tensor) -> None:
        f = factors.to(norm.weight.dtype)
        norm.weight[channels] *= f
        if norm.bias is not None:
            norm.bias[channels] *= f

    return scale


def _scale_output_rows(*linears: nn.Linear, offset: int = 0) -> Callable[[torch.Tensor, torch.Tensor], None]:
    def scale(channels: torch.Tensor, factors: torch.Tensor) -> None:
        for linear in linears:
            _scale_rows(linear, channels + offset, factors)

    return scale


def _scale_adaln_zero(linear: nn.Linear, width: int, shift_chunk: int) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """norm(x) * (1 + scale) + shift, with shift and scale rows of `linear` in chunks shift_chunk and
    shift_chunk + 1: f * (1 + s) = 1 + (f*s + f - 1), so the scale rows are multiplied by f and the
    scale bias gets f - 1 added; the shift rows are multiplied by f."""
    def scale(channels: torch.Tensor, factors: torch.Tensor) -> None:
        f = factors.to(linear.weight.dtype)
        _scale_rows(linear, channels + shift_chunk * width, factors)
        _scale_rows(linear, channels + (shift_chunk + 1) * width, factors)
        linear.bias[channels + (shift_chunk + 1) * width] += f - 1

    return scale


# -- finders: (path, module) -> sites, registered per building block --------------------------------

Finder = Callable[[str, nn.Module], Iterator[ScalingSite]]
FINDERS: dict[str, Finder] = {}


def finder(block_class_name: str) -> Callable[[Finder], Finder]:
    def register(fn: Finder) -> Finder:
        FINDERS[block_class_name] = fn
        return fn

    return register


def _attention_readers(path: str, attn: nn.Module, reads_context: bool) -> tuple[str, ...]:
    """q, and k/v unless they read the condition (cross-attention) instead of the normed tokens."""
    names = ("to_q",) if reads_context else ("to_q", "to_k", "to_v")
    return tuple(f"{path}.{n}" for n in names if isinstance(getattr(attn, n, None), nn.Linear))


def _is_affine_layer_norm(norm: nn.Module | None) -> bool:
    return isinstance(norm, nn.LayerNorm) and norm.weight is not None


def _ffn_up(path: str, block: nn.Module) -> tuple[str, ...]:
    proj = getattr(getattr(block, "ff", None), "net", [None])[0]
    return (f"{path}.ff.net.0.proj",) if isinstance(getattr(proj, "proj", None), nn.Linear) else ()


def _layer_norm_sites(path: str, block: nn.Module) -> Iterator[ScalingSite]:
    attn1, attn2 = block.attn1, getattr(block, "attn2", None)
    groups = [("norm1", _attention_readers(f"{path}.attn1", attn1, block.only_cross_attention))]
    if attn2 is not None:
        groups.append(("norm2", _attention_readers(f"{path}.attn2", attn2, attn2.is_cross_attention)))
    groups.append(("norm3", _ffn_up(path, block)))
    for name, readers in groups:
        norm = getattr(block, name, None)
        if _is_affine_layer_norm(norm) and readers:
            yield ScalingSite(f"{path}.{name}", "norm", norm.normalized_shape[0], _scale_affine(norm), readers)


def _adaln_zero_sites(path: str, block: nn.Module) -> Iterator[ScalingSite]:
    linear = block.norm1.linear
    width = linear.out_features // 6  # shift/scale/gate for attention, then for the MLP
    attn = _attention_readers(f"{path}.attn1", block.attn1, block.only_cross_attention)
    if attn:
        yield ScalingSite(f"{path}.norm1.linear[msa]", "adaln", width, _scale_adaln_zero(linear, width, 0), attn)
    ffn = _ffn_up(path, block)
    if ffn:
        yield ScalingSite(f"{path}.norm1.linear[mlp]", "adaln", width, _scale_adaln_zero(linear, width, 3), ffn)


# BasicTransformerBlock's norm types -> its sites. ada_norm_single (PixArt, Sana) modulates with a table
# shared through the model-wide adaln_single, so no per-block site exists there.
BLOCK_NORMS: dict[str, Callable[[str, nn.Module], Iterator[ScalingSite]]] = {
    "layer_norm": _layer_norm_sites,
    "ada_norm_zero": _adaln_zero_sites,
}


@finder("BasicTransformerBlock")
def _transformer_block(path: str, block: nn.Module) -> Iterator[ScalingSite]:
    if getattr(block, "pos_embed", None) is not None:  # positions are added to the normed tokens
        return
    sites = BLOCK_NORMS.get(block.norm_type)
    if sites is not None:
        yield from sites(path, block)


@finder("Transformer2DModel")
def _transformer_2d(path: str, model: nn.Module) -> Iterator[ScalingSite]:
    norm, proj_in = getattr(model, "norm", None), getattr(model, "proj_in", None)
    if isinstance(norm, nn.GroupNorm) and norm.affine and type(proj_in) in (nn.Linear, nn.Conv2d):
        yield ScalingSite(f"{path}.norm", "norm", norm.num_channels, _scale_affine(norm), (f"{path}.proj_in",))


@finder("FeedForward")
def _feed_forward(path: str, ff: nn.Module) -> Iterator[ScalingSite]:
    gate, down = ff.net[0], ff.net[-1]
    if type(gate).__name__ == "GEGLU" and isinstance(down, nn.Linear):
        hidden = gate.proj.out_features // 2  # [hidden, gate] halves
        yield ScalingSite(f"{path}.net.0.proj[hidden]", "gated_ffn", hidden, _scale_output_rows(gate.proj),
                          (f"{path}.net.{len(ff.net) - 1}",))


def _attention_values(path: str, attn: nn.Module) -> Iterator[ScalingSite]:
    """Any attention module with Linear to_v and to_out[0] (diffusers' Attention, WanAttention,
    LTXAttention, FluxAttention): joint attention scales the context values (add_v_proj) alike, since
    image and context tokens attend to both."""
    to_v, to_out = getattr(attn, "to_v", None), getattr(attn, "to_out", None)
    if not isinstance(to_v, nn.Linear) or not isinstance(to_out, nn.ModuleList) or not isinstance(to_out[0], nn.Linear):
        return
    producers = [to_v]
    readers = [f"{path}.to_out.0"]
    add_v = getattr(attn, "add_v_proj", None)
    if isinstance(add_v, nn.Linear):
        producers.append(add_v)
    if isinstance(getattr(attn, "to_add_out", None), nn.Linear):
        readers.append(f"{path}.to_add_out")
    yield ScalingSite(f"{path}.to_v", "attention_values", to_v.out_features, _scale_output_rows(*producers),
                      tuple(readers))


for _name in ("Attention", "WanAttention", "LTXAttention", "FluxAttention"):
    FINDERS[_name] = _attention_values


def find_sites(model: nn.Module) -> list[ScalingSite]:
    """Every scaling site of the model, in module order."""
    return [site for path, module in model.named_modules() if type(module).__name__ in FINDERS
            for site in FINDERS[type(module).__name__](path, module)]
