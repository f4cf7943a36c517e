"""The quantized checkpoint's manifest: file names, format versions, the schema every manifest is checked
against before any value in it is used, and reading it (checkpoint.py writes and loads the folders).

A model folder's diffquant_config.json and a pipeline folder's diffquant_pipeline.json are sealed with
a sha256 of their own canonical JSON (folders.sealed). Format v1 manifests (before sealing) are read
only when the caller vouches for the folder (allow_unsealed).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from diffquant import folders
from diffquant.folders import (
    UnsafeFolderError,
    check_file_hashes,
    check_seal,
    read_json,
    read_pipeline_index,
    refuse_code_and_pickles,
)
from diffquant.formats.spec import QuantSpec, SpecError
from diffquant.tensors.packing import packing_for

FORMAT_NAME = "diffquant-quantized"
FORMAT_VERSION = 2  # 2: sealed, schema-checked manifest; the model class from an allow-list
UNSEALED_VERSION = 1  # loaded only with allow_unsealed=True
MANIFEST = "diffquant_config.json"
PIPELINE_INDEX = folders.PIPELINE_INDEX
TENSORS = "diffquant_model.safetensors"
MODEL_CONFIG = "config.json"
PIPELINE_MANIFEST = "diffquant_pipeline.json"
PIPELINE_FORMAT = "diffquant-pipeline"
DENOISER_COMPONENTS = ("transformer", "unet")

log = logging.getLogger("diffquant.checkpoint")


class CheckpointError(ValueError):
    """A quantized checkpoint that is missing, corrupt, tampered with or for another model."""


def is_diffquant_folder(path: Path) -> bool:
    """What a save may replace with overwrite: a folder diffquant wrote (a quantized model or pipeline),
    or an empty folder."""
    return path.is_dir() and not path.is_symlink() and (is_quantized_folder(path) or not any(path.iterdir()))


# Low-rank factors are stored in the first of these that holds them exactly (SVDQuant rounds its
# branch to 16 bits, so float16 is the rule and reload stays bitwise identical).
LOW_RANK_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOW_RANK_DTYPE_NAMES = tuple(str(d).removeprefix("torch.") for d in LOW_RANK_DTYPES)


# -- manifest schema ------------------------------------------------------------------------------

_MANIFEST_FIELDS = {"format": str, "format_version": int, "diffquant_version": str, "model_class": str,
                    "recipe": dict, "layers": dict, "sha256": dict}
_MANIFEST_OPTIONAL = {"attention": dict, "stage_reports": list}
_LAYER_FIELDS = {"role": str, "type": str, "weight": (dict, type(None)), "input": (dict, type(None)),
                 "weight_shape": list, "packing": (str, type(None)), "codes_shape": (list, type(None)),
                 "low_rank": (dict, type(None))}
_LOW_RANK_FIELDS = {"rank": int, "dtype": str}


def _check_fields(where: str, data: Any, required: dict[str, Any], optional: dict[str, Any] | None = None) -> None:
    """`data` is a JSON object with exactly the required keys (+ optional ones), each of its type."""
    optional = optional or {}
    if not isinstance(data, dict):
        raise CheckpointError(f"{where} is not a JSON object")
    missing, unknown = sorted(set(required) - set(data)), sorted(set(data) - set(required) - set(optional))
    if missing or unknown:
        raise CheckpointError(f"{where}: {'missing keys ' + str(missing) if missing else ''}"
                              f"{'; ' if missing and unknown else ''}{'unknown keys ' + str(unknown) if unknown else ''}")
    for key, kind in {**required, **optional}.items():
        value = data.get(key)
        if key in data and (not isinstance(value, kind) or (isinstance(value, bool) and kind is int)):
            raise CheckpointError(f"{where}: {key!r} has the wrong type ({type(value).__name__})")


def _positive_ints(where: str, values: Any) -> list[int]:
    if not isinstance(values, list) or not values or not all(
            type(v) is int and v > 0 for v in values):
        raise CheckpointError(f"{where} must be a list of positive integers, got {values!r}")
    return values


def _spec(where: str, data: dict[str, Any] | None, check: str) -> QuantSpec | None:
    if data is None:
        return None
    try:
        spec = QuantSpec.from_dict(data)
        getattr(spec, check)()
    except (SpecError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: {exc}") from exc
    return spec


def layer_specs(name: str, entry: Any) -> tuple[QuantSpec | None, QuantSpec | None]:
    """Validate one manifest layer entry; its weight and input specs."""
    where = f"{MANIFEST} layer {name!r}"
    _check_fields(where, entry, _LAYER_FIELDS)
    weight = _spec(f"{where} weight", entry["weight"], "validate_for_weight")
    inp = _spec(f"{where} input", entry["input"], "validate_for_activation")
    _positive_ints(f"{where} weight_shape", entry["weight_shape"])
    expected_packing = None if weight is None else packing_for(weight.bits)
    if entry["packing"] != expected_packing:
        raise CheckpointError(f"{where}: packing {entry['packing']!r} does not fit its weight spec "
                              f"({expected_packing!r})")
    if (entry["codes_shape"] is None) != (weight is None):
        raise CheckpointError(f"{where}: codes_shape must be given exactly when the weight is quantized")
    if weight is not None:
        codes = _positive_ints(f"{where} codes_shape", entry["codes_shape"])
        if _numel(codes) != _numel(entry["weight_shape"]):
            raise CheckpointError(f"{where}: codes_shape {codes} does not hold weight_shape {entry['weight_shape']}")
    if entry["low_rank"] is not None:
        _check_fields(f"{where} low_rank", entry["low_rank"], _LOW_RANK_FIELDS)
        if entry["low_rank"]["dtype"] not in LOW_RANK_DTYPE_NAMES or entry["low_rank"]["rank"] < 1:
            raise CheckpointError(f"{where}: low_rank {entry['low_rank']!r} is not a positive rank in one of "
                                  f"{LOW_RANK_DTYPE_NAMES}")
    return weight, inp


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _unsealed(folder: Path, manifest: dict[str, Any], allow: bool) -> dict[str, Any]:
    """A v1 manifest (written before manifests were sealed): only when the caller vouches for the folder."""
    if not allow:
        raise CheckpointError(
            f"{folder} was saved before diffquant sealed its manifests (format v{UNSEALED_VERSION}), so edits to "
            "it cannot be detected. If you trust it, load it with load_quantized(path, allow_unsealed=True) "
            "and save it again to seal it, or quantize the model again")
    log.warning("%s: loading an unsealed v%d manifest (allow_unsealed=True): its model_module is ignored and "
                "its schema checked; save the model again to seal it", folder / MANIFEST, UNSEALED_VERSION)
    return {k: v for k, v in manifest.items() if k != "model_module"}  # never imported: see folders.py


def read_manifest(folder: Path, allow_unsealed: bool = False) -> dict[str, Any]:
    """The folder's manifest, its seal and schema checked (nothing of it is used before that)."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder} does not exist or is not a folder")
    for name in (MANIFEST, MODEL_CONFIG, TENSORS):
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder} is not a complete diffquant checkpoint: {name} is missing")
    manifest = read_json(folder / MANIFEST, CheckpointError)
    version = (manifest.get("format"), manifest.get("format_version")) if isinstance(manifest, dict) else None
    version = version if version is not None and type(version[1]) is int else (None, None)  # True is not 1
    if version == (FORMAT_NAME, UNSEALED_VERSION):
        manifest = _unsealed(folder, manifest, allow_unsealed)
    elif version == (FORMAT_NAME, FORMAT_VERSION):
        manifest = check_seal(manifest, folder / MANIFEST, CheckpointError)
    else:
        raise CheckpointError(f"{folder / MANIFEST}: format {version} is not ({FORMAT_NAME!r}, {FORMAT_VERSION})")
    _check_fields(str(folder / MANIFEST), manifest, _MANIFEST_FIELDS, _MANIFEST_OPTIONAL)
    if set(manifest["sha256"]) != {TENSORS, MODEL_CONFIG}:
        raise CheckpointError(f"{folder / MANIFEST}: sha256 must list exactly {TENSORS} and {MODEL_CONFIG}")
    return manifest


