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

The jobs, one module each: this one holds the set (rows, batches); `set_files` its files on disk;
`recording` turns denoiser calls into rows; `capture` runs a sampler under the recorder; `tdac` the
step weights; `selection` the per-step counts and the draw; `playback` the replay.

Rows. One row is one batch row of one denoiser call, with the keyword inputs exactly as the sampler
passed them (`hidden_states` / `sample`, `timestep`, `class_labels` / `encoder_hidden_states`). With
classifier-free guidance a call holds the conditional rows, then the null rows; both are rows here,
tied by `sample_id` (the trajectory) and told apart by `conditional`. Counts in `select` are of
samples (trajectories at a step), so a guided pair is never split. An input is per row when it is a
tensor whose first axis is the call's row count (that of its first input; a 0-d tensor is broadcast
to the rows); any other tensor (e.g. FLUX's `img_ids`) is `shared`: stored once, passed whole to every
batch, and it must be the same in every call. Nested dict inputs (e.g. SDXL's `added_cond_kwargs`) are
stored under dotted names (`added_cond_kwargs.text_embeds`) and rebuilt on replay; None is dropped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffquant.calib.set_files import read_set_files, write_set_files

INPUT_PREFIX = "input."
SHARED_PREFIX = "shared."
ROW_KEYS = ("step", "sample_id", "conditional")
STATIC_TYPES = (bool, int, float, str)


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
        tensors = {k: v.detach().cpu().contiguous() for k, v in self._stored_tensors().items()}
        sidecar = {"rows": len(self), "inputs": sorted(self.inputs), "static": self.static, "meta": self.meta}
        if self.shared:
            sidecar["shared"] = sorted(self.shared)
        return write_set_files(path, tensors, sidecar)

    @classmethod
    def load(cls, path: str | Path) -> CalibrationSet:
        """Read a set written by `save`; checks the format, version and the tensors' digest."""
        tensors, sidecar = read_set_files(path)
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

