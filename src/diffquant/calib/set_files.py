"""A calibration set on disk: tensors in a .safetensors file, everything else in a .json sidecar.

Both files carry a sha256 of the tensors, so a torn pair (new tensors with an old sidecar) is refused;
each is written to a temporary name beside its target and renamed into place (diffquant.atomic).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffquant.atomic import atomic_file, write_json_atomic

FORMAT = "diffquant-calibration-set"
VERSION = 1


def write_set_files(path: str | Path, tensors: dict[str, torch.Tensor], sidecar: dict[str, Any]) -> Path:
    """`tensors` (contiguous, on the CPU) to `path` and `sidecar` plus format, version and digest to its
    .json; returns the .safetensors path."""
    path = tensors_path(path)
    digest = _digest(tensors)
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "version": str(VERSION), "sha256": digest})
    write_json_atomic(path.with_suffix(".json"), {"format": FORMAT, "version": VERSION, **sidecar, "sha256": digest},
                      sort_keys=True)
    return path


def read_set_files(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, sidecar) of a pair written by `write_set_files`; checks the format, version and digest."""
    path = tensors_path(path)
    sidecar = json.loads(path.with_suffix(".json").read_text())
    if sidecar.get("format") != FORMAT or sidecar.get("version") != VERSION:
        raise ValueError(f"{path}: not a {FORMAT} v{VERSION} sidecar "
                         f"(format {sidecar.get('format')!r}, version {sidecar.get('version')!r})")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    if not sidecar["sha256"] == metadata.get("sha256") == _digest(tensors):
        raise ValueError(f"{path}: tensors and sidecar do not match (torn or corrupt save)")
    return tensors, sidecar


def tensors_path(path: str | Path) -> Path:
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
