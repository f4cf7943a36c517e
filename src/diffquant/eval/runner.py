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

import hashlib
import json
import math
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from diffquant import atomic, zoo
from diffquant.api import STATE_ATTR, quantized_layers
from diffquant.atomic import atomic_file, check_output_file
from diffquant.calib.steps import sampling_step
from diffquant.checkpoint import is_quantized_folder, save_quantized
from diffquant.configs import check_count, positive_or_default
from diffquant.eval import metrics
from diffquant.eval.stats import ReferenceStats, classifier_features, load_reference_stats
from diffquant.formats.ops import sqnr_db
from diffquant.info import checkpoint_info
from diffquant.nn.attention import attention_summary
from diffquant.zoo.classifier import load_classifier, predict
from diffquant.zoo.model import LatentDiffusionModel, generate, sample_latents

CACHE_VERSION = 1  # bump when the cached content or generation protocol changes
FP_RECIPE, FP_BITS = "fp", "W16A16"
FID_METHOD = ("Frechet distance (own float64 closed form, trace term by symmetric eigendecomposition) of "
              "fmnist-classifier 256-d penultimate features vs the Fashion-MNIST test set (10k)")
FEATURE_DISTANCE_METHOD = "mean L2 distance between L2-normalised fmnist-classifier features, paired images"


@dataclass(frozen=True)
class EvalSettings:
    """How to evaluate. steps=None: the model's own default; cache_dir=None: ~/.cache/diffquant/eval."""

    samples: int = 1000
    steps: int | None = None
    seed: int = 0
    sqnr_samples: int = 64
    batch_size: int = 250
    cache: bool = True
    cache_dir: Path | None = None
    progress: bool = False
    frozen: bool = False  # run a quantized target through the packed integer kernels (diffquant.freeze)

    def __post_init__(self) -> None:
        if self.samples < 2:
            raise ValueError(f"evaluation needs at least 2 samples (FID needs a covariance), got {self.samples}")
        if self.sqnr_samples < 1 or self.batch_size < 1:
            raise ValueError("sqnr_samples and batch_size must be positive")
        check_count("steps", self.steps, optional=True)  # before any sampling: None is the model's default


@dataclass
class EvalTarget:
    """What is evaluated: the model, its FP reference (the same object for an FP target) and, for a
    checkpoint on disk, its folder (whose checkpoint_info gives the quantized bytes)."""

    model: LatentDiffusionModel
    reference: LatentDiffusionModel
    name: str
    folder: Path | None = None

    @property
    def is_reference(self) -> bool:
        return self.model is self.reference


# -- resolving a target: an ordered registry of (accepts, resolve) -------------------------------


@dataclass(frozen=True)
class TargetKind:
    name: str
    accepts: Callable[[Any], bool]
    resolve: Callable[[Any, LatentDiffusionModel | None], EvalTarget]


def _resolve_model(target: LatentDiffusionModel, reference: LatentDiffusionModel | None) -> EvalTarget:
    if reference is None and _recipe_of(target.denoiser) is not None:
        raise ValueError("a quantized model needs its full-precision reference: pass reference=")
    return EvalTarget(target, reference or target, target.name)


def _resolve_zoo_name(target: str, reference: LatentDiffusionModel | None) -> EvalTarget:
    model = zoo.load(target)
    return EvalTarget(model, reference or model, target)


def _resolve_folder(target: str | Path, reference: LatentDiffusionModel | None) -> EvalTarget:
    folder = Path(target)
    if not folder.exists():
        raise FileNotFoundError(f"{folder} is neither a zoo model name nor an existing folder")
    from diffquant.workflows import zoo_name_of  # workflows imports the whole quantize stack

    name = zoo_name_of(folder)
    if name is None:
        raise ValueError(f"{folder} was not made from a zoo model (no marker file): evaluation needs the zoo "
                         "model's sampler and reference; make it with `diffquant quantize ZOO_NAME ...`")
    folder_q = folder if is_quantized_folder(folder) else None
    return EvalTarget(zoo.load(name, folder), reference or zoo.load(name), name, folder_q)


