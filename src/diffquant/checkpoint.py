"""Real quantized checkpoints: safetensors + a JSON quantization config, atomic writes, no pickle.

A quantized model folder holds

    config.json                   the diffusers model config (model.save_config)
    diffquant_config.json         manifest: format version, model class, recipe, per-layer plan and
                                  packing, sha256 of the two files beside it
    diffquant_model.safetensors   every tensor of the model; quantized weights as packed integer
                                  codes (tensors/packing.py) "<layer>.weight_codes" with their
                                  qparams; low-rank branches (SVDQuant) as "<layer>.low_rank_down"
                                  [K, r] and "<layer>.low_rank_up" [r, out] (K = in_features, or
                                  kh·kw·c_in in (kh, kw, c_in) order for a Conv2d: the weight
                                  matrix's view, nn/layers.py) in the narrowest float
                                  dtype that holds them exactly (the manifest's per-layer
                                  "low_rank": {"rank", "dtype"}); attention-matmul operand
                                  quantizers (nn.attention) as "<attention>.matmul_quantizers.
                                  <operand>.scale" / ".zero_point" (float32, as calibrated or
                                  learned), their configs in the manifest's "attention" (path ->
                                  AttentionQuantConfig dict; the key only when there are any);
                                  everything else as it was

A pipeline folder keeps diffusers' layout (model_index.json + one folder per component) with the
denoiser's folder in the layout above, and adds diffquant_pipeline.json: the sha256 of every file in
the folder.

Both manifests are sealed (folders.sealed: a sha256 of their own canonical JSON) and validated against
their schema before any value in them is used; the model class is looked up in an allow-list
(folders.resolve_model_class), never imported from a name in a file; no file is ever unpickled.
Saves are atomic (atomic_directory): the folder appears whole or not at all, an existing folder is
replaced only when asked and only if it is a diffquant folder, and interrupted saves' leftovers are
cleared by the next save beside them.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from diffquant.atomic import atomic_directory
from diffquant.finite import NonFiniteError, check_finite
from diffquant.folders import (
    UnsafeFolderError,
    check_file_hashes,
    file_hashes,
    files_under,
    is_loadable_model_class,
    read_json,
    refuse_code_and_pickles,
    resolve_model_class,
    sealed,
)
from diffquant.formats.spec import QuantSpec
from diffquant.integrations.diffusers_io import load_pipeline_folder
from diffquant.job import STATE_ATTR, QuantizationState, quantized_layers
from diffquant.lora import require_detached
from diffquant.manifest import (
    DENOISER_COMPONENTS,
    FORMAT_NAME,
    FORMAT_VERSION,
    LOW_RANK_DTYPES,
    MANIFEST,
    MODEL_CONFIG,
    PIPELINE_FORMAT,
    PIPELINE_INDEX,
    PIPELINE_MANIFEST,
    TENSORS,
    CheckpointError,
    check_saved_pipeline,
    check_unsealed_pipeline,
    is_diffquant_folder,
    is_quantized_folder,
    layer_specs,
    read_manifest,
    saved_by_older_format,
    unsafe_as_checkpoint_error,
)
from diffquant.nn.attention import AttentionQuantConfig, attention_quantizers, install_attention_quantizers
from diffquant.nn.layers import QuantizedLayer, wrap_layer
from diffquant.plan import LayerPlan
from diffquant.recipes.config import Recipe, RecipeError
from diffquant.tensors.packing import pack_format_codes, packing_for, unpack_format_codes
from diffquant.thaw import thawed  # a frozen model is saved as the codes it was frozen from
from diffquant.version import __version__

__all__ = ["DENOISER_COMPONENTS", "MANIFEST", "MODEL_CONFIG", "PIPELINE_INDEX", "PIPELINE_MANIFEST", "TENSORS",
           "CheckpointError", "check_saved_pipeline", "is_quantized_folder", "load_pipeline_any", "load_quantized",
           "parameters_on_meta", "save_quantized", "saved_by_older_format"]


# -- saving ---------------------------------------------------------------------------------------


def _layer_entry(layer: QuantizedLayer, plan: LayerPlan) -> dict[str, Any]:
    wq = layer.weight_quantizer
    return {
        "role": plan.role,
        "type": type(layer).__name__,
        "weight": None if wq is None else wq.spec.to_dict(),
        "input": None if layer.input_quantizer is None else layer.input_quantizer.spec.to_dict(),
        "weight_shape": list(layer.weight_shape),
        "packing": None if wq is None else packing_for(wq.spec.bits),
        "codes_shape": None,
        "low_rank": None,
    }


def _low_rank_tensors(name: str, layer: QuantizedLayer, entry: dict[str, Any]) -> dict[str, torch.Tensor]:
    down, up = (t.detach() for t in layer.low_rank)
    dtype = next(d for d in LOW_RANK_DTYPES if all(torch.equal(t.to(d).to(t.dtype), t) for t in (down, up)))
    entry["low_rank"] = {"rank": down.shape[1], "dtype": str(dtype).removeprefix("torch.")}
    return {f"{name}.low_rank_down": down.to(dtype), f"{name}.low_rank_up": up.to(dtype)}


def _layer_tensors(name: str, layer: QuantizedLayer, entry: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The layer's tensors with the float weight replaced by packed codes and stored-dtype scales (an
    activation-only layer keeps its float weight)."""
    wq = layer.weight_quantizer
    tensors = {f"{name}.{k}": v for k, v in layer.state_dict().items() if k != "weight" or wq is None}
    if layer.low_rank is not None:
        tensors.update(_low_rank_tensors(name, layer, entry))
    if wq is None:
        return tensors
    codes = layer.weight_codes if layer.weight_codes is not None else wq.codes(layer.weight_matrix(layer.weight))
    entry["codes_shape"] = list(codes.shape)
    fmt = wq.spec.qformat
    tensors[f"{name}.weight_codes"] = pack_format_codes(codes, fmt)
    # the spec's scale format decides: float16 values, or E4M3 bit patterns beside the global scale
    tensors[f"{name}.weight_quantizer.scale"] = wq.spec.scale_format.encode(wq.scale, wq.global_scale)
    if wq.zero_point is not None:
        tensors[f"{name}.weight_quantizer.zero_point"] = wq.zero_point.to(fmt.storage_dtype())
    return tensors


