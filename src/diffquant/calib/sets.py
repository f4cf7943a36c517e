"""Calibration sets for reconstruction-based PTQ: captured once, selected deterministically, replayed.

Reconstruction methods (BRECQ / Q-Diffusion, EDA-DM's FBR) optimise against the denoiser's inputs at
chosen sampling steps. Which inputs, and how many per step, is a choice of its own (Q-Diffusion:
uniform over steps; EDA-DM: TDAC weights), so it lives here as data any recipe can take, not inside
one method. In a recipe, the `calibration_selection` stage (diffquant.algorithms.calibration_selection)
does all of it from the calibration function quantize() was given; by hand:

    cal, feats = capture(model, num_samples=64)           # every denoiser call of the FP sampler
    # or, from any calibration function: cal, feats = capture_calls(calibration, denoiser)
    counts = counts_from_weights(tdac_weights(feats), 256) # or uniform_counts(len(cal.steps()), 256)
    # capped_counts(weights, 256, available) when a step may hold fewer samples than its share
    chosen = select(cal, counts, seed=0)
    chosen.save("cal.safetensors")                         # + cal.json sidecar; reload with load()
    diffquant.quantize(model.denoiser, recipe, calibration=replay(chosen))

Rows. One row is one batch row of one denoiser call, with the keyword inputs exactly as the sampler
passed them (`hidden_states` / `sample`, `timestep`, `class_labels` / `encoder_hidden_states`). With
classifier-free guidance a call holds the conditional rows, then the null rows; both are rows here,
tied by `sample_id` (the trajectory) and told apart by `conditional`. Counts in `select` are of
samples (trajectories at a step), so a guided pair is never split. An input is per row when it is a
tensor whose first axis is the call's row count (that of its first input; a 0-d tensor is broadcast
to the rows); any other tensor (e.g. FLUX's `img_ids`) is `shared`: stored once, passed whole to every
batch, and it must be the same in every call. Nested dict inputs (e.g. SDXL's `added_cond_kwargs`) are
stored under dotted names (`added_cond_kwargs.text_embeds`) and rebuilt on replay; None is dropped.

Capture. `capture` runs a zoo model's sampler batch by batch, so it knows each call's trajectories.
`capture_calls` records from any calibration function and infers them (`_Recorder`): a call is
guided when its first input's two halves are equal (classifier-free guidance duplicates the
latents), its samples are its rows (halved when guided); a new sampler batch, with fresh sample ids
after the previous batch's, starts whenever the sampling step does not increase or the number of
samples changes. For a zoo model's `.calibration(...)` both give the same set. The first half of a
guided call is marked conditional (the zoo's order; diffusers pipelines put the unconditional half
first, so there `conditional` marks the position, and TDAC's features come from the null half).
A sampler that runs the conditional and null passes as separate calls at the same step records
them as separate, all-"conditional" samples.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from diffquant.atomic import atomic_file, write_text_atomic
from diffquant.calib.steps import StepContextError, current_step, current_total_steps, sampling_step

if TYPE_CHECKING:
    from diffquant.zoo.model import LatentDiffusionModel

FORMAT = "diffquant-calibration-set"
VERSION = 1
INPUT_PREFIX = "input."
SHARED_PREFIX = "shared."
ROW_KEYS = ("step", "sample_id", "conditional")
STATIC_TYPES = (bool, int, float, str)
# Keyword arguments that choose how the denoiser returns, not what it computes.
CALL_OPTIONS = frozenset({"return_dict"})

# EDA-DM's TDAC hyper-parameters (BienLuky/EDA-DM scripts): density radius r = 3.0 for ImageNet and
# CIFAR-10, 0.3 for LSUN and COCO; diversity weight lam = 1.2 ImageNet, 1.0 LSUN-bedroom, 5.0 COCO.
TDAC_RADIUS = 3.0
TDAC_LAMBDA = 1.2


# -- the set ---------------------------------------------------------------------------------------


@dataclass
class CalibrationSet:
    """Denoiser inputs captured from the full-precision sampler, one entry per batch row.

    inputs: the denoiser's tensor keyword inputs by name, each [rows, ...].
    step: [rows] int64 sampling-step index of each row (0 = first denoising step).
    sample_id: [rows] int64 trajectory of each row; a guided call's cond and null rows share it.
    conditional: [rows] bool, False on the null rows of classifier-free guidance.
    static: non-tensor keyword inputs (bool / int / float / str), the same for every call.
    meta: JSON-able provenance (model, seed, steps, selection) kept through save / load.
    shared: tensor inputs without a batch axis (e.g. FLUX's `img_ids`), the same for every call and
        passed whole to every batch.
    Names with dots are nested dict inputs (`added_cond_kwargs.text_embeds`); `batches` rebuilds them.
    """

    inputs: dict[str, torch.Tensor]
    step: torch.Tensor
    sample_id: torch.Tensor
    conditional: torch.Tensor
    static: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    shared: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        rows = self.step.shape[0] if self.step.dim() == 1 else -1
        if rows < 0 or self.step.dtype != torch.long or self.sample_id.dtype != torch.long:
            raise ValueError("step and sample_id must be 1-D int64 tensors")
        if self.conditional.dtype != torch.bool:
            raise ValueError(f"conditional must be bool, got {self.conditional.dtype}")
        wrong = {k: tuple(v.shape) for k, v in self._row_tensors().items() if v.dim() == 0 or v.shape[0] != rows}
        if wrong:
            raise ValueError(f"every tensor needs {rows} rows (one per row of `step`); got shapes {wrong}")
        bad = {k: type(v).__name__ for k, v in self.static.items() if not isinstance(v, STATIC_TYPES)}
        if bad:
            raise TypeError(f"static inputs must be bool/int/float/str (they are saved as JSON): {bad}")
        bad = {k: type(v).__name__ for k, v in self.shared.items() if not isinstance(v, torch.Tensor)}
        if bad:
            raise TypeError(f"shared inputs must be tensors: {bad}")

    def _row_tensors(self) -> dict[str, torch.Tensor]:
        named = {f"{INPUT_PREFIX}{k}": v for k, v in self.inputs.items()}
        return {**named, "step": self.step, "sample_id": self.sample_id, "conditional": self.conditional}

    def _stored_tensors(self) -> dict[str, torch.Tensor]:
        return {**self._row_tensors(), **{f"{SHARED_PREFIX}{k}": v for k, v in self.shared.items()}}

    def __len__(self) -> int:
        return int(self.step.shape[0])

    def steps(self) -> list[int]:
        """The sampling steps present, ascending."""
        return [int(s) for s in torch.unique(self.step)]

    def subset(self, indices: Sequence[int] | torch.Tensor) -> CalibrationSet:
        """The given rows, in the given order (a new set; tensors are copied by indexing). A bool mask
        is taken as a mask, never cast to row numbers 0 / 1."""
        index = torch.as_tensor(indices)
        index = torch.nonzero(index).flatten() if index.dtype == torch.bool else index.long()
        return CalibrationSet(
            inputs={k: v[index] for k, v in self.inputs.items()},
            step=self.step[index], sample_id=self.sample_id[index], conditional=self.conditional[index],
            static=dict(self.static), meta=json.loads(json.dumps(self.meta)), shared=dict(self.shared),
        )

    def batches(self, batch_size: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """(step, denoiser kwargs) for at most `batch_size` rows of ONE step at a time, steps ascending.

        One step per batch because per-step quantizer state reads a single step index per call. Rows
        keep their captured order, so with batch_size = the sampler's rows per call (2x its batch
        under guidance) the batches are exactly the sampler's calls. Shared inputs go whole into every
        batch; dotted names become nested dicts again.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for s in self.steps():
            rows = torch.nonzero(self.step == s).flatten()
            for chunk in rows.split(batch_size):
                yield s, _nest({**self.static, **self.shared, **{k: v[chunk] for k, v in self.inputs.items()}})

    def save(self, path: str | Path) -> Path:
        """Write `path` (.safetensors: the tensors) and its .json sidecar, each atomically.

        Each file goes to a temporary name beside its target and is renamed into place, so a failed
        save leaves no partial file and keeps what was there. Both carry a digest of the tensors, so
        `load` rejects a torn pair (new tensors with an old sidecar).
        """
        path = _tensors_path(path)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self._stored_tensors().items()}
        digest = _digest(tensors)
        sidecar = {"format": FORMAT, "version": VERSION, "rows": len(self), "inputs": sorted(self.inputs),
                   "static": self.static, "meta": self.meta, "sha256": digest}
        if self.shared:
            sidecar["shared"] = sorted(self.shared)
        metadata = {"format": FORMAT, "version": str(VERSION), "sha256": digest}
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        text = json.dumps(sidecar, indent=2, sort_keys=True) + "\n"
        write_text_atomic(path.with_suffix(".json"), text)
        return path

    @classmethod
    def load(cls, path: str | Path) -> CalibrationSet:
        """Read a set written by `save`; checks the format, version and the tensors' digest."""
        path = _tensors_path(path)
        sidecar = json.loads(path.with_suffix(".json").read_text())
        if sidecar.get("format") != FORMAT or sidecar.get("version") != VERSION:
            raise ValueError(f"{path}: not a {FORMAT} v{VERSION} sidecar "
                             f"(format {sidecar.get('format')!r}, version {sidecar.get('version')!r})")
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
        if not sidecar["sha256"] == metadata.get("sha256") == _digest(tensors):
            raise ValueError(f"{path}: tensors and sidecar do not match (torn or corrupt save)")
        inputs = {k.removeprefix(INPUT_PREFIX): v for k, v in tensors.items() if k.startswith(INPUT_PREFIX)}
        shared = {k.removeprefix(SHARED_PREFIX): v for k, v in tensors.items() if k.startswith(SHARED_PREFIX)}
        return cls(inputs, tensors["step"], tensors["sample_id"], tensors["conditional"],
                   static=sidecar["static"], meta=sidecar["meta"], shared=shared)


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """Dotted names back into nested dicts: {"a.b": x, "c": y} -> {"a": {"b": x}, "c": y}."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _tensors_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"calibration set path must end in .safetensors (the sidecar is .json), got {path}")
    return path


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# -- capture ---------------------------------------------------------------------------------------


@dataclass
class StepFeatures:
    """TDAC's per-step features: `features[i]` is [num_samples, D] float32 (flattened) at `steps[i]`,
    taken from the conditional rows of `module`'s output."""

    module: str
    steps: list[int]
    features: list[torch.Tensor]

    def __len__(self) -> int:
        return len(self.features)


