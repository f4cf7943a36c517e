"""Tiny, randomly initialised diffusers models: one per architecture family the adapters cover.

Each entry builds a float32 model from a small config (no downloads), makes seeded example inputs
for a batch size and runs a forward pass. Widths are 64 or 128 (attention_head_dim * heads = 64) so
4-bit group-64 quantization applies cleanly; depth is 1-2 blocks. Parameters that diffusers
initialises to zero are re-initialised with small random values, so the output depends on every
layer (see `fill_zero_params`).

    tiny = TINY_MODELS["flux"]
    model = tiny.build()
    out = tiny.run(model, tiny.inputs(2))

Forward passes take milliseconds with torch.set_num_threads(1); with several intra-op threads on a
busy machine OpenMP synchronisation can make them 10-50x slower.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

SEED = 0
TEXT_TOKENS = 8
WAN_TEXT_TOKENS = 512  # Wan I2V's attention splits image/text context assuming exactly 512 text tokens


@dataclass(frozen=True)
class TinyModel:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int], dict[str, Any]]  # batch size -> forward kwargs (seeded)

    def run(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        return model(**inputs, return_dict=False)[0]


@torch.no_grad()
def fill_zero_params(model: nn.Module, seed: int = SEED, std: float = 0.02) -> nn.Module:
    """Re-initialise every all-zero parameter (adaLN-Zero modulations, zero-init output projections,
    norm / linear biases) with N(0, std²) values, seeded, so no layer is dead at initialisation."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if not torch.any(p):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model


def _builder(cls_name: str, config: dict[str, Any]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import diffusers

        torch.manual_seed(SEED)
        model = getattr(diffusers, cls_name)(**config)
        return fill_zero_params(model).float().eval()

    build.__name__ = f"build_{cls_name}"
    return build


def _gen(seed: int = SEED) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g)


def _steps(g: torch.Generator, batch: int, high: int = 1000) -> torch.Tensor:
    """Integer-valued diffusion timesteps in [0, high), as float (what pipelines pass)."""
    return torch.randint(0, high, (batch,), generator=g).float()


# -- UNets ------------------------------------------------------------------------------------------

# DDPM-style pixel-space UNet: plain attention blocks (Attention modules directly in `attentions`).
UNET2D_CONFIG = dict(
    sample_size=8,
    in_channels=3,
    out_channels=3,
    block_out_channels=(64, 128),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=32,
    norm_num_groups=32,
)


def _unet2d_inputs(batch: int) -> dict[str, Any]:
    g = _gen()
    return {"sample": _randn(g, batch, 3, 8, 8), "timestep": _steps(g, batch)}


# SDXL-style latent UNet: Transformer2DModel blocks with linear proj_in/out and text_time added
# conditioning (pooled text embeds + size/crop ids). NB: in UNet2DConditionModel `attention_head_dim`
# is (for legacy reasons) the number of heads.
UNET2D_CONDITION_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(64, 128),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4),
    cross_attention_dim=64,
    norm_num_groups=32,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=64 + 6 * 8,
)


def _unet2d_condition_inputs(batch: int) -> dict[str, Any]:
    g = _gen()
    return {
        "sample": _randn(g, batch, 4, 8, 8),
        "timestep": _steps(g, batch),
        "encoder_hidden_states": _randn(g, batch, TEXT_TOKENS, 64),
        "added_cond_kwargs": {
            "text_embeds": _randn(g, batch, 64),
            "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(batch, 1),
        },
    }


# -- image diffusion transformers -------------------------------------------------------------------

DIT_CONFIG = dict(
    num_attention_heads=2,
    attention_head_dim=32,
    in_channels=4,
    out_channels=8,  # learned sigma
    num_layers=2,
    sample_size=8,
    patch_size=2,
    num_embeds_ada_norm=10,  # number of classes
)


def _dit_inputs(batch: int) -> dict[str, Any]:
    g = _gen()
    return {
        "hidden_states": _randn(g, batch, 4, 8, 8),
        "timestep": torch.randint(0, 1000, (batch,), generator=g),
        "class_labels": torch.randint(0, 10, (batch,), generator=g),
    }


# PixArt-α 1024 style: with the resolution / aspect-ratio micro-conditions, whose embedders take
# hidden // 3 channels each: hence 3 heads of 64 (hidden 192, like PixArt's 1152 = 3 * 384).
PIXART_CONFIG = dict(
    num_attention_heads=3,
    attention_head_dim=64,
    in_channels=4,
    out_channels=8,
    num_layers=2,
    cross_attention_dim=192,
    caption_channels=64,
    sample_size=8,
    patch_size=2,
    use_additional_conditions=True,
)


