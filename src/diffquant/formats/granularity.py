"""Granularities: which elements of a tensor share one range, as objects that code dispatches on.

A QuantSpec names its granularity by string (`granularity: "group"`, what recipes, manifests and cache
keys hold); `QuantSpec.grain` is the object here, and code asks it instead of comparing names. Tensors are
feature-axis-last; a weight is its [out, K] matrix.

    name      blocks of block_view          weights  activations           K segment (kernels)
    tensor    one: [1, numel]               yes      static or dynamic     whole K
    channel   one per row: [rows, C]        yes      static only           whole K (weights); none (inputs)
    token     one per row: [rows, C]        no       dynamic only          whole K
    group     group_size along C: [*, g]    yes      dynamic only          group_size

"channel" is one range per output channel for a weight, but per *input* channel for an activation: such a
scale changes at every k, so those inputs cannot feed the integer GEMM (`integer_activations`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffquant.formats.base import SpecError


def group_view(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """[..., C] -> [..., ceil(C/g), g], zero-padding a ragged last group.

    Zero padding is harmless: symmetric ranges ignore zeros and affine ranges always include 0.
    """
    channels = x.shape[-1]
    pad = (-channels) % group_size
    if pad:
        x = F.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)


@dataclass(frozen=True)
class Granularity:
    """One granularity (module table). Subclasses give the block layout; the fields say where it applies.

    for_weights: a weight may use it. static_activation / dynamic_activation: an activation may use it
    with a calibrated / a run-time range; `activation_rule` says why when it may not.
    ranges_per_row: a dynamic activation range per row (and per group within it), not one per tensor.
    integer_activations: inputs with these ranges can feed the integer GEMM (a scale constant along K
    within a segment). splittable: a static range of it can be split in two at a channel (shortcut
    splitting, nn/quantizers.py).
    """

    name: str
    for_weights: bool
    static_activation: bool
    dynamic_activation: bool
    activation_rule: str = ""
    ranges_per_row: bool = False
    integer_activations: bool = True
    splittable: bool = False
    takes_group_size: bool = False

    def view(self, x: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
        """x (feature axis last) as [blocks, block_len]: each row shares one range."""
        return x.reshape(-1, x.shape[-1])

    def unview(self, xb: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Inverse of view for a tensor of the original `shape`."""
        return xb.reshape(shape)

    def segment(self, group_size: int | None) -> int | None:
        """Inputs along K that share one scale; None: the whole K axis."""
        return None

    def static_range(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel calibrated (min, max) [C] -> the ranges a static activation quantizer holds."""
        return lo, hi

    def column_blocks(self, columns: torch.Tensor) -> torch.Tensor:
        """A weight's columns [N, g] of one K segment as blocks: one per output row (GPTQ's groups)."""
        return columns

    def by_output(self, blocks: torch.Tensor, out_features: int) -> torch.Tensor:
        """Weight qparams [blocks, 1] (view order) -> [K groups, N], as the packed GEMM reads them."""
        return blocks.reshape(out_features, -1).t().contiguous()

    def from_output(self, groups: torch.Tensor) -> torch.Tensor:
        """Inverse of by_output."""
        return groups.t().reshape(-1, 1)

    def check_activation(self, dynamic: bool) -> None:
        if not (self.dynamic_activation if dynamic else self.static_activation):
            raise SpecError(self.activation_rule)


@dataclass(frozen=True)
class PerTensor(Granularity):
    """One range for the whole tensor."""

    def view(self, x: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
        return x.reshape(1, -1)

    def static_range(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return lo.amin().reshape(1), hi.amax().reshape(1)

    def column_blocks(self, columns: torch.Tensor) -> torch.Tensor:
        return columns.reshape(1, -1)

    def by_output(self, blocks: torch.Tensor, out_features: int) -> torch.Tensor:
        return blocks.reshape(1, 1)

    def from_output(self, groups: torch.Tensor) -> torch.Tensor:
        return groups.reshape(1, 1)


@dataclass(frozen=True)
class PerGroup(Granularity):
    """Blocks of group_size along the feature axis (the last one zero-padded when ragged)."""

    def view(self, x: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
        if group_size is None:
            raise SpecError("granularity 'group' needs a group_size")
        return group_view(x, group_size).reshape(-1, group_size)

    def unview(self, xb: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return xb.reshape(*shape[:-1], -1)[..., :shape[-1]]

    def segment(self, group_size: int | None) -> int | None:
        return group_size


TENSOR = PerTensor("tensor", for_weights=True, static_activation=True, dynamic_activation=True, splittable=True)
CHANNEL = Granularity(
    "channel", for_weights=True, static_activation=True, dynamic_activation=False, integer_activations=False,
    activation_rule="per-input-channel activation ranges are calibrated (static): set dynamic=false, "
                    "or use granularity 'token' / 'group' for dynamic ranges")
TOKEN = Granularity("token", for_weights=False, static_activation=False, dynamic_activation=True,
                    ranges_per_row=True,
                    activation_rule="per-token activation ranges change with every input: set dynamic=true")
GROUP = PerGroup("group", for_weights=True, static_activation=False, dynamic_activation=True, ranges_per_row=True,
                 takes_group_size=True,
                 activation_rule="per-group activation ranges are computed at run time: set dynamic=true")

GRANULARITIES: dict[str, Granularity] = {g.name: g for g in (TENSOR, CHANNEL, TOKEN, GROUP)}


def get_granularity(granularity: str | Granularity) -> Granularity:
    """The Granularity of a name (or the object itself)."""
    if isinstance(granularity, Granularity):
        return granularity
    if not isinstance(granularity, str) or granularity not in GRANULARITIES:
        raise SpecError(f"unknown granularity {granularity!r}; choose one of {tuple(GRANULARITIES)}")
    return GRANULARITIES[granularity]
