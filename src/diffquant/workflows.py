"""End-to-end jobs behind the CLI: load a folder, quantize (calibrating if needed), save."""

from __future__ import annotations

from pathlib import Path

from diffquant.api import quantize
from diffquant.calib.pipeline import pipeline_calibration
from diffquant.checkpoint import save_quantized
from diffquant.integrations.diffusers_io import (
    denoiser_of,
    is_pipeline_folder,
    load_model_folder,
    load_pipeline_folder,
)
from diffquant.recipes.presets import resolve_recipe


def quantize_folder(
    source: str | Path,
    recipe: str | Path,
    out: str | Path,
    overwrite: bool = False,
    calib_samples: int = 8,
    calib_steps: int = 20,
    seed: int = 0,
) -> Path:
    """Quantize a diffusers model folder or pipeline folder and write the quantized folder to `out`.

    A pipeline's denoiser is quantized; the other components are written unchanged. Recipes that need
    calibration run the full-precision pipeline; a bare model folder has no sampler to run.
    """
    source, out = Path(source), Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    recipe_obj = resolve_recipe(recipe)  # fail on a bad recipe before loading anything
    if not source.exists():
        raise FileNotFoundError(f"model folder {source} does not exist")
    if is_pipeline_folder(source):
        pipe = load_pipeline_folder(source)
        _, model = denoiser_of(pipe)
        calibration = pipeline_calibration(pipe, calib_samples, calib_steps, seed=seed)
        quantize(model, recipe_obj, calibration=calibration)
        return save_quantized(pipe, out, overwrite=overwrite)
    if recipe_obj.needs_calibration:
        raise ValueError(
            f"recipe {recipe_obj.name!r} needs calibration, which runs a sampler: give a pipeline folder "
            "(model_index.json) instead of a bare model folder, or use the Python API with your own sampler"
        )
    model = load_model_folder(source)
    quantize(model, recipe_obj)
    return save_quantized(model, out, overwrite=overwrite)
