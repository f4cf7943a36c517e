"""Streaming activation statistics, collected with hooks while the full-precision sampler runs.

Only running per-channel min / max (over every token of every call) are kept, never activations:
memory is O(layers x channels x steps) whatever the number of calibration samples.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from diffquant.calib.steps import current_step


@dataclass
class ChannelRange:
    """Running per-channel min and max of a layer's input (feature axis = input channels)."""

    lo: torch.Tensor
    hi: torch.Tensor
    count: int = 0  # number of calls merged

    @classmethod
    def of(cls, x2d: torch.Tensor) -> ChannelRange:
        return cls(x2d.amin(dim=0), x2d.amax(dim=0), 1)

    def update(self, x2d: torch.Tensor) -> None:
        self.lo = torch.minimum(self.lo, x2d.amin(dim=0))
        self.hi = torch.maximum(self.hi, x2d.amax(dim=0))
        self.count += 1

    def merged(self, other: ChannelRange) -> ChannelRange:
        return ChannelRange(torch.minimum(self.lo, other.lo), torch.maximum(self.hi, other.hi),
                            self.count + other.count)

    @property
    def absmax(self) -> torch.Tensor:
        return torch.maximum(self.lo.abs(), self.hi.abs())

    def divided(self, divisor: torch.Tensor) -> ChannelRange:
        """Range of x / divisor for a positive per-channel divisor (e.g. smoothing factors)."""
        return ChannelRange(self.lo / divisor, self.hi / divisor, self.count)


@dataclass
class LayerStats:
    """Input statistics of one layer: over all calls, and per sampling step when steps were set."""

    overall: ChannelRange | None = None
    per_step: dict[int, ChannelRange] = field(default_factory=dict)

    def observe(self, x2d: torch.Tensor, step: int | None) -> None:
        x2d = x2d.detach().float()
        if self.overall is None:
            self.overall = ChannelRange.of(x2d)
        else:
            self.overall.update(x2d)
        if step is not None:
            if step in self.per_step:
                self.per_step[step].update(x2d)
            else:
                self.per_step[step] = ChannelRange.of(x2d)

    def divided(self, divisor: torch.Tensor) -> LayerStats:
        assert self.overall is not None
        return LayerStats(self.overall.divided(divisor),
                          {s: r.divided(divisor) for s, r in self.per_step.items()})

    @property
    def num_steps(self) -> int:
        return max(self.per_step) + 1 if self.per_step else 0


class ActivationStats(dict[str, LayerStats]):
    """Module name -> LayerStats of its input. What static-range and smoothing stages consume."""

    def require(self, name: str) -> LayerStats:
        if name not in self or self[name].overall is None:
            raise KeyError(f"no calibration statistics for layer {name!r}: it never ran during calibration")
        return self[name]


def feature_last_2d(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer input as [tokens, channels]: Linear features are last, Conv2d channels are dim 1."""
    if isinstance(module, nn.Conv2d) or getattr(module, "feature_axis", -1) == 1:
        x = x.movedim(1, -1)
    return x.reshape(-1, x.shape[-1])


@contextlib.contextmanager
def observe_inputs(modules: dict[str, nn.Module], stats: ActivationStats) -> Iterator[ActivationStats]:
    """Record the input ranges of `modules` into `stats` while the block runs."""

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            stats.setdefault(name, LayerStats()).observe(feature_last_2d(module, args[0]), current_step())

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in modules.items()]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


def collect_activation_stats(
    modules: dict[str, nn.Module], run: Callable[[], object], stats: ActivationStats | None = None
) -> ActivationStats:
    """Run `run()` (the full-precision sampler over the calibration conditions) and return input stats."""
    stats = ActivationStats() if stats is None else stats
    with torch.no_grad(), observe_inputs(modules, stats):
        run()
    return stats


def modules_by_name(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    lookup = dict(model.named_modules())
    return {n: lookup[n] for n in names}
