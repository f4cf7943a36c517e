"""Training scaffolding shared by the zoo's latent diffusion models (fmnist-dit, fmnist-sd): VAE latents
encoded once and cached, the EMA training state, and the training-time figures of the model cards
(class accuracy, FID against the test set, its floors, guidance sweep, sample grid). The evaluation
harness users run is diffquant.eval; these are the cards' own numbers."""

from __future__ import annotations

import copy
import hashlib
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from diffquant import frechet
from diffquant.calib.steps import sampling_step
from diffquant.configs import positive_or_default
from diffquant.train_utils import default_checkpoint_dir, step_seed
from diffquant.zoo.classifier import accuracy
from diffquant.zoo.data import CLASS_NAMES, fashion_mnist_tensors
from diffquant.zoo.model import LatentDiffusionModel, generate
from diffquant.zoo.registry import get
from diffquant.zoo.vae import encode_latents, load_vae, reconstruct

# ----------------------------------------------------------------------------------------------
# Training data: VAE latents, encoded once and cached


def vae_fingerprint(vae_dir: Path) -> str:
    h = hashlib.sha256()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        h.update((vae_dir / name).read_bytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Posterior means x scaling_factor. No flip augmentation: Fashion-MNIST's shoes almost all face the
    same way (sneakers 99.7%, ankle boots 100%), so flipped shoes would be out of distribution."""
    return torch.cat(
        [encode_latents(vae, images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    )


def _latent_cache(vae_dir: Path, cache_dir: Path) -> Path:
    # Keyed by the VAE's exact files: a retrained VAE gets fresh latents.
    return Path(cache_dir) / f"latents-{vae_fingerprint(vae_dir)}.safetensors"


def cached_latents(vae_dir: Path, cache_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents [60000, 4, 8, 8], labels) of the train split, encoded once per VAE so that a resumed
    run does not redo it; the encoding time is kept in the file's metadata (`latent_encode_seconds`)."""
    path = _latent_cache(vae_dir, cache_dir)
    if not path.is_file():
        t0 = time.perf_counter()
        images, labels = fashion_mnist_tensors("train")
        latents = encode_dataset(load_vae(weights_dir=vae_dir), images)
        seconds = f"{time.perf_counter() - t0:.1f}"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"latents": latents.contiguous(), "labels": labels}, str(tmp), {"encode_s": seconds})
        tmp.replace(path)  # atomic: an interrupted run never leaves a truncated cache
    with safe_open(str(path), "pt") as f:
        return f.get_tensor("latents"), f.get_tensor("labels")


def latent_encode_seconds(vae_dir: Path, cache_dir: Path) -> float:
    with safe_open(str(_latent_cache(vae_dir, cache_dir)), "pt") as f:
        return float((f.metadata() or {}).get("encode_s", "nan"))


TrainingObjective = Callable[[nn.Module, int], torch.Tensor]


