"""Streaming activation statistics, collected with hooks while the full-precision sampler runs.

Always kept: running per-channel min / max (over every token of every call), O(layers x channels x
steps) whatever the number of calibration samples. On request (`sample_rows=n`, for stages that score
candidates by a layer's output error, e.g. SVDQuant), also a uniform random sample of at most n input
rows per layer (`RowSample`, O(layers x n x channels)), and which layers read the very same input
tensor (`ActivationStats.input_groups`: q/k/v of one attention, adaLN linears fed by one embedding).

A row is what the layer's weight multiplies: a token's features for a Linear, an im2col patch for a
Conv2d ([kh·kw·C] in (kh, kw, c) order, channels fastest, as QConv2d's weight matrix; zeros where the
window reaches into the padding), so a layer's output at a sampled row is row · W_matrixᵀ. Patches are
built only for the rows the sample keeps (`patch_rows`), never for a whole unfolded input.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from diffquant.calib.steps import current_step
from diffquant.finite import check_finite


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

    def copy(self) -> ChannelRange:
        return ChannelRange(self.lo.clone(), self.hi.clone(), self.count)

    @property
    def absmax(self) -> torch.Tensor:
        return torch.maximum(self.lo.abs(), self.hi.abs())

    def divided(self, divisor: torch.Tensor) -> ChannelRange:
        """Range of x / divisor for a positive per-channel divisor (e.g. smoothing factors)."""
        return ChannelRange(self.lo / divisor, self.hi / divisor, self.count)


ROW_SAMPLE_SEED = 0
NON_FINITE_HINT = ("the calibration data or the full-precision model gives NaN / Inf there: look for NaN / Inf "
                   "in the calibration inputs (one bad sample is enough), or calibrate a float16 model in float32")


class CalibrationMismatchError(ValueError):
    """Calibration statistics that do not fit the model they are given for."""


def check_range_finite(name: str, rng: ChannelRange, step: int | None) -> None:
    """Raise NonFiniteError naming the layer and the sampling step if the range holds NaN / ±Inf."""
    where = "outside any sampling step" if step is None else f"at sampling step {step}"
    for bound in (rng.lo, rng.hi):
        check_finite(f"calibration input range of layer {name!r} {where}", bound, NON_FINITE_HINT)


@dataclass(frozen=True)
class Rows:
    """One call's input rows, built on demand: `count` rows, of which gather(indices [k], ascending)
    returns float32 [k, width]. A sample keeps few of many rows, so a conv's patches (kh·kw times the
    input) are only ever built for the kept ones."""

    count: int
    gather: Callable[[torch.Tensor], torch.Tensor]

    @classmethod
    def of(cls, x2d: torch.Tensor) -> Rows:
        return cls(x2d.shape[0], lambda index: x2d[index].float())


@dataclass
class RowSample:
    """A uniform random sample (without replacement) of at most `capacity` rows of everything seen.

    Bottom-k sampling: every row draws a random key and the `capacity` smallest keys are kept, so the
    sample is uniform over all rows of all calls at any point, in O(capacity x channels) memory. Each
    sample draws from its own generator with one seed: layers fed the same tensors keep the same rows.
    taps: channel vectors per row (a conv's kh·kw kernel positions, channels fastest; 1 for a Linear).
    """

    capacity: int
    rows: torch.Tensor | None = None  # float32 [n <= capacity, taps * C], in order of arrival
    keys: torch.Tensor | None = None  # float64 [n]
    seen: int = 0
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(ROW_SAMPLE_SEED))
    taps: int = 1

    def update(self, x2d: torch.Tensor) -> None:
        self.update_rows(Rows.of(x2d.detach()))

    def update_rows(self, new: Rows) -> None:
        """Add a call's rows. Only this call's `capacity` smallest keys can enter the sample, so only
        those rows are gathered (the same sample as gathering all of them)."""
        keys = torch.rand(new.count, generator=self.generator, dtype=torch.float64)
        index = torch.arange(new.count)
        if new.count > self.capacity:
            index = keys.topk(self.capacity, largest=False).indices.sort().values
            keys = keys[index]
        rows = new.gather(index)  # a copy: never a view of the model's activation
        if self.rows is not None:
            rows, keys = torch.cat([self.rows, rows]), torch.cat([self.keys, keys])
        if rows.shape[0] > self.capacity:
            kept = keys.topk(self.capacity, largest=False).indices.sort().values
            rows, keys = rows[kept], keys[kept]
        self.rows, self.keys = rows, keys
        self.seen += new.count

    def divided(self, divisor: torch.Tensor) -> RowSample:
        """The sample of x / divisor for a per-channel divisor [C] (repeated over a patch's taps)."""
        rows = None if self.rows is None else self.rows / divisor.repeat(self.taps)
        return RowSample(self.capacity, rows, self.keys, self.seen, self.generator, self.taps)


@dataclass
class LayerStats:
    """Input statistics of one layer: over all calls, per sampling step when steps were set, and a
    sample of input rows when calibration was asked for one."""

    overall: ChannelRange | None = None
    per_step: dict[int, ChannelRange] = field(default_factory=dict)
    sample: RowSample | None = None

    def observe(self, x2d: torch.Tensor, step: int | None, rows: Rows | None = None,
                name: str = "(unnamed)") -> None:
        """x2d [tokens, C]: the input's channel vectors (ranges); rows: what the sample draws from, the
        same x2d rows unless given (a conv's patches: patch_rows). name: the layer, for errors: a call
        with NaN / ±Inf raises NonFiniteError at once (min / max would carry it into every range)."""
        x2d = x2d.detach().float()
        call = ChannelRange.of(x2d)
        check_range_finite(name, call, step)
        self.overall = call if self.overall is None else self.overall.merged(call)
        if step is not None:
            known = self.per_step.get(step)
            self.per_step[step] = call.copy() if known is None else known.merged(call)
        if self.sample is not None:
            self.sample.update_rows(Rows.of(x2d) if rows is None else rows)

    def check_finite(self, name: str) -> None:
        """Raise NonFiniteError if a range or the row sample holds NaN / ±Inf (statistics from elsewhere)."""
        if self.overall is not None:
            check_range_finite(name, self.overall, None)
        for step, rng in sorted(self.per_step.items()):
            check_range_finite(name, rng, step)
        if self.sample is not None and self.sample.rows is not None:
            check_finite(f"calibration row sample of layer {name!r}", self.sample.rows, NON_FINITE_HINT)

    def check_width(self, name: str, channels: int, taps: int = 1) -> None:
        """Raise CalibrationMismatchError unless every range has `channels` entries and the row sample
        taps·channels columns: statistics of another model (another width) would be accepted silently."""
        shapes = [(f"step {s} range", tuple(r.lo.shape)) for s, r in sorted(self.per_step.items())]
        if self.overall is not None:
            shapes.insert(0, ("range", tuple(self.overall.lo.shape)))
        bad = [(what, shape) for what, shape in shapes if shape != (channels,)]
        if self.sample is not None and self.sample.rows is not None and self.sample.rows.shape[1] != taps * channels:
            bad.append(("row sample", tuple(self.sample.rows.shape)))
        if bad:
            what, shape = bad[0]
            raise CalibrationMismatchError(
                f"calibration statistics of layer {name!r} do not fit it: its {what} has shape {shape}, the layer "
                f"reads {channels} input channels ({taps * channels} per row): they were collected on another "
                "model (another width); collect them on this model")

    def divided(self, divisor: torch.Tensor) -> LayerStats:
        assert self.overall is not None
        return LayerStats(self.overall.divided(divisor),
                          {s: r.divided(divisor) for s, r in self.per_step.items()},
                          None if self.sample is None else self.sample.divided(divisor))

    @property
    def num_steps(self) -> int:
        return max(self.per_step) + 1 if self.per_step else 0


class ActivationStats(dict[str, LayerStats]):
    """Module name -> LayerStats of its input. What static-range and smoothing stages consume.

    input_groups: sets of layers (two or more) that read the very same input tensor in every call of
    the calibration run, as observed by observe_inputs (empty when not observed).
    channel_splits: layer -> channel where the skip begins, for layers whose input is a UNet decoder's
    skip concatenation (arch/skips.py), as observed during the calibration run; None when not
    observed (diffquant.quantize observes them for recipes with split_shortcut inputs).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.input_groups: list[tuple[str, ...]] = []
        self.channel_splits: dict[str, int] | None = None

    def require(self, name: str) -> LayerStats:
        if name not in self or self[name].overall is None:
            raise KeyError(f"no calibration statistics for layer {name!r}: it never ran during calibration")
        return self[name]

    def require_sample(self, name: str) -> torch.Tensor:
        """The sampled input rows [n, C] of a layer (calibration run with sample_rows > 0)."""
        sample = self.require(name).sample
        if sample is None or sample.rows is None:
            raise KeyError(f"no sampled input rows for layer {name!r}: collect the statistics with sample_rows > 0 "
                           "(diffquant.quantize does so for recipes whose stages need them)")
        return sample.rows

    def input_group_of(self, name: str) -> tuple[str, ...]:
        """The layers reading the same input as `name` (itself included), in registration order."""
        return next((g for g in self.input_groups if name in g), (name,))


def _version(x: torch.Tensor) -> int | None:
    """The tensor's in-place modification counter (None for inference-mode tensors, which have none)."""
    try:
        return x._version
    except RuntimeError:
        return None


class InputSharing:
    """Which layers read the very same tensor object, unmodified, in every call.

    Within a run, each live input tensor (held by a weak reference, so a recycled address never
    matches) collects the layers that consumed it while its version counter was unchanged. Layers a
    and b share their input when every consumption of either included the other.
    """

    def __init__(self) -> None:
        self._live: dict[int, tuple[weakref.ref, int, list[str]]] = {}
        self._partners: dict[str, set[str]] = {}

    def see(self, name: str, x: torch.Tensor) -> None:
        key, version = id(x), _version(x)
        entry = self._live.get(key)
        if entry is not None and entry[0]() is x and entry[1] == version and version is not None:
            entry[2].append(name)
            return
        self._close(key)
        self._live[key] = (weakref.ref(x, lambda _, key=key: self._close(key)), version, [name])

    def _close(self, key: int) -> None:
        entry = self._live.pop(key, None)
        if entry is None:
            return
        group = dict.fromkeys(entry[2])  # a set in order of consumption
        for name in group:
            known = self._partners.get(name)
            self._partners[name] = set(group) if known is None else known & group.keys()

    def groups(self) -> list[tuple[str, ...]]:
        """Groups of two or more layers with a shared input (after the run), in first-seen order."""
        for key in list(self._live):
            self._close(key)
        groups, placed = [], set()
        for name, partners in self._partners.items():
            if name in placed:
                continue
            group = tuple(p for p in self._partners if p in partners and name in self._partners[p])
            placed.update(group)
            if len(group) > 1:
                groups.append(group)
        return groups


def is_conv(module: nn.Module) -> bool:
    """A float or quantized Conv2d (channels at dim 1)."""
    return isinstance(module, nn.Conv2d) or getattr(module, "feature_axis", -1) == 1


def feature_last_2d(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer input as [tokens, channels]: Linear features are last, Conv2d channels are dim 1."""
    if is_conv(module):
        x = x.movedim(1, -1)
    return x.reshape(-1, x.shape[-1])


def conv_padding(conv: nn.Module) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) zero padding of a Conv2d, "same" / "valid" resolved as F.conv2d does
    (an odd "same" total puts the extra row / column at the bottom / right)."""
    if conv.padding == "valid":
        return 0, 0, 0, 0
    if conv.padding == "same":
        totals = [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation, strict=True)]
        return totals[0] // 2, totals[0] - totals[0] // 2, totals[1] // 2, totals[1] - totals[1] // 2
    ph, pw = conv.padding
    return ph, ph, pw, pw


def patch_rows(conv: nn.Module, x: torch.Tensor) -> Rows:
    """A conv input x [B, C, H, W] as its im2col rows [B·Ho·Wo, kh·kw·C] (row = (b, oh, ow), K in
    (kh, kw, c) order like QConv2d.weight_matrix; padding as zeros), gathered per requested row."""
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    top, bottom, left, right = conv_padding(conv)
    padded = F.pad(x.detach(), (left, right, top, bottom)).movedim(1, -1)  # [B, H', W', C]
    batch, height, width, channels = padded.shape
    out_h, out_w = (height - dh * (kh - 1) - 1) // sh + 1, (width - dw * (kw - 1) - 1) // sw + 1
    taps_h = torch.arange(kh, device=x.device) * dh
    taps_w = torch.arange(kw, device=x.device) * dw

    def gather(index: torch.Tensor) -> torch.Tensor:
        index = index.to(x.device)
        b, pixel = index // (out_h * out_w), index % (out_h * out_w)
        rows = (pixel // out_w * sh)[:, None] + taps_h  # [k, kh]
        cols = (pixel % out_w * sw)[:, None] + taps_w  # [k, kw]
        patches = padded[b[:, None, None], rows[:, :, None], cols[:, None, :]]  # [k, kh, kw, C]
        return patches.reshape(index.shape[0], kh * kw * channels).float()

    return Rows(batch * out_h * out_w, gather)


def _taps(module: nn.Module) -> int:
    return module.kernel_size[0] * module.kernel_size[1] if is_conv(module) else 1


@contextlib.contextmanager
def observe_inputs(modules: dict[str, nn.Module], stats: ActivationStats,
                   sample_rows: int = 0) -> Iterator[ActivationStats]:
    """Record the input ranges of `modules` into `stats` while the block runs; with sample_rows > 0
    also a sample of that many input rows per layer. On exit, stats.input_groups lists the layers
    that read one tensor (see InputSharing)."""
    if sample_rows < 0:
        raise ValueError(f"sample_rows must be >= 0, got {sample_rows}")
    sharing = InputSharing()

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if name not in stats:
                stats[name] = LayerStats(sample=RowSample(sample_rows, taps=_taps(module)) if sample_rows else None)
            sharing.see(name, x)
            rows = patch_rows(module, x) if sample_rows and is_conv(module) else None
            stats[name].observe(feature_last_2d(module, x), current_step(), rows, name)

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in modules.items()]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()
        stats.input_groups = sharing.groups()


def collect_activation_stats(
    modules: dict[str, nn.Module], run: Callable[[], object], stats: ActivationStats | None = None,
    sample_rows: int = 0,
) -> ActivationStats:
    """Run `run()` (the full-precision sampler over the calibration conditions) and return input stats.

    sample_rows: keep a uniform sample of this many input rows per layer (0: ranges only).
    """
    stats = ActivationStats() if stats is None else stats
    with torch.no_grad(), observe_inputs(modules, stats, sample_rows):
        run()
    return stats


def input_channels(module: nn.Module) -> int:
    """The channels of a (float or quantized) Linear / Conv2d input: what its statistics are per."""
    return module.in_channels if is_conv(module) else module.in_features


def check_given_stats(stats: ActivationStats, modules: dict[str, nn.Module]) -> None:
    """Statistics collected elsewhere, before a model takes them: every range and sample finite
    (NonFiniteError), and each of `modules`' of its width (CalibrationMismatchError)."""
    for name, layer in stats.items():
        layer.check_finite(name)
    for name, module in modules.items():
        stats[name].check_width(name, input_channels(module), _taps(module))


def modules_by_name(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Module]:
    lookup = dict(model.named_modules())
    return {n: lookup[n] for n in names}
