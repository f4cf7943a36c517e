"""A latent diffusion model as the evaluation harness and calibration see it.

`LatentDiffusionModel` bundles a diffusers pipeline's denoiser, VAE and scheduler with a
`Conditioning` strategy (class labels, or prompts embedded by a text encoder) and the model's own
sampler settings. Everything that samples — calibration, evaluation, distillation — goes through
`predict_noise` (classifier-free guidance batched: one denoiser call is one sampling step) and
`sample_latents`, which sets the sampling step explicitly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from diffquant.calib.steps import sampling_step
from diffquant.configs import check_count, positive_or_default

PROVENANCE = "provenance"  # LatentDiffusionModel.extra key: what loading did to the shipped weights


class Conditioning:
    """Turns class labels into the denoiser's conditioning keyword arguments."""

    def denoiser_kwargs(self, labels: torch.Tensor) -> dict[str, Any]:
        raise NotImplementedError

    def null_kwargs(self, batch: int, device: torch.device | str = "cpu") -> dict[str, Any]:
        """The unconditional input of classifier-free guidance, on `device`."""
        raise NotImplementedError



@dataclass(frozen=True)
class SamplerConfig:
    """How a zoo model samples by default: classifier-free guidance scale and number of steps."""

    guidance_scale: float = 2.0
    default_steps: int = 25

@dataclass
class ClassConditioning(Conditioning):
    """DiT-style class labels; `null_class` is the label-embedding row trained as "no class"."""

    null_class: int

    def denoiser_kwargs(self, labels: torch.Tensor) -> dict[str, Any]:
        return {"class_labels": labels}

    def null_kwargs(self, batch: int, device: torch.device | str = "cpu") -> dict[str, Any]:
        return {"class_labels": torch.full((batch,), self.null_class, dtype=torch.long, device=device)}


@dataclass
class LatentDiffusionModel:
    """Denoiser + VAE + scheduler + conditioning, with the sampler settings the model was made for.

    pipe: a diffusers pipeline holding the components (saved / quantized / reloaded as a folder).
    latent_shape: (C, H, W) of one latent. learned_sigma: the denoiser outputs [eps, variance]
    channels; only eps is used. guidance_scale: classifier-free guidance (1 = off).
    """

    name: str
    pipe: Any
    conditioning: Conditioning
    latent_shape: tuple[int, int, int]
    num_classes: int
    guidance_scale: float = 1.5
    default_steps: int = 25
    learned_sigma: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, "transformer", None) or self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def scheduler(self):
        return self.pipe.scheduler

    def predict_noise(self, latents: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                      guidance_scale: float | None = None) -> torch.Tensor:
        """Noise prediction after classifier-free guidance, in one batched denoiser call."""
        g = self.guidance_scale if guidance_scale is None else guidance_scale
        batch = latents.shape[0]
        timesteps = t.expand(batch) if t.dim() == 0 else t
        if g == 1.0:
            return self._eps(latents, timesteps, self.conditioning.denoiser_kwargs(labels))
        cond = self.conditioning.denoiser_kwargs(labels)
        null = self.conditioning.null_kwargs(batch, latents.device)
        both = {k: torch.cat([cond[k], null[k]]) for k in cond}
        eps = self._eps(torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), both)
        eps_cond, eps_null = eps.chunk(2)
        return eps_null + g * (eps_cond - eps_null)

    def _eps(self, latents: torch.Tensor, t: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        out = self.denoiser(latents, timestep=t, **kwargs, return_dict=False)[0]
        return out[:, : self.latent_shape[0]] if self.learned_sigma else out

    def initial_noise(self, n: int, seed: int) -> torch.Tensor:
        return torch.randn((n, *self.latent_shape), generator=torch.Generator().manual_seed(seed))

    def sample_latents(self, labels: torch.Tensor, noise: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """`sample_latents(self, ...)` below, with the model's guidance: what calib.capture drives."""
        return sample_latents(self, labels, noise, steps)

    def calibration(self, num_samples: int = 64, steps: int | None = None, seed: int = 1234,
                    batch_size: int = 64, progress: bool = True) -> Callable[[torch.nn.Module], None]:
        """A `calibration=` function for diffquant.quantize: sample `num_samples` balanced labels
        through every sampling step (seeds disjoint from evaluation's by default). Its `reseeded(seed)`
        gives the same sampler from other noise (training stages draw fresh trajectories with it)."""
        check_count("calibration num_samples", num_samples)
        check_count("calibration steps", steps, optional=True)
        check_count("calibration batch_size", batch_size)
        labels = torch.arange(num_samples) % self.num_classes
        noise = self.initial_noise(num_samples, seed)

        def run(denoiser: torch.nn.Module) -> None:
            if denoiser is not self.denoiser:
                raise ValueError("calibration runs this zoo model's own denoiser")
            for start in tqdm(range(0, num_samples, batch_size), desc="calibrate", disable=not progress):
                sl = slice(start, start + batch_size)
                sample_latents(self, labels[sl], noise[sl], steps)

        run.reseeded = lambda new_seed: self.calibration(num_samples, steps, new_seed, batch_size, progress=False)
        return run

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1]."""
        scale = self.vae.config.scaling_factor
        return self.vae.decode(latents / scale, return_dict=False)[0].clamp(-1, 1)


StepHook = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor | None]


@torch.no_grad()
def sample_latents(
    model: LatentDiffusionModel,
    labels: torch.Tensor,
    noise: torch.Tensor,
    steps: int | None = None,
    guidance_scale: float | None = None,
    step_hook: StepHook | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Run the model's scheduler from `noise` to clean latents for `labels`.

    step_hook(step, t, x_t, eps) may return a replacement eps (e.g. the teacher's, to follow the
    full-precision trajectory); every denoiser call runs inside `sampling_step(step, total)`, total
    the number of scheduler timesteps.
    """
    scheduler = model.scheduler
    scheduler.set_timesteps(positive_or_default("steps", steps, model.default_steps))
    x = noise * scheduler.init_noise_sigma
    for i, t in enumerate(tqdm(scheduler.timesteps, desc="sample", disable=not progress, leave=False)):
        model_input = scheduler.scale_model_input(x, t)
        with sampling_step(i, len(scheduler.timesteps)):
            eps = model.predict_noise(model_input, t, labels, guidance_scale)
        if step_hook is not None:
            replaced = step_hook(i, t, model_input, eps)
            eps = eps if replaced is None else replaced
        x = scheduler.step(eps, t, x, return_dict=False)[0]
    return x


@torch.no_grad()
def generate(
    model: LatentDiffusionModel,
    labels: torch.Tensor,
    seed: int = 0,
    steps: int | None = None,
    batch_size: int = 250,
    progress: bool = True,
) -> torch.Tensor:
    """Images in [-1, 1] for `labels`; sample i always starts from the same noise (seed, i)."""
    noise = model.initial_noise(len(labels), seed)
    images = []
    batches = range(0, len(labels), batch_size)
    for start in tqdm(batches, desc=f"generate {model.name}", disable=not progress):
        sl = slice(start, start + batch_size)
        latents = sample_latents(model, labels[sl], noise[sl], steps)
        images.append(model.decode(latents))
    return torch.cat(images)
