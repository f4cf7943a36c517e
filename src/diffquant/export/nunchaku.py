"""Export of SVDQuant models to the single-safetensors layout of the nunchaku runtime.

nunchaku (mit-han-lab/nunchaku, the SVDQuant inference engine) loads one safetensors file whose
quantized linears are `SVDQW4A4Linear` modules. For each exported layer `<name>` (the module path in
the model, e.g. ``transformer_blocks.0.attn1.to_q``) this module writes, with O = out_features,
I = in_features, r = rank, g = weight group size (64 for INT4, 16 for NVFP4), D = `dtype` (float16
unless asked otherwise):

    =========================== =============== ============= =====================================
    tensor                      shape           dtype         meaning
    =========================== =============== ============= =====================================
    <name>.qweight              [O, I/2]        int8          4-bit weight codes of the residual R,
                                                              two per byte (see "qweight" below)
    <name>.wscales              [I/g, O]        float16 (1)   INT4: group scales, w = code · scale
                                                float8_e4m3fn NVFP4: E4M3 block scales (units of
                                                              wtscale)
    <name>.wtscale              [1]             float32       NVFP4 only: the tensor (global) scale
    <name>.wcscales             [O]             D             NVFP4 only: per-channel scales, all 1
    <name>.smooth_factor        [I]             D             λ: the kernel computes x̂ = x / λ
    <name>.smooth_factor_orig   [I]             D             the same λ (nunchaku keeps the original
                                                              λ beside the one LoRAs may rescale)
    <name>.proj_down            [I, r]          D             L1, the branch's down factor
    <name>.proj_up              [O, r]          D             L2ᵀ, the branch's up factor (nunchaku
                                                              stores it output-major)
    <name>.bias                 [O]             D             only if the layer has a bias
    =========================== =============== ============= =====================================

(1) the scale dtype of the recipe (`scale_dtype: float16` in svdquant-w4a4), so the scales are the
    ones the model computes with, bit for bit.

The layer computes  Y = Q(x̂)·dequant(qweight, wscales)ᵀ + (x̂ · proj_down) · proj_upᵀ + bias,
x̂ = x / smooth_factor, with the input quantized dynamically in the weight's format and group size
(INT4 signed, or unsigned where the recipe made it `uint4`; NVFP4), as nunchaku's kernel does.

qweight: row o holds the codes of W[o, :] in input order; byte k holds code 2k in its low nibble and
code 2k+1 in its high nibble (diffquant.tensors.packing "nibbles"), stored as int8 (nunchaku's
parameter dtype; reinterpret as uint8 to read the nibbles). INT4 codes are 4-bit two's complement
(-8..7); NVFP4 codes are the E2M1 sign-magnitude bit patterns (sign in bit 3).

Layouts (`layout=`, metadata `layout`):
  * "logical" (`logical-v1`, the default): the plain row-major tensors above, unpadded.
  * "tiled" (`nunchaku-tiled-v1`): nunchaku's *runtime* order. nunchaku permutes qweight, wscales,
    bias, smooth_factor(_orig), wcscales and the low-rank factors into the tile order of its MMA
    kernels and pads O and I to multiples of 128 and r to a multiple of 16 (scales / smooth padded
    with 1, weights / bias / factors with 0); export/nunchaku_tiles.py documents the index algebra and
    converts both ways. Each layer's config then also records `padded` = [O_p, I_p, r_p], the sizes
    nunchaku's module must be built with; in_features / out_features / rank stay the logical ones.
    A layer whose O or I is not a multiple of 128 is exported padded, with a warning: nunchaku's
    module would compute O_p outputs where the model expects O.
  * wtscale is float32 here (nunchaku allocates it in the compute dtype): the exact global scale.
  * nunchaku writes the file's non-quantized tensors (norms, embeddings, adaLN linears) in the
    compute dtype under the diffusers names of its own model classes; here they are written under
    the diffquant model's names in their own dtype (`include_unquantized`), with no renaming.

Which layers are exported: a quantized nn.Linear (QLinear) whose weight is INT4 symmetric in groups
(or NVFP4) with the input quantized dynamically in the same 4-bit format and group size — what
`SVDQW4A4Linear` computes. A layer with a low-rank branch is exported with its rank; a matching
4-bit layer without a branch (e.g. left unsplit) is exported with rank 0 (empty proj tensors) — the
same module with no branch. Every other quantized layer (W8A8, weight-only, convolutions, ragged
groups) is skipped and listed with the reason in the metadata's `skipped`; nothing of a skipped layer
is written, not even with `include_unquantized`. nunchaku has no convolution layer, so SVDQuant convs
(a UNet's, with their low-rank branch: algorithms/svdquant.py) are skipped too, and export logs a
warning naming them: the file alone cannot run such a model. A model with no layer
carrying a branch is not an SVDQuant model and is refused (ValueError).

Metadata (safetensors header, strings): `format` = "nunchaku-svdquant", `layout` = "logical-v1",
`diffquant_version`, and `quantization_config`, a JSON string: {"method": "svdquant", "precision":
"int4" | "nvfp4" | "mixed", "group_size", "rank" (the largest), "dtype", "source_recipe",
"diffquant_version", "layers": {name: {"precision", "group_size", "rank", "in_features",
"out_features", "bias", "act_format", "act_unsigned"}}, "skipped": {name: reason}}.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from diffquant.atomic import atomic_file
from diffquant.checkpoint import DENOISER_COMPONENTS, CheckpointError, is_quantized_folder, load_quantized
from diffquant.export.nunchaku_tiles import ROW_TILE, pad_dims, tile_layer, untile_layer
from diffquant.formats import get_format
from diffquant.formats.granularity import GROUP
from diffquant.formats.scales import get_scale_format
from diffquant.job import STATE_ATTR, quantized_layers
from diffquant.nn import QLinear
from diffquant.tensors.packing import pack_format_codes, unpack_format_codes
from diffquant.version import __version__

log = logging.getLogger("diffquant.export")

FORMAT = "nunchaku-svdquant"
LAYOUTS = {"logical": "logical-v1", "tiled": "nunchaku-tiled-v1"}  # export option -> metadata value
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
LAYER_TENSORS = ("qweight", "wscales", "wtscale", "wcscales", "smooth_factor", "smooth_factor_orig",
                 "proj_down", "proj_up", "bias")
# weight format -> the input formats nunchaku's W4A4 kernel pairs with it
_ACT_FORMATS = {"int4": ("int4", "uint4"), "nvfp4": ("nvfp4",)}


# -- source ------------------------------------------------------------------------------------------

def _quantized_model(model_or_folder: Any) -> nn.Module:
    if isinstance(model_or_folder, nn.Module):
        if getattr(model_or_folder, STATE_ATTR, None) is None:
            raise ValueError("model is not quantized: call diffquant.quantize(model, recipe) first")
        return model_or_folder
    folder = Path(model_or_folder)
    if not folder.exists():
        raise CheckpointError(f"{folder} does not exist")
    if not is_quantized_folder(folder):
        raise CheckpointError(f"{folder} is not a quantized model folder (no diffquant_config.json): "
                              f"quantize it first with `diffquant quantize`")
    for component in DENOISER_COMPONENTS:  # a pipeline folder: load its quantized denoiser alone (the
        if is_quantized_folder(folder / component):  # file holds nothing else, and the pipeline class may
            return _quantized_model(folder / component)  # want components a zoo pipeline does not ship)
    loaded = load_quantized(folder)
    if isinstance(loaded, nn.Module):
        return loaded
    raise CheckpointError(f"{folder}: the pipeline has no quantized denoiser")


def _skip_reason(layer: Any) -> str | None:
    if not isinstance(layer, QLinear):
        branch = "" if layer.low_rank is None else f" (its rank-{layer.low_rank_down.shape[1]} SVDQuant branch is not exported)"
        return f"{type(layer).__name__}: nunchaku's W4A4 layer is a Linear{branch}"
    wq, iq = layer.weight_quantizer, layer.input_quantizer
    if wq is None:
        return "weight not quantized"
    ws = wq.spec
    if ws.format not in _ACT_FORMATS:
        return f"weight format {ws.format} (nunchaku: int4 or nvfp4)"
    if ws.grain is not GROUP or not ws.symmetric:
        return f"weight {ws.granularity} {'symmetric' if ws.symmetric else 'affine'} (nunchaku: symmetric groups)"
    if ws.format == "int4" and ws.scale_dtype not in ("float16", "bfloat16"):
        return f"int4 scales in {ws.scale_dtype} (nunchaku: 16-bit scales)"
    in_features = layer.weight_shape[1]
    if in_features % ws.group_size:
        return f"in_features {in_features} not a multiple of the group size {ws.group_size}"
    if iq is None:
        return "input not quantized (nunchaku's layer is W4A4)"
    ins = iq.spec
    if ins.format not in _ACT_FORMATS[ws.format] or not ins.dynamic or ins.group_size != ws.group_size:
        return (f"input {ins.format} {'dynamic' if ins.dynamic else 'static'} group {ins.group_size} "
                f"(nunchaku: dynamic {ws.format}, group {ws.group_size})")
    return None


# -- one layer ---------------------------------------------------------------------------------------

def layer_tensors(layer: Any, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The nunchaku tensors of one exportable QLinear (see the module docstring for the layout)."""
    wq = layer.weight_quantizer
    spec, fmt = wq.spec, wq.spec.qformat
    out_features, in_features = layer.weight_shape
    groups = in_features // spec.group_size
    codes = layer.weight_codes if layer.weight_codes is not None else wq.codes(layer.weight_matrix(layer.weight))
    tensors = {"qweight": pack_format_codes(codes.detach(), fmt).view(torch.int8)}
    stored_scale = spec.scale_format.encode(wq.scale.detach(), wq.global_scale)  # [O * groups, 1]
    wscales = stored_scale.reshape(out_features, groups).t().contiguous()
    if spec.format == "nvfp4":
        tensors["wscales"] = wscales.view(torch.float8_e4m3fn)  # E4M3 bit patterns, OCP "fn" encoding
        tensors["wtscale"] = wq.global_scale.detach().float().reshape(1)
        tensors["wcscales"] = torch.ones(out_features, dtype=dtype)
    else:
        tensors["wscales"] = wscales
    smooth = layer.smooth if layer.smooth is not None else torch.ones(in_features)
    tensors["smooth_factor"] = smooth.detach().to(dtype)
    tensors["smooth_factor_orig"] = smooth.detach().to(dtype)
    if layer.low_rank is not None:
        down, up = (t.detach() for t in layer.low_rank)
        tensors["proj_down"] = down.to(dtype)  # [I, r]
        tensors["proj_up"] = up.t().to(dtype)  # [O, r]
    else:
        tensors["proj_down"] = torch.zeros(in_features, 0, dtype=dtype)
        tensors["proj_up"] = torch.zeros(out_features, 0, dtype=dtype)
    if layer.bias is not None:
        tensors["bias"] = layer.bias.detach().to(dtype)
    return {k: v.contiguous().cpu() for k, v in tensors.items()}