def resolve_feature_module(denoiser: nn.Module, name: str | None = None) -> tuple[str, nn.Module]:
    """The module whose output gives TDAC's features: `name` if given, else the middle transformer
    block of a DiT-like model (`transformer_blocks[len // 2]`, or `blocks[len // 2]` as in Wan),
    else a UNet's `mid_block`."""
    if name is not None:
        return name, denoiser.get_submodule(name)
    for attr in ("transformer_blocks", "blocks"):
        blocks = getattr(denoiser, attr, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return f"{attr}.{len(blocks) // 2}", blocks[len(blocks) // 2]
    if isinstance(getattr(denoiser, "mid_block", None), nn.Module):
        return "mid_block", denoiser.mid_block
    raise ValueError(f"{type(denoiser).__name__} has neither `transformer_blocks` / `blocks` nor a `mid_block`: "
                     "pass feature_module=<module name> to choose where TDAC's features come from")


class _Recorder:
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


def capture(
    model: LatentDiffusionModel,
    num_samples: int,
    steps: int | None = None,
    seed: int = 1234,
    batch_size: int = 64,
    feature_module: str | None = None,
    progress: bool = True,
) -> tuple[CalibrationSet, StepFeatures]:
    """Run the full-precision sampler and record every denoiser call, plus TDAC's step features.

    Labels and noise are those of `model.calibration` (balanced labels; seed 1234 by default, disjoint
    from evaluation's seeds). Every row of every call is kept (guided: cond and null rows), so the
    set holds num_samples x steps (x 2 with guidance) rows; select() picks from it. Features come
    from the conditional rows only (where: `resolve_feature_module`; `feature_module` names another).
    """
    from diffquant.zoo.model import sample_latents

    if num_samples < 1 or batch_size < 1:
        raise ValueError(f"num_samples and batch_size must be >= 1, got {num_samples}, {batch_size}")
    denoiser = model.denoiser
    module_name, module = resolve_feature_module(denoiser, feature_module)
    labels = torch.arange(num_samples) % model.num_classes
    noise = model.initial_noise(num_samples, seed)
    recorder = _Recorder(denoiser)
    with recorder.hooks(denoiser, module):
        for start in tqdm(range(0, num_samples, batch_size), desc="capture", disable=not progress):
            sl = slice(start, start + batch_size)
            recorder.batch, recorder.offset = len(labels[sl]), start
            sample_latents(model, labels[sl], noise[sl], steps)
    meta = {"model": model.name, "num_samples": num_samples, "steps": model.default_steps if steps is None else steps,
            "seed": seed, "guidance_scale": model.guidance_scale, "feature_module": module_name}
    return recorder.calibration_set(meta), recorder.step_features(module_name, num_samples)


def capture_calls(
    calibration: Callable[[nn.Module], object],
    denoiser: nn.Module,
    feature_module: str | None = None,
    features: bool = True,
) -> tuple[CalibrationSet, StepFeatures | None]:
    """Run `calibration(denoiser)` (any calibration function: a zoo model's `.calibration(...)`,
    diffquant.calib.pipeline_calibration, replay, your own sampler) under no_grad and record every
    denoiser call, plus TDAC's step features (None with features=False; then no feature module is
    needed). Every call must run inside a sampling step. Sample ids and guidance are inferred (module
    docstring); for a zoo model's `.calibration(n, ...)` the set and features equal `capture(model,
    n, ...)`'s. meta: "num_samples" (trajectories seen), "steps" (the run's step count when every
    call reported the same one, else None), "guided_calls", "feature_module".
    """
    module_name, module = resolve_feature_module(denoiser, feature_module) if features else (None, None)
    recorder = _Recorder(denoiser, explicit=False, features=features)
    with recorder.hooks(denoiser, module), torch.no_grad():
        calibration(denoiser)
    if recorder.calls == 0:
        raise ValueError("the calibration function never called the denoiser")
    totals = recorder.totals
    meta = {"source": "calibration function", "num_samples": recorder.offset + recorder.batch,
            "steps": next(iter(totals)) if len(totals) == 1 else None,
            "guided_calls": recorder.guided_calls, "feature_module": module_name}
    feats = recorder.step_features(module_name) if module_name is not None else None
    return recorder.calibration_set(meta), feats


# -- selection -------------------------------------------------------------------------------------


def uniform_counts(num_steps: int, n: int) -> list[int]:
    """Q-Diffusion's timestep-aware uniform sampling: n samples spread equally over the steps, the
    remainder to the earliest steps; sums exactly to n."""
    if num_steps < 1 or n < 0:
        raise ValueError(f"need num_steps >= 1 and n >= 0, got {num_steps}, {n}")
    base, extra = divmod(n, num_steps)
    return [base + (t < extra) for t in range(num_steps)]


def _feature_matrix(features: StepFeatures | Sequence[torch.Tensor]) -> torch.Tensor:
    per_step = features.features if isinstance(features, StepFeatures) else list(features)
    if len(per_step) < 1:
        raise ValueError("TDAC needs features of at least one step")
    sizes = {f.numel() for f in per_step}
    if len(sizes) != 1:
        raise ValueError(f"every step's features must have the same size, got sizes {sorted(sizes)}")
    return torch.stack([f.reshape(-1).double() for f in per_step])


def _pairwise_mse(F: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """[T, T] mean((F_t - F_t')^2) from the Gram matrix of the rows of F."""
    sq = gram.diagonal()
    return (sq[:, None] + sq[None, :] - 2 * gram).clamp_min(0) / F.shape[1]


def tdac_scores(features: StepFeatures | Sequence[torch.Tensor], r: float = TDAC_RADIUS
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """EDA-DM's raw per-step scores (float64, [T] each), from each step's flattened features F_t.

    density d_t = #{t' != t : mean((F_t - F_t')^2) <= r}: steps whose features many others share.
    diversity v_t = sum_{t' != t} (1 - cos(F_t, F_t')): steps pointing away from the rest.
    """
    F = _feature_matrix(features)
    gram = F @ F.T
    sq = gram.diagonal()
    mse = _pairwise_mse(F, gram)
    norms = sq.sqrt().clamp_min(1e-12)
    cos = gram / (norms[:, None] * norms[None, :])
    others = ~torch.eye(F.shape[0], dtype=torch.bool)
    density = ((mse <= r) & others).sum(dim=1).double()
    diversity = ((1 - cos) * others).sum(dim=1)
    return density, diversity


def _min_max(x: torch.Tensor) -> torch.Tensor:
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else torch.zeros_like(x)


def tdac_weights(features: StepFeatures | Sequence[torch.Tensor], r: float = TDAC_RADIUS,
                 lam: float = TDAC_LAMBDA) -> torch.Tensor:
    """EDA-DM's TDAC step weights w_t = d_hat_t + lam * v_hat_t (float64, [T]), with d and v from
    `tdac_scores` min-max normalised (a constant score normalises to zeros).

    Defaults are the paper's class-conditional ImageNet values (r = 3.0, lam = 1.2). The authors use
    r = 3.0 for ImageNet / CIFAR-10 and 0.3 for LSUN / COCO; lam = 1.2 ImageNet, 1.0 LSUN-bedroom,
    5.0 COCO. r is in the features' squared units, so it depends on the model and feature module.
    """
    if r < 0 or lam < 0:
        raise ValueError(f"need r >= 0 and lam >= 0, got r={r}, lam={lam}")
    density, diversity = tdac_scores(features, r)
    return _min_max(density) + lam * _min_max(diversity)


def median_step_distance(features: StepFeatures | Sequence[torch.Tensor]) -> float:
    """The median over step pairs t != t' of mean((F_t - F_t')^2): the scale of TDAC's radius on these
    features (0.0 for a single step). A radius r * median_step_distance counts, for r = 1, roughly
    half of the other steps as neighbours of a typical step, on any model and feature module."""
    F = _feature_matrix(features)
    if F.shape[0] < 2:
        return 0.0
    mse = _pairwise_mse(F, F @ F.T)
    return float(mse[~torch.eye(F.shape[0], dtype=torch.bool)].median())


def counts_from_weights(weights: Sequence[float] | torch.Tensor, n: int) -> list[int]:
    """n_t proportional to w_t, summing exactly to n: floor of n * w_t / sum(w), then the leftover
    one at a time to the largest remainders (ties to the earlier step), so |n_t - n*w_t/sum(w)| < 1.
    All-zero weights fall back to uniform_counts."""
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if n < 0 or w.numel() < 1 or not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"need n >= 0 and finite non-negative weights for >= 1 step, got n={n}, {w.tolist()}")
    total = w.sum()
    if total == 0:
        return uniform_counts(w.numel(), n)
    quota = (w * n / total).tolist()
    counts = [int(q // 1) for q in quota]
    by_remainder = sorted(range(len(quota)), key=lambda t: (counts[t] - quota[t], t))
    for t in by_remainder[: n - sum(counts)]:
        counts[t] += 1
    return counts


def capped_counts(weights: Sequence[float] | torch.Tensor, n: int, available: Sequence[int],
                  minimum: int = 0) -> list[int]:
    """counts_from_weights(weights, n), but no step above its `available` samples (select's limit).

    A step whose share n * w_t / sum(w) reaches its cap gets exactly the cap, and what it cannot take
    goes to the other steps in proportion to their weights (repeated until no share exceeds a cap; to
    the uncapped steps equally when their weights are all zero); the last shares are rounded as in
    counts_from_weights. So the counts sum exactly to n, count_t <= available_t, and with no cap
    reached they are counts_from_weights(weights, n). minimum: every step first gets min(minimum,
    available_t) (per-step ranges need data at every step), the rest is shared out as above.
    Deterministic. Raises ValueError when n exceeds sum(available) or the minimums exceed n.
    """
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    avail = [int(a) for a in available]
    if len(avail) != w.numel() or any(a < 0 for a in avail) or minimum < 0:
        raise ValueError(f"need one available count >= 0 per weight and minimum >= 0, got {avail} for "
                         f"{w.numel()} weights, minimum {minimum}")
    counts_from_weights(w, 0)  # validates the weights
    if n > sum(avail):
        raise ValueError(f"asked for {n} samples, but the steps hold only {sum(avail)} ({avail})")
    counts = [min(minimum, a) for a in avail]
    rest = n - sum(counts)
    if rest < 0:
        raise ValueError(f"a minimum of {minimum} samples per step needs {sum(counts)}, more than n = {n}")
    room = [a - c for a, c in zip(avail, counts, strict=True)]
    active = [t for t in range(len(avail)) if room[t] > 0]
    while active:
        share = w[active]
        quota = share * rest / share.sum() if share.sum() > 0 else torch.full((len(active),), rest / len(active))
        full = [t for t, q in zip(active, quota.tolist(), strict=True) if q >= room[t]]
        if not full:
            for t, extra in zip(active, counts_from_weights(share, rest), strict=True):
                counts[t] += extra
            break
        for t in full:
            counts[t] += room[t]
            rest -= room[t]
        active = [t for t in active if t not in full]
    return counts


def select(cal_set: CalibrationSet, counts: Sequence[int], seed: int = 0) -> CalibrationSet:
    """counts[i] samples of step cal_set.steps()[i], drawn without replacement by a seeded generator.

    A count is of samples (trajectories at that step): a guided sample keeps its cond AND null rows.
    Rows keep their captured order. The same (set, counts, seed) always gives the same rows, and the
    draws of one step do not depend on the counts of the others.
    """
    steps = cal_set.steps()
    if len(counts) != len(steps):
        raise ValueError(f"{len(counts)} counts for {len(steps)} steps {steps}")
    gen = torch.Generator().manual_seed(seed)
    keep = torch.zeros(len(cal_set), dtype=torch.bool)
    for s, k in zip(steps, counts, strict=True):
        at = cal_set.step == s
        ids = torch.unique(cal_set.sample_id[at])
        if not 0 <= k <= len(ids):
            raise ValueError(f"step {s}: asked for {k} samples, the set has {len(ids)}")
        chosen = ids[torch.randperm(len(ids), generator=gen)[:k]]
        keep |= at & torch.isin(cal_set.sample_id, chosen)
    picked = cal_set.subset(torch.nonzero(keep).flatten())
    return replace(picked, meta={**picked.meta, "selection": {"counts": [int(k) for k in counts], "seed": seed}})


# -- replay ----------------------------------------------------------------------------------------


def replay(cal_set: CalibrationSet, batch_size: int = 64, progress: bool = False
           ) -> Callable[[nn.Module], None]:
    """A `calibration=` function for diffquant.quantize: runs the denoiser it is given on the set's
    batches (one step each, inside `sampling_step(step, total)`, under no_grad), inputs on its device;
    total is the captured run's step count (meta "steps"), None when the set does not record it."""
    total = cal_set.meta.get("steps")
    total = total if isinstance(total, int) else None

    def run(denoiser: nn.Module) -> None:
        param = next(denoiser.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        with torch.no_grad():
            for step, kwargs in tqdm(cal_set.batches(batch_size), desc="calibrate", disable=not progress):
                with sampling_step(step, total):
                    denoiser(**_to_device(kwargs, device))

    return run


def _to_device(tree: Any, device: torch.device) -> Any:
    if isinstance(tree, dict):
        return {k: _to_device(v, device) for k, v in tree.items()}
    return tree.to(device) if isinstance(tree, torch.Tensor) else tree