TARGET_KINDS: list[TargetKind] = [
    TargetKind("model", lambda t: isinstance(t, LatentDiffusionModel), _resolve_model),
    TargetKind("zoo name", lambda t: isinstance(t, str) and zoo.is_zoo_name(t), _resolve_zoo_name),
    TargetKind("folder", lambda t: isinstance(t, str | Path), _resolve_folder),
]


def resolve_target(target: Any, reference: LatentDiffusionModel | None = None) -> EvalTarget:
    for kind in TARGET_KINDS:
        if kind.accepts(target):
            return kind.resolve(target, reference)
    raise TypeError(f"cannot evaluate a {type(target).__name__}: give a zoo name, a folder or a LatentDiffusionModel")


# -- recipe and size --------------------------------------------------------------------------


def _recipe_of(denoiser: torch.nn.Module) -> Any:
    state = getattr(denoiser, STATE_ATTR, None)
    return None if state is None else state.recipe


def recipe_and_bits(denoiser: torch.nn.Module) -> tuple[str, str]:
    recipe = _recipe_of(denoiser)
    return (FP_RECIPE, FP_BITS) if recipe is None else (recipe.name, recipe.label)


def weight_bytes(denoiser: torch.nn.Module, folder: Path | None = None) -> tuple[int, int]:
    """(whole-denoiser weight bytes, quantized layers' bytes).

    Quantized layers count what their checkpoint stores (codes, scales, their bias: checkpoint_info's
    `quantized_bytes`); every other parameter counts 16 bits — so the FP row is 2 bytes per parameter
    and rows of different recipes are comparable.
    """
    layers = quantized_layers(denoiser)
    prefixes = tuple(f"{name}." for name in layers)
    fp_params = sum(p.numel() for n, p in denoiser.named_parameters() if not n.startswith(prefixes))
    q_bytes = _quantized_layer_bytes(denoiser, folder) if layers else 0
    return q_bytes + 2 * fp_params, q_bytes


def _quantized_layer_bytes(denoiser: torch.nn.Module, folder: Path | None) -> int:
    if folder is not None:
        return checkpoint_info(folder)["quantized_bytes"]
    # An in-memory quantized model: measure what its checkpoint would hold.
    with tempfile.TemporaryDirectory() as tmp:
        return checkpoint_info(save_quantized(denoiser, Path(tmp) / "model"))["quantized_bytes"]


# -- the FP image cache ------------------------------------------------------------------------


def default_cache_dir() -> Path:
    root = os.environ.get("DIFFQUANT_CACHE_DIR") or Path.home() / ".cache" / "diffquant"
    return Path(root) / "eval"


