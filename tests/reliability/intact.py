"""Helpers for refused inputs: a model that quantize refused must be exactly the model it was given.

    with left_intact(model, run), pytest.raises(...):   # weights, module types, hooks, output (bits)
        diffquant.quantize(model, ...)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

import diffquant
from diffquant.api import STATE_ATTR
from tests.tiny_models import TINY_MODELS

DIT, UNET = TINY_MODELS["dit"], TINY_MODELS["unet2d"]


def run_dit(model):
    with torch.no_grad(), diffquant.sampling_step(0):
        return DIT.run(model, DIT.inputs(2))


def run_unet(model):
    with torch.no_grad(), diffquant.sampling_step(0):
        return UNET.run(model, UNET.inputs(2))


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes: equal exactly when the tensors are bitwise equal (NaN payloads included)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def _hooks(model: nn.Module) -> dict[str, int]:
    return {n: len(m._forward_hooks) + len(m._forward_pre_hooks) for n, m in model.named_modules()}


@dataclass
class Snapshot:
    state: dict[str, torch.Tensor]
    types: dict[str, type]
    hooks: dict[str, int]
    output: torch.Tensor

    @classmethod
    def of(cls, model: nn.Module, run: Callable[[nn.Module], torch.Tensor]) -> Snapshot:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return cls(state, {n: type(m) for n, m in model.named_modules()}, _hooks(model), run(model))

    def assert_intact(self, model: nn.Module, run: Callable[[nn.Module], torch.Tensor]) -> None:
        """Same modules, same tensors bit for bit, same hooks, not marked quantized, same output."""
        assert getattr(model, STATE_ATTR, None) is None, "the refused model is marked quantized"
        assert not diffquant.quantized_layers(model), "the refused model kept quantized layers"
        assert {n: type(m) for n, m in model.named_modules()} == self.types
        assert _hooks(model) == self.hooks
        state = model.state_dict()
        assert state.keys() == self.state.keys()
        changed = [k for k, v in state.items() if not bitwise_equal(v, self.state[k])]
        assert not changed, f"tensors changed by a refused quantize: {changed[:5]}"
        assert bitwise_equal(run(model), self.output)


@contextlib.contextmanager
def left_intact(model: nn.Module, run: Callable[[nn.Module], torch.Tensor]) -> Iterator[None]:
    """Snapshot `model` (and its output under `run`) and assert the block left it exactly so."""
    before = Snapshot.of(model, run)
    yield
    before.assert_intact(model, run)
