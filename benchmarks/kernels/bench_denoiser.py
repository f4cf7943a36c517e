"""End-to-end denoiser steps: fp32, bf16 and diffquant's frozen W8A8 / W4A4, side by side, one process.

    python benchmarks/kernels/bench_denoiser.py            # SD-1.5-size UNet, DiT-XL/2-size DiT, zoo models
    python benchmarks/kernels/bench_denoiser.py --quick    # tiny configs of the same families (smoke run)

One step = one denoiser forward with classifier-free guidance batched (batch 2: conditional and
unconditional), as a sampler calls it. Random-weight models are built from their config (no download):
  sd15-unet   UNet2DConditionModel with Stable Diffusion 1.5's config, 64x64x4 latent, 77x768 text tokens
  dit-xl2     DiTTransformer2DModel with DiT-XL/2's config (28 layers, width 1152, 16 heads, patch 2),
              32x32x4 latent, class labels
and every shipped zoo model (diffquant.zoo) at its own latent size, batch 2 x `--zoo-batch`.

Quantized models: diffquant.quantize(model, preset) then diffquant.freeze(model), on the model cast to
the machine's fastest float dtype first, so attention, norms and the layers a recipe keeps in full
precision run in that dtype as in the bf16 baseline. Ratios are to the fastest float path of the
machine (min of fp32 and bf16). Profiles of the SD UNet step in the fastest float dtype and quantized
(time per module type, exclusive of child modules, and torch.profiler's top operators by self CPU time)
show where the time goes.
Every case runs under a time limit (harness.py); JSON + markdown go to --out.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from harness import (
    CLOCKS,
    Skip,
    Timing,
    beside,
    cpu_slug,
    guarded,
    load_average,
    machine,
    machine_lines,
    module_bytes,
    relative_error,
    time_case,
)
from torch import nn

import diffquant
from diffquant import zoo
from diffquant.kernels import detect_cpu, fastest_float_dtype

FAST = fastest_float_dtype()

SD15_UNET = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280), "cross_attention_dim": 768, "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}
DIT_XL2 = {
    "num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": 8, "num_layers": 28,
    "sample_size": 32, "patch_size": 2, "norm_type": "ada_norm_zero", "num_embeds_ada_norm": 1000,
}
TINY_UNET = {**SD15_UNET, "sample_size": 16, "block_out_channels": (32, 64, 64, 64), "cross_attention_dim": 64,
             "layers_per_block": 1, "norm_num_groups": 16}
TINY_DIT = {**DIT_XL2, "num_attention_heads": 2, "attention_head_dim": 32, "num_layers": 2, "sample_size": 16}


@dataclass
class Case:
    """A denoiser and one step's inputs (batch 2 for classifier-free guidance)."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], dict[str, Any]]
    note: str = ""


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def unet_case(name: str, config: dict[str, Any]) -> Case:
    def build() -> nn.Module:
        from diffusers import UNet2DConditionModel

        torch.manual_seed(0)
        return UNet2DConditionModel(**config).eval()

    def inputs() -> dict[str, Any]:
        size, g = config["sample_size"], _generator()
        return {"sample": torch.randn(2, 4, size, size, generator=g), "timestep": torch.tensor([500, 500]),
                "encoder_hidden_states": torch.randn(2, 77, config["cross_attention_dim"], generator=g)}

    return Case(name, build, inputs, f"UNet2DConditionModel, {config['sample_size']}x{config['sample_size']}x4 "
                                     f"latent, batch 2, 77x{config['cross_attention_dim']} text tokens")


def dit_case(name: str, config: dict[str, Any]) -> Case:
    def build() -> nn.Module:
        from diffusers import DiTTransformer2DModel

        torch.manual_seed(0)
        return DiTTransformer2DModel(**config).eval()

    def inputs() -> dict[str, Any]:
        size, g = config["sample_size"], _generator()
        return {"hidden_states": torch.randn(2, 4, size, size, generator=g), "timestep": torch.tensor([500, 500]),
                "class_labels": torch.tensor([1, config["num_embeds_ada_norm"]])}

    width = config["num_attention_heads"] * config["attention_head_dim"]
    return Case(name, build, inputs, f"DiTTransformer2DModel, {config['num_layers']} layers, width {width}, "
                                     f"{size_tokens(config)} tokens per image, batch 2")


