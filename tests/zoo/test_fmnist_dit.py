"""fmnist-dit: shipped weights, classifier-free guidance, label dropout, one training step."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import diffquant.zoo as zoo
from diffquant.zoo import training
from diffquant.zoo.models import fmnist_dit as fd
from diffquant.zoo.train_utils import step_generator

TINY = fd.DiTConfig(width=32, num_heads=2, depth=2)


def _randomised_tiny() -> torch.nn.Module:
    """A tiny DiT whose zero-initialised (adaLN-Zero) layers are perturbed, so outputs depend on inputs."""
    torch.manual_seed(0)
    model = fd.build_transformer(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _tiny_model(guidance: float = 3.0) -> zoo.LatentDiffusionModel:
    scheduler = fd.sampling_scheduler(fd.train_scheduler())
    pipe = SimpleNamespace(transformer=_randomised_tiny(), vae=None, scheduler=scheduler)
    return fd.as_latent_model(pipe, fd.SamplerConfig(guidance_scale=guidance, default_steps=3))


@pytest.fixture(scope="module")
def shipped() -> zoo.LatentDiffusionModel:
    if not zoo.entries()[fd.NAME].available:
        pytest.skip("fmnist-dit weights not shipped yet (train: python -m diffquant.zoo.models.fmnist_dit)")
    return zoo.load(fd.NAME)


def test_shipped_model_samples(shipped):
    assert shipped.denoiser.dtype == torch.float32 and not shipped.denoiser.training
    assert shipped.latent_shape == (4, 8, 8) and shipped.num_classes == 10
    assert shipped.conditioning.null_class == 10
    assert shipped.guidance_scale == fd.SamplerConfig().guidance_scale
    images = zoo.generate(shipped, torch.tensor([0, 3, 7, 9]), steps=3, progress=False)
    assert images.shape == (4, 1, 32, 32) and torch.isfinite(images).all()
    assert images.min() >= -1 and images.max() <= 1


def test_shipped_label_dropout_off(shipped):
    embeddings = fd.label_embeddings(shipped.denoiser)
    assert len(embeddings) == shipped.denoiser.config.num_layers
    assert all(e.dropout_prob == 0 and e.embedding_table.num_embeddings == 11 for e in embeddings)


def test_guidance_matches_manual_cfg():
    model = _tiny_model(guidance=3.0)
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 4, 8, 8, generator=gen), torch.tensor(500)
    labels = torch.tensor([0, 1, 2, 9])
    with torch.no_grad():
        cond = model.denoiser(x, timestep=t.expand(4), class_labels=labels, return_dict=False)[0]
        null_labels = torch.full((4,), fd.NULL_CLASS)
        null = model.denoiser(x, timestep=t.expand(4), class_labels=null_labels, return_dict=False)[0]
        guided = model.predict_noise(x, t, labels)
        unguided = model.predict_noise(x, t, labels, guidance_scale=1.0)
    assert not torch.allclose(cond, null)  # otherwise the check below is vacuous
    torch.testing.assert_close(guided, null + 3.0 * (cond - null), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(unguided, cond)


def test_tiny_model_samples_through_scheduler():
    latents = zoo.sample_latents(_tiny_model(), torch.arange(4), torch.randn(4, 4, 8, 8))
    assert latents.shape == (4, 4, 8, 8) and torch.isfinite(latents).all()


def test_per_block_label_dropout_off():
    model = fd.build_transformer(TINY).train()
    embeddings = fd.label_embeddings(model)
    assert len(embeddings) == TINY.depth
    assert all(e.dropout_prob == 0 and e.embedding_table.num_embeddings == 11 for e in embeddings)
    x, t, y = torch.randn(8, 4, 8, 8), torch.randint(0, 1000, (8,)), torch.randint(0, 10, (8,))
    with torch.no_grad():  # train mode must be deterministic: no label drawn away
        a = model(x, timestep=t, class_labels=y, return_dict=False)[0]
        b = model(x, timestep=t, class_labels=y, return_dict=False)[0]
    torch.testing.assert_close(a, b)


def test_label_dropout_rate_per_sample():
    labels = torch.randint(0, 10, (20_000,), generator=torch.Generator().manual_seed(1))
    dropped = fd.drop_labels(labels, 0.1, torch.Generator().manual_seed(2))
    is_null = dropped == fd.NULL_CLASS
    assert 0.09 < is_null.float().mean().item() < 0.11
    assert torch.equal(dropped[~is_null], labels[~is_null])


def test_every_block_sees_the_same_dropped_labels():
    """Dropping once per sample: the unconditional input is jointly unconditional in all blocks."""
    model = fd.build_transformer(TINY).train()
    seen: list[torch.Tensor] = []
    for emb in fd.label_embeddings(model):
        emb.register_forward_pre_hook(lambda _m, args: seen.append(args[0].clone()))
    latents, labels = torch.randn(64, 4, 8, 8), torch.randint(0, 10, (64,))
    fd.diffusion_loss(model, fd.train_scheduler(), latents, labels, torch.Generator().manual_seed(0), 0.5)
    assert len(seen) >= TINY.depth and all(torch.equal(s, seen[0]) for s in seen)
    assert (seen[0] == fd.NULL_CLASS).any() and (seen[0] != fd.NULL_CLASS).any()


def test_training_step_reduces_loss_on_fixed_batch():
    torch.manual_seed(0)
    cfg = fd.DiTTrainConfig(steps=20, batch_size=16, lr=2e-3, warmup=0, bf16=False)
    state = training.TrainState(fd.build_transformer(TINY))
    optimizer = torch.optim.AdamW(state.model.parameters(), lr=cfg.lr)
    latents, labels = torch.randn(16, 4, 8, 8), torch.randint(0, 10, (16,))
    step = fd.make_train_step(state, optimizer, fd.train_scheduler(cfg), latents, labels, cfg)
    losses = [step(i)["loss"] for i in range(cfg.steps)]
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5])
    ema, model = dict(state.ema.named_parameters()), dict(state.model.named_parameters())
    assert not torch.equal(ema["proj_out_2.weight"], model["proj_out_2.weight"])


def test_training_step_is_reproducible_from_step_seed():
    """Resuming replays the same step: all randomness comes from step_generator(seed, step)."""
    latents, labels = torch.randn(8, 4, 8, 8), torch.randint(0, 10, (8,))
    model = _randomised_tiny()
    a, b = (
        fd.diffusion_loss(model, fd.train_scheduler(), latents, labels, step_generator(0, 7), 0.1)
        for _ in range(2)
    )
    assert a.item() == b.item()


def test_frechet_distance_known_values():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert training.frechet_distance(a, a) == pytest.approx(0, abs=1e-6)
    assert training.frechet_distance(a, a + np.array([3.0, 0, 4.0])) == pytest.approx(25, rel=1e-6)
