"""Role adapters for diffusers UNets and diffusion transformers (rules over module paths).

Rules are ordered and the first full match wins, so the embedding / conditioning rules come first:
some of those modules contain sub-layers that look like block layers (Wan's image embedder holds a
FeedForward `ff.net.*`, DiT blocks each hold a timestep embedder). Module paths are those of
diffusers 0.42; the building blocks below are shared by every family with the same structure.
"""

from __future__ import annotations

from diffquant.arch.base import RoleAdapter, register_adapter

Rules = tuple[tuple[str, str], ...]


def _attention(name: str, role: str) -> Rules:
    """q/k/v/out projections of a diffusers `Attention` module whose attribute path ends in `name`."""
    return (
        (rf".*\.{name}\.to_q", f"{role}.q"),
        (rf".*\.{name}\.to_k", f"{role}.k"),
        (rf".*\.{name}\.to_v", f"{role}.v"),
        (rf".*\.{name}\.to_out\.0", f"{role}.out"),
    )


def _added_projections(name: str, role: str) -> Rules:
    """The `add_*` projections of an `Attention`: the context stream of MM-DiT joint attention, or
    the extra (image-condition) keys/values of Wan I2V cross-attention."""
    return (
        (rf".*\.{name}\.add_q_proj", f"{role}.q"),
        (rf".*\.{name}\.add_k_proj", f"{role}.k"),
        (rf".*\.{name}\.add_v_proj", f"{role}.v"),
        (rf".*\.{name}\.to_add_out", f"{role}.out"),
    )


def _feed_forward(name: str) -> Rules:
    """A diffusers `FeedForward`: net.0 is the GELU/GEGLU module holding the up projection."""
    return (
        (rf".*\.{name}\.net\.0\.proj", "ffn.up"),
        (rf".*\.{name}\.net\.2", "ffn.down"),
    )


# -- UNets ------------------------------------------------------------------------------------------
# Shared by UNet2DModel (plain `Attention` modules directly in `attentions.N`) and UNet2DConditionModel
# (`Transformer2DModel`s in `attentions.N`, with attn1 = self, attn2 = cross attention, proj_in/out).
# Resnet-style resamplers (downsample_type="resnet") are ResnetBlock2Ds inside `*samplers.N`: their
# time projection is a resblock.time_proj, their convolutions the resampling.
_UNET_RULES: Rules = (
    (r"conv_in", "embed"),
    (r"time_embedding\..*", "time_embed"),
    (r"(class_embedding|add_embedding|encoder_hid_proj)(\..*)?", "cond_embed"),
    *_attention(r"attentions\.\d+", "attn"),
    *_attention("attn1", "attn"),
    *_attention("attn2", "cross_attn"),
    *_feed_forward("ff"),
    (r".*\.attentions\.\d+\.proj_in", "proj_in"),
    (r".*\.attentions\.\d+\.proj_out", "proj_out"),
    (r".*\.resnets\.\d+\.conv[12]", "resblock.conv"),
    (r".*\.resnets\.\d+\.conv_shortcut", "resblock.shortcut"),
    (r".*\.(resnets|downsamplers|upsamplers)\.\d+\.time_emb_proj", "resblock.time_proj"),
    (r".*\.upsamplers\.\d+\.\w+", "upsample"),
    (r".*\.downsamplers\.\d+\.\w+", "downsample"),
    (r"conv_out", "head"),
)

UNET2D = register_adapter("UNet2DModel", RoleAdapter("unet2d", _UNET_RULES))
UNET2D_CONDITION = register_adapter("UNet2DConditionModel", RoleAdapter("unet2d-condition", _UNET_RULES))