def _pixart_inputs(batch: int) -> dict[str, Any]:
    g = _gen()
    return {
        "hidden_states": _randn(g, batch, 4, 8, 8),
        "encoder_hidden_states": _randn(g, batch, TEXT_TOKENS, 64),
        "timestep": _steps(g, batch),
        "added_cond_kwargs": {
            "resolution": torch.tensor([[64.0, 64.0]]).repeat(batch, 1),
            "aspect_ratio": torch.ones(batch, 1),
        },
    }


# SD3.5-style MM-DiT: block 0 is an MMDiT-X block with a second (image-only) self-attention `attn2`;
# the last block is context_pre_only (no context FFN / context out-projection).
SD3_CONFIG = dict(
    sample_size=8,
    patch_size=2,
    in_channels=16,
    num_layers=2,
    attention_head_dim=32,
    num_attention_heads=2,
    joint_attention_dim=64,
    caption_projection_dim=64,
    pooled_projection_dim=64,
    out_channels=16,
    pos_embed_max_size=8,
    dual_attention_layers=(0,),
    qk_norm="rms_norm",
)


def _sd3_inputs(batch: int) -> dict[str, Any]:
    g = _gen()
    return {
        "hidden_states": _randn(g, batch, 16, 8, 8),
        "encoder_hidden_states": _randn(g, batch, TEXT_TOKENS, 64),
        "pooled_projections": _randn(g, batch, 64),
        "timestep": _steps(g, batch),
    }


# FLUX.1-dev style (guidance-distilled): one double-stream and one single-stream block. Latents are
# 2x2-packed tokens of 16 channels -> 64 features; rope axes sum to attention_head_dim.
FLUX_CONFIG = dict(
    patch_size=1,
    in_channels=64,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=32,
    num_attention_heads=2,
    joint_attention_dim=64,
    pooled_projection_dim=64,
    guidance_embeds=True,
    axes_dims_rope=(8, 12, 12),
)


def _flux_inputs(batch: int) -> dict[str, Any]:
    g = _gen()
    h = w = 4  # packed latent grid
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    return {
        "hidden_states": _randn(g, batch, h * w, 64),
        "encoder_hidden_states": _randn(g, batch, TEXT_TOKENS, 64),
        "pooled_projections": _randn(g, batch, 64),
        "timestep": torch.rand(batch, generator=g),  # flow-matching time in [0, 1]
        "img_ids": img_ids.reshape(h * w, 3),
        "txt_ids": torch.zeros(TEXT_TOKENS, 3),
        "guidance": torch.full((batch,), 3.5),
    }


# Sana: linear self-attention, cross-attention, GLUMBConv FFN (1x1 conv, depthwise 3x3, 1x1 conv).
SANA_CONFIG = dict(
    in_channels=16,
    out_channels=16,
    num_attention_heads=2,
    attention_head_dim=32,
    num_layers=2,
    num_cross_attention_heads=2,
    cross_attention_head_dim=32,
    cross_attention_dim=64,
    caption_channels=64,
    mlp_ratio=2.0,
    sample_size=8,
    patch_size=1,
)


def _sana_inputs(batch: int) -> dict[str, Any]:
    g = _gen()
    return {
        "hidden_states": _randn(g, batch, 16, 8, 8),
        "encoder_hidden_states": _randn(g, batch, TEXT_TOKENS, 64),
        "timestep": _steps(g, batch),
    }


# -- video diffusion transformers -------------------------------------------------------------------

# CogVideoX-2b style: text and video tokens share one "expert" attention (joint full attention).
# Sincos positional embeddings need text length == max_text_seq_length.
COGVIDEOX_CONFIG = dict(
    num_attention_heads=2,
    attention_head_dim=32,
    in_channels=4,
    out_channels=4,
    time_embed_dim=64,
    text_embed_dim=64,
    num_layers=2,
    sample_width=8,
    sample_height=8,
    sample_frames=5,  # -> 2 latent frames
    patch_size=2,
    max_text_seq_length=TEXT_TOKENS,
)


def _cogvideox_inputs(batch: int) -> dict[str, Any]:
    g = _gen()
    return {
        "hidden_states": _randn(g, batch, 2, 4, 8, 8),  # [B, F, C, H, W]
        "encoder_hidden_states": _randn(g, batch, TEXT_TOKENS, 64),
        "timestep": _steps(g, batch),
    }


