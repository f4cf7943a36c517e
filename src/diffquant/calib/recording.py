"""Denoiser calls -> calibration-set rows (and the feature module's outputs -> TDAC's step features).

`CallRecorder` hooks a denoiser. Explicit mode (`capture`): the capture loop tells it each sampler
call's trajectories. Generic mode (`capture_calls`) infers them: a call is guided when its first
input's two halves are equal (classifier-free guidance duplicates the latents), its samples are its
rows (halved when guided); a new sampler batch, with fresh sample ids after the previous batch's,
starts whenever the sampling step does not increase or the number of samples changes. The first half
of a guided call is marked conditional (the zoo's order; diffusers pipelines put the unconditional
half first, so there `conditional` marks the position, and TDAC's features come from the null half).
A sampler that runs the conditional and null passes as separate calls at the same step records them
as separate, all-"conditional" samples.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from diffquant.calib.sets import ROW_KEYS, STATIC_TYPES, CalibrationSet
from diffquant.calib.steps import StepContextError, current_step, current_total_steps
from diffquant.calib.tdac import StepFeatures

# Keyword arguments that choose how the denoiser returns, not what it computes.
CALL_OPTIONS = frozenset({"return_dict"})


class CallRecorder:
    """Hooks that turn denoiser calls into rows and the feature module's outputs into step features.

    explicit (`capture`): the capture loop sets `batch` (trajectories in the current sampler call)
    and `offset` (the first one's sample id); a call with 2x `batch` rows is guided: conditional rows
    first, then null rows. Otherwise (`capture_calls`) both are inferred per call, as the module
    docstring describes.
    """

    def __init__(self, denoiser: nn.Module, explicit: bool = True, features: bool = True):
        self.names = [p for p in inspect.signature(denoiser.forward).parameters if p != "self"]
        self.explicit, self.with_features = explicit, features
        self.batch = self.offset = 0
        self.last_step: int | None = None
        self.rows: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.static: dict[str, Any] | None = None
        self.shared: dict[str, torch.Tensor] | None = None
        self.kinds: tuple[frozenset[str], frozenset[str]] | None = None
        self.features: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.calls, self.call_rows, self.guided_calls, self.pending = 0, 0, 0, False
        self.totals: set[int | None] = set()

    def _guided(self, rows: int) -> bool:
        if rows not in (self.batch, 2 * self.batch):
            raise RuntimeError(f"denoiser call with {rows} rows for a sampler batch of {self.batch}: "
                               "expected the batch, or twice it with classifier-free guidance")
        return rows == 2 * self.batch

    def _infer(self, primary: torch.Tensor, step: int) -> bool:
        """Generic mode: guided when the first input's halves are equal; a new sampler batch (fresh
        sample ids) when the step does not increase or the number of samples changes."""
        rows = primary.shape[0]
        half = rows // 2
        guided = rows > 0 and rows % 2 == 0 and torch.equal(primary[:half], primary[half:])
        samples = half if guided else rows
        if self.last_step is None or step <= self.last_step or samples != self.batch:
            self.offset += self.batch
            self.batch = samples
        return guided

    def _primary(self, call: dict[str, Any]) -> torch.Tensor:
        first = call.get(self.names[0]) if self.names else None
        if isinstance(first, torch.Tensor) and first.dim() > 0:
            return first
        for value in call.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                return value
        raise ValueError("a denoiser call has no tensor input with a batch axis")

    def on_call(self, _module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if len(args) > len(self.names):
            raise TypeError(f"denoiser called with {len(args)} positional arguments; forward takes {self.names}")
        if self.pending:
            raise RuntimeError("the feature module did not run once per sampler call")
        step = current_step()
        if step is None:
            raise StepContextError("a calibration set records each denoiser call's sampling step: run the "
                                   "denoiser inside `diffquant.sampling_step(i)` or diffquant.track_pipeline_steps")
        call = {**dict(zip(self.names, args, strict=False)), **kwargs}
        primary = self._primary(call)
        rows = primary.shape[0]
        guided = self._guided(rows) if self.explicit else self._infer(primary, step)
        tensors, shared, static = _split_inputs(call, rows)
        self._check_constant(tensors, shared, static)
        ids = torch.arange(self.offset, self.offset + self.batch)
        cond = torch.ones(self.batch, dtype=torch.bool)
        for key, value in tensors.items():
            self.rows[key].append(value)
        self.rows["step"].append(torch.full((rows,), step, dtype=torch.long))
        self.rows["sample_id"].append(torch.cat([ids, ids]) if guided else ids)
        self.rows["conditional"].append(torch.cat([cond, ~cond]) if guided else cond)
        self.last_step, self.call_rows, self.pending = step, rows, self.with_features
        self.calls += 1
        self.guided_calls += guided
        self.totals.add(current_total_steps())

    def _check_constant(self, tensors: dict[str, torch.Tensor], shared: dict[str, torch.Tensor],
                        static: dict[str, Any]) -> None:
        kinds = (frozenset(tensors), frozenset(shared))
        if self.kinds is None:
            self.kinds, self.static, self.shared = kinds, static, shared
            return
        if kinds != self.kinds:
            raise ValueError(f"denoiser inputs changed between calls: per-row {sorted(self.kinds[0])}, shared "
                             f"{sorted(self.kinds[1])} -> per-row {sorted(kinds[0])}, shared {sorted(kinds[1])}")
        if static != self.static:
            raise ValueError(f"non-tensor denoiser inputs changed between calls: {self.static} -> {static}")
        for key, value in shared.items():
            before = self.shared[key]
            if value.shape != before.shape or value.dtype != before.dtype or not torch.equal(value, before):
                raise ValueError(f"denoiser input {key!r} has no batch axis (shape {tuple(value.shape)}) and "
                                 "changed between calls: a calibration set stores such inputs once")

    def on_feature(self, _module: nn.Module, _args: tuple, output: Any) -> None:
        if not self.pending:
            raise RuntimeError("the feature module did not run once per sampler call")
        out = _feature_tensor(output, self.call_rows)
        cond = out[: self.batch].detach()
        self.features[current_step()].append(cond.reshape(self.batch, -1).to("cpu", torch.float32, copy=True))
        self.pending = False

    def calibration_set(self, meta: dict[str, Any]) -> CalibrationSet:
        rows = {k: torch.cat(v) for k, v in self.rows.items()}
        step, sample_id, conditional = (rows.pop(k) for k in ROW_KEYS)
        return CalibrationSet(rows, step, sample_id, conditional, static=self.static or {}, meta=meta,
                              shared=self.shared or {})

    def step_features(self, module: str, num_samples: int | None = None) -> StepFeatures:
        if self.pending:
            raise RuntimeError(f"feature module {module!r} did not run once per sampler call")
        steps = sorted(self.features)
        features = [torch.cat(self.features[s]) for s in steps]
        if num_samples is not None and any(f.shape[0] != num_samples for f in features):
            raise RuntimeError(f"feature module {module!r} did not run once per sampler call")
        return StepFeatures(module, steps, features)

    @contextlib.contextmanager
    def hooks(self, denoiser: nn.Module, feature_module: nn.Module | None) -> Iterator[None]:
        handles = [denoiser.register_forward_pre_hook(self.on_call, with_kwargs=True)]
        if feature_module is not None:
            handles.append(feature_module.register_forward_hook(self.on_feature))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _feature_tensor(output: Any, rows: int) -> torch.Tensor:
    """The largest tensor of a module's output (tuples, lists, dicts and diffusers output dataclasses
    searched; ties to the first) with the call's rows: a two-stream block's image stream."""
    found: list[torch.Tensor] = []

    def walk(node: Any) -> None:
        if isinstance(node, torch.Tensor):
            found.append(node)
        elif isinstance(node, tuple | list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):  # diffusers' BaseOutput is an OrderedDict
            for item in node.values():
                walk(item)
        elif isinstance(getattr(node, "sample", None), torch.Tensor):
            found.append(node.sample)

    walk(output)
    fits = [t for t in found if t.dim() > 0 and t.shape[0] == rows]
    if not fits:
        raise TypeError(f"the feature module returned no tensor with the call's {rows} rows (got "
                        f"{[tuple(t.shape) for t in found] or type(output).__name__}): choose another feature_module")
    return max(fits, key=lambda t: t.numel())


def _split_inputs(call: dict[str, Any], rows: int, prefix: str = ""
                  ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """Per-row tensors (a 0-d tensor, e.g. one timestep for the batch, is broadcast to the rows),
    shared tensors (first axis not the row count) and static scalars; nested dicts flatten to dotted
    names; call options and None are dropped; anything else is refused, not guessed."""
    tensors: dict[str, torch.Tensor] = {}
    shared: dict[str, torch.Tensor] = {}
    static: dict[str, Any] = {}
    for key, value in call.items():
        name = f"{prefix}{key}"
        if (not prefix and key in CALL_OPTIONS) or value is None:
            continue
        if isinstance(value, dict):
            bad = [k for k in value if not isinstance(k, str) or "." in k]
            if bad:
                raise TypeError(f"denoiser input {name!r} is a dict with keys {bad} that cannot be stored by name")
            inner = _split_inputs(value, rows, prefix=f"{name}.")
            for into, part in zip((tensors, shared, static), inner, strict=True):
                into.update(part)
        elif isinstance(value, torch.Tensor):
            value = value.expand(rows) if value.dim() == 0 else value
            (tensors if value.shape[0] == rows else shared)[name] = value.detach().to("cpu", copy=True)
        elif isinstance(value, STATIC_TYPES):
            static[name] = value
        else:
            raise TypeError(f"denoiser input {name!r} of type {type(value).__name__} cannot be captured "
                            "(only tensors, dicts of them and bool/int/float/str)")
    return tensors, shared, static