def _model_tensors(model: nn.Module, state: QuantizationState) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    layers = quantized_layers(model)
    entries: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    prefixes = tuple(f"{n}." for n in layers)
    for key, value in model.state_dict().items():
        if not key.startswith(prefixes):
            tensors[key] = value
    for name, layer in layers.items():
        entries[name] = _layer_entry(layer, state.plan[name])
        tensors.update(_layer_tensors(name, layer, entries[name]))
    for key, value in tensors.items():
        check_finite(key, value, hint="nothing was saved: quantize from finite weights and calibration data")
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}, entries


def _attention_entries(model: nn.Module) -> dict[str, Any]:
    """{"attention": {path: config dict}} for the model's attention operand quantizers; {} without any
    (manifests of models without them stay as they were)."""
    installed = attention_quantizers(model)
    return {"attention": {path: q.config.to_dict() for path, q in installed.items()}} if installed else {}


def _state_of(model: nn.Module) -> QuantizationState:
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise ValueError("model is not quantized: call diffquant.quantize(model, recipe) first")
    return state


def _save_model_files(model: nn.Module, folder: Path) -> None:
    require_detached(model, "save a quantized model")
    state = _state_of(model)
    if not hasattr(model, "save_config"):
        raise TypeError(f"{type(model).__name__} is not a diffusers model (no save_config)")
    if not is_loadable_model_class(type(model)):
        raise TypeError(f"{type(model).__name__} is not a diffusers model class: register it with "
                        "diffquant.folders.register_model_class so that its checkpoints can be loaded")
    model.save_config(folder)
    with thawed(model):
        tensors, entries = _model_tensors(model, state)
    save_file(tensors, folder / TENSORS, metadata={"format": FORMAT_NAME})
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "diffquant_version": __version__,
        "model_class": type(model).__name__,
        "recipe": state.recipe.to_dict(),
        "layers": entries,
        **_attention_entries(model),
        **({"stage_reports": state.stage_reports} if state.stage_reports else {}),
        "sha256": file_hashes(folder, (Path(TENSORS), Path(MODEL_CONFIG))),
    }
    (folder / MANIFEST).write_text(json.dumps(sealed(manifest), indent=2))


