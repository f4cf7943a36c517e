"""`fmnist-dit`: a class-conditional latent DiT on Fashion-MNIST, the zoo's analogue of DiT / LDM-4.

A diffusers ``DiTTransformer2DModel`` denoises the 8x8x4 latents of the shipped ``fmnist-vae``
(patch 2 -> 16 tokens), conditioned on the 10 classes plus a learned null class (index 10) for
classifier-free guidance. It is trained with epsilon-prediction MSE under a 1000-step linear DDPM
schedule and shipped as a DiTPipeline-style folder whose scheduler is DDIM (the default sampler).

Train and ship with ``python -m diffquant.zoo.models.fmnist_dit --steps N`` (needs the shipped VAE and
classifier). Note that ``DiTPipeline.__call__`` hard-codes null class 1000, so sample through
``diffquant.zoo.model`` (``diffquant.zoo.load("fmnist-dit")``), not the diffusers pipeline call.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DiTPipeline, DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding
from torch import nn

from diffquant.cli_args import positive_int
from diffquant.zoo.classifier import load_classifier
from diffquant.zoo.data import CLASS_NAMES, fashion_mnist_tensors
from diffquant.zoo.model import ClassConditioning, LatentDiffusionModel
from diffquant.zoo.registry import WEIGHTS_ROOT, ZooEntry, register
from diffquant.zoo.train_utils import (
    Checkpointer,
    atomic_dir,
    cosine_lr,
    count_params,
    cpu_name,
    default_checkpoint_dir,
    set_lr,
    step_generator,
)
from diffquant.zoo.training import (
    TrainState,
    balanced_labels,
    cached_latents,
    classifier_features,
    ema_decay_at,
    ema_update,
    fid_floors,
    guidance_sweep,
    latent_encode_seconds,
    sample_grid,
    sample_metrics,
    vae_fingerprint,
)
from diffquant.zoo.vae import load_vae

NAME = "fmnist-dit"
WEIGHTS_DIR = WEIGHTS_ROOT / NAME
VAE_DIR = WEIGHTS_ROOT / "fmnist-vae"
NUM_CLASSES = len(CLASS_NAMES)
NULL_CLASS = NUM_CLASSES  # the extra label-embedding row diffusers adds when class dropout > 0
LATENT_SHAPE = (4, 8, 8)


@dataclass
class DiTConfig:
    width: int = 256
    num_heads: int = 4
    depth: int = 6
    patch_size: int = 2
    latent_channels: int = LATENT_SHAPE[0]
    latent_size: int = LATENT_SHAPE[1]
    num_classes: int = NUM_CLASSES
    out_channels: int = LATENT_SHAPE[0]  # eps only (no learned sigma): simplest to train and sample

    @property
    def head_dim(self) -> int:
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} must divide by num_heads {self.num_heads}")
        return self.width // self.num_heads


@dataclass
class DiTTrainConfig:
    steps: int = 10000
    batch_size: int = 128
    lr: float = 6e-4
    warmup: int = 150
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    label_dropout: float = 0.1  # once per sample: the joint "no class" input CFG needs
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"  # DiT / LDM's schedule
    bf16: bool = True  # autocast the denoiser (measured: ~2x faster, same loss curve)
    seed: int = 0


@dataclass
class SamplerConfig:
    guidance_scale: float = 2.0
    default_steps: int = 25


# ----------------------------------------------------------------------------------------------
# Model


def build_transformer(config: DiTConfig | None = None) -> DiTTransformer2DModel:
    """A freshly initialised DiT (DiT-paper init) with the per-block label dropout turned off."""
    c = config or DiTConfig()
    model = DiTTransformer2DModel(
        num_attention_heads=c.num_heads,
        attention_head_dim=c.head_dim,
        in_channels=c.latent_channels,
        out_channels=c.out_channels,
        num_layers=c.depth,
        sample_size=c.latent_size,
        patch_size=c.patch_size,
        num_embeds_ada_norm=c.num_classes,  # DiT's class count (the embedding table adds the null row)
        norm_type="ada_norm_zero",
    )
    _dit_init(model)
    disable_block_label_dropout(model)
    return model


def _dit_init(model: DiTTransformer2DModel) -> None:
    """Initialise as the DiT paper does; diffusers' constructor leaves PyTorch defaults.

    Zeroing the adaLN modulations and the output layer makes every block start as the identity and the
    output start at zero ("adaLN-Zero"), which the DiT paper found to train markedly faster.
    """
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    w = model.pos_embed.proj.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))
    for block in model.transformer_blocks:
        emb = block.norm1.emb
        nn.init.normal_(emb.class_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(emb.timestep_embedder.linear_2.weight, std=0.02)
        nn.init.zeros_(block.norm1.linear.weight)
        nn.init.zeros_(block.norm1.linear.bias)
    for layer in (model.proj_out_1, model.proj_out_2):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def label_embeddings(model: nn.Module) -> list[LabelEmbedding]:
    return [m for m in model.modules() if isinstance(m, LabelEmbedding)]


def disable_block_label_dropout(model: nn.Module) -> None:
    """diffusers gives every DiT block its own LabelEmbedding, each dropping labels independently in
    train mode, so a jointly unconditional input almost never occurs. We drop once per sample instead
    (`drop_labels`). The null row stays: it is allocated at construction from class_dropout_prob > 0."""
    for emb in label_embeddings(model):
        emb.dropout_prob = 0.0


def drop_labels(labels: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """Replace each label by NULL_CLASS with probability p (one decision per sample, for all blocks)."""
    drop = torch.rand(labels.shape, generator=gen) < p
    return torch.where(drop, torch.full_like(labels, NULL_CLASS), labels)


def train_scheduler(cfg: DiTTrainConfig | None = None) -> DDPMScheduler:
    cfg = cfg or DiTTrainConfig()
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_schedule=cfg.beta_schedule,
        prediction_type="epsilon",
        clip_sample=False,  # latents are not bounded to [-1, 1]
    )


def sampling_scheduler(train: DDPMScheduler) -> DDIMScheduler:
    # "trailing" spacing starts sampling at t = T-1 (pure noise), which matters at few steps.
    return DDIMScheduler.from_config(
        train.config, clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing"
    )


# ----------------------------------------------------------------------------------------------
# Loading


def load_fmnist_dit(folder: Path) -> LatentDiffusionModel:
    """The shipped folder, or a quantized copy of it, as a float32 eval-mode LatentDiffusionModel."""
    from diffquant.checkpoint import load_pipeline_any  # heavy import, deferred to first load

    pipe = load_pipeline_any(folder)
    pipe.transformer.float().eval()
    pipe.vae.float().eval()
    # A method that fine-tunes the denoiser in train mode must not bring back per-block dropout.
    disable_block_label_dropout(pipe.transformer)
    return as_latent_model(pipe)


def as_latent_model(pipe, sampler: SamplerConfig | None = None) -> LatentDiffusionModel:
    s = sampler or SamplerConfig()
    return LatentDiffusionModel(
        name=NAME,
        pipe=pipe,
        conditioning=ClassConditioning(null_class=NULL_CLASS),
        latent_shape=LATENT_SHAPE,
        num_classes=NUM_CLASSES,
        guidance_scale=s.guidance_scale,
        default_steps=s.default_steps,
        learned_sigma=False,
    )


register(
    ZooEntry(
        NAME,
        f"class-conditional latent DiT ({DiTConfig().depth} blocks, width {DiTConfig().width}) on "
        "Fashion-MNIST 8x8x4 VAE latents; DDIM sampler with classifier-free guidance",
        WEIGHTS_DIR,
        load_fmnist_dit,
    )
)


# ----------------------------------------------------------------------------------------------
# Training


def diffusion_loss(
    model: nn.Module,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    labels: torch.Tensor,
    gen: torch.Generator,
    label_dropout: float,
    bf16: bool = False,
) -> torch.Tensor:
    """Epsilon-prediction MSE at uniformly drawn timesteps, labels dropped once per sample."""
    n = latents.shape[0]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=gen)
    noise = torch.randn(latents.shape, generator=gen)
    x_t = scheduler.add_noise(latents, noise, t)
    labels = drop_labels(labels, label_dropout, gen)
    # bf16 autocast roughly halves the step time on AVX-512-BF16 CPUs; weights, optimizer and the loss
    # stay float32.
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        eps = model(x_t, timestep=t, class_labels=labels, return_dict=False)[0]
    return F.mse_loss(eps[:, : noise.shape[1]].float(), noise)


def make_train_step(state: TrainState, optimizer, scheduler, latents, labels, cfg: DiTTrainConfig):
    def step_fn(step: int) -> dict[str, float]:
        gen = step_generator(cfg.seed, step)
        idx = torch.randint(0, len(latents), (cfg.batch_size,), generator=gen)
        set_lr(optimizer, cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup))
        state.model.train()
        loss = diffusion_loss(
            state.model, scheduler, latents[idx], labels[idx], gen, cfg.label_dropout, cfg.bf16
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.grad_clip)
        optimizer.step()
        ema_update(state.ema, state.model, ema_decay_at(step, cfg.ema_decay))
        return {"loss": loss.item()}

    return step_fn


# ----------------------------------------------------------------------------------------------
# Shipping


def save_pipeline(transformer: nn.Module, vae: AutoencoderKL, out_dir: Path) -> None:
    """A DiTPipeline-style folder: float16 safetensors, DDIM scheduler (the default sampler)."""
    pipe = DiTPipeline(
        transformer=copy.deepcopy(transformer).half(),  # .half() rather than ModelMixin.to (warns)
        vae=copy.deepcopy(vae).half(),
        scheduler=sampling_scheduler(train_scheduler()),
    )
    pipe.save_pretrained(str(out_dir), safe_serialization=True)


def evaluate_folder(folder: Path, sweep: bool = True) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """FP figures of the model card for the pipeline in `folder`: (results, images, labels)."""
    classifier = load_classifier()
    test_x, _ = fashion_mnist_tensors("test")
    test_features = classifier_features(classifier, test_x)
    model = load_fmnist_dit(folder)
    metrics, images = sample_metrics(model, classifier, test_features)
    results = {
        "samples": metrics,
        "sweep": guidance_sweep(model, classifier, test_features) if sweep else [],
        "floors": fid_floors(classifier, model.vae, test_x),
        "sampler": asdict(SamplerConfig()),
    }
    return results, images, balanced_labels(len(images))


def ship(ema: nn.Module, config: DiTConfig, training: dict, out_dir: Path, sweep: bool = True) -> dict:
    """Write the pipeline folder, evaluate what ships (float16-rounded), add the card and sample grid."""
    with atomic_dir(out_dir) as tmp:
        save_pipeline(ema, load_vae(weights_dir=VAE_DIR), tmp)
        results, images, labels = evaluate_folder(tmp, sweep)
        sample_grid(images, labels).save(tmp / "samples.png", optimize=True)
        (tmp / "README.md").write_text(model_card(config, training, results))
    return results


def model_card(config: DiTConfig, t: dict, r: dict) -> str:
    s, fl, sampler = r["samples"], r["floors"], r["sampler"]
    tokens = (config.latent_size // config.patch_size) ** 2
    sweep = "\n".join(
        f"| {row['guidance']:g} | {row['class_accuracy'] * 100:.1f}% | {row['fid']:.2f} |"
        for row in r["sweep"]
    )
    return f"""# {NAME}

