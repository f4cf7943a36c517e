"""The full-precision images of an evaluation, cached on disk under a key of everything that decides
them, so that evaluating many recipes generates FP once."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from diffquant.atomic import atomic_file
from diffquant.eval.evaluation import EvalSettings
from diffquant.zoo.model import LatentDiffusionModel

CACHE_VERSION = 1  # bump when the cached content or generation protocol changes


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
