"""End-to-end jobs behind the CLI: load a folder, quantize (calibrating if needed), save."""

from __future__ import annotations

from pathlib import Path

from diffquant import zoo
from diffquant.api import quantize
from diffquant.atomic import check_target
from diffquant.calib.pipeline import pipeline_calibration
from diffquant.checkpoint import is_diffquant_folder, save_quantized
from diffquant.configs import check_count
from diffquant.folders import read_json
from diffquant.integrations.diffusers_io import (
    denoiser_of,
    is_pipeline_folder,
    load_model_folder,
    load_pipeline_folder,
)
from diffquant.recipes.config import Recipe
from diffquant.recipes.presets import resolve_recipe
from diffquant.zoo.model import PROVENANCE

ZOO_MARKER = "diffquant_zoo.json"  # in a quantized zoo folder: which zoo model it came from


def quantize_folder(
    source: str | Path,
    recipe: str | Path,
    out: str | Path,
    overwrite: bool = False,
    calib_samples: int | None = None,
    calib_steps: int | None = None,
    seed: int | None = None,
) -> Path:
    """Quantize a zoo model, a diffusers model folder or a pipeline folder and write the quantized folder to `out`.

    A pipeline's denoiser is quantized; the other components are written unchanged. Recipes that need
    calibration run the full-precision pipeline; a bare model folder has no sampler to run.
    """
    out = Path(out)
    check_target(out, overwrite, is_diffquant_folder)  # before hours of work, not after
    check_count("calib-samples", calib_samples, optional=True)
    check_count("calib-steps", calib_steps, optional=True)
    recipe_obj = resolve_recipe(recipe)  # fail on a bad recipe before loading anything
    if zoo.is_zoo_name(str(source)):
        return quantize_zoo_model(str(source), recipe_obj, out, overwrite,
                                  64 if calib_samples is None else calib_samples, calib_steps,
                                  1234 if seed is None else seed)
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"model folder {source} does not exist")
    if is_pipeline_folder(source):
        pipe = load_pipeline_folder(source)
        _, model = denoiser_of(pipe)
        calibration = pipeline_calibration(pipe, 8 if calib_samples is None else calib_samples,
                                           20 if calib_steps is None else calib_steps, seed=seed or 0)
        quantize(model, recipe_obj, calibration=calibration)
        return save_quantized(pipe, out, overwrite=overwrite, source=source)
    if recipe_obj.needs_calibration:
        raise ValueError(
            f"recipe {recipe_obj.name!r} needs calibration, which runs a sampler: give a pipeline folder "
            "(model_index.json) instead of a bare model folder, or use the Python API with your own sampler"
        )
    model = load_model_folder(source)
    quantize(model, recipe_obj)
    return save_quantized(model, out, overwrite=overwrite)


def quantize_zoo_model(
    name: str,
    recipe: Recipe,
    out: Path,
    overwrite: bool = False,
    calib_samples: int = 64,
    calib_steps: int | None = None,
    seed: int = 1234,
) -> Path:
    """Quantize a zoo model's denoiser, calibrating with the model's own sampler when needed."""
    model = zoo.load(name)
    calibration = None
    if recipe.needs_calibration:
        calibration = model.calibration(calib_samples, calib_steps, seed=seed)
    training = None
    if recipe.needs_training_data:
        from diffquant.zoo.training import diffusion_objective

        training = diffusion_objective(model)
    quantize(model.denoiser, recipe, calibration=calibration, training=training)
    # What was done to the shipped weights at load (a variant's outlier profile) travels with the folder.
    marker = {"zoo": name, **model.extra.get(PROVENANCE, {})}
    return save_quantized(model.pipe, out, overwrite=overwrite, extra_json={ZOO_MARKER: marker},
                          source=zoo.get(name).folder)


def zoo_name_of(folder: str | Path) -> str | None:
    """The zoo model a quantized folder was made from, if any."""
    marker = Path(folder) / ZOO_MARKER
    if not marker.is_file():
        return None
    data = read_json(marker, ValueError)
    if not isinstance(data, dict) or not isinstance(data.get("zoo"), str):
        raise ValueError(f"{marker} does not name a zoo model ({{\"zoo\": NAME}})")
    return data["zoo"]