# -- diffusion transformers: shared pieces ---------------------------------------------------------
# diffusers names the parts of its combined embedders consistently, wherever they sit (DiT: inside
# every block's norm1.emb; PixArt: adaln_single.emb; SD3/Flux: time_text_embed; Sana/LTX: time_embed
# (.emb)): the timestep MLP is time_embed, guidance / pooled-text / micro-condition MLPs cond_embed.
_EMBEDDERS: Rules = (
    (r"(.*\.)?timestep_embedder\..*", "time_embed"),
    (r"(.*\.)?(guidance|text|resolution|aspect_ratio)_embedder\..*", "cond_embed"),
    (r"caption_projection\..*|context_embedder", "cond_embed"),
)

# Every AdaLayerNorm variant (Zero, ZeroX, Single-block Zero, Continuous, CogVideoX's LayerNormZero)
# keeps its modulation linear in `.linear`: norm1, norm1_context, norm2, norm, norm_out.
_ADALN_NORMS: Rules = ((r"(.*\.)?norm\w*\.linear", "adaln"),)

# adaLN-single (PixArt-α; reused by Sana and LTX-Video): one modulation linear for the whole model,
# per-block scale_shift_table parameters instead of per-block linears.
_ADALN_SINGLE: Rules = ((r"(adaln_single|time_embed)\.linear", "adaln"),)

# Blocks with self-attention attn1 and cross-attention attn2 over the text tokens.
_SELF_CROSS_ATTENTION: Rules = (*_attention("attn1", "attn"), *_attention("attn2", "cross_attn"))

# MM-DiT double-stream block: one joint attention over image + context tokens, with separate
# projections (add_*) and FFN (ff_context) for the context stream; all of it is "attn" / "ffn".
_MMDIT_BLOCK: Rules = (
    *_attention("attn", "attn"),
    *_added_projections("attn", "attn"),
    *_feed_forward("ff"),
    *_feed_forward("ff_context"),
)

_HEAD: Rules = ((r"proj_out", "head"),)


# -- image diffusion transformers ------------------------------------------------------------------
# DiT (diffusers layout): every block carries its own copy of the timestep/class embedder in
# norm1.emb (only block 0's feeds the final layer); the final layer is proj_out_1 (adaLN shift/scale
# from the conditioning) then proj_out_2 (the output projection).
DIT = register_adapter(
    "DiTTransformer2DModel",
    RoleAdapter(
        "dit",
        (
            (r"pos_embed\.proj", "embed"),
            *_EMBEDDERS,
            *_ADALN_NORMS,
            (r"proj_out_1", "adaln"),
            *_attention("attn1", "attn"),
            *_feed_forward("ff"),
            (r"proj_out_2", "head"),
        ),
    ),
)

PIXART = register_adapter(
    "PixArtTransformer2DModel",
    RoleAdapter(
        "pixart",
        (
            (r"pos_embed\.proj", "embed"),
            *_EMBEDDERS,
            *_ADALN_SINGLE,
            *_SELF_CROSS_ATTENTION,
            *_feed_forward("ff"),
            *_HEAD,
        ),
    ),
)

# SD3 / SD3.5: MM-DiT blocks. In SD3.5's MMDiT-X blocks (dual_attention_layers) `attn2` is a second
# *self*-attention over the image tokens only, not a cross-attention. The last block is context-pre-only
# (no ff_context / to_add_out; norm1_context is an AdaLayerNormContinuous).
SD3 = register_adapter(
    "SD3Transformer2DModel",
    RoleAdapter(
        "sd3",
        (
            (r"pos_embed\.proj", "embed"),
            *_EMBEDDERS,
            *_ADALN_NORMS,
            *_MMDIT_BLOCK,
            *_attention("attn2", "attn"),
            *_HEAD,
        ),
    ),
)