def diffusion_objective(
    model: LatentDiffusionModel,
    batch_size: int = 64,
    seed: int = 0,
    label_dropout: float = 0.1,
    data: tuple[torch.Tensor, torch.Tensor] | None = None,
    sampler_steps: int | None = None,
) -> TrainingObjective:
    """Training data for training-based quantization stages (`diffquant.quantize(..., training=...)`):
    `objective(denoiser, i)` is the epsilon-prediction MSE of batch i of the model's training latents,
    the condition replaced by the null condition with p = label_dropout once per sample (as the zoo
    models were trained). Batch i is drawn from (seed, i) alone, so a resumed run sees the same batches.

    Timesteps are those the quantized model will meet: batch i takes one step of the model's sampler
    (`sampler_steps`, default the model's own step count) and runs inside `sampling_step(step, total)`,
    so per-step quantizer state (temporal LSQ, per-step ranges) trains on its own step.
    data: (latents, labels) to use instead of the cached Fashion-MNIST latents (those are encoded with
    the model's VAE on first use, which needs the dataset)."""
    if data is None:
        data = cached_latents(get(model.name).folder / "vae", default_checkpoint_dir(model.name))
    latents, labels = data
    noising = DDPMScheduler.from_config(model.scheduler.config)  # the training betas of the sampler
    sampler = type(model.scheduler).from_config(model.scheduler.config)
    sampler.set_timesteps(positive_or_default("sampler_steps", sampler_steps, model.default_steps))
    timesteps = sampler.timesteps.clone()

    def objective(denoiser: nn.Module, i: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(step_seed(seed, i))
        idx = torch.randint(0, len(latents), (batch_size,), generator=gen)
        step = int(torch.randint(0, len(timesteps), (1,), generator=gen))
        x0, t = latents[idx], timesteps[step].expand(batch_size)
        noise = torch.randn(x0.shape, generator=gen)
        drop = torch.rand(batch_size, generator=gen) < label_dropout
        cond = model.conditioning.denoiser_kwargs(labels[idx])
        null = model.conditioning.null_kwargs(batch_size)
        kwargs = {k: torch.where(drop.reshape(-1, *[1] * (v.dim() - 1)), null[k], v) for k, v in cond.items()}
        device = next(denoiser.parameters()).device
        x_t = noising.add_noise(x0, noise, t).to(device)
        kwargs = {k: v.to(device) for k, v in kwargs.items()}
        with sampling_step(step, len(timesteps)):
            eps = denoiser(x_t, timestep=t.to(device), **kwargs, return_dict=False)[0][:, : x0.shape[1]]
        return F.mse_loss(eps.float(), noise.to(device))

    return objective


# ----------------------------------------------------------------------------------------------
# EMA training state


class TrainState(nn.Module):
    """The trained model and its EMA in one module, so one Checkpointer state_dict resumes both."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.ema = copy.deepcopy(model).requires_grad_(False).eval()


def ema_decay_at(step: int, decay: float) -> float:
    # Warm up the decay so the EMA is not dominated by the random init in short runs.
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)


# ----------------------------------------------------------------------------------------------
# Training-time evaluation


@torch.no_grad()
def classifier_features(classifier: nn.Module, images: torch.Tensor, batch_size: int = 500) -> np.ndarray:
    classifier.eval()
    feats = [classifier.features(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    return torch.cat(feats).double().numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID's formula, diffquant.frechet)."""
    return frechet.frechet_distance(*frechet.feature_statistics(a), *frechet.feature_statistics(b))


def balanced_labels(n: int) -> torch.Tensor:
    return torch.arange(n) % len(CLASS_NAMES)


def sample_metrics(
    model: LatentDiffusionModel,
    classifier: nn.Module,
    test_features: np.ndarray,
    n: int = 1000,
    seed: int = 0,
    guidance_scale: float | None = None,
) -> tuple[dict, torch.Tensor]:
    """Class accuracy and FID (classifier features, vs the test set) of n balanced samples."""
    labels = balanced_labels(n)
    saved = model.guidance_scale
    if guidance_scale is not None:
        model.guidance_scale = guidance_scale
    try:
        t0 = time.perf_counter()
        images = generate(model, labels, seed=seed, progress=False)
        seconds = time.perf_counter() - t0
    finally:
        model.guidance_scale = saved
    metrics = {
        "class_accuracy": round(accuracy(classifier, images, labels), 4),
        "fid": round(frechet_distance(classifier_features(classifier, images), test_features), 3),
        "generate_s": round(seconds, 1),
    }
    return metrics, images


def fid_floors(classifier: nn.Module, vae: AutoencoderKL, test_images: torch.Tensor, seed: int = 0) -> dict:
    """What FID reaches without any generative error: real vs real, and VAE reconstructions."""
    test_features = classifier_features(classifier, test_images)
    train_images, _ = fashion_mnist_tensors("train")
    subset = train_images[torch.randperm(len(train_images), generator=torch.Generator().manual_seed(seed))]
    recon = reconstruct(vae, test_images)
    return {
        "real_train_10k_vs_test": frechet_distance(
            classifier_features(classifier, subset[:10_000]), test_features
        ),
        # Same sample count as the generated figure: FID is biased upwards at small n.
        "real_train_1k_vs_test": frechet_distance(
            classifier_features(classifier, subset[:1000]), test_features
        ),
        "vae_recon_test_vs_test": frechet_distance(classifier_features(classifier, recon), test_features),
    }


def sample_grid(images: torch.Tensor, labels: torch.Tensor, per_class: int = 8, zoom: int = 2):
    """A (classes x per_class) grid of images in [-1, 1] as a grayscale PIL image."""
    from PIL import Image

    rows = [images[labels == c][:per_class] for c in range(len(CLASS_NAMES))]
    grid = torch.cat([torch.cat(list(r[:, 0]), dim=1) for r in rows], dim=0)  # [10*32, 8*32]
    pixels = ((grid + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    img = Image.fromarray(pixels)  # 2-D uint8 -> grayscale ("L")
    return img.resize((img.width * zoom, img.height * zoom), Image.NEAREST)


GUIDANCE_SWEEP = (1.5, 2.0, 3.0, 4.0)


def guidance_sweep(model, classifier, test_features, n: int = 500, seed: int = 1) -> list[dict]:
    """Accuracy and FID per guidance scale on n samples (seed disjoint from the card's seed 0)."""
    return [
        {"guidance": g, **sample_metrics(model, classifier, test_features, n, seed, g)[0]}
        for g in GUIDANCE_SWEEP
    ]
