"""A tiny quantized DiT and a tiny DiT pipeline folder, shared by checkpoint and CLI tests."""

from __future__ import annotations

import pytest
import torch

import diffquant
from tests.tiny_models import TINY_MODELS

TINY_DIT = TINY_MODELS["dit"]


def dit_calibration(model):
    with diffquant.sampling_step(0):
        TINY_DIT.run(model, TINY_DIT.inputs(2))


@pytest.fixture
def quantized_dit():
    return diffquant.quantize(TINY_DIT.build(), "w8a8-static", calibration=dit_calibration, progress=False)


def dit_output(model) -> torch.Tensor:
    with torch.no_grad(), diffquant.sampling_step(0):
        return TINY_DIT.run(model, TINY_DIT.inputs(2))


@pytest.fixture(scope="session")
def dit_pipeline_folder(tmp_path_factory):
    """A DiTPipeline folder (transformer, tiny VAE, DDIM scheduler) saved with diffusers."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    # DiTPipeline's classifier-free guidance uses label 1000 as the null class: keep 1000 classes.
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4,
                                        out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                        num_embeds_ada_norm=1000, norm_num_groups=32)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 16, 16),
                        latent_channels=4, norm_num_groups=8, sample_size=32)
    folder = tmp_path_factory.mktemp("pipe") / "dit-pipeline"
    DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler()).save_pretrained(folder)
    return folder