def save_quantized(
    model_or_pipeline: Any,
    path: str | Path,
    overwrite: bool = False,
    extra_json: dict[str, Any] | None = None,
    source: str | Path | None = None,
) -> Path:
    """Write a quantized model (or a pipeline whose denoiser is quantized) to `path`, atomically.

    overwrite: replace an existing `path`, which must be a diffquant folder (or empty).
    extra_json: file name -> JSON-serialisable object written into the folder in the same atomic step
    (e.g. which zoo model the folder came from). source: the pipeline folder the pipeline was loaded
    from; its unquantized components are copied byte for byte instead of re-saved.
    """
    path = Path(path)
    with atomic_directory(path, overwrite, replaceable=is_diffquant_folder) as tmp:
        pipeline = hasattr(model_or_pipeline, "components")
        if pipeline:
            _save_pipeline(model_or_pipeline, tmp, None if source is None else Path(source))
        else:
            _save_model_files(model_or_pipeline, tmp)
        for name, content in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=2))
        if pipeline:
            _write_pipeline_manifest(tmp)
    return path


def _save_pipeline(pipe: Any, folder: Path, source: Path | None) -> None:
    pipe.save_config(folder)
    for name, component in pipe.components.items():
        if component is None:
            continue
        if getattr(component, STATE_ATTR, None) is not None:
            (folder / name).mkdir()
            _save_model_files(component, folder / name)
        elif source is not None and (source / name).is_dir():
            shutil.copytree(source / name, folder / name, symlinks=False)
        elif hasattr(component, "save_pretrained"):
            component.save_pretrained(folder / name, **_safe_serialization(component))
        else:
            raise TypeError(f"pipeline component {name!r} ({type(component).__name__}) cannot be saved")
    refuse_code_and_pickles(folder)


def _safe_serialization(component: Any) -> dict[str, bool]:
    """save_pretrained's safetensors switch, for the components whose save_pretrained has one."""
    import inspect

    params = inspect.signature(component.save_pretrained).parameters
    return {"safe_serialization": True} if "safe_serialization" in params else {}


def _write_pipeline_manifest(folder: Path) -> None:
    manifest = {"format": PIPELINE_FORMAT, "format_version": 1, "diffquant_version": __version__,
                "sha256": file_hashes(folder, files_under(folder))}
    (folder / PIPELINE_MANIFEST).write_text(json.dumps(sealed(manifest), indent=2))


# -- loading --------------------------------------------------------------------------------------


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create module parameters on the meta device (no memory, no init); buffers stay real.

    Loading then assigns the checkpoint's tensors, so no full-precision copy is ever materialised.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _verify_files(folder: Path, manifest: dict[str, Any], verify: bool) -> None:
    with unsafe_as_checkpoint_error():
        refuse_code_and_pickles(folder)
        check_file_hashes(folder, manifest["sha256"], verify, CheckpointError, exact=False)


def _build_empty_model(folder: Path, manifest: dict[str, Any]) -> nn.Module:
    try:
        cls = resolve_model_class(manifest["model_class"])
    except UnsafeFolderError as exc:
        raise CheckpointError(f"{folder / MANIFEST}: {exc}") from exc
    config = read_json(folder / MODEL_CONFIG, CheckpointError)
    if not isinstance(config, dict) or config.get("_class_name", cls.__name__) != cls.__name__:
        raise CheckpointError(f"{folder / MODEL_CONFIG} is not the config of a {cls.__name__}")
    try:
        with parameters_on_meta():
            return cls.from_config(config)
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{folder / MODEL_CONFIG}: cannot build a {cls.__name__}: {exc}") from exc