A class-conditional latent diffusion transformer (diffusers `DiTTransformer2DModel`) on Fashion-MNIST:
diffquant's small analogue of the DiT / LDM-4 ImageNet models used in diffusion-quantization papers. It
denoises the 8x8x4 latents of `fmnist-vae` (shipped here in `vae/`) conditioned on the 10 classes.

## Architecture

- `DiTTransformer2DModel(num_layers={config.depth}, num_attention_heads={config.num_heads},
  attention_head_dim={config.head_dim}, patch_size={config.patch_size}, sample_size={config.latent_size},
  in_channels={config.latent_channels}, out_channels={config.out_channels}, num_embeds_ada_norm={config.num_classes},
  norm_type="ada_norm_zero")`: width {config.width}, {tokens} tokens, epsilon prediction only
- Parameters: transformer {t["params"]:,}; VAE {t["vae_params"]:,}
- Stored as float16 safetensors; `diffquant.zoo.load("{NAME}")` loads it as float32 in eval mode.
- Classes 0-9: {", ".join(CLASS_NAMES)}.
- Label **{NULL_CLASS}** is the null class of classifier-free guidance. `DiTPipeline.__call__` hard-codes
  null class 1000, so sample through `diffquant.zoo.model` (`generate`, `sample_latents`), not the
  diffusers pipeline call; `DiffusionPipeline.from_pretrained` loads the components.

