"""The data block reconstruction works on: recorded denoiser calls, blocks found from module paths,
and one block's inputs / outputs cached from a full-precision and a quantized pass.

Block inputs are whatever the parent module passes (args and kwargs, nested tuples / lists / dicts).
Calls are merged along the batch axis into `Rows`: a leaf is batched when it is a tensor whose first
axis is the call's row count (that of its first tensor with a batch axis); any other leaf (rotary
embeddings, flags, None) must be the same in every merged call and is shared by all rows.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from diffquant.calib.steps import current_step, sampling_step
from diffquant.nn.layers import quantization_enabled

# Module paths (full match) that form one block. The outermost match wins, so a UNet's
# Transformer2DModel (`attentions.N`) is one block together with its inner transformer_blocks.
BLOCK_PATTERNS = (
    r"(down_blocks|up_blocks)\.\d+\.(resnets|attentions)\.\d+",
    r"mid_block\.(resnets|attentions)\.\d+",
    r"(transformer_blocks|single_transformer_blocks|blocks)\.\d+",
)


# -- nested inputs / outputs ----------------------------------------------------------------------


def flatten(tree: Any) -> list[Any]:
    """Leaves of nested tuples / lists / dicts (diffusers output dataclasses are dicts), in order."""
    if isinstance(tree, tuple | list):
        return [leaf for item in tree for leaf in flatten(item)]
    if isinstance(tree, dict):
        return [leaf for item in tree.values() for leaf in flatten(item)]
    return [tree]


def unflatten(tree: Any, leaves: Iterator[Any]) -> Any:
    """`tree`'s structure with its leaves taken from `leaves` (inverse of flatten)."""
    if isinstance(tree, list):
        return [unflatten(item, leaves) for item in tree]
    if isinstance(tree, tuple):  # a namedtuple comes back as a plain tuple
        return tuple(unflatten(item, leaves) for item in tree)
    if isinstance(tree, dict):
        return {k: unflatten(v, leaves) for k, v in tree.items()}
    return next(leaves)


