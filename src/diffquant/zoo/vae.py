"""Small diffusers ``AutoencoderKL`` mapping 32x32x1 Fashion-MNIST images to 8x8x4 latents.

It gives the project's latent-diffusion models a real VAE to run through (and to quantize) while
staying cheap on CPU. The shipped config carries a ``scaling_factor`` (1 / std of the latents) so that
``encode_latents`` returns roughly unit-variance latents, the convention diffusion training expects.

Train and ship new weights with ``python -m diffquant.zoo.vae`` (needs the shipped classifier, which
scores the reconstructions).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from diffquant.zoo.classifier import accuracy, load_classifier
from diffquant.zoo.data import fashion_mnist_tensors
from diffquant.zoo.train_utils import (
    Checkpointer,
    atomic_dir,
    cosine_lr,
    count_params,
    cpu_name,
    default_checkpoint_dir,
    set_lr,
    step_generator,
    training_parser,
)

WEIGHTS_DIR = Path(__file__).parent / "weights" / "fmnist-vae"


@dataclass
class VAEConfig:
    in_channels: int = 1
    latent_channels: int = 4
    sample_size: int = 32
    # Three blocks = two 2x downsamplings: 32x32 -> 8x8. Narrow, one resnet per block: convolutions at
    # 32x32 dominate CPU time, and Fashion-MNIST needs little capacity.
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    norm_num_groups: int = 16
    mid_block_add_attention: bool = True

    @property
    def latent_size(self) -> int:
        return self.sample_size >> (len(self.block_out_channels) - 1)


def build_vae(config: VAEConfig | None = None) -> AutoencoderKL:
    c = config or VAEConfig()
    if any(ch % c.norm_num_groups for ch in c.block_out_channels):
        raise ValueError(
            f"every block width in {c.block_out_channels} must divide by norm_num_groups={c.norm_num_groups}"
        )
    n = len(c.block_out_channels)
    return AutoencoderKL(
        in_channels=c.in_channels,
        out_channels=c.in_channels,
        latent_channels=c.latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=c.block_out_channels,
        layers_per_block=c.layers_per_block,
        norm_num_groups=c.norm_num_groups,
        sample_size=c.sample_size,
        mid_block_add_attention=c.mid_block_add_attention,
    )


def load_vae(
    device: str | torch.device = "cpu",
    weights_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> AutoencoderKL:
    """Load the shipped float16 weights, cast to dtype (float32 by default), in eval mode."""
    vae = AutoencoderKL.from_pretrained(
        str(Path(weights_dir) if weights_dir else WEIGHTS_DIR), torch_dtype=dtype
    )
    return vae.to(device).eval()


# ----------------------------------------------------------------------------------------------
# Inference helpers


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, sample: bool = False) -> torch.Tensor:
    """Images in [-1, 1] -> latents multiplied by the config's scaling_factor (posterior mean unless sample)."""
    dist = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
    z = dist.sample() if sample else dist.mode()
    return z * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images clamped to [-1, 1]."""
    z = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor
    return vae.decode(z).sample.clamp(-1, 1)


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 250) -> torch.Tensor:
    """Encode (posterior mean) and decode in batches; returns float32 CPU images in [-1, 1]."""
    vae.eval()
    out = [
        decode_latents(vae, encode_latents(vae, images[i : i + batch_size])).float().cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB with images in [-1, 1] measured on the [0, 1] scale (peak 1)."""
    mse = ((a - b) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return -10 * torch.log10(mse)


@torch.no_grad()
def latent_stats(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 250) -> tuple[float, float]:
    """Mean and std of posterior samples (unscaled) over images, as used for the scaling factor."""
    vae.eval()
    z = torch.cat(
        [
            vae.encode(images[i : i + batch_size]).latent_dist.sample()
            for i in range(0, len(images), batch_size)
        ]
    )
    return z.mean().item(), z.std().item()


# ----------------------------------------------------------------------------------------------
# Training


@dataclass
class VAETrainConfig:
    steps: int = 4400
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    kl_weight: float = 1e-5  # on the KL per latent element; keeps latents bounded without blurring
    mse_weight: float = 1.0  # L1 keeps edges sharp, MSE (what PSNR measures) polishes the rest
    grad_clip: float = 1.0
    seed: int = 0
    scale_subset: int = 5000  # training images used to estimate the latent scaling factor


def vae_loss(
    vae: AutoencoderKL, x: torch.Tensor, cfg: VAETrainConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    post = vae.encode(x).latent_dist
    recon = vae.decode(post.sample()).sample
    l1 = (recon - x).abs().mean()
    mse = (recon - x).pow(2).mean()
    kl = post.kl().mean() / post.mean[0].numel()  # diffusers sums KL over latent dims; make it per element
    loss = l1 + cfg.mse_weight * mse + cfg.kl_weight * kl
    return loss, {"l1": l1.item(), "mse": mse.item(), "kl": kl.item()}


def _make_step(vae, optimizer, images, cfg: VAETrainConfig):
    def step_fn(step: int) -> dict[str, float]:
        gen = step_generator(cfg.seed, step)
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=gen)
        x = images[idx]
        flip = torch.rand(len(x), generator=gen) < 0.5  # the only augmentation: free, label-preserving
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        set_lr(optimizer, cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup))
        vae.train()
        loss, metrics = vae_loss(vae, x, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
        optimizer.step()
        return metrics

    return step_fn


def evaluate(
    vae: AutoencoderKL, classifier: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor
) -> dict:
    recon = reconstruct(vae, images)
    return {
        "psnr_db": round(psnr(recon, images).mean().item(), 2),
        "mse": round(((recon - images) / 2).pow(2).mean().item(), 6),
        "classifier_acc_original": round(accuracy(classifier, images, labels), 4),
        "classifier_acc_reconstruction": round(accuracy(classifier, recon, labels), 4),
    }


def save_vae(vae: AutoencoderKL, out_dir: str | Path, card: str) -> None:
    """Atomically write the diffusers folder (float16 safetensors + config.json) and README.md."""
    with atomic_dir(out_dir) as tmp:
        # .half()/.float() rather than ModelMixin.to(dtype), which warns about upcast-sensitive modules.
        vae.half().save_pretrained(str(tmp), safe_serialization=True)
        vae.float()
        (tmp / "README.md").write_text(card)


def _model_card(vae: AutoencoderKL, cfg: VAEConfig, t: dict) -> str:
    ev = t["eval"]
    ls = cfg.latent_size
    return f"""# fmnist-vae

A small [diffusers](https://github.com/huggingface/diffusers) `AutoencoderKL` for Fashion-MNIST padded to
{cfg.sample_size}x{cfg.sample_size}x{cfg.in_channels} (pixels in [-1, 1], background -1), with
{ls}x{ls}x{cfg.latent_channels} latents: the autoencoder of diffquant's small latent-diffusion reference models.

## Architecture

- `AutoencoderKL(block_out_channels={tuple(cfg.block_out_channels)}, layers_per_block={cfg.layers_per_block},
  norm_num_groups={cfg.norm_num_groups}, latent_channels={cfg.latent_channels}, mid_block_add_attention={cfg.mid_block_add_attention})`
- Parameters: {count_params(vae):,} (encoder {count_params(vae.encoder) + count_params(vae.quant_conv):,},
  decoder {count_params(vae.decoder) + count_params(vae.post_quant_conv):,})
- Stored in float16 (`diffusion_pytorch_model.safetensors`); `diffquant.zoo.vae.load_vae()` loads it as float32.
- `scaling_factor` = **{t["scaling_factor"]:.4f}** (1 / std of posterior samples over {t["scale_subset"]:,} training
  images; unscaled latent mean {t["latent_mean"]:.4f}, std {t["latent_std"]:.4f}). Multiply latents by it before
  diffusion and divide before decoding, as `encode_latents` / `decode_latents` do.

## Training

- Data: Fashion-MNIST train split (60,000 images, Debian package `dataset-fashion-mnist`), random horizontal flips
- Loss: L1 + {t["mse_weight"]} x MSE + {t["kl_weight"]:g} x KL (per latent element), posterior sampled
- Steps: {t["steps"]} x batch {t["batch_size"]}, Adam lr {t["lr"]:g} with {t["warmup"]}-step warmup + cosine decay,
  gradient clipping {t["grad_clip"]}; seed {t["seed"]}
- Wall time: {t["wall_time_s"] / 60:.1f} min on {t["hardware"]}, {t["threads"]} thread(s)

## Evaluation (Fashion-MNIST test split, 10,000 images, posterior mean, float16 weights)

| metric | value |
| --- | --- |
| reconstruction PSNR (mean per image, [0, 1] scale) | {ev["psnr_db"]:.2f} dB |
| reconstruction MSE ([0, 1] scale) | {ev["mse"]:.5f} |
| fmnist-classifier accuracy on original images | {ev["classifier_acc_original"] * 100:.2f}% |
| fmnist-classifier accuracy on reconstructions | {ev["classifier_acc_reconstruction"] * 100:.2f}% |

## Reproduce

```
{t["command"]}
```
"""


def train_vae(
    out_dir: str | Path = WEIGHTS_DIR,
    steps: int = 4400,
    batch_size: int = 32,
    seed: int = 0,
    resume: bool = True,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 200,
    config: VAEConfig | None = None,
    command: str = "python -m diffquant.zoo.vae",
) -> dict:
    """Train on the train split, set scaling_factor, evaluate on test, write the folder + card."""
    cfg = VAETrainConfig(steps=steps, batch_size=batch_size, seed=seed)
    config = config or VAEConfig()
    torch.manual_seed(seed)
    vae = build_vae(config)
    optimizer = torch.optim.Adam(vae.parameters(), lr=cfg.lr)
    ckpt = Checkpointer(
        Path(checkpoint_dir) if checkpoint_dir else default_checkpoint_dir("fmnist-vae"),
        meta={"model": asdict(config), "train": asdict(cfg)},
    )
    images, _ = fashion_mnist_tensors("train")
    step_fn = _make_step(vae, optimizer, images, cfg)
    wall = ckpt.run(vae, optimizer, step_fn, cfg.steps, resume, checkpoint_every, "vae")
    vae = vae.half().float().eval()  # measure exactly what ships
    torch.manual_seed(seed)
    mean, std = latent_stats(vae, images[torch.randperm(len(images))[: cfg.scale_subset]])
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    test_x, test_y = fashion_mnist_tensors("test")
    training = {
        **asdict(cfg),
        "wall_time_s": round(wall, 1),
        "threads": torch.get_num_threads(),
        "hardware": cpu_name(),
        "scaling_factor": vae.config.scaling_factor,
        "latent_mean": mean,
        "latent_std": std,
        "eval": evaluate(vae, load_classifier(), test_x, test_y),
        "command": command,
    }
    save_vae(vae, out_dir, _model_card(vae, config, training))
    return training


def main(argv: list[str] | None = None) -> None:
    p = training_parser("Train the Fashion-MNIST AutoencoderKL and ship its weights.", 4400, 32, WEIGHTS_DIR, "output diffusers folder", "fmnist-vae", 1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = (
        f"python -m diffquant.zoo.vae --steps {args.steps} --batch-size {args.batch_size} --seed {args.seed}"
    )
    t = time.perf_counter()
    result = train_vae(
        args.out,
        args.steps,
        args.batch_size,
        args.seed,
        not args.no_resume,
        args.checkpoint_dir,
        command=command,
    )
    print(json.dumps(result["eval"] | {"scaling_factor": result["scaling_factor"]}, indent=2))
    print(f"wrote {args.out} ({time.perf_counter() - t:.0f} s)")


if __name__ == "__main__":
    main()
