"""Role adapters on tiny diffusers models: coverage, default full-precision layers, tricky layers."""

from __future__ import annotations

import fnmatch
import functools
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from diffquant.arch import (
    DEFAULT_SKIP_ROLES,
    ROLES,
    GenericAdapter,
    adapter_for,
    quantizable_layers,
    registered_adapters,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the tiny model registry
from tiny_models import TINY_MODELS  # noqa: E402

FAMILIES = list(TINY_MODELS)

# Layers the papers keep in full precision (Q-Diffusion / PTQ4DiT / ViDiT-Q / SVDQuant style): input
# embeddings, timestep and condition embedders, adaLN modulation, output head. Exactly the layers
# matching these globs must get a default-skipped role; every pattern must match at least one layer.
EXPECTED_FULL_PRECISION: dict[str, list[str]] = {
    "unet2d": ["conv_in", "time_embedding.*", "conv_out"],
    "unet2d-condition": ["conv_in", "time_embedding.*", "add_embedding.*", "conv_out"],
    "dit": [
        "pos_embed.proj",
        "transformer_blocks.*.norm1.emb.timestep_embedder.*",  # (the class embedder is an nn.Embedding)
        "transformer_blocks.*.norm1.linear",
        "proj_out_1",
        "proj_out_2",
    ],
    "pixart": ["pos_embed.proj", "adaln_single.*", "caption_projection.*", "proj_out"],
    "sd3": [
        "pos_embed.proj",
        "time_text_embed.*",
        "context_embedder",
        "transformer_blocks.*.norm1.linear",
        "transformer_blocks.*.norm1_context.linear",
        "norm_out.linear",
        "proj_out",
    ],
    "flux": [
        "x_embedder",
        "time_text_embed.*",
        "context_embedder",
        "transformer_blocks.*.norm1.linear",
        "transformer_blocks.*.norm1_context.linear",
        "single_transformer_blocks.*.norm.linear",
        "norm_out.linear",
        "proj_out",
    ],
    "sana": ["patch_embed.proj", "time_embed.*", "caption_projection.*", "proj_out"],
    "cogvideox": [
        "patch_embed.*",
        "time_embedding.*",
        "transformer_blocks.*.norm1.linear",
        "transformer_blocks.*.norm2.linear",
        "norm_out.linear",
        "proj_out",
    ],
    "wan": ["condition_embedder.*", "proj_out"],  # (the patch embedding is a Conv3d: not quantizable)
    "ltx-video": ["proj_in", "time_embed.*", "caption_projection.*", "proj_out"],
}

_ATTN = {"attn.q", "attn.k", "attn.v", "attn.out"}
_CROSS = {"cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.out"}
_FFN = {"ffn.up", "ffn.down"}
_RESBLOCK = {"resblock.conv", "resblock.shortcut", "resblock.time_proj", "upsample", "downsample"}
_UNET = {"embed", "time_embed", "head", *_ATTN, *_RESBLOCK}

# The roles each tiny model has. UNet2DModel's attention blocks are bare Attention modules (no FFN).
# SD3 / Flux (MM-DiT joint attention) and CogVideoX (full attention over text + video tokens) have no
# cross-attention; DiT is class-conditioned.
ROLES_PRESENT: dict[str, set[str]] = {
    "unet2d": _UNET,
    "unet2d-condition": _UNET | _CROSS | _FFN | {"cond_embed", "proj_in", "proj_out"},
    "dit": {"embed", "time_embed", "adaln", "head", *_ATTN, *_FFN},
    "pixart": {"embed", "time_embed", "cond_embed", "adaln", "head", *_ATTN, *_CROSS, *_FFN},
    "sd3": {"embed", "time_embed", "cond_embed", "adaln", "head", *_ATTN, *_FFN},
    "flux": {"embed", "time_embed", "cond_embed", "adaln", "head", *_ATTN, *_FFN},
    "sana": {"embed", "time_embed", "cond_embed", "adaln", "head", *_ATTN, *_CROSS, *_FFN},
    "cogvideox": {"embed", "time_embed", "cond_embed", "adaln", "head", *_ATTN, *_FFN},
    "wan": {"time_embed", "cond_embed", "adaln", "head", *_ATTN, *_CROSS, *_FFN},
    "ltx-video": {"embed", "time_embed", "cond_embed", "adaln", "head", *_ATTN, *_CROSS, *_FFN},
}
NO_FFN_FAMILIES = {"unet2d"}
CROSS_ATTENTION_FAMILIES = {"unet2d-condition", "pixart", "sana", "wan", "ltx-video"}
UNET_FAMILIES = {"unet2d", "unet2d-condition"}

# Layers whose weight cannot affect the output: SD3's last block is context-pre-only, its context
# stream only supplies keys/values, so the context queries it computes are discarded.
UNUSED_LAYERS = {"sd3": {"transformer_blocks.1.attn.add_q_proj"}}

# Layers that are easy to get wrong.
SPOT_CHECKS = [
    ("unet2d", "mid_block.attentions.0.to_q", "attn.q"),  # Attention directly in `attentions`
    ("unet2d-condition", "down_blocks.1.attentions.0.proj_in", "proj_in"),
    ("unet2d-condition", "up_blocks.0.resnets.0.time_emb_proj", "resblock.time_proj"),
    ("dit", "transformer_blocks.1.norm1.emb.timestep_embedder.linear_1", "time_embed"),
    ("dit", "proj_out_1", "adaln"),
    ("pixart", "adaln_single.linear", "adaln"),
    ("pixart", "adaln_single.emb.resolution_embedder.linear_1", "cond_embed"),
    ("sd3", "transformer_blocks.0.attn2.to_q", "attn.q"),  # SD3.5 dual attention: image self-attention
    ("sd3", "transformer_blocks.0.attn.add_k_proj", "attn.k"),
    ("sd3", "transformer_blocks.0.attn.to_add_out", "attn.out"),
    ("sd3", "transformer_blocks.0.ff_context.net.2", "ffn.down"),
    ("sd3", "time_text_embed.text_embedder.linear_1", "cond_embed"),
    ("flux", "time_text_embed.guidance_embedder.linear_1", "cond_embed"),
    ("flux", "single_transformer_blocks.0.proj_mlp", "ffn.up"),
    ("flux", "single_transformer_blocks.0.proj_out", "ffn.down"),
    ("flux", "single_transformer_blocks.0.attn.to_v", "attn.v"),
    ("sana", "time_embed.linear", "adaln"),
    ("sana", "transformer_blocks.0.ff.conv_depth", "ffn.up"),
    ("sana", "transformer_blocks.0.ff.conv_point", "ffn.down"),
    ("cogvideox", "patch_embed.text_proj", "cond_embed"),
    ("wan", "condition_embedder.time_proj", "adaln"),
    ("wan", "condition_embedder.image_embedder.ff.net.0.proj", "cond_embed"),
    ("wan", "blocks.0.attn2.add_k_proj", "cross_attn.k"),
    ("wan", "blocks.0.ffn.net.2", "ffn.down"),
    ("ltx-video", "proj_in", "embed"),
    ("ltx-video", "time_embed.linear", "adaln"),
]


pytestmark = pytest.mark.usefixtures("single_thread")


@functools.cache
def _model(family: str) -> nn.Module:
    return TINY_MODELS[family].build()


@functools.cache
def _roles(family: str) -> dict[str, str]:
    model = _model(family)
    return adapter_for(model).assign(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_adapter_is_registered(family):
    model = _model(family)
    adapter = adapter_for(model)
    assert not isinstance(adapter, GenericAdapter)
    assert adapter is registered_adapters()[type(model).__name__]
    assert adapter.name == family
    assert adapter.default_skip == DEFAULT_SKIP_ROLES


@pytest.mark.parametrize("family", FAMILIES)
def test_every_layer_has_a_known_role(family):
    roles = _roles(family)
    assert roles
    unmatched = sorted(p for p, r in roles.items() if r == "other")
    assert not unmatched, f"{family}: layers without a role: {unmatched}"
    assert set(roles.values()) <= set(ROLES)


@pytest.mark.parametrize("family", FAMILIES)
def test_default_full_precision_layers(family):
    roles = _roles(family)
    skip = adapter_for(_model(family)).default_skip
    patterns = EXPECTED_FULL_PRECISION[family]
    for pattern in patterns:
        assert fnmatch.filter(roles, pattern), f"{family}: {pattern!r} matches no layer"
    expected = {p for p in roles if any(fnmatch.fnmatchcase(p, pat) for pat in patterns)}
    skipped = {p for p, r in roles.items() if r in skip}
    assert sorted(skipped - expected) == [], "skipped by default but quantized in the papers"
    assert sorted(expected - skipped) == [], "quantized by default but kept in full precision in the papers"
    # the compute layers are quantized by default
    assert not {r for r in roles.values() if r.startswith(("attn.", "cross_attn.", "ffn."))} & skip


@pytest.mark.parametrize("family", FAMILIES)
def test_roles_present(family):
    present = set(_roles(family).values())
    assert present >= _ATTN
    assert (present >= _FFN) != (family in NO_FFN_FAMILIES)
    if family in CROSS_ATTENTION_FAMILIES:
        assert present >= _CROSS
    else:
        assert not present & _CROSS
    if family in UNET_FAMILIES:
        assert "resblock.conv" in present
    assert present == ROLES_PRESENT[family]


@pytest.mark.parametrize(
    ("family", "path", "role"), SPOT_CHECKS, ids=[f"{f}:{p}" for f, p, _ in SPOT_CHECKS]
)
def test_tricky_layer_roles(family, path, role):
    assert _roles(family)[path] == role


def test_every_family_class_is_registered():
    classes = {type(_model(family)).__name__ for family in FAMILIES}
    assert classes <= set(registered_adapters())


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_is_deterministic_and_uses_every_layer(family):
    tiny = TINY_MODELS[family]
    model = _model(family)
    zero = [n for n, p in model.named_parameters() if not torch.any(p)]
    assert not zero, f"all-zero parameters left: {zero}"
    inputs = tiny.inputs(2)
    out = tiny.run(model, inputs)
    assert out.shape[0] == 2 and out.dtype == torch.float32 and torch.isfinite(out).all()
    with torch.no_grad():
        again = tiny.run(tiny.build(), tiny.inputs(2))
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    # every quantizable layer influences the output (no dead branch, no zero-initialised gate)
    layers = quantizable_layers(model)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((out * probe).sum(), [m.weight for m in layers.values()])
    dead = {p for p, g in zip(layers, grads, strict=True) if not torch.any(g)}
    assert dead == UNUSED_LAYERS.get(family, set()), "layers that do not affect the output"


def test_unknown_model_gets_generic_adapter():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    adapter = adapter_for(model)
    assert isinstance(adapter, GenericAdapter)
    assert adapter.assign(model) == {"0": "embed", "2": "other", "4": "head"}