def saved_by_older_format(path: str | Path) -> bool:
    """A quantized model or pipeline folder whose manifest is of an older format than this diffquant writes."""
    path = Path(path)
    for manifest in (path / MANIFEST, *(path / n / MANIFEST for n in DENOISER_COMPONENTS)):
        if manifest.is_file():
            data = read_json(manifest, CheckpointError)
            return isinstance(data, dict) and data.get("format_version") != FORMAT_VERSION
    return False


def is_quantized_folder(path: str | Path) -> bool:
    """A quantized model folder, or a pipeline folder with a quantized denoiser."""
    path = Path(path)
    return (path / MANIFEST).is_file() or any((path / n / MANIFEST).is_file() for n in DENOISER_COMPONENTS)


def check_saved_pipeline(folder: Path, verify: bool) -> dict[str, Any]:
    """The pipeline manifest sealed and every file of the folder as saved; model_index.json allow-listed."""
    where = folder / PIPELINE_MANIFEST
    if not where.is_file():
        raise CheckpointError(f"{folder} has no {PIPELINE_MANIFEST}: it was not saved by this diffquant version "
                              "(quantize the pipeline again)")
    manifest = check_seal(read_json(where, CheckpointError), where, CheckpointError)
    _check_fields(str(where), manifest, {"format": str, "format_version": int, "diffquant_version": str,
                                         "sha256": dict})
    if (manifest["format"], manifest["format_version"]) != (PIPELINE_FORMAT, 1):
        raise CheckpointError(f"{where}: format {manifest['format']!r} v{manifest['format_version']} is not "
                              f"{PIPELINE_FORMAT!r} v1")
    with unsafe_as_checkpoint_error():
        refuse_code_and_pickles(folder)
        check_file_hashes(folder, manifest["sha256"], verify, CheckpointError, exempt=(PIPELINE_MANIFEST,))
        return read_pipeline_index(folder)


def check_unsealed_pipeline(folder: Path) -> dict[str, Any]:
    """A pipeline folder saved before pipeline manifests: nothing that runs code, an allow-listed index."""
    with unsafe_as_checkpoint_error():
        refuse_code_and_pickles(folder)
        return read_pipeline_index(folder)


@contextlib.contextmanager
def unsafe_as_checkpoint_error() -> Iterator[None]:
    """folders.py's refusals, reported as what they are to a loader: a checkpoint it cannot load."""
    try:
        yield
    except UnsafeFolderError as exc:
        raise CheckpointError(str(exc)) from exc
