"""Side-by-side timings of one Linear layer: fp32, bf16, diffquant's packed layers, and peers.

    python benchmarks/kernels/bench_linear.py --quick      # smoke run: small shapes, a minute or two
    python benchmarks/kernels/bench_linear.py              # full: 4096x4096, 3072x12288, 12288x3072
                                                           #       at 256 / 1024 / 4096 tokens
    python benchmarks/kernels/bench_linear.py --peers      # + sdnq / torchao / optimum-quanto if installed
                                                           #   (pip install -e ".[bench]")

Everything runs in ONE process, so every method sees the same machine state; each time is the minimum
of several runs, every case under a time limit (harness.py). Quantized methods, diffquant's and the
peers', take their input in the machine's fastest float dtype (bf16 where native, else fp32), as a model
running in that dtype feeds them; fp32 and bf16 rows are the float baselines. Each peer is checked to
run its quantized path (a quantized weight type and an int8 matmul), else it is reported as an error.
Results: JSON and a markdown table (CPU model, instruction set, cores, threads, torch version, load
average, the command) with ratios to the fastest float path and to the best peer, peak memory of a
call, and resident weight bytes against fp32.

Methods and peers are registry entries; a peer whose package is missing is reported as skipped.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from harness import (
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

from diffquant.formats import QuantSpec
from diffquant.kernels import CpuFeatures, detect_cpu, fastest_float_dtype, usable_backends
from diffquant.nn.layers import QLinear
from diffquant.nn.packed import PackedLinear

FULL = {"shapes": [(4096, 4096), (3072, 12288), (12288, 3072)], "tokens": [256, 1024, 4096], "runs": 3}
QUICK = {"shapes": [(512, 512), (512, 2048), (2048, 512)], "tokens": [64, 256], "runs": 3}
HEADLINE = ((4096, 4096), 1024)  # the targets are stated for this case
PROBE_TOKENS = 32
LOW_RANK = 32
ACT_DTYPE = fastest_float_dtype()  # what quantized methods take as input


@dataclass
class Runner:
    fn: Callable[[torch.Tensor], torch.Tensor]
    input_dtype: torch.dtype = ACT_DTYPE
    resident_bytes: int | None = None
    note: str = ""


@dataclass(frozen=True)
class Method:
    name: str
    build: Callable[[nn.Linear, CpuFeatures], Runner]
    kind: str  # "float" | "diffquant" | "peer"


METHODS: dict[str, Method] = {}


def method(name: str, kind: str) -> Callable:
    def wrap(build: Callable[[nn.Linear, CpuFeatures], Runner]) -> Callable:
        METHODS[name] = Method(name, build, kind)
        return build

    return wrap


# -- float baselines ---------------------------------------------------------------------------------


@method("fp32", "float")
def _fp32(linear: nn.Linear, cpu: CpuFeatures) -> Runner:
    return Runner(linear, torch.float32, linear.weight.numel() * 4)


@method("bf16", "float")
def _bf16(linear: nn.Linear, cpu: CpuFeatures) -> Runner:
    if not cpu.native_bf16:
        raise Skip(f"bf16 is emulated on this CPU ({cpu.instruction_set}): 0.15-0.2x fp32")
    layer = copy.deepcopy(linear).bfloat16()
    return Runner(layer, torch.bfloat16, layer.weight.numel() * 2)


# -- diffquant -----------------------------------------------------------------------------------------

INT8_CHANNEL = QuantSpec("int8", "channel", scale_dtype="float16")
INT4_CHANNEL = QuantSpec("int4", "channel", scale_dtype="float16")
INT4_G64 = QuantSpec("int4", "group", group_size=64, scale_dtype="float16")
INT8_TOKEN = QuantSpec("int8", "token", dynamic=True)
INT4_TOKEN_G64 = QuantSpec("int4", "group", group_size=64, dynamic=True)
INT4_G128 = QuantSpec("int4", "group", group_size=128, scale_dtype="float16")
INT4_TOKEN_G128 = QuantSpec("int4", "group", group_size=128, dynamic=True)
FP4_CHANNEL = QuantSpec("fp4_e2m1", "channel", scale_dtype="float16")
MXFP4 = QuantSpec.for_format("mxfp4")


def diffquant_method(name: str, weight: QuantSpec, inputs: QuantSpec | None, rank: int | None = None,
                     backend: str | None = None) -> None:
    def build(linear: nn.Linear, cpu: CpuFeatures) -> Runner:
        if backend is not None and backend not in [b.name for b in usable_backends(cpu)]:
            raise Skip(f"backend {backend!r} does not run well on this CPU")
        low_rank = None if rank is None else low_rank_split(linear, rank)
        if low_rank is not None:  # quantize the residual W - (L1 L2)^T, as SVDQuant does
            linear = copy.deepcopy(linear)
            linear.weight.data -= (low_rank[0] @ low_rank[1]).t()
        layer = QLinear(linear, weight, inputs)
        layer.calibrate_weight()
        packed = PackedLinear.from_layer(layer, backend=backend, low_rank=low_rank)
        return Runner(packed, resident_bytes=packed.resident_bytes(), note=packed.extra_repr())

    METHODS[name] = Method(name, build, "diffquant")


def low_rank_split(linear: nn.Linear, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """L1 [in, r], L2 [r, out] with L1 @ L2 ~ W^T (randomized SVD): the branch SVDQuant keeps in float."""
    torch.manual_seed(0)
    u, s, v = torch.svd_lowrank(linear.weight.detach(), q=rank, niter=2)  # W [out, in] ~ u diag(s) v^T
    root = s.sqrt()
    return (v * root).contiguous(), (u * root).t().contiguous()


diffquant_method("diffquant W8A8", INT8_CHANNEL, INT8_TOKEN)
diffquant_method("diffquant W4A8", INT4_CHANNEL, INT8_TOKEN)
diffquant_method("diffquant W4A4", INT4_G64, INT4_TOKEN_G64)
diffquant_method(f"diffquant W4A4+r{LOW_RANK}", INT4_G64, INT4_TOKEN_G64, rank=LOW_RANK)
# Groups of 128 on both sides: half the group-wise rescales of the preset's 64 (a coarser format).
diffquant_method("diffquant W4A4 g128", INT4_G128, INT4_TOKEN_G128)
diffquant_method("diffquant W4A16", INT4_G64, None)
# FP4 weights (E2M1 per channel; OCP MXFP4: blocks of 32, E8M0 scales) with INT8 inputs on the integer GEMM:
# E2M1 x 2 are integers (nn/packed_weight.py, CodeLevels), decoded by the kernels' nibble table.
diffquant_method("diffquant FP4-W4A8", FP4_CHANNEL, INT8_TOKEN)
diffquant_method("diffquant MXFP4-W4A8", MXFP4, INT8_TOKEN)
# The same layers on torch._int_mm with per-segment rescale passes (kernels/segmented.py): what the
# fused kernels of the "vnni" backend replace, and the path of CPUs without them.
diffquant_method("diffquant W8A8 [int_mm]", INT8_CHANNEL, INT8_TOKEN, backend="int_mm")
diffquant_method("diffquant W4A4 [int_mm]", INT4_G64, INT4_TOKEN_G64, backend="int_mm")
diffquant_method("diffquant W8A8 [fbgemm]", INT8_CHANNEL, INT8_TOKEN, backend="fbgemm")
# diffquant's AVX2 kernels where another backend is the default (on AVX-512 VNNI machines).
diffquant_method("diffquant W8A8 [avx2]", INT8_CHANNEL, INT8_TOKEN, backend="avx2")
diffquant_method("diffquant W4A4 [avx2]", INT4_G64, INT4_TOKEN_G64, backend="avx2")
diffquant_method("diffquant W4A8 [avx2]", INT4_CHANNEL, INT8_TOKEN, backend="avx2")
diffquant_method("diffquant FP4-W4A8 [avx2]", FP4_CHANNEL, INT8_TOKEN, backend="avx2")


# -- peers (optional `bench` extra; each skipped cleanly when its package is missing) ----------------------


def peer(name: str, package: str) -> Callable:
    def wrap(build: Callable[[nn.Module], Runner]) -> Callable:
        def guarded_build(linear: nn.Linear, cpu: CpuFeatures) -> Runner:
            if importlib.util.find_spec(package.split(".")[0]) is None:
                raise Skip(f"package {package!r} is not installed")
            model = nn.Sequential(copy.deepcopy(linear).to(ACT_DTYPE)).eval()
            runner = build(model)
            runner.resident_bytes = module_bytes(model)  # quantized weight, scales and bias, as diffquant's
            return runner

        METHODS[name] = Method(name, guarded_build, "peer")
        return build

    return wrap


def quantized_path(ok: bool, what: str) -> None:
    if not ok:
        raise RuntimeError(f"did not take its quantized path: {what}")


@peer("torchao W8A8", "torchao")
def _torchao(model: nn.Module) -> Runner:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    weight = type(model[0].weight).__name__
    quantized_path("Int8" in weight or "Affine" in weight, f"weight is a {weight}")
    return Runner(model, note=f"eager, weight {weight}")


@peer("torchao W8A8 + compile", "torchao")
def _torchao_compiled(model: nn.Module) -> Runner:
    import torch._inductor.config as inductor

    _torchao(model)  # quantizes in place and checks the quantized path
    inductor.freezing = True  # constant-folds the int8 weight into oneDNN's qlinear (CPU-KERNELS.md)
    compiled = torch.compile(model, dynamic=True)  # one compilation for every token count
    with torch.no_grad():
        compiled(torch.randn(PROBE_TOKENS, model[0].in_features, dtype=ACT_DTYPE))
    return Runner(compiled, note="torch.compile(dynamic=True), inductor freezing; compiled before timing")


@peer("optimum-quanto W8A8", "optimum.quanto")
def _quanto(model: nn.Module) -> Runner:
    from optimum.quanto import Calibration, freeze, qint8, quantize

    quantize(model, weights=qint8, activations=qint8)
    with Calibration(), torch.no_grad():
        model(torch.randn(256, model[0].in_features, dtype=ACT_DTYPE))
    freeze(model)
    weight = type(model[0].weight).__name__
    quantized_path("QBytes" in weight and model[0].activation_qtype is not None, f"weight is a {weight}")
    return Runner(model, note=f"static per-tensor activation scale (calibrated), weight {weight}")


@peer("sdnq W8A8", "sdnq")
def _sdnq(model: nn.Module) -> Runner:
    from sdnq import sdnq_post_load_quant

    model = sdnq_post_load_quant(model, weights_dtype="int8", use_quantized_matmul=True, torch_dtype=ACT_DTYPE,
                                 add_skip_keys=False)
    forward = getattr(model[0], "forward_func", None)
    name = getattr(forward, "__name__", str(forward))
    quantized_path("int8_matmul" in name, f"forward is {name}")
    return Runner(model, note=f"forward {name}")


# -- the run -----------------------------------------------------------------------------------------------


@dataclass
class Bench:
    shapes: list[tuple[int, int]]
    tokens: list[int]
    timing: Timing
    methods: list[Method]
    cpu: CpuFeatures = field(default_factory=detect_cpu)
    results: list[dict[str, Any]] = field(default_factory=list)

    def run(self) -> None:
        for in_features, out_features in self.shapes:
            torch.manual_seed(0)
            linear = nn.Linear(in_features, out_features).eval()
            runners = {m.name: self._build(m, linear) for m in self.methods}
            for tokens in self.tokens:
                self._run_tokens(linear, runners, tokens)
            del runners

    def _build(self, m: Method, linear: nn.Linear) -> Runner | dict[str, Any]:
        built = guarded(lambda: {"runner": m.build(linear, self.cpu)}, 10 * self.timing.limit)
        return built.get("runner", built)

    def _run_tokens(self, linear: nn.Linear, runners: dict[str, Any], tokens: int) -> None:
        x = torch.randn(tokens, linear.in_features, generator=torch.Generator().manual_seed(1))
        reference = None
        for name, runner in runners.items():
            row = self._case(runner, x)
            output = row.pop("output", None)
            if name == "fp32" and output is not None:
                reference = output.float()
            if output is not None and reference is not None:
                row["rel_err"] = relative_error(output, reference)
            if isinstance(runner, Runner):
                row["note"] = row.get("note", runner.note)
                if runner.resident_bytes is not None:
                    row["resident_vs_fp32"] = runner.resident_bytes / (4 * linear.weight.numel())
            row.update(method=name, shape=[linear.in_features, linear.out_features], tokens=tokens)
            self.results.append(row)
            print(_progress_line(row), flush=True)

    def _case(self, runner: Runner | dict[str, Any], x: torch.Tensor) -> dict[str, Any]:
        if not isinstance(runner, Runner):
            return dict(runner)
        x = x.to(runner.input_dtype)
        probe = x[:PROBE_TOKENS]
        scale = x.shape[0] / probe.shape[0]
        return guarded(lambda: time_case(lambda: runner.fn(x), lambda: runner.fn(probe), scale, self.timing),
                       self.timing.limit)


def _progress_line(row: dict[str, Any]) -> str:
    value = f"{row['ms']:.2f} ms" if row["status"] == "ok" else f"{row['status']}: {row.get('note', '')}"
    return f"{row['shape'][0]}x{row['shape'][1]} @ {row['tokens']:>5} tokens  {row['method']:<28} {value}"


# -- report ------------------------------------------------------------------------------------------------


def add_ratios(results: list[dict[str, Any]], kinds: dict[str, str]) -> None:
    """Per case: speed-up over the fastest float path and over the best peer (>1: faster)."""
    cases: dict[tuple, list[dict[str, Any]]] = {}
    for row in results:
        cases.setdefault((tuple(row["shape"]), row["tokens"]), []).append(row)
    for rows in cases.values():
        ok = [r for r in rows if r["status"] == "ok"]
        floats = [r["ms"] for r in ok if kinds.get(r["method"]) == "float"]
        peers = [r for r in ok if kinds.get(r["method"]) == "peer"]
        best_peer = min(peers, key=lambda r: r["ms"]) if peers else None
        for r in ok:
            if floats:
                r["vs_fastest_float"] = min(floats) / r["ms"]
            if best_peer is not None:
                r["vs_best_peer"] = best_peer["ms"] / r["ms"]
                r["best_peer"] = best_peer["method"]


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return ""
    if row["status"] != "ok":
        return row["status"]
    ratio = f" ({row['vs_fastest_float']:.2f}x)" if "vs_fastest_float" in row else ""
    return f"{row['ms']:.1f}{ratio}"


def timing_table(bench: Bench) -> list[str]:
    names = [m.name for m in bench.methods]
    lines = ["| in x out | tokens | " + " | ".join(names) + " | best peer | diffquant W8A8 vs best peer |",
             "|---|---|" + "---|" * (len(names) + 2)]
    for shape in bench.shapes:
        for tokens in bench.tokens:
            rows = {r["method"]: r for r in bench.results if tuple(r["shape"]) == shape and r["tokens"] == tokens}
            w8 = rows.get("diffquant W8A8", {})
            peer = w8.get("best_peer", "-")
            versus = f"{w8['vs_best_peer']:.2f}x" if "vs_best_peer" in w8 else "-"
            cells = [_cell(rows.get(n)) for n in names]
            lines.append(f"| {shape[0]}x{shape[1]} | {tokens} | " + " | ".join(cells) + f" | {peer} | {versus} |")
    return lines


def memory_table(bench: Bench) -> list[str]:
    shape, tokens = bench.shapes[0], bench.tokens[-1]
    lines = [f"| method | resident weight bytes / fp32 | peak memory of a call, MiB ({shape[0]}x{shape[1]} @ "
             f"{tokens}) | rel. error vs fp32 (same case) | notes |", "|---|---|---|---|---|"]
    for m in bench.methods:
        row = next((r for r in bench.results if r["method"] == m.name and tuple(r["shape"]) == shape
                    and r["tokens"] == tokens), {})
        mem = f"{row['resident_vs_fp32']:.3f}" if "resident_vs_fp32" in row else "-"
        peak = f"{row['peak_mib']:.0f}" if "peak_mib" in row else "-"
        err = f"{row['rel_err']:.1e}" if "rel_err" in row else "-"
        note = row.get("note", "") if row.get("status") == "ok" else f"{row.get('status', '')}: {row.get('note', '')}"
        lines.append(f"| {m.name} | {mem} | {peak} | {err} | {note} |")
    return lines


def headline(bench: Bench) -> list[str]:
    shape, tokens = HEADLINE
    rows = {r["method"]: r for r in bench.results if tuple(r["shape"]) == shape and r["tokens"] == tokens}
    if "diffquant W8A8" not in rows or rows["diffquant W8A8"]["status"] != "ok":
        return []
    w8 = rows["diffquant W8A8"]
    lines = [f"Targets (issues 5 and 17) at {shape[0]}x{shape[1]}, {tokens} tokens:", "",
             f"- W8A8 {w8['ms']:.1f} ms = {w8.get('vs_fastest_float', float('nan')):.2f}x the fastest float path "
             f"(target >= 1.8x)"]
    if "vs_best_peer" in w8:
        lines.append(f"- W8A8 vs the best peer ({w8['best_peer']}): {w8['vs_best_peer']:.2f}x (target >= 1.0x)")
    for name in ("diffquant W4A4", "diffquant W4A4 g128"):
        w4 = rows.get(name, {})
        if w4.get("status") == "ok":
            lines.append(f"- {name.removeprefix('diffquant ')} {w4['ms']:.1f} ms = {w4['ms'] / w8['ms']:.2f}x W8A8's "
                         f"time (target <= 1.15x), weight bytes {w4.get('resident_vs_fp32', 0):.3f} vs "
                         f"{w8.get('resident_vs_fp32', 0):.3f} of fp32 (target <= 0.14 for W4)")
    return [*lines, ""]


def markdown(bench: Bench, info: dict[str, Any], command: str) -> str:
    lines = [f"# Linear layer timings ({info['date']})", "", *machine_lines(info, command),
             f"Quantized methods take {str(ACT_DTYPE).removeprefix('torch.')} input. ms, min of runs "
             "(speed-up vs the fastest float path in the same process). skip / timeout / error: see notes.", "",
             *headline(bench), *timing_table(bench), "", *memory_table(bench)]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run on small shapes")
    parser.add_argument("--peers", action="store_true", help="also time sdnq / torchao / optimum-quanto")
    parser.add_argument("--only", nargs="*", default=None, help="method names to run (default: all)")
    parser.add_argument("--shapes", nargs="*", default=None, help="in x out shapes, e.g. 4096x4096 (default: preset)")
    parser.add_argument("--tokens", nargs="*", type=int, default=None, help="token counts (default: preset)")
    parser.add_argument("--tag", default="", help="suffix of the output file names")
    parser.add_argument("--limit", type=float, default=None, help="seconds per case (default 10 quick, 60 full)")
    parser.add_argument("--runs", type=int, default=None, help="timed runs per case, the minimum is kept (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--clock", choices=["wall", "thread"], default="wall",
                        help="thread: this thread's CPU time, for --threads 1 on a shared machine")
    parser.add_argument("--beside", type=int, default=0,
                        help="other single-thread fp32 matmul processes running for the whole run (contention)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent, help="output folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = QUICK if args.quick else FULL
    methods = [m for m in METHODS.values() if (args.peers or m.kind != "peer")
               and (args.only is None or m.name in args.only or m.kind == "float")]
    if args.clock == "thread" and torch.get_num_threads() != 1:
        raise SystemExit("--clock thread measures one thread's CPU time: use it with --threads 1")
    timing = Timing(args.runs or preset["runs"], args.limit or (10 if args.quick else 60), args.clock)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else preset["shapes"]
    bench = Bench(shapes, args.tokens or preset["tokens"], timing, methods)
    info, command = {**machine(), "clock": args.clock, "jobs_beside": args.beside}, " ".join(["python", *sys.argv])
    with beside(args.beside):
        bench.run()
        info["load_average_at_end"] = load_average()
    add_ratios(bench.results, {m.name: m.kind for m in methods})
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"linear{'-quick' if args.quick else ''}-{cpu_slug()}{'-' + args.tag if args.tag else ''}"
    stem.with_suffix(".json").write_text(json.dumps({"machine": info, "command": command,
                                                     "results": bench.results}, indent=2))
    stem.with_suffix(".md").write_text(markdown(bench, info, command))
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