# Wan 2.1 I2V style (a superset of T2V): CLIP image tokens go through image_embedder and get their own
# cross-attention k/v (add_k_proj / add_v_proj). The patch embedding is a Conv3d (not quantizable).
WAN_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=32,
    in_channels=4,
    out_channels=4,
    text_dim=64,
    freq_dim=64,
    ffn_dim=128,
    num_layers=2,
    image_dim=64,
    added_kv_proj_dim=64,
    rope_max_seq_len=32,
)


def _wan_inputs(batch: int) -> dict[str, Any]:
    g = _gen()
    return {
        "hidden_states": _randn(g, batch, 4, 2, 8, 8),  # [B, C, F, H, W]
        "timestep": _steps(g, batch),
        "encoder_hidden_states": _randn(g, batch, WAN_TEXT_TOKENS, 64),
        "encoder_hidden_states_image": _randn(g, batch, 4, 64),
    }


LTX_VIDEO_CONFIG = dict(
    in_channels=64,
    out_channels=64,
    patch_size=1,
    patch_size_t=1,
    num_attention_heads=2,
    attention_head_dim=32,
    cross_attention_dim=64,
    num_layers=2,
    caption_channels=64,
)


def _ltx_video_inputs(batch: int) -> dict[str, Any]:
    g = _gen()
    frames, height, width = 2, 4, 4
    return {
        "hidden_states": _randn(g, batch, frames * height * width, 64),  # packed latent tokens
        "encoder_hidden_states": _randn(g, batch, TEXT_TOKENS, 64),
        "timestep": _steps(g, batch),
        "encoder_attention_mask": torch.ones(batch, TEXT_TOKENS),
        "num_frames": frames,
        "height": height,
        "width": width,
    }


TINY_MODELS: dict[str, TinyModel] = {
    m.name: m
    for m in (
        TinyModel("unet2d", _builder("UNet2DModel", UNET2D_CONFIG), _unet2d_inputs),
        TinyModel(
            "unet2d-condition",
            _builder("UNet2DConditionModel", UNET2D_CONDITION_CONFIG),
            _unet2d_condition_inputs,
        ),
        TinyModel("dit", _builder("DiTTransformer2DModel", DIT_CONFIG), _dit_inputs),
        TinyModel("pixart", _builder("PixArtTransformer2DModel", PIXART_CONFIG), _pixart_inputs),
        TinyModel("sd3", _builder("SD3Transformer2DModel", SD3_CONFIG), _sd3_inputs),
        TinyModel("flux", _builder("FluxTransformer2DModel", FLUX_CONFIG), _flux_inputs),
        TinyModel("sana", _builder("SanaTransformer2DModel", SANA_CONFIG), _sana_inputs),
        TinyModel("cogvideox", _builder("CogVideoXTransformer3DModel", COGVIDEOX_CONFIG), _cogvideox_inputs),
        TinyModel("wan", _builder("WanTransformer3DModel", WAN_CONFIG), _wan_inputs),
        TinyModel("ltx-video", _builder("LTXVideoTransformer3DModel", LTX_VIDEO_CONFIG), _ltx_video_inputs),
    )
}


def dit_set(rows_per_step: int, steps: int, seed: int):
    """A recorded calibration set of seeded tiny-DiT inputs: `rows_per_step` rows at each of `steps` steps."""
    from diffquant.calib import CalibrationSet

    g = torch.Generator().manual_seed(seed)
    n = rows_per_step * steps
    inputs = {"hidden_states": torch.randn(n, 4, 8, 8, generator=g),
              "timestep": torch.randint(0, 1000, (n,), generator=g),
              "class_labels": torch.randint(0, 10, (n,), generator=g)}
    return CalibrationSet(inputs, torch.arange(steps).repeat_interleave(rows_per_step), torch.arange(n),
                          torch.ones(n, dtype=torch.bool), static={"return_dict": False})


def run_dit_at_step0(model: nn.Module, batch: int = 2) -> torch.Tensor:
    """One no-grad forward of the tiny DiT at sampling step 0: a calibration function, or the output
    that tests compare (seeded inputs, so every call sees the same batch)."""
    from diffquant.calib.steps import sampling_step

    with torch.no_grad(), sampling_step(0):
        return TINY_MODELS["dit"].run(model, TINY_MODELS["dit"].inputs(batch))