def size_tokens(config: dict[str, Any]) -> int:
    return (config["sample_size"] // config["patch_size"]) ** 2


def zoo_case(name: str, batch: int) -> Case:
    """A shipped zoo model's denoiser at its own latent size: `batch` samples, doubled for guidance."""
    model = zoo.load(name)

    def inputs() -> dict[str, Any]:
        g = _generator()
        labels = torch.arange(batch) % model.num_classes
        cond, null = model.conditioning.denoiser_kwargs(labels), model.conditioning.null_kwargs(batch)
        latents = torch.randn(2 * batch, *model.latent_shape, generator=g)
        key = "hidden_states" if hasattr(model.pipe, "transformer") and model.pipe.transformer is not None else "sample"
        return {key: latents, "timestep": torch.full((2 * batch,), 500),
                **{k: torch.cat([cond[k], null[k]]) for k in cond}}

    return Case(name, lambda: copy.deepcopy(model.denoiser).float().eval(), inputs,
                f"zoo {type(model.denoiser).__name__}, latent {model.latent_shape}, batch 2x{batch}")


def cases(quick: bool, zoo_batch: int) -> list[Case]:
    if quick:
        return [unet_case("tiny-unet", TINY_UNET), dit_case("tiny-dit", TINY_DIT)]
    zoo_cases = [zoo_case(entry, zoo_batch) for entry in zoo.entries()]
    return [unet_case("sd15-unet", SD15_UNET), dit_case("dit-xl2", DIT_XL2), *zoo_cases]


# -- variants of a model ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    name: str
    dtype: torch.dtype
    recipe: str | None = None  # a diffquant preset, frozen after quantizing

    @property
    def profiled(self) -> bool:
        """Profiled where a profile case runs: the fastest float path and the quantized variants."""
        return self.recipe is not None or self.dtype == FAST

    def make(self, model: nn.Module) -> nn.Module:
        if self.dtype == torch.bfloat16 and not detect_cpu().native_bf16:
            raise Skip("bf16 is emulated on this CPU (0.15-0.2x fp32)")
        model = model.to(self.dtype)
        if self.recipe is not None:
            diffquant.quantize(model, self.recipe, progress=False)
            diffquant.freeze(model)
        return model


VARIANTS = [Variant("fp32", torch.float32), Variant("bf16", torch.bfloat16),
            Variant("diffquant W8A8", FAST, "w8a8"), Variant("diffquant W4A4", FAST, "w4a4")]


def cast_inputs(inputs: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}


def forward(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    return model(**inputs, return_dict=False)[0]


# -- profile ------------------------------------------------------------------------------------------------


class ModuleTimer:
    """Time per module type, exclusive of child modules, from forward hooks."""

    def __init__(self, model: nn.Module, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.totals: dict[str, float] = {}
        self.stack: list[list[float]] = []  # [start, time spent in children]
        self.hooks = [h for m in model.modules() for h in (m.register_forward_pre_hook(self._enter),
                                                           m.register_forward_hook(self._leave))]

    def _enter(self, module: nn.Module, args: Any) -> None:
        self.stack.append([self.clock(), 0.0])

    def _leave(self, module: nn.Module, args: Any, out: Any) -> None:
        start, children = self.stack.pop()
        elapsed = self.clock() - start
        name = type(module).__name__
        self.totals[name] = self.totals.get(name, 0.0) + elapsed - children
        if self.stack:
            self.stack[-1][1] += elapsed

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


@torch.no_grad()
def profile(model: nn.Module, inputs: dict[str, Any], clock: str = "wall", top: int = 12) -> dict[str, Any]:
    """Module-type split (exclusive ms) and torch.profiler's top operators by self CPU time."""
    timer = ModuleTimer(model, CLOCKS[clock])
    start = CLOCKS[clock]()
    forward(model, inputs)
    total = CLOCKS[clock]() - start
    timer.remove()
    split = sorted(timer.totals.items(), key=lambda kv: -kv[1])[:top]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        forward(model, inputs)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    ops = [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "calls": e.count} for e in events]
    return {"step_ms": 1e3 * total, "by_module_type_ms": {k: 1e3 * v for k, v in split}, "top_ops": ops}


# -- the run ------------------------------------------------------------------------------------------------


@dataclass
class Bench:
    cases: list[Case]
    timing: Timing
    profile_cases: tuple[str, ...]
    variants: list[Variant] = field(default_factory=lambda: list(VARIANTS))
    results: list[dict[str, Any]] = field(default_factory=list)
    profiles: dict[str, dict[str, Any]] = field(default_factory=dict)

    def run(self) -> None:
        for case in self.cases:
            inputs, reference, base = case.inputs(), None, case.build()
            for variant in self.variants:
                row, output = self._variant(case, base, variant, inputs)
                if variant.name == "fp32" and output is not None:
                    reference = output
                if output is not None and reference is not None:
                    row["rel_err"] = relative_error(output, reference)
                self.results.append(row)
                print(f"{case.name:<12} {variant.name:<16} " + (f"{row['ms']:.0f} ms" if row["status"] == "ok"
                      else f"{row['status']}: {row.get('note', '')}"), flush=True)
                gc.collect()
            del base

    def _variant(self, case: Case, base: nn.Module, variant: Variant,
                 inputs: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor | None]:
        """Time one variant of a model (built from a copy of `base`); returns its row and output."""
        row: dict[str, Any] = {"model": case.name, "variant": variant.name, "about": case.note}
        kept: dict[str, torch.Tensor] = {}

        def run() -> dict[str, Any]:
            started = time.perf_counter()
            model = variant.make(copy.deepcopy(base))
            row.update(build_s=time.perf_counter() - started, weight_mib=module_bytes(model) / 2**20)
            x = cast_inputs(inputs, variant.dtype)
            result = time_case(lambda: forward(model, x), None, 1.0, self.timing)
            kept["output"] = result.pop("output").float()
            if case.name in self.profile_cases and variant.profiled:
                self.profiles[f"{case.name} / {variant.name}"] = guarded(lambda: profile(model, x, self.timing.clock),
                                                                         self.timing.limit)
            return result

        result = guarded(run, self.timing.limit)
        return {**row, **result}, kept.get("output")


def add_ratios(results: list[dict[str, Any]]) -> None:
    for name in {r["model"] for r in results}:
        rows = [r for r in results if r["model"] == name and r["status"] == "ok"]
        floats = [r["ms"] for r in rows if r["variant"] in ("fp32", "bf16")]
        for r in rows:
            if floats:
                r["vs_fastest_float"] = min(floats) / r["ms"]


# -- report -------------------------------------------------------------------------------------------------


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return ""
    if row["status"] != "ok":
        return row["status"]
    return f"{row['ms']:.0f} ({row.get('vs_fastest_float', float('nan')):.2f}x)"


def markdown(bench: Bench, info: dict[str, Any], command: str) -> str:
    names = [v.name for v in bench.variants]
    lines = [f"# Denoiser step timings ({info['date']})", "", *machine_lines(info, command),
             "ms per denoiser step, min of runs (speed-up vs the fastest float path of the same model). "
             f"Quantized models run their float parts in {str(FAST).removeprefix('torch.')}.", "",
             "| model | " + " | ".join(names) + " | weights fp32 / W8A8 / W4A4, MiB | about |",
             "|---|" + "---|" * (len(names) + 2)]
    for case in bench.cases:
        rows = {r["variant"]: r for r in bench.results if r["model"] == case.name}
        mib = " / ".join(f"{rows[v]['weight_mib']:.0f}" if "weight_mib" in rows.get(v, {}) else "-"
                         for v in ("fp32", "diffquant W8A8", "diffquant W4A4"))
        lines.append(f"| {case.name} | " + " | ".join(_cell(rows.get(n)) for n in names) + f" | {mib} | {case.note} |")
    lines += ["", "Relative error of the output vs fp32 (mean squared error / mean square): " + "; ".join(
        f"{r['model']} {r['variant']} {r['rel_err']:.1e}" for r in bench.results if "rel_err" in r), ""]
    for title, prof in bench.profiles.items():
        lines += profile_lines(title, prof)
    return "\n".join(lines) + "\n"


def profile_lines(title: str, prof: dict[str, Any]) -> list[str]:
    if "step_ms" not in prof:
        return [f"Profile {title}: {prof.get('status')}: {prof.get('note', '')}", ""]
    total = prof["step_ms"]
    split = ", ".join(f"{k} {v:.0f} ms ({100 * v / total:.0f}%)" for k, v in prof["by_module_type_ms"].items())
    ops = ", ".join(f"{o['op']} {o['self_ms']:.0f} ms" for o in prof["top_ops"])
    return [f"Profile {title} (one step, {total:.0f} ms with hooks): by module type, exclusive: {split}.", "",
            f"Top operators by self CPU time: {ops}.", ""]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny configs (smoke run)")
    parser.add_argument("--only", nargs="*", default=None, help="case names to run (default: all)")
    parser.add_argument("--zoo-batch", type=int, default=16, help="samples per zoo step (doubled for guidance)")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--limit", type=float, default=None, help="seconds per case (default 20 quick, 180 full)")
    parser.add_argument("--variants", nargs="*", default=None, help="variant names (default: all)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall",
                        help="thread: this thread's CPU time, for --threads 1 on a shared machine")
    parser.add_argument("--tag", default="", help="suffix of the output file names")
    parser.add_argument("--beside", type=int, default=0,
                        help="other single-thread fp32 matmul processes running for the whole run (contention)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent, help="output folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # not the dtype-cast advice on every random-weight model
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread" and torch.get_num_threads() != 1:
        raise SystemExit("--clock thread measures one thread's CPU time: use it with --threads 1")
    selected = [c for c in cases(args.quick, args.zoo_batch) if args.only is None or c.name in args.only]
    variants = [v for v in VARIANTS if args.variants is None or v.name in args.variants]
    bench = Bench(selected, Timing(args.runs, args.limit or (20 if args.quick else 180), args.clock),
                  ("tiny-unet", "sd15-unet"), variants)
    info, command = {**machine(), "clock": args.clock, "jobs_beside": args.beside}, " ".join(["python", *sys.argv])
    with beside(args.beside):
        bench.run()
        info["load_average_at_end"] = load_average()
    add_ratios(bench.results)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"denoiser{'-quick' if args.quick else ''}-{cpu_slug()}{'-' + args.tag if args.tag else ''}"
    stem.with_suffix(".json").write_text(json.dumps({"machine": info, "command": command, "results": bench.results,
                                                     "profiles": bench.profiles}, indent=2))
    stem.with_suffix(".md").write_text(markdown(bench, info, command))
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
