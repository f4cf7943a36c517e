"""`diffquant selfcheck`: quantize a small DiT built from a config with every preset and report.

A self-contained check that runs on any machine in seconds: it builds a seeded DiT, calibrates on a
short denoising trajectory, quantizes with each post-training preset recipe (with --all also those
whose stages optimise: minutes), measures the denoiser output against
full precision (SQNR), saves, reloads and checks the reload is bitwise identical. Random weights
have no real activation outliers, so these numbers say the machinery works, not how good a method
is: the zoo models and `diffquant eval` measure that.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from diffquant.api import quantize
from diffquant.calib.steps import sampling_step
from diffquant.checkpoint import load_quantized, save_quantized
from diffquant.formats.ops import sqnr_db
from diffquant.info import checkpoint_info
from diffquant.recipes.config import RecipeError
from diffquant.recipes.presets import list_presets

CHECK_DIT_CONFIG = dict(
    num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=4,
    sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=32,
)
CHECK_STEPS = 8


@dataclass(frozen=True)
class CheckRow:
    recipe: str
    bits: str
    sqnr_db: float
    weight_bytes_ratio: float
    reload_bitwise: bool
    seconds: float  # quantize, run, save and reload


def check_model() -> torch.nn.Module:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(**CHECK_DIT_CONFIG).eval()


def check_inputs(step: int, batch: int = 8) -> dict:
    g = torch.Generator().manual_seed(step)
    t = torch.full((batch,), 999 - step * (1000 // CHECK_STEPS))
    return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g), timestep=t,
                class_labels=torch.randint(0, 10, (batch,), generator=g))


def run_trajectory(model: torch.nn.Module) -> torch.Tensor:
    outputs = []
    with torch.no_grad():
        for step in range(CHECK_STEPS):
            with sampling_step(step, CHECK_STEPS):
                outputs.append(model(**check_inputs(step), return_dict=False)[0])
    return torch.cat(outputs)


def selected_presets(names: list[str] | None, everything: bool = False) -> dict:
    """The presets named; with none named, the post-training ones (seconds), or with `everything` also
    those whose stages optimise (minutes: StageConfig.optimizes). An unknown name is a RecipeError, not
    a row left out of the table."""
    presets = list_presets()
    unknown = [name for name in names or () if name not in presets]
    if unknown:
        raise RecipeError(f"unknown recipe preset{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}; "
                          f"available: {', '.join(presets)}")
    if names:
        return {name: recipe for name, recipe in presets.items() if name in names}
    return {name: recipe for name, recipe in presets.items() if everything or not recipe.optimizes}


def run_selfcheck(recipes: list[str] | None = None, workdir: Path | None = None,
                  everything: bool = False) -> list[CheckRow]:
    presets = selected_presets(recipes, everything)  # before the model is built: a typo fails at once
    reference_model = check_model()
    reference = run_trajectory(reference_model)
    rows = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for name, recipe in presets.items():
            start = time.perf_counter()
            model = quantize(copy.deepcopy(reference_model), recipe, calibration=run_trajectory, progress=False)
            out = run_trajectory(model)
            folder = save_quantized(model, Path(tmp) / name)
            reloaded = run_trajectory(load_quantized(folder))
            info = checkpoint_info(folder)
            rows.append(CheckRow(name, recipe.label, sqnr_db(reference, out),
                                 info["quantized_bytes"] / info["quantized_bytes_16bit"], torch.equal(out, reloaded),
                                 time.perf_counter() - start))
    return rows


def format_rows(rows: list[CheckRow]) -> str:
    lines = [f"{'recipe':<20}{'bits':<7}{'SQNR vs FP (dB)':>16}{'bytes vs 16-bit':>17}{'reload bitwise':>16}"
             f"{'seconds':>9}"]
    for r in rows:
        lines.append(f"{r.recipe:<20}{r.bits:<7}{r.sqnr_db:>16.2f}{r.weight_bytes_ratio:>17.3f}{str(r.reload_bitwise):>16}"
                     f"{r.seconds:>9.1f}")
    return "\n".join(lines)