## Sampler (defaults of the zoo model)

- `DDIMScheduler` (in `scheduler/`, timestep_spacing "trailing", eta 0), **{sampler["default_steps"]} steps**,
  classifier-free guidance scale **{sampler["guidance_scale"]:g}** (one batched denoiser call per step)
- Training noise schedule: DDPM, {t["num_train_timesteps"]} steps, {t["beta_schedule"]} betas (1e-4 to 0.02)

## Training

- Data: VAE latents of the 60,000 Fashion-MNIST training images (posterior mean x scaling_factor,
  encoded once and cached; no flip augmentation: the dataset's shoes almost all face the same way)
- Loss: epsilon MSE at uniform timesteps; labels replaced by the null class with p={t["label_dropout"]} once
  per sample (diffusers' independent per-block label dropout is switched off)
- {t["steps"]} steps x batch {t["batch_size"]}, AdamW lr {t["lr"]:g} (weight decay {t["weight_decay"]:g}) with
  {t["warmup"]}-step warmup + cosine decay, gradient clipping {t["grad_clip"]}, bf16 autocast: {t["bf16"]};
  EMA decay {t["ema_decay"]} (the EMA weights are shipped); seed {t["seed"]}
- Wall time: {t["wall_time_s"] / 60:.1f} min of training + {t["latent_encode_s"]:.0f} s encoding the latents,
  on {t["hardware"]}, {t["threads"]} thread(s)

## Evaluation (training-time figures; see diffquant.eval for the full harness)

1000 samples, 100 per class, seed 0, default sampler ({sampler["default_steps"]} DDIM steps, guidance
{sampler["guidance_scale"]:g}), float16 weights run in float32. "FID" is a simple Fréchet distance in the
256-d feature space of the shipped `fmnist-classifier` (`features()`) against the 10,000 test images,
in float64 by `diffquant.eval.metrics` (equal to the `scipy.linalg.sqrtm` formula up to round-off); it is
not comparable to Inception FID.

| metric | value |
| --- | --- |
| class accuracy of samples (fmnist-classifier) | **{s["class_accuracy"] * 100:.1f}%** |
| FID, 1000 samples vs test | **{s["fid"]:.2f}** |
| floor: 10k real train images vs test | {fl["real_train_10k_vs_test"]:.2f} |
| floor: 1000 real train images vs test (same n as the samples) | {fl["real_train_1k_vs_test"]:.2f} |
| floor: VAE reconstructions of the test set vs test | {fl["vae_recon_test_vs_test"]:.2f} |
| time to generate the 1000 samples ({t["threads"]} thread(s)) | {s["generate_s"]:.0f} s |

Guidance sweep (500 samples, seed 1): FID is lowest at weak guidance while class accuracy rises with it;
the default {sampler["guidance_scale"]:g} was picked from this sweep as the trade-off between the two.

| guidance | class accuracy | FID |
| --- | --- | --- |
{sweep}

`samples.png`: rows are the 10 classes in label order, 8 samples each (the first of the 1000 above).

## Use

```python
import torch
import diffquant.zoo as zoo

model = zoo.load("{NAME}")
images = zoo.generate(model, labels=torch.arange(10))  # [-1, 1], 1x32x32
```

## Reproduce

```
{t["command"]}
```
"""


# ----------------------------------------------------------------------------------------------
# Entry point


def train_dit(
    out_dir: str | Path = WEIGHTS_DIR,
    steps: int = 10000,
    batch_size: int = 128,
    seed: int = 0,
    resume: bool = True,
    checkpoint_dir: str | Path | None = None,
    threads: int = 2,
    config: DiTConfig | None = None,
    bf16: bool = True,
    checkpoint_every: int = 200,
    command: str = "python -m diffquant.zoo.models.fmnist_dit",
) -> dict:
    """Train on cached VAE latents, then ship the EMA weights as a pipeline folder with its card."""
    torch.set_num_threads(threads)
    cfg = DiTTrainConfig(steps=steps, batch_size=batch_size, seed=seed, bf16=bf16)
    config = config or DiTConfig()
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else default_checkpoint_dir(NAME)
    latents, labels = cached_latents(VAE_DIR, ckpt_dir)
    torch.manual_seed(seed)
    state = TrainState(build_transformer(config))
    optimizer = torch.optim.AdamW(state.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    meta = {"model": asdict(config), "train": asdict(cfg), "vae": vae_fingerprint(VAE_DIR)}
    ckpt = Checkpointer(ckpt_dir, meta=meta)
    step_fn = make_train_step(state, optimizer, train_scheduler(cfg), latents, labels, cfg)
    wall = ckpt.run(state, optimizer, step_fn, cfg.steps, resume, checkpoint_every, NAME)
    training = {
        **asdict(cfg),
        "wall_time_s": round(wall, 1),
        "latent_encode_s": latent_encode_seconds(VAE_DIR, ckpt_dir),
        "threads": threads,
        "hardware": cpu_name(),
        "params": count_params(state.ema),
        "vae_params": count_params(load_vae(weights_dir=VAE_DIR)),
        "command": command,
    }
    training["eval"] = ship(state.ema, config, training, Path(out_dir))
    return training


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description="Train the Fashion-MNIST latent DiT and ship its pipeline folder."
    )
    p.add_argument("--steps", type=positive_int, default=10000)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="output pipeline folder")
    p.add_argument(
        "--checkpoint-dir", type=Path, default=None, help=f"default ~/.cache/diffquant/train/{NAME}"
    )
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--threads", type=positive_int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument("--fp32", action="store_true", help="train without bf16 autocast")
    args = p.parse_args(argv)
    command = (
        f"python -m diffquant.zoo.models.fmnist_dit --steps {args.steps} --batch-size {args.batch_size} "
        f"--seed {args.seed} --threads {args.threads}"
    )
    if args.fp32:
        command += " --fp32"
    t = time.perf_counter()
    result = train_dit(
        args.out,
        args.steps,
        args.batch_size,
        args.seed,
        not args.no_resume,
        args.checkpoint_dir,
        args.threads,
        bf16=not args.fp32,
        command=command,
    )
    print(json.dumps(result["eval"], indent=2))
    print(f"wrote {args.out} ({time.perf_counter() - t:.0f} s)")


if __name__ == "__main__":
    main()