def tree_map(tree: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    return unflatten(tree, iter([fn(x) if isinstance(x, torch.Tensor) else x for x in flatten(tree)]))


def first_float_tensor(output: Any) -> torch.Tensor:
    """The first floating-point tensor of a denoiser's output (its prediction, whatever the wrapping)."""
    for leaf in flatten(output):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return leaf
    raise TypeError(f"the denoiser returned no floating-point tensor ({type(output).__name__})")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape \
            and torch.equal(a, b)
    return a is b or a == b


@dataclass
class Rows:
    """Many calls' inputs (or outputs) merged along the batch axis: `template` keeps the structure,
    each leaf is a batched tensor [rows, ...] or a value every call shared (no batch axis)."""

    template: Any
    leaves: list[Any]
    batched: list[bool]
    count: int

    @classmethod
    def merge(cls, trees: list[Any]) -> Rows:
        calls = [flatten(t) for t in trees]
        rows = [_rows_of(leaves) for leaves in calls]
        if len({len(leaves) for leaves in calls}) != 1:
            raise ValueError("a block was called with differently structured inputs across calls")
        leaves, batched = [], []
        for values in zip(*calls, strict=True):
            is_batched = all(isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n
                             for v, n in zip(values, rows, strict=True))
            if not is_batched and not all(_same(v, values[0]) for v in values):
                raise ValueError("a block input without a batch axis changed between calls")
            leaves.append(torch.cat(values) if is_batched else values[0])
            batched.append(is_batched)
        template = unflatten(trees[0], iter([None] * len(calls[0])))  # structure only, no tensors
        return cls(template, leaves, batched, sum(rows))

    def take(self, index: torch.Tensor) -> list[Any]:
        return [leaf[index.to(leaf.device)] if batched else leaf
                for leaf, batched in zip(self.leaves, self.batched, strict=True)]

    def build(self, leaves: list[Any]) -> Any:
        return unflatten(self.template, iter(leaves))


def _rows_of(leaves: list[Any]) -> int:
    first = next((x for x in leaves if isinstance(x, torch.Tensor) and x.dim() > 0), None)
    if first is None:
        raise ValueError("a block call has no tensor with a batch axis")
    return first.shape[0]


# -- the calibration data -------------------------------------------------------------------------


@dataclass
class DenoiserCall:
    """One recorded denoiser call: its sampling step and its inputs (tensors on the CPU)."""

    step: int | None
    args: tuple
    kwargs: dict[str, Any]

    def run(self, model: nn.Module, device: torch.device) -> Any:
        to = lambda t: t.to(device)  # noqa: E731
        with sampling_step(self.step):
            return model(*tree_map(self.args, to), **tree_map(self.kwargs, to))


class _Stop(Exception):
    """Raised by a hook once a block's data is taken: the rest of the forward is not needed."""


def full_precision(switches: list[nn.Module]) -> contextlib.AbstractContextManager[None]:
    """Quantization off inside for `switches`: QuantizedLayers and attention operand quantizers
    (nn.attention.AttentionQuantizers), anything with a `quant_enabled` flag."""
    return quantization_enabled(switches, False)


def record_calls(model: nn.Module, calibration: Callable[[nn.Module], object], layers: list[nn.Module],
                 first_only: bool = False) -> list[DenoiserCall]:
    """Run the calibration function in full precision (`layers`: the quantized layers and attention
    operand quantizers to switch off) and keep every denoiser call's inputs (on the CPU); `first_only`:
    stop at the first call, without running it or the rest of the calibration."""
    calls: list[DenoiserCall] = []

    def pre(_module, args, kwargs):
        cpu = lambda t: t.detach().to("cpu", copy=True)  # noqa: E731
        calls.append(DenoiserCall(current_step(), tree_map(args, cpu), tree_map(kwargs, cpu)))
        if first_only:
            raise _Stop

    handle = model.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad(), full_precision(layers), contextlib.suppress(_Stop):
            calibration(model)
    finally:
        handle.remove()
    if not calls:
        raise ValueError("the calibration function never called the model")
    return calls


def block_io(model: nn.Module, block: nn.Module, calls: list[DenoiserCall], device: torch.device,
             outputs: bool) -> list[tuple[int | None, Any, Any]]:
    """(step, (args, kwargs), output or None) of the block's first run in every call."""
    records: list[tuple[int | None, Any, Any]] = []
    pending: list[Any] = []

    def pre(_module, args, kwargs):
        inputs = tree_map((args, kwargs), torch.Tensor.detach)
        if not outputs:
            records.append((current_step(), inputs, None))
            raise _Stop
        pending.append(inputs)

    def post(_module, _args, _kwargs, output):
        records.append((current_step(), pending.pop(), tree_map(output, torch.Tensor.detach)))
        raise _Stop

    handles = [block.register_forward_pre_hook(pre, with_kwargs=True)]
    if outputs:
        handles.append(block.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            for call in calls:
                with contextlib.suppress(_Stop):
                    call.run(model, device)
    finally:
        for handle in handles:
            handle.remove()
    return records


@dataclass
class BlockGroup:
    """Rows of a block's cached data that may share a batch (one sampling step, or all of them)."""

    step: int | None
    fp_in: Rows
    q_in: Rows
    fp_out: Rows


def group_records(fp: list, quantized: list, per_step: bool) -> list[BlockGroup]:
    """block_io records of the FP and quantized passes (same calls, same order) merged into groups:
    one per sampling step when `per_step`, else one for all rows."""
    if len(fp) != len(quantized) or any(a[0] != b[0] for a, b in zip(fp, quantized, strict=True)):
        raise RuntimeError("the full-precision and quantized passes ran the block differently")
    keys: dict[int | None, list[int]] = {}
    for i, (step, _, _) in enumerate(fp):
        keys.setdefault(step if per_step else None, []).append(i)
    return [BlockGroup(key, Rows.merge([fp[i][1] for i in idx]), Rows.merge([quantized[i][1] for i in idx]),
                       Rows.merge([fp[i][2] for i in idx])) for key, idx in keys.items()]


# -- blocks ---------------------------------------------------------------------------------------


def find_blocks(layer_names: list[str], patterns: tuple[str, ...] = BLOCK_PATTERNS) -> dict[str, list[str]]:
    """Block path -> its quantized layers; a layer inside no block is a block of its own."""
    compiled = [re.compile(p) for p in patterns]
    blocks: dict[str, list[str]] = {}
    for name in layer_names:
        parts = name.split(".")
        prefixes = (".".join(parts[:i]) for i in range(1, len(parts)))
        block = next((p for p in prefixes if any(c.fullmatch(p) for c in compiled)), name)
        blocks.setdefault(block, []).append(name)
    return blocks


def execution_order(model: nn.Module, blocks: list[str], call: DenoiserCall,
                    device: torch.device) -> list[str]:
    """The blocks in the order one denoiser call first runs them (blocks it never runs are left out)."""
    order: list[str] = []
    handles = [model.get_submodule(name).register_forward_pre_hook(
        lambda *_, name=name: order.append(name) if name not in order else None) for name in blocks]
    try:
        with torch.no_grad():
            call.run(model, device)
    finally:
        for handle in handles:
            handle.remove()
    return order