def _layer_config(layer: Any) -> dict[str, Any]:
    ws, ins = layer.weight_quantizer.spec, layer.input_quantizer.spec
    out_features, in_features = layer.weight_shape
    return {"precision": ws.format, "group_size": ws.group_size,
            "rank": 0 if layer.low_rank is None else int(layer.low_rank_down.shape[1]),
            "in_features": int(in_features), "out_features": int(out_features), "bias": layer.bias is not None,
            "act_format": ins.format, "act_unsigned": ins.format.startswith("u")}


# -- export ------------------------------------------------------------------------------------------

def export_nunchaku(model_or_folder: Any, out_file: str | Path, dtype: str = "float16",
                    include_unquantized: bool = True, overwrite: bool = True, layout: str = "logical") -> Path:
    """Write an SVDQuant model (quantized model or saved folder) as one nunchaku safetensors file.

    layout: "logical" (row-major, unpadded) or "tiled" (nunchaku's runtime tile order, padded); see the
    module docstring.
    dtype: the compute dtype of the 16-bit tensors (smooth, low-rank factors, bias): "float16"
    (default, as nunchaku's FP16 models), "bfloat16" or "float32" (lossless for every tensor).
    include_unquantized: also write the model's tensors outside the quantized layers (as they are).
    The file is written to a temporary name beside `out_file` and renamed: never half-written.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: choose one of {sorted(LAYOUTS)}")
    torch_dtype = DTYPES[dtype]
    model = _quantized_model(model_or_folder)
    layers = quantized_layers(model)
    tensors, configs, skipped = _export_layers(layers, torch_dtype, layout)
    _warn_skipped_branches(layers, skipped)
    if not any(c["rank"] for c in configs.values()):
        raise ValueError("no SVDQuant layer to export: the model has no quantized Linear with a low-rank "
                         "branch in nunchaku's W4A4 formats (quantize it with svdquant-w4a4 or svdquant-nvfp4)"
                         + (f"; skipped: {dict(list(skipped.items())[:3])}" if skipped else ""))
    if include_unquantized:
        prefixes = tuple(f"{n}." for n in layers)
        for key, value in model.state_dict().items():
            if not key.startswith(prefixes) and key not in tensors:
                tensors[key] = value.detach().contiguous().cpu()
    precisions = sorted({c["precision"] for c in configs.values()})
    groups = sorted({c["group_size"] for c in configs.values()})
    state = getattr(model, STATE_ATTR)
    config = {
        "method": "svdquant",
        "precision": precisions[0] if len(precisions) == 1 else "mixed",
        "group_size": groups[0] if len(groups) == 1 else None,
        "rank": max(c["rank"] for c in configs.values()),
        "dtype": dtype,
        "layout": LAYOUTS[layout],
        "source_recipe": state.recipe.name,
        "diffquant_version": __version__,
        "layers": configs,
        "skipped": skipped,
    }
    metadata = {"format": FORMAT, "layout": LAYOUTS[layout], "diffquant_version": __version__,
                "quantization_config": json.dumps(config, sort_keys=True)}
    return _atomic_save(tensors, metadata, Path(out_file), overwrite)


def _export_layers(layers: dict[str, Any], torch_dtype: torch.dtype, layout: str
                   ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, str]]:
    """(tensors, per-layer configs, skipped layers with the reason) of the exportable quantized layers."""
    tensors: dict[str, torch.Tensor] = {}
    configs: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for name, layer in layers.items():
        reason = _skip_reason(layer)
        if reason is not None:
            skipped[name] = reason
            continue
        configs[name] = _layer_config(layer)
        layer_out = layer_tensors(layer, torch_dtype)
        if layout == "tiled":
            layer_out = _tiled(layer_out, configs[name], name)
        tensors.update({f"{name}.{k}": v for k, v in layer_out.items()})
    return tensors, configs, skipped


def _tiled(tensors: dict[str, torch.Tensor], config: dict[str, Any], name: str) -> dict[str, torch.Tensor]:
    """One layer's tensors in nunchaku's tile order; records the padded sizes in its config."""
    config["padded"] = list(pad_dims(config["out_features"], config["in_features"], config["rank"]))
    if config["out_features"] % ROW_TILE or config["in_features"] % ROW_TILE:
        log.warning("nunchaku export: %s (%d -> %d) is padded to %d -> %d: nunchaku's layer needs multiples of "
                    "%d and would compute the padded outputs too", name, config["in_features"],
                    config["out_features"], config["padded"][1], config["padded"][0], ROW_TILE)
    return {k: v.contiguous() for k, v in tile_layer(tensors).items()}


def _warn_skipped_branches(layers: dict[str, Any], skipped: dict[str, str]) -> None:
    """Say it loudly when SVDQuant layers (with a branch, e.g. a UNet's convs) stay out of the file."""
    lost = [n for n in skipped if layers[n].low_rank is not None]
    if lost:
        log.warning("nunchaku export: %d SVDQuant layers with a low-rank branch are skipped and not written "
                    "(nunchaku has no such layer; see the metadata's 'skipped'): %s%s", len(lost),
                    ", ".join(lost[:8]), ", ..." if len(lost) > 8 else "")


def _atomic_save(tensors: dict[str, torch.Tensor], metadata: dict[str, str], out: Path, overwrite: bool) -> Path:
    seen: set[int] = set()
    for key, value in tensors.items():  # safetensors refuses shared storage (tied weights, shared λ)
        ident = value.untyped_storage().data_ptr()
        if value.numel() and ident in seen:
            tensors[key] = value.clone()
        seen.add(ident)
    with atomic_file(out, overwrite) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return out


# -- import ------------------------------------------------------------------------------------------

@dataclass
class NunchakuFile:
    """An exported file read back: per-layer tensors (keys as in LAYER_TENSORS), the other tensors,
    and the parsed quantization config."""

    config: dict[str, Any]
    layers: dict[str, dict[str, torch.Tensor]]
    other: dict[str, torch.Tensor] = field(default_factory=dict)

    def decoded(self, name: str) -> dict[str, torch.Tensor]:
        """diffquant's view of one layer: codes [O, I] (format storage dtype), scale [O·I/g, 1]
        float32 (as WeightQuantizer.scale), global_scale (NVFP4), smooth [I], low_rank_down [I, r],
        low_rank_up [r, O], bias."""
        cfg, t = self.config["layers"][name], self.layers[name]
        fmt = get_format(cfg["precision"])
        out: dict[str, torch.Tensor] = {
            "codes": unpack_format_codes(t["qweight"].view(torch.uint8), fmt, cfg["in_features"]),
            "smooth": t["smooth_factor"], "low_rank_down": t["proj_down"], "low_rank_up": t["proj_up"].t(),
        }
        if cfg["precision"] == "nvfp4":
            out["global_scale"] = t["wtscale"]
            scale = get_scale_format("e4m3").decode(t["wscales"].view(torch.uint8), t["wtscale"])
        else:
            scale = t["wscales"].float()
        out["scale"] = scale.t().reshape(-1, 1)
        if "bias" in t:
            out["bias"] = t["bias"]
        return out


def import_nunchaku(file: str | Path) -> NunchakuFile:
    """Read a file written by export_nunchaku back into per-layer tensors (a tiled file is converted back
    to the logical layout)."""
    path = Path(file)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            raw = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{path} cannot be read as safetensors: {exc}") from exc
    if metadata.get("format") != FORMAT or "quantization_config" not in metadata:
        raise ValueError(f"{path} is not a {FORMAT} export (metadata format {metadata.get('format')!r})")
    if metadata.get("layout") not in LAYOUTS.values():
        raise ValueError(f"{path}: layout {metadata.get('layout')!r}, this reader knows {sorted(LAYOUTS.values())}")
    config = json.loads(metadata["quantization_config"])
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for name, cfg in config["layers"].items():
        layers[name] = {k: raw.pop(f"{name}.{k}") for k in LAYER_TENSORS if f"{name}.{k}" in raw}
        if metadata["layout"] == LAYOUTS["tiled"]:
            layers[name] = untile_layer(layers[name], cfg["out_features"], cfg["in_features"], cfg["rank"])
    return NunchakuFile(config, layers, raw)
