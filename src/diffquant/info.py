"""Summaries of quantized checkpoints: bits per role, parameters, bytes on disk vs 16-bit."""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from safetensors import safe_open

from diffquant.formats import get_format
from diffquant.manifest import MANIFEST, PIPELINE_INDEX, TENSORS, CheckpointError, read_manifest
from diffquant.nn.attention import AttentionQuantConfig, summary_of


def _numel(shape: list[int]) -> int:
    return math.prod(shape)


def _model_folder(path: Path) -> Path:
    if (path / PIPELINE_INDEX).is_file():
        for sub in sorted(path.iterdir()):
            if (sub / MANIFEST).is_file():
                return sub
        raise CheckpointError(f"{path} is a pipeline folder without a quantized component")
    return path


def checkpoint_info(path: str | Path) -> dict[str, Any]:
    """Per-role and total figures of a quantized model or pipeline folder."""
    folder = _model_folder(Path(path))
    manifest = read_manifest(folder)
    stages = stage_scalars(manifest.get("stage_reports", []))
    layer_bytes: dict[str, int] = defaultdict(int)
    total_params = 0
    with safe_open(folder / TENSORS, framework="pt") as f:
        for key in f.keys():  # noqa: SIM118  (safe_open has no __iter__)
            tensor = f.get_slice(key)
            shape, dtype = tensor.get_shape(), tensor.get_dtype()
            nbytes = _numel(shape) * _DTYPE_BYTES[dtype]
            owner = next((n for n in manifest["layers"] if key.startswith(n + ".")), None)
            if owner is not None:
                layer_bytes[owner] += nbytes
            if not key.endswith(("weight_codes", "scale", "zero_point", "smooth")):
                total_params += _numel(shape)
    roles: dict[str, dict[str, Any]] = {}
    for name, entry in manifest["layers"].items():
        row = roles.setdefault(entry["role"], {"layers": 0, "params": 0, "weight_bits": set(), "input_bits": set(),
                                               "bytes": 0, "weight_formats": Counter(), "input_formats": Counter()})
        row["layers"] += 1
        row["weight_formats"][_format(entry["weight"])] += 1  # per layer: a format search mixes them
        row["input_formats"][_format(entry["input"])] += 1
        row["params"] += _numel(entry["weight_shape"])
        row["bytes"] += layer_bytes[name]
        row["weight_bits"].add(_bits(entry["weight"]))
        row["input_bits"].add(_bits(entry["input"]))
        total_params += _numel(entry["weight_shape"]) if entry["weight"] is not None else 0
    quant_params = sum(r["params"] for r in roles.values())
    quant_bytes = sum(r["bytes"] for r in roles.values())
    for row in roles.values():
        row["weight_bits"] = sorted(row["weight_bits"])
        row["input_bits"] = sorted(row["input_bits"])
        row["weight_formats"] = dict(sorted(row["weight_formats"].items()))
        row["input_formats"] = dict(sorted(row["input_formats"].items()))
    attention = manifest.get("attention", {})
    return {
        "path": str(path),
        "model_class": manifest["model_class"],
        "recipe": manifest["recipe"]["name"],
        "attention_modules": len(attention),
        "attention_quantized": summary_of(AttentionQuantConfig.from_dict(c) for c in attention.values()),
        "roles": roles,
        "quantized_layers": len(manifest["layers"]),
        "quantized_params": quant_params,
        "quantized_bytes": quant_bytes,
        "quantized_bytes_16bit": 2 * quant_params,
        "total_params": total_params,
        "file_bytes": (folder / TENSORS).stat().st_size,
        "file_bytes_16bit": 2 * total_params,
        "stages": stages,
    }


def stage_scalars(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each recipe stage's report reduced to its type and scalar figures (seconds, training seconds,
    trained share ...; lists and tables left out)."""
    return [{k: v for k, v in report.items() if isinstance(v, int | float | str)} for report in reports]


def _bits(spec: dict[str, Any] | None) -> int:
    if spec is None:
        return 16
    return get_format(spec["format"]).bits  # the registry's, not the name's digits ("fp4_e2m1")


def _format(spec: dict[str, Any] | None) -> str:
    return "fp" if spec is None else spec["format"]


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def format_info(info: dict[str, Any]) -> str:
    lines = [
        f"{info['path']}: {info['model_class']} quantized with recipe {info['recipe']!r}",
        f"{'role':<20}{'layers':>7}{'params':>12}{'W bits':>8}{'A bits':>8}{'bytes':>12}",
    ]
    for role, row in sorted(info["roles"].items()):
        wb = "/".join(map(str, row["weight_bits"]))
        ab = "/".join(map(str, row["input_bits"]))
        lines.append(f"{role:<20}{row['layers']:>7}{row['params']:>12,}{wb:>8}{ab:>8}{row['bytes']:>12,}")
    lines.append("formats per role (x layers):")
    lines.extend(f"  {role:<18}W {_counts(row['weight_formats'])}  A {_counts(row['input_formats'])}"
                 for role, row in sorted(info["roles"].items()))
    q, q16 = info["quantized_bytes"], info["quantized_bytes_16bit"]
    lines.append(f"quantized layers: {info['quantized_layers']}, {info['quantized_params']:,} params, "
                 f"{q:,} bytes vs {q16:,} at 16 bits ({q / max(q16, 1):.3f}x)")
    if info["attention_quantized"]:
        lines.append(f"attention matmuls: operands {info['attention_quantized']} in {info['attention_modules']} "
                     "attention modules (the matmuls run in float on the fake-quantized operands)")
    f, f16 = info["file_bytes"], info["file_bytes_16bit"]
    lines.append(f"whole model: {info['total_params']:,} params, {f:,} bytes on disk vs {f16:,} at 16 bits "
                 f"({f / max(f16, 1):.3f}x)")
    lines.extend(f"stage {stage['type']}: " + ", ".join(f"{k} {v}" for k, v in stage.items() if k != "type")
                 for stage in info["stages"])
    return "\n".join(lines)


def _counts(formats: dict[str, int]) -> str:
    return ",".join(f"{name}x{count}" for name, count in formats.items())


def info_json(info: dict[str, Any]) -> str:
    return json.dumps(info, indent=2)
