"""Load users' diffusers model folders and pipeline folders (lazy diffusers import)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffquant.checkpoint import DENOISER_COMPONENTS, PIPELINE_INDEX


def is_pipeline_folder(path: Path) -> bool:
    return (path / PIPELINE_INDEX).is_file()


def load_model_folder(path: Path) -> Any:
    """A diffusers model from a folder with config.json (+ weights), class from `_class_name`."""
    import diffusers

    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has neither model_index.json (a pipeline) nor config.json (a model)")
    class_name = json.loads(config_file.read_text()).get("_class_name")
    cls = getattr(diffusers, class_name or "", None)
    if cls is None:
        raise ValueError(f"{config_file}: _class_name {class_name!r} is not a diffusers model class")
    return cls.from_pretrained(path)


def load_pipeline_folder(path: Path) -> Any:
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(path)


def denoiser_of(pipe: Any) -> tuple[str, Any]:
    for name in DENOISER_COMPONENTS:
        component = getattr(pipe, name, None)
        if component is not None:
            return name, component
    raise ValueError(f"{type(pipe).__name__} has neither a transformer nor a unet component")
