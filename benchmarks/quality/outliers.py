"""Activation outlier statistics of a zoo model: `python benchmarks/quality/outliers.py fmnist-dit`.

For every quantizable layer's input, over the model's own sampler (64 samples, all steps): per-channel
max |X|, and the ratio max channel / median channel, summarised per layer role. Writes
benchmarks/quality/outliers-<model>.json and prints a markdown table.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

from diffquant import zoo
from diffquant.arch import adapter_for, quantizable_layers
from diffquant.calib.stats import collect_activation_stats


def outlier_table(name: str, samples: int = 64) -> dict[str, dict[str, float]]:
    model = zoo.load(name)
    denoiser = model.denoiser
    roles = adapter_for(denoiser).assign(denoiser)
    layers = quantizable_layers(denoiser)
    stats = collect_activation_stats(layers, lambda: model.calibration(samples, progress=False)(denoiser))
    by_role: dict[str, list[float]] = {}
    peak: dict[str, float] = {}
    for path, layer_stats in stats.items():
        absmax = layer_stats.overall.absmax
        ratio = float(absmax.max() / absmax.median().clamp(min=1e-12))
        by_role.setdefault(roles[path], []).append(ratio)
        peak[roles[path]] = max(peak.get(roles[path], 0.0), float(absmax.max()))
    return {role: {"layers": len(r), "median_ratio": statistics.median(r), "max_ratio": max(r), "max_abs": peak[role]}
            for role, r in sorted(by_role.items())}


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "fmnist-dit"
    torch.manual_seed(0)
    table = outlier_table(name)
    out = Path(__file__).parent / f"outliers-{name}.json"
    out.write_text(json.dumps(table, indent=2))
    print("| role | layers | max/median channel of max abs X (median over layers) | worst layer | max abs X |")
    print("|---|---|---|---|---|")
    for role, row in table.items():
        print(f"| {role} | {row['layers']} | {row['median_ratio']:.1f} | {row['max_ratio']:.1f} | {row['max_abs']:.1f} |")


if __name__ == "__main__":
    main()
