"""Fashion-MNIST AutoencoderKL: architecture, shipped weights, latent scaling."""

import json

import pytest
import torch
from safetensors import safe_open

from diffquant.zoo.data import dataset_available, fashion_mnist_tensors
from diffquant.zoo.vae import (
    WEIGHTS_DIR,
    VAEConfig,
    build_vae,
    decode_latents,
    encode_latents,
    load_vae,
    psnr,
    reconstruct,
)

TINY = VAEConfig(block_out_channels=(8, 16, 16), norm_num_groups=8)

needs_data = pytest.mark.skipif(
    not dataset_available(),
    reason="Fashion-MNIST not installed (apt-get update && apt-get install -y dataset-fashion-mnist)",
)


def test_tiny_vae_shapes():
    torch.manual_seed(0)
    vae = build_vae(TINY).eval()
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    z = encode_latents(vae, x)
    assert z.shape == (2, 4, TINY.latent_size, TINY.latent_size) == (2, 4, 8, 8)
    y = decode_latents(vae, z)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1


def test_group_divisibility_checked():
    with pytest.raises(ValueError, match="norm_num_groups"):
        build_vae(VAEConfig(block_out_channels=(8, 16, 24), norm_num_groups=16))


def test_psnr_known_value():
    a = torch.zeros(2, 1, 4, 4)
    assert torch.allclose(psnr(a, a + 0.2), torch.full((2,), 20.0))  # 0.1 error on the [0, 1] scale


def test_shipped_vae_files():
    weights = WEIGHTS_DIR / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size < 8_000_000
    with safe_open(str(weights), "pt") as f:
        names = f.keys()  # safe_open handles are not iterable
        assert {f.get_slice(k).get_dtype() for k in names} == {"F16"}
    config = json.loads((WEIGHTS_DIR / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL"
    assert config["latent_channels"] == 4 and len(config["block_out_channels"]) == 3
    assert config["scaling_factor"] != 1.0  # computed from data, not the diffusers default
    assert (WEIGHTS_DIR / "README.md").is_file()


def test_load_shipped_vae():
    vae = load_vae()
    assert not vae.training and vae.dtype == torch.float32
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    assert encode_latents(vae, x).shape == (2, 4, 8, 8)
    assert reconstruct(vae, x).shape == (2, 1, 32, 32)


@needs_data
def test_shipped_vae_quality_and_scaling():
    images, _ = fashion_mnist_tensors("test")
    x = images[:64]
    vae = load_vae()
    assert psnr(reconstruct(vae, x), x).mean() > 20.0
    # scaling_factor should make the latents roughly unit-variance
    assert 0.7 < encode_latents(vae, x, sample=True).std().item() < 1.4
