"""Resolving what to evaluate (a LatentDiffusionModel, a zoo name, a quantized folder: an ordered
registry of kinds) and what it is: recipe, bits and weight bytes."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffquant import zoo
from diffquant.api import STATE_ATTR, quantized_layers
from diffquant.checkpoint import is_quantized_folder, save_quantized
from diffquant.eval.evaluation import EvalTarget
from diffquant.info import checkpoint_info, stage_scalars
from diffquant.zoo.model import LatentDiffusionModel

FP_RECIPE, FP_BITS = "fp", "W16A16"


@dataclass(frozen=True)
class TargetKind:
    name: str
    accepts: Callable[[Any], bool]
    resolve: Callable[[Any, LatentDiffusionModel | None], EvalTarget]


def _resolve_model(target: LatentDiffusionModel, reference: LatentDiffusionModel | None) -> EvalTarget:
    if reference is None and recipe_of(target.denoiser) is not None:
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


def recipe_of(denoiser: torch.nn.Module) -> Any:
    state = getattr(denoiser, STATE_ATTR, None)
    return None if state is None else state.recipe


def recipe_and_bits(denoiser: torch.nn.Module) -> tuple[str, str]:
    recipe = recipe_of(denoiser)
    return (FP_RECIPE, FP_BITS) if recipe is None else (recipe.name, recipe.label)


def stage_figures(denoiser: torch.nn.Module) -> list[dict[str, Any]]:
    """What each stage of the denoiser's recipe reported, scalars only ([] for a full-precision model)."""
    state = getattr(denoiser, STATE_ATTR, None)
    return [] if state is None else stage_scalars(state.stage_reports)


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
