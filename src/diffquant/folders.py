"""What diffquant may load from a folder it did not write itself: nothing that runs code.

- Model and pipeline classes come from an allow-list (diffusers' own exports, and classes registered
  with `register_model_class`); a name in a file is looked up there, never imported as a module.
- No file is unpickled: folders holding pickle-based weights (.bin, .pt, .ckpt, ...) or Python files
  are refused with a message that says how to convert them.
- JSON manifests are sealed with a sha256 of their canonical text, so an edit is caught before any of
  their values is used; files beside them are listed with their sha256.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any


class UnsafeFolderError(ValueError):
    """A folder whose loading could run code, or whose files do not match what was saved."""


# Weights in these are pickles (torch.load runs code unless weights_only holds, and even then the
# format is not ours to trust); .py files are what diffusers' dynamic modules would import.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
CODE_SUFFIXES = (".py", ".pyc", ".so")
CONVERT_HINT = ("convert it to safetensors first: load it where you trust it and call "
                "save_pretrained(folder, safe_serialization=True)")

PIPELINE_INDEX = "model_index.json"  # a diffusers pipeline folder's list of components
# Libraries a pipeline's model_index.json may name for its components.
COMPONENT_LIBRARIES = ("diffusers", "transformers")

_MODEL_CLASSES: dict[str, type] = {}


def register_model_class(cls: type) -> type:
    """Allow a model class that is not one of diffusers' exports to be loaded from checkpoints."""
    _MODEL_CLASSES[cls.__name__] = cls
    return cls


def _diffusers_export(name: str, base_name: str) -> type | None:
    import diffusers

    if not name.isidentifier() or name.startswith("_"):
        return None
    cls = getattr(diffusers, name, None)
    base = getattr(diffusers, base_name)
    return cls if isinstance(cls, type) and issubclass(cls, base) else None


def resolve_model_class(name: Any) -> type:
    """The model class a checkpoint names: a registered class or a diffusers model class, else an error."""
    cls = _MODEL_CLASSES.get(name) if isinstance(name, str) else None
    cls = cls or (_diffusers_export(name, "ModelMixin") if isinstance(name, str) else None)
    if cls is None:
        raise UnsafeFolderError(f"model class {name!r} is neither a diffusers model class nor registered with "
                                "diffquant.folders.register_model_class: refusing to load it")
    return cls


def is_loadable_model_class(cls: type) -> bool:
    try:
        return resolve_model_class(cls.__name__) is cls
    except UnsafeFolderError:
        return False


def files_under(folder: Path) -> list[Path]:
    """Every file below `folder` (relative paths, sorted); links are refused, not followed."""
    found = []
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            raise UnsafeFolderError(f"{path} is a symbolic link: a saved folder holds plain files only")
        if path.is_file():
            found.append(path.relative_to(folder))
    return found


def refuse_code_and_pickles(folder: Path) -> None:
    """Raise if any file below `folder` is a pickle or could be imported as code."""
    for rel in files_under(folder):
        if rel.suffix in PICKLE_SUFFIXES:
            raise UnsafeFolderError(f"{folder / rel} holds pickled weights, which diffquant never loads: "
                                    f"{CONVERT_HINT}")
        if rel.suffix in CODE_SUFFIXES:
            raise UnsafeFolderError(f"{folder / rel} is code; diffquant never imports code from a model folder: "
                                    "remove it")


def check_pipeline_index(index: Any, where: Path) -> None:
    """model_index.json names a diffusers pipeline class and components from allow-listed libraries."""
    if not isinstance(index, dict):
        raise UnsafeFolderError(f"{where} is not a JSON object")
    if _diffusers_export(index.get("_class_name", ""), "DiffusionPipeline") is None:
        raise UnsafeFolderError(f"{where}: _class_name {index.get('_class_name')!r} is not a diffusers pipeline class")
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list):
            continue
        if len(value) != 2 or value[0] not in (*COMPONENT_LIBRARIES, None):
            raise UnsafeFolderError(f"{where}: component {name!r} comes from {value!r}; only "
                                    f"{' and '.join(COMPONENT_LIBRARIES)} classes are loaded")


def read_pipeline_index(folder: Path) -> dict[str, Any]:
    """The folder's model_index.json, checked against the allow-list (check_pipeline_index)."""
    index = read_json(folder / PIPELINE_INDEX, UnsafeFolderError)
    check_pipeline_index(index, folder / PIPELINE_INDEX)
    return index


def read_json(path: Path, error: type[Exception]) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path} cannot be read as JSON: {exc}") from exc


# -- hashes ---------------------------------------------------------------------------------------

SEAL = "manifest_sha256"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _canonical_sha(data: dict[str, Any]) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def sealed(data: dict[str, Any]) -> dict[str, Any]:
    """`data` with its own sha256 added (of the canonical JSON of everything else)."""
    return {**data, SEAL: _canonical_sha(data)}


def check_seal(data: Any, where: Path, error: type[Exception]) -> dict[str, Any]:
    """The manifest without its seal, after checking that nothing in it changed since it was written."""
    if not isinstance(data, dict) or not isinstance(data.get(SEAL), str):
        raise error(f"{where} has no {SEAL}: it was not written by this diffquant version or was edited")
    body = {k: v for k, v in data.items() if k != SEAL}
    if _canonical_sha(body) != data[SEAL]:
        raise error(f"{where} was edited after it was saved (its {SEAL} does not match): refusing to load it")
    return body


def file_hashes(folder: Path, names: Iterable[Path]) -> dict[str, str]:
    return {rel.as_posix(): sha256_of(folder / rel) for rel in names}


def check_file_hashes(folder: Path, expected: Any, verify: bool, error: type[Exception],
                      exact: bool = True, exempt: tuple[str, ...] = ()) -> None:
    """The files `expected` lists (relative path -> sha256) are there and, with verify, unchanged;
    with exact, nothing else is in the folder but the `exempt` ones (the manifest itself)."""
    if not isinstance(expected, dict) or not expected or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in expected.items()):
        raise error(f"{folder}: the manifest lists no sha256 of its files")
    present = {rel.as_posix() for rel in files_under(folder)}
    missing = sorted(set(expected) - present)
    if missing:
        raise error(f"{folder} is incomplete: {missing[:5]} missing")
    extra = sorted(present - set(expected) - set(exempt)) if exact else []
    if extra:
        raise error(f"{folder} holds files that were not saved with it: {extra[:5]}")
    for rel, sha in expected.items():
        if verify and sha256_of(folder / rel) != sha:
            raise error(f"{folder / rel} does not match the sha256 recorded when it was saved: the file was "
                        "truncated, modified or replaced")
