"""Load users' diffusers model folders and pipeline folders (lazy diffusers import).

Only safetensors weights and allow-listed classes: a folder with pickled weights or Python files is
refused before diffusers sees it (diffusers would unpickle .bin files and import a component's .py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffquant.folders import read_json, read_pipeline_index, refuse_code_and_pickles, resolve_model_class
from diffquant.manifest import DENOISER_COMPONENTS, PIPELINE_INDEX


def is_pipeline_folder(path: Path) -> bool:
    return (path / PIPELINE_INDEX).is_file()


def load_model_folder(path: Path) -> Any:
    """A diffusers model from a folder with config.json (+ weights), class from `_class_name`."""
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has neither model_index.json (a pipeline) nor config.json (a model)")
    config = read_json(config_file, ValueError)
    cls = resolve_model_class(config.get("_class_name") if isinstance(config, dict) else None)
    refuse_code_and_pickles(path)
    return cls.from_pretrained(path, use_safetensors=True)


def load_pipeline_folder(path: Path) -> Any:
    from diffusers import DiffusionPipeline

    read_pipeline_index(path)
    refuse_code_and_pickles(path)
    return DiffusionPipeline.from_pretrained(path, use_safetensors=True)


def denoiser_of(pipe: Any) -> tuple[str, Any]:
    for name in DENOISER_COMPONENTS:
        component = getattr(pipe, name, None)
        if component is not None:
            return name, component
    raise ValueError(f"{type(pipe).__name__} has neither a transformer nor a unet component")