# Flux: MM-DiT double-stream blocks, then single-stream blocks over the concatenated tokens, where
# attention and MLP run in parallel from one input: q/k/v and proj_mlp read the normed tokens, and
# proj_out maps concat(attention output, GELU(proj_mlp)) back to the model width. That proj_out is
# both the attention out-projection and the MLP down-projection; it is called ffn.down because most of
# its input (mlp_ratio 4: 4 of 5 parts) is post-GELU MLP activations, as in an FFN down-projection.
FLUX = register_adapter(
    "FluxTransformer2DModel",
    RoleAdapter(
        "flux",
        (
            (r"x_embedder", "embed"),
            *_EMBEDDERS,
            *_ADALN_NORMS,
            *_MMDIT_BLOCK,
            (r"single_transformer_blocks\.\d+\.proj_mlp", "ffn.up"),
            (r"single_transformer_blocks\.\d+\.proj_out", "ffn.down"),
            *_HEAD,
        ),
    ),
)

# Sana: attn1 is linear (ReLU-kernel) self-attention, attn2 cross-attention. The FFN is GLUMBConv:
# conv_inverted (1x1 up to 2x hidden), conv_depth (depthwise 3x3 on the expanded channels, before the
# GLU gate), conv_point (1x1 down). conv_depth belongs to the expansion, hence ffn.up; being depthwise
# its weight has only 9 inputs per output channel (one short quantization group).
SANA = register_adapter(
    "SanaTransformer2DModel",
    RoleAdapter(
        "sana",
        (
            (r"patch_embed\.proj", "embed"),
            *_EMBEDDERS,
            *_ADALN_SINGLE,
            *_SELF_CROSS_ATTENTION,
            (r".*\.ff\.conv_(inverted|depth)", "ffn.up"),
            (r".*\.ff\.conv_point", "ffn.down"),
            *_HEAD,
        ),
    ),
)


# -- video diffusion transformers ------------------------------------------------------------------
# CogVideoX: text tokens are projected in the patch embedder (patch_embed.text_proj) and concatenated
# with the video tokens; attn1 is full attention over both (shared q/k/v, "expert" adaLN per stream),
# so it is self-attention here. patch_embed.proj is a Conv2d (a Linear with patch_size_t, v1.5);
# ofs_embedding (v1.5 I2V) embeds a scalar condition like a timestep.
COGVIDEOX = register_adapter(
    "CogVideoXTransformer3DModel",
    RoleAdapter(
        "cogvideox",
        (
            (r"patch_embed\.proj", "embed"),
            (r"patch_embed\.text_proj", "cond_embed"),
            (r"time_embedding\..*", "time_embed"),
            (r"ofs_embedding\..*", "cond_embed"),
            *_ADALN_NORMS,
            *_attention("attn1", "attn"),
            *_feed_forward("ff"),
            *_HEAD,
        ),
    ),
)

# Wan 2.x: the patch embedding is a Conv3d (not a quantizable type; listed for completeness). The
# condition embedder computes the timestep MLP and, in `time_proj`, the modulation shared by all blocks
# (the adaLN-single linear; blocks add their scale_shift_table). I2V models embed CLIP image tokens
# (image_embedder, a FeedForward) and give them their own cross-attention keys/values (add_k/v_proj).
WAN = register_adapter(
    "WanTransformer3DModel",
    RoleAdapter(
        "wan",
        (
            (r"patch_embedding", "embed"),
            (r"condition_embedder\.time_embedder\..*", "time_embed"),
            (r"condition_embedder\.time_proj", "adaln"),
            (r"condition_embedder\.(text|image)_embedder\..*", "cond_embed"),
            *_SELF_CROSS_ATTENTION,
            *_added_projections("attn2", "cross_attn"),
            *_feed_forward("ffn"),
            *_HEAD,
        ),
    ),
)

# LTX-Video: the top-level proj_in is the (linear) patch embedding of the packed latent tokens, not a
# UNet-style proj_in.
LTX_VIDEO = register_adapter(
    "LTXVideoTransformer3DModel",
    RoleAdapter(
        "ltx-video",
        (
            (r"proj_in", "embed"),
            *_EMBEDDERS,
            *_ADALN_SINGLE,
            *_SELF_CROSS_ATTENTION,
            *_feed_forward("ff"),
            *_HEAD,
        ),
    ),
)