def _packed_codes(name: str, entry: dict[str, Any], spec: QuantSpec, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The stored codes of a layer, checked to be in the dtype and shape its spec packs to."""
    key = f"{name}.weight_codes"
    if key not in tensors:
        raise CheckpointError(f"layer {name!r}: {key} is missing from {TENSORS}")
    codes_shape = entry["codes_shape"]
    probe = pack_format_codes(torch.zeros(1, codes_shape[-1], dtype=torch.int16), spec.qformat)
    expected = (probe.dtype, [*codes_shape[:-1], probe.shape[-1]])
    packed = tensors.pop(key)
    if (packed.dtype, list(packed.shape)) != expected:
        raise CheckpointError(f"layer {name!r}: stored codes are {packed.dtype} {list(packed.shape)} but its "
                              f"{spec.format} spec packs to {expected[0]} {expected[1]}")
    return packed


def _prepare_layers(model: nn.Module, layers: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, LayerPlan]:
    plan = {}
    modules = dict(model.named_modules())
    for name, entry in layers.items():
        weight, inp = layer_specs(name, entry)
        if name not in modules:
            raise CheckpointError(f"checkpoint layer {name!r} does not exist in the model built from config.json")
        try:
            layer = wrap_layer(modules[name], weight, inp)
        except (TypeError, ValueError, NotImplementedError) as exc:
            raise CheckpointError(f"layer {name!r}: {exc}") from exc
        if type(layer).__name__ != entry["type"] or list(layer.weight.shape) != entry["weight_shape"]:
            raise CheckpointError(
                f"layer {name!r}: saved as a {entry['type']} of weight {entry['weight_shape']} but config.json "
                f"builds a {type(layer).__name__} of {list(layer.weight.shape)}"
            )
        if weight is not None:
            codes = unpack_format_codes(_packed_codes(name, entry, weight, tensors), weight.qformat,
                                        entry["codes_shape"][-1])
            tensors[f"{name}.weight_codes"] = codes
            _decode_weight_scale(name, weight, tensors)
            layer.hold_codes(codes)
        if entry.get("low_rank") is not None:
            _load_low_rank(name, layer, tensors)
        parent_path, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, attr, layer)
        plan[name] = LayerPlan(name, entry["role"], weight, inp)
    return plan


def _prepare_attention(model: nn.Module, entries: dict[str, Any]) -> None:
    """Install the recorded attention operand quantizers (their buffers are filled by load_state_dict)."""
    modules = dict(model.named_modules())
    for path, data in entries.items():
        if path not in modules:
            raise CheckpointError(f"checkpoint attention module {path!r} does not exist in the model built from "
                                  "config.json")
        try:
            config = AttentionQuantConfig.from_dict(data)
            install_attention_quantizers(model, config, select=lambda name, _module, path=path: name == path)
        except (ValueError, NotImplementedError) as exc:
            raise CheckpointError(f"attention module {path!r}: {exc}") from exc


def _decode_weight_scale(name: str, spec: QuantSpec, tensors: dict[str, torch.Tensor]) -> None:
    """Stored weight scales -> the float32 scales the maths uses (spec.scale_format.decode)."""
    key, global_key = f"{name}.weight_quantizer.scale", f"{name}.weight_quantizer.global_scale"
    if key not in tensors:
        return  # reported as a missing key by load_state_dict
    try:
        tensors[key] = spec.scale_format.decode(tensors[key], tensors.get(global_key))
    except ValueError as exc:
        raise CheckpointError(f"layer {name!r}: {exc}") from exc


def _load_low_rank(name: str, layer: QuantizedLayer, tensors: dict[str, torch.Tensor]) -> None:
    """Install the branch in the dtype of the layer's other floats (exact: see LOW_RANK_DTYPES)."""
    keys = (f"{name}.low_rank_down", f"{name}.low_rank_up")
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise CheckpointError(f"layer {name!r} is recorded with a low-rank branch but {missing} are missing")
    dtype = layer.bias.dtype if layer.bias is not None else torch.float32
    for key in keys:
        tensors[key] = tensors[key].to(dtype)
    try:
        layer.set_low_rank(*(tensors[k] for k in keys))
    except (ValueError, NotImplementedError) as exc:
        raise CheckpointError(f"layer {name!r}: {exc}") from exc


def _add_buffer_placeholders(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Give None buffers that the checkpoint fills a placeholder, so load_state_dict can assign them."""
    for key, value in tensors.items():
        owner_path, _, attr = key.rpartition(".")
        try:
            owner = model.get_submodule(owner_path)
        except AttributeError:
            continue  # reported as an unexpected key by load_state_dict
        if attr in owner._buffers and owner._buffers[attr] is None:
            owner._buffers[attr] = torch.empty_like(value, device="meta")


def load_quantized(path: str | Path, verify: bool = True, allow_unsealed: bool = False) -> Any:
    """Load a quantized model folder (or a pipeline folder with a quantized denoiser).

    verify=False skips the sha256 of the large files (the manifests' seals and schema are always
    checked). allow_unsealed=True also loads folders saved before manifests were sealed (format v1),
    which the caller vouches for; save them again to seal them."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if (path / PIPELINE_INDEX).is_file():
        return _load_pipeline(path, verify, allow_unsealed)
    return _load_model(path, verify, allow_unsealed)


def _load_model(folder: Path, verify: bool, allow_unsealed: bool = False) -> nn.Module:
    manifest = read_manifest(folder, allow_unsealed)
    _verify_files(folder, manifest, verify)
    try:
        recipe = Recipe.from_dict(manifest["recipe"])
    except RecipeError as exc:
        raise CheckpointError(f"{folder / MANIFEST}: recipe: {exc}") from exc
    try:
        tensors = load_file(folder / TENSORS)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{folder / TENSORS} cannot be read: {exc}") from exc
    for key, value in tensors.items():
        try:
            check_finite(key, value)
        except NonFiniteError as exc:
            raise CheckpointError(f"{folder / TENSORS}: {exc}") from exc
    model = _build_empty_model(folder, manifest)
    plan = _prepare_layers(model, manifest["layers"], tensors)
    _prepare_attention(model, manifest.get("attention", {}))
    _add_buffer_placeholders(model, tensors)
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{folder}: the tensors do not match the model built from config.json: {exc}") from exc
    left_on_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if left_on_meta:
        raise CheckpointError(f"{folder}: no tensors for parameters {left_on_meta[:5]}")
    setattr(model, STATE_ATTR, QuantizationState(recipe, plan, list(manifest.get("stage_reports", []))))
    return model.eval()


def load_pipeline_any(path: str | Path) -> Any:
    """A pipeline folder, full precision or with a quantized denoiser."""
    if is_quantized_folder(path):
        return load_quantized(path)
    return load_pipeline_folder(Path(path))


def _load_pipeline(folder: Path, verify: bool, allow_unsealed: bool) -> Any:
    from diffusers import DiffusionPipeline

    sealed_folder = (folder / PIPELINE_MANIFEST).is_file() or not allow_unsealed
    index = check_saved_pipeline(folder, verify) if sealed_folder else check_unsealed_pipeline(folder)
    # the denoiser's files are hashed above with the whole folder, when it has a pipeline manifest
    quantized = {name: _load_model(folder / name, verify and not sealed_folder, allow_unsealed)
                 for name in DENOISER_COMPONENTS if name in index and (folder / name / MANIFEST).is_file()}
    if not quantized:
        raise CheckpointError(f"{folder} is a pipeline folder without a quantized transformer or unet")
    return DiffusionPipeline.from_pretrained(folder, use_safetensors=True, **quantized)
