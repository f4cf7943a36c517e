"""`evaluate(target, ...)`: a (quantized) latent diffusion model against its full-precision reference.

Protocol (SVDQuant's, adapted to a class-conditional model on CPU):

1. Labels are balanced and fixed (sample i has class i % num_classes); sample i starts from the
   same initial noise `model.initial_noise(samples, seed)[i]` for the target and the reference.
2. Both generate images with the model's own sampler (batched). The FP images are cached on disk
   (optional, see `FPImageCache`) so that evaluating many recipes generates FP once.
3. Distribution quality: FID of each image set against the shipped real test-set statistics in the
   evaluation classifier's feature space (Fréchet distance, see metrics.py), and the share
   of samples the classifier assigns to the requested class.
4. Fidelity to FP: PSNR, SSIM and the feature distance between paired images (same noise).
5. Noise-prediction SQNR per sampling step along the FP trajectory, on the first `sqnr_samples`
   samples: the FP model samples, and at every step the target predicts eps on the same x_t inside
   `diffquant.sampling_step(step)`; eps after classifier-free guidance is compared.

Everything is seeded and nothing is shuffled: the same call twice gives identical numbers (wall
times aside).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffquant.atomic import check_output_file
from diffquant.calib.steps import sampling_step
from diffquant.configs import positive_or_default
from diffquant.eval import metrics
from diffquant.eval.evaluation import EvalSettings, EvalTarget, Evaluation
from diffquant.eval.fp_cache import FPImageCache, default_cache_dir
from diffquant.eval.output import save_grid, write_json_atomic
from diffquant.eval.stats import ReferenceStats, classifier_features, load_reference_stats
from diffquant.eval.targets import recipe_and_bits, resolve_target, stage_figures, weight_bytes
from diffquant.formats.ops import sqnr_db
from diffquant.nn.attention import attention_summary
from diffquant.zoo.classifier import load_classifier, predict
from diffquant.zoo.model import LatentDiffusionModel, generate, sample_latents

FID_METHOD = ("Frechet distance (own float64 closed form, trace term by symmetric eigendecomposition) of "
              "fmnist-classifier 256-d penultimate features vs the Fashion-MNIST test set (10k)")
FEATURE_DISTANCE_METHOD = "mean L2 distance between L2-normalised fmnist-classifier features, paired images"


# -- generation and measurements ----------------------------------------------------------------


def balanced_labels(samples: int, num_classes: int) -> torch.Tensor:
    return torch.arange(samples) % num_classes


def timed_generate(model: LatentDiffusionModel, labels: torch.Tensor, settings: EvalSettings,
                   steps: int) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    images = generate(model, labels, settings.seed, steps, settings.batch_size, settings.progress)
    return images, time.perf_counter() - start


def fp_images(reference: LatentDiffusionModel, name: str, labels: torch.Tensor, settings: EvalSettings,
              steps: int) -> tuple[torch.Tensor, float]:
    """The reference's images and their generation time, from the cache when allowed and present."""
    if not settings.cache:
        return timed_generate(reference, labels, settings, steps)
    cache = FPImageCache(settings.cache_dir or default_cache_dir())
    key = cache.key(reference, settings, steps)
    hit = cache.load(name, key)
    if hit is not None:
        return hit
    images, wall = timed_generate(reference, labels, settings, steps)
    cache.save(name, key, images, wall)
    return images, wall


@torch.no_grad()
def eps_sqnr_per_step(model: LatentDiffusionModel, reference: LatentDiffusionModel, labels: torch.Tensor,
                      noise: torch.Tensor, steps: int, batch_size: int) -> list[float]:
    """SQNR (dB) of the target's guided eps against FP's at each step of the FP trajectory, pooled over
    the samples given."""
    fp_eps: dict[int, list[torch.Tensor]] = {}
    q_eps: dict[int, list[torch.Tensor]] = {}
    for start in range(0, len(labels), batch_size):
        batch_labels = labels[start : start + batch_size]

        def hook(step: int, t: torch.Tensor, x_in: torch.Tensor, eps: torch.Tensor,
                 batch_labels: torch.Tensor = batch_labels) -> None:
            with sampling_step(step, len(reference.scheduler.timesteps)):
                q_eps.setdefault(step, []).append(model.predict_noise(x_in, t, batch_labels))
            fp_eps.setdefault(step, []).append(eps)
            return None  # keep FP's eps: the trajectory stays FP's

        sample_latents(reference, batch_labels, noise[start : start + batch_size], steps, step_hook=hook)
    return [metrics.capped_sqnr_db(sqnr_db(torch.cat(fp_eps[i]), torch.cat(q_eps[i]))) for i in sorted(fp_eps)]


@dataclass
class Judge:
    """The evaluation classifier and the real-data statistics, loaded once for many evaluations."""

    classifier: torch.nn.Module = field(default_factory=load_classifier)
    stats: ReferenceStats = field(default_factory=load_reference_stats)

    def quality(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, torch.Tensor]:
        """(FID, class accuracy, features) of generated images."""
        features = classifier_features(self.classifier, images)
        fid = metrics.fid_from_features(features, self.stats.mu, self.stats.sigma)
        accuracy = metrics.class_accuracy(predict(self.classifier, images), labels)
        return fid, accuracy, features


