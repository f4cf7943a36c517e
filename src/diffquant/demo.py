"""`diffquant demo`: the main job — quantize the shipped default zoo model and evaluate it.

For each recipe it writes a quantized pipeline folder (`diffquant quantize ZOO_NAME`), evaluates it
against the full-precision model from the same noise (`diffquant eval`: FID, class accuracy,
PSNR/SSIM vs FP, eps SQNR, bytes) and writes the metrics JSON and an FP-over-quantized sample grid
next to the folder. It ends with one table, then times generation of the frozen (packed-kernel) models
against FP side by side on this machine (eval/speed.py; `<model>-speed.json`) and says for each recipe
whether it is smaller and faster, or why not. The defaults take about two and a half minutes on 2 CPU
cores; `--samples 1000` gives the figures of the quality report (`benchmarks/quality/`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffquant.configs import check_count

DEFAULT_MODEL = "fmnist-dit"
DEFAULT_RECIPES = ("w8a8", "w4a4")


@dataclass(frozen=True)
class DemoConfig:
    model: str = DEFAULT_MODEL
    recipes: tuple[str, ...] = DEFAULT_RECIPES
    samples: int = 200
    steps: int | None = None  # the model's own sampler
    out: Path = field(default_factory=lambda: Path("runs") / "demo")
    progress: bool = True
    speed_samples: int = 64  # samples per timed generation (0: no speed measurement)

    def __post_init__(self) -> None:
        if not self.recipes:
            raise ValueError("the demo needs at least one recipe")
        check_count("samples", self.samples)
        check_count("steps", self.steps, optional=True)
        check_count("speed_samples", self.speed_samples, minimum=0)


def demo_paths(config: DemoConfig, recipe: str) -> tuple[Path, Path, Path]:
    """(quantized folder, metrics JSON, grid PNG) of one recipe."""
    stem = config.out / f"{config.model}-{recipe}"
    return stem, stem.with_suffix(".json"), stem.with_suffix(".png")


def run_demo(config: DemoConfig) -> list[dict[str, Any]]:
    """Quantize and evaluate `config.model` with each recipe; returns the `diffquant eval` results."""
    from diffquant.eval.runner import evaluate
    from diffquant.recipes.presets import resolve_recipe
    from diffquant.workflows import quantize_zoo_model

    results = []
    for name in config.recipes:
        folder, metrics, grid = demo_paths(config, name)
        if config.progress:
            print(f"[{config.model} / {name}] quantizing -> {folder}", flush=True)
        quantize_zoo_model(config.model, resolve_recipe(name), folder, overwrite=True)
        if config.progress:
            print(f"[{config.model} / {name}] evaluating {config.samples} samples", flush=True)
        results.append(evaluate(folder, config.samples, config.steps, json_path=metrics, grid_path=grid,
                                progress=config.progress))
    return results


def run_speed(config: DemoConfig) -> Any:
    """Frozen generation time of the demo's folders against FP (eval/speed.py), written to
    `<model>-speed.json`; None when `speed_samples` is 0."""
    from diffquant.eval.output import write_json_atomic
    from diffquant.eval.speed import time_frozen_against_fp

    if config.speed_samples <= 0:
        return None
    if config.progress:
        print(f"[{config.model}] timing frozen models against FP ({config.speed_samples} samples)", flush=True)
    report = time_frozen_against_fp([demo_paths(config, name)[0] for name in config.recipes], config.speed_samples,
                                    config.steps)
    write_json_atomic(config.out / f"{config.model}-speed.json", report.to_dict())
    return report


def format_demo(results: Sequence[dict[str, Any]]) -> str:
    """The quality report's table for these rows, with the FP row rebuilt from their FP references."""
    from diffquant.eval.report import markdown_table
    from diffquant.eval.targets import FP_RECIPE

    if not results:
        return "no recipes run"
    first = results[0]
    fp_row = {"model": first["model"], "recipe": FP_RECIPE, "bits": "W16A16", "fid": first["fp_fid"],
              "class_accuracy": first["fp_class_accuracy"], "wall_time_s": first.get("fp_wall_time_s"),
              "samples": first["samples"], "steps": first["steps"]}
    return markdown_table([fp_row, *results])
