"""UNet decoder skip concatenations: which layers read cat([hidden, skip], dim=1), and where the skip
begins (Q-Diffusion's shortcut splitting, METHODS.md §12).

A UNet's up blocks (diffusers: every block whose forward takes `res_hidden_states_tuple`, e.g.
UpBlock2D, CrossAttnUpBlock2D, AttnUpBlock2D) feed each resnet the decoder features concatenated
along the channels with a skip from the encoder, whose ranges differ a lot. Inside such a resnet the
layers reading that concatenation (diffusers' ResnetBlock2D: conv1, after the channel-wise norm1 and
SiLU, and the 1x1 conv_shortcut on the raw input) can quantize the two halves with separate ranges.

Detection watches a forward pass instead of re-deriving channel counts from a config:

  * a pre-hook on each up block notes the skip tensors it is given (consumed last-first);
  * a pre-hook on each of its `resnets` finds the pending skip tensor that its input ends with
    (same batch and spatial size, and the input's last channels equal to it, value for value):
    the split is input channels - skip channels;
  * a pre-hook on every Linear / Conv2d inside that resnet records the split for the layers whose
    input has the resnet input's shape (the concatenation itself, or channel-wise functions of it).

So a model without such blocks (a DiT, a VAE encoder) yields nothing, and a block that concatenates
differently, or not at all, is not mistaken for one. Blocks that change the skip tensor before the
concatenation (FreeU) are not detected (logged).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Iterator

import torch
from torch import nn

from diffquant.arch.base import QUANTIZABLE_TYPES

log = logging.getLogger("diffquant.arch.skips")

SKIP_ARGUMENT = "res_hidden_states_tuple"


def up_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """Modules whose forward takes the encoder's skip tensors (`res_hidden_states_tuple`) and that hold
    `resnets`, by path."""
    found = {}
    for name, module in model.named_modules():
        if not isinstance(getattr(module, "resnets", None), nn.ModuleList):
            continue
        try:
            parameters = inspect.signature(module.forward).parameters
        except (TypeError, ValueError):
            continue
        if SKIP_ARGUMENT in parameters:
            found[name] = module
    return found


def _argument(args: tuple, kwargs: dict, position: int, names: tuple[str, ...]):
    for name in names:
        if name in kwargs:
            return kwargs[name]
    return args[position] if len(args) > position else None


class SkipObserver:
    """Hook state of one observation (module docstring). `splits`: layer path -> split channel."""

    def __init__(self) -> None:
        self.splits: dict[str, int] = {}
        self.conflicting: set[str] = set()
        self.unmatched: set[str] = set()  # up blocks some of whose skip tensors no resnet read
        self._pending: list[torch.Tensor] = []
        self._active: tuple[torch.Size, int] | None = None

    def block_entered(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        skips = _argument(args, kwargs, 1, (SKIP_ARGUMENT,))
        if isinstance(skips, torch.Tensor):
            skips = (skips,)
        self._pending = [t for t in reversed(tuple(skips or ())) if isinstance(t, torch.Tensor)]

    def block_left(self, name: str) -> Callable:
        def hook(*_) -> None:
            if self._pending:
                self.unmatched.add(name)
            self._pending, self._active = [], None

        return hook

    def resnet_entered(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = _argument(args, kwargs, 0, ("input_tensor", "hidden_states"))
        self._active = None
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            return
        for i, skip in enumerate(self._pending):
            if self._is_tail(x, skip):
                self._active = (x.shape, x.shape[1] - skip.shape[1])
                del self._pending[i]
                return

    @staticmethod
    def _is_tail(x: torch.Tensor, skip: torch.Tensor) -> bool:
        channels = skip.shape[1] if skip.dim() == x.dim() else 0
        if not 0 < channels < x.shape[1] or skip.shape[0] != x.shape[0] or skip.shape[2:] != x.shape[2:]:
            return False
        return bool(torch.equal(x[:, x.shape[1] - channels:], skip))

    def resnet_left(self, *_) -> None:
        self._active = None

    def layer_hook(self, name: str) -> Callable:
        def hook(_module: nn.Module, args: tuple) -> None:
            if self._active is None or not args or not isinstance(args[0], torch.Tensor):
                return
            shape, split = self._active
            if args[0].shape != shape or name in self.conflicting:
                return
            if self.splits.setdefault(name, split) != split:
                self.conflicting.add(name)
                del self.splits[name]

        return hook


@contextlib.contextmanager
def observe_skip_concats(model: nn.Module) -> Iterator[dict[str, int]]:
    """Inside, forward passes of `model` record into the yielded dict the layers (paths of Linear /
    Conv2d modules) whose input is a skip concatenation, with the channel where the skip begins."""
    observer = SkipObserver()
    handles = []
    for block_name, block in up_blocks(model).items():
        handles.append(block.register_forward_pre_hook(observer.block_entered, with_kwargs=True))
        handles.append(block.register_forward_hook(observer.block_left(block_name), always_call=True))
        for resnet_index, resnet in enumerate(block.resnets):
            handles.append(resnet.register_forward_pre_hook(observer.resnet_entered, with_kwargs=True))
            handles.append(resnet.register_forward_hook(observer.resnet_left, always_call=True))
            for layer_name, layer in resnet.named_modules():
                if type(layer) in QUANTIZABLE_TYPES:
                    path = f"{block_name}.resnets.{resnet_index}.{layer_name}".lstrip(".")
                    handles.append(layer.register_forward_pre_hook(observer.layer_hook(path)))
    try:
        yield observer.splits
    finally:
        for handle in handles:
            handle.remove()
        if observer.conflicting:
            log.warning("skip concatenations: %d layers saw different splits in different calls and are not split: "
                        "%s", len(observer.conflicting), sorted(observer.conflicting)[:3])
        if observer.unmatched:
            log.info("skip concatenations: up blocks %s passed skip tensors that no resnet input ended with "
                     "(e.g. changed by FreeU before the concatenation)", sorted(observer.unmatched)[:3])


def skip_concat_splits(model: nn.Module, run: Callable[[], object]) -> dict[str, int]:
    """Run `run()` (a forward pass or a sampler over `model`) and return {layer path: split channel}
    for the layers that read a skip concatenation (module docstring); {} for models without any."""
    with torch.no_grad(), observe_skip_concats(model) as splits:
        run()
    return dict(splits)
