"""Teacher-forced layer comparisons: each layer of a model run on the inputs another model's same-named
layer saw. What "computes the same" means for a low-bit model: whole-model outputs at 4-bit activations are
chaotic on the tiny random models (a last-bit difference of a float sum flips a code, and the flips cascade,
by how much depends on the CPU's float kernels), while each layer on the same input differs only by the
order of its float rounding."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


def layer_io(model: nn.Module, names: Iterable[str], run: Callable[[], Any]) -> tuple[Any, dict[str, tuple]]:
    """(what run() returned, {name: (first positional input, output)} of the named submodules during it, the
    last call of each)."""
    captured: dict[str, tuple] = {}
    hooks = [model.get_submodule(name).register_forward_hook(
        lambda _m, args, out, n=name: captured.__setitem__(n, (args[0], out))) for name in names]
    try:
        result = run()
    finally:
        for hook in hooks:
            hook.remove()
    return result, captured


@torch.no_grad()
def worst_layer_rel(model: nn.Module, captured: dict[str, tuple]) -> float:
    """The largest max |y - y_ref| / max |y_ref| of model's layers on the captured inputs."""
    worst = 0.0
    for name, (x, expected) in captured.items():
        got = model.get_submodule(name)(x)
        worst = max(worst, float((got - expected).abs().max() / expected.abs().max()))
    return worst