def model_fingerprint(model: LatentDiffusionModel) -> str:
    """sha256 of everything that decides what the model generates: denoiser and VAE tensors as loaded
    (hashing the loaded tensors rather than files also covers in-memory models), scheduler config,
    conditioning and sampler settings."""
    digest = hashlib.sha256()
    for component in (model.denoiser, model.vae):
        for name, tensor in sorted(component.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    settings = {"scheduler": type(model.scheduler).__name__, "scheduler_config": dict(model.scheduler.config),
                "conditioning": repr(model.conditioning), "latent_shape": list(model.latent_shape),
                "guidance_scale": model.guidance_scale, "learned_sigma": model.learned_sigma,
                "num_classes": model.num_classes}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()


@dataclass
class FPImageCache:
    """FP images of (model fingerprint, samples, steps, seed, batch size, torch version), as safetensors
    written atomically. A file whose recorded key differs or that cannot be read is regenerated."""

    folder: Path

    def key(self, model: LatentDiffusionModel, settings: EvalSettings, steps: int) -> str:
        parts = {"version": CACHE_VERSION, "model": model_fingerprint(model), "samples": settings.samples,
                 "steps": steps, "seed": settings.seed, "batch_size": settings.batch_size,
                 "torch": torch.__version__}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()

    def path(self, name: str, key: str) -> Path:
        return self.folder / f"{name}-{key[:20]}.safetensors"

    def load(self, name: str, key: str) -> tuple[torch.Tensor, float] | None:
        path = self.path(name, key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("key") != key:
                    return None
                return f.get_tensor("images"), float(meta["wall_time_s"])
        except (SafetensorError, OSError, KeyError, ValueError):
            return None

    def save(self, name: str, key: str, images: torch.Tensor, wall_time_s: float) -> None:
        with atomic_file(self.path(name, key)) as tmp:
            save_file({"images": images.contiguous()}, str(tmp), metadata={"key": key, "wall_time_s": repr(wall_time_s)})


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


@dataclass
class Evaluation:
    """The metrics and the two image sets they were computed from (same labels, same noise)."""

    result: dict[str, Any]
    target: EvalTarget
    labels: torch.Tensor
    fp_images: torch.Tensor
    images: torch.Tensor


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
        "weight_bytes": total_bytes, "quantized_layer_bytes": q_bytes,
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


# -- output ---------------------------------------------------------------------------------------


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write JSON to a temporary file beside `path`, then rename (readers never see a partial file).

    Non-finite floats (NaN from a model whose images blew up) are written as null: JSON has no NaN,
    and one broken recipe must not lose a whole report.
    """
    return atomic.write_json_atomic(path, _finite_or_null(obj), allow_nan=False)


def _finite_or_null(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite_or_null(v) for v in obj]
    return obj


SUMMARY_KEYS: tuple[tuple[str, str], ...] = (
    ("fid", "{:.3f}"), ("fp_fid", "{:.3f}"), ("class_accuracy", "{:.4f}"), ("fp_class_accuracy", "{:.4f}"),
    ("psnr_vs_fp", "{:.2f} dB"), ("ssim_vs_fp", "{:.4f}"), ("feature_distance_vs_fp", "{:.4f}"),
    ("eps_sqnr_db", "{:.2f} dB"), ("wall_time_s", "{:.1f} s"), ("fp_wall_time_s", "{:.1f} s"),
    ("weight_bytes", "{:,}"),
)


def _format(value: Any, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def format_result(result: dict[str, Any]) -> str:
    attention = f"; attention {result['attention_quantized']}" if result.get("attention_quantized") else ""
    head = (f"{result['model']} {result['recipe']} ({result['bits']}{attention}): {result['samples']} samples, "
            f"{result['steps']} steps, seed {result['seed']}")
    lines = [head] + [f"  {key:<24}{_format(result[key], fmt)}" for key, fmt in SUMMARY_KEYS]
    lines.append(f"  FID: {result['fid_method']}")
    return "\n".join(lines)


def save_grid(path: str | Path, evaluation: Evaluation) -> Path:
    """PNG grid: FP row over the target's row, the first sample of each class per column, labelled."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    columns = _first_of_each_class(evaluation.labels)
    names = evaluation.target.reference.extra.get("class_names")
    result = evaluation.result
    rows = (("FP", evaluation.fp_images), (f"{result['recipe']}\n{result['bits']}", evaluation.images))
    fig, axes = plt.subplots(2, len(columns), figsize=(0.9 * len(columns) + 0.6, 2.3), squeeze=False)
    for r, (row_label, images) in enumerate(rows):
        for c, (label, index) in enumerate(columns):
            ax = axes[r][c]
            ax.imshow(_to_display(images[index]), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(names[label] if names else f"class {label}", fontsize=6)
            if c == 0:
                ax.set_ylabel(row_label, fontsize=7)
    fig.suptitle(f"{result['model']}: FP vs {result['recipe']} (seed {result['seed']}, {result['steps']} steps)",
                 fontsize=8)
    fig.tight_layout()
    return save_figure(fig, Path(path))


def save_figure(fig: Any, path: Path, dpi: int = 100) -> Path:
    """A matplotlib figure saved atomically (and closed)."""
    import matplotlib.pyplot as plt

    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    return path


def _first_of_each_class(labels: torch.Tensor) -> list[tuple[int, int]]:
    """(class, index of its first sample), by class."""
    first: dict[int, int] = {}
    for index, label in enumerate(labels.tolist()):
        first.setdefault(label, index)
    return sorted(first.items())


def _to_display(image: torch.Tensor) -> Any:
    """[C, H, W] in [-1, 1] -> an HxW or HxWxC array in [0, 1] for imshow."""
    x = ((image.float() + 1) / 2).clamp(0, 1)
    return x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy()