# -- the evaluation -------------------------------------------------------------------------------


def evaluate(
    target: str | Path | LatentDiffusionModel,
    samples: int = 1000,
    steps: int | None = None,
    seed: int = 0,
    *,
    reference: LatentDiffusionModel | None = None,
    sqnr_samples: int = 64,
    batch_size: int = 250,
    cache: bool = True,
    cache_dir: str | Path | None = None,
    json_path: str | Path | None = None,
    grid_path: str | Path | None = None,
    judge: Judge | None = None,
    progress: bool = False,
    frozen: bool = False,
) -> dict[str, Any]:
    """Evaluate a zoo model name (FP), a quantized zoo folder, or a LatentDiffusionModel (with its FP
    `reference` when quantized) against full precision; returns the metrics as a flat dict and writes
    them to `json_path` / a sample grid to `grid_path` when given. See the module docstring."""
    settings = EvalSettings(samples, steps, seed, sqnr_samples, batch_size, cache,
                            Path(cache_dir) if cache_dir is not None else None, progress, frozen)
    for path in (json_path, grid_path):  # before minutes of sampling, not after
        if path is not None:
            check_output_file(Path(path))
    evaluation = run_evaluation(resolve_target(target, reference), settings, judge or Judge())
    if json_path is not None:
        write_json_atomic(json_path, evaluation.result)
    if grid_path is not None:
        save_grid(grid_path, evaluation)
    return evaluation.result

def run_evaluation(target: EvalTarget, settings: EvalSettings, judge: Judge) -> Evaluation:
    ref = target.reference
    steps = positive_or_default("steps", settings.steps, ref.default_steps)
    labels = balanced_labels(settings.samples, ref.num_classes)
    recipe, bits = recipe_and_bits(target.model.denoiser)
    total_bytes, q_bytes = weight_bytes(target.model.denoiser, target.folder)  # before freezing repacks
    backend, paths = _freeze_if_asked(target, settings)
    fp, fp_wall = fp_images(ref, target.name, labels, settings, steps)
    q, q_wall = (fp, fp_wall) if target.is_reference else timed_generate(target.model, labels, settings, steps)
    fid, acc, q_feat = judge.quality(q, labels)
    fp_fid, fp_acc, fp_feat = (fid, acc, q_feat) if target.is_reference else judge.quality(fp, labels)
    per_step = _sqnr_per_step(target, labels, settings, steps)
    result = {
        "model": target.name, "recipe": recipe, "bits": bits,
        "attention_quantized": attention_summary(target.model.denoiser),
        "fid": fid, "fp_fid": fp_fid, "class_accuracy": acc, "fp_class_accuracy": fp_acc,
        "psnr_vs_fp": metrics.psnr(q, fp), "ssim_vs_fp": metrics.ssim(q, fp),
        "feature_distance_vs_fp": metrics.feature_distance(q_feat, fp_feat),
        "eps_sqnr_db": sum(per_step) / len(per_step), "eps_sqnr_db_per_step": per_step,
        "wall_time_s": q_wall, "fp_wall_time_s": fp_wall,
        "weight_bytes": total_bytes, "quantized_layer_bytes": q_bytes, "stages": stage_figures(target.model.denoiser),
        "frozen": settings.frozen, "kernel_backend": backend, "kernel_paths": paths,
        "samples": settings.samples, "steps": steps, "seed": settings.seed,
        "sqnr_samples": min(settings.sqnr_samples, settings.samples),
        "fid_method": FID_METHOD, "feature_distance_method": FEATURE_DISTANCE_METHOD,
        "psnr_cap_db": metrics.PSNR_CAP_DB,
    }
    return Evaluation(result, target, labels, fp, q)


def _freeze_if_asked(target: EvalTarget, settings: EvalSettings) -> tuple[str | None, dict[str, int] | None]:
    """Freeze the target's denoiser into packed modules when asked: (the integer backend's name, how many
    layers run each path -- "int" on that backend, "float" weight-only, "emulated" non-integer formats)."""
    if not settings.frozen:
        return None, None
    if target.is_reference:
        raise ValueError("frozen evaluation needs a quantized target, not the full-precision model")
    from diffquant.freeze import freeze, packed_layers  # imports the kernel stack only when asked
    from diffquant.kernels import select_backend

    backend = select_backend()
    freeze(target.model.denoiser, backend=backend)
    paths = Counter(layer.path for layer in packed_layers(target.model.denoiser).values())
    return backend.name, dict(sorted(paths.items()))


def _sqnr_per_step(target: EvalTarget, labels: torch.Tensor, settings: EvalSettings, steps: int) -> list[float]:
    if target.is_reference:  # the reference against itself: identical eps, infinite SQNR -> the cap
        return [metrics.SQNR_CAP_DB] * steps
    n = min(settings.sqnr_samples, settings.samples)
    noise = target.reference.initial_noise(settings.samples, settings.seed)[:n]
    return eps_sqnr_per_step(target.model, target.reference, labels[:n], noise, steps, settings.batch_size)
