"""Side-by-side timings of one Linear layer: fp32, bf16, diffquant's packed layers, and peers.

    python benchmarks/kernels/bench_linear.py --quick      # smoke run: small shapes, a minute or two
    python benchmarks/kernels/bench_linear.py              # full: 4096x4096, 3072x12288, 12288x3072
                                                           #       at 256 / 1024 / 4096 tokens
    python benchmarks/kernels/bench_linear.py --peers      # + sdnq / torchao / optimum-quanto if installed

Everything runs in ONE process, so every method sees the same machine state; each time is the minimum
of several runs. Each case is guarded by a time limit: a probe on a few tokens predicts the full
case and skips it as "timeout" if it would exceed the limit (e.g. torch._int_mm or bf16 on an
AVX2-only CPU), and the timed runs stop at the limit (checked between operations). Results: JSON and
a markdown table (CPU model, instruction set, cores, threads, torch version, date, the command)
written to --out.

Methods and peers are registry entries; a peer whose package is missing is reported as skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import importlib.util
import json
import platform
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffquant.formats import QuantSpec
from diffquant.kernels import CpuFeatures, active_backend, detect_cpu, usable_backends
from diffquant.nn.layers import QLinear
from diffquant.nn.packed import PackedLinear

FULL = {"shapes": [(4096, 4096), (3072, 12288), (12288, 3072)], "tokens": [256, 1024, 4096], "runs": 5}
QUICK = {"shapes": [(512, 512), (512, 2048), (2048, 512)], "tokens": [64, 256], "runs": 3}
PROBE_TOKENS = 32
LOW_RANK = 32


class Skip(Exception):
    """The method does not apply on this machine (reason in the message)."""


class CaseTimeout(Exception):
    pass


@dataclass
class Runner:
    fn: Callable[[torch.Tensor], torch.Tensor]
    input_dtype: torch.dtype = torch.float32
    resident_bytes: int | None = None


@dataclass(frozen=True)
class Method:
    name: str
    build: Callable[[nn.Linear, CpuFeatures], Runner]
    kind: str  # "baseline" | "diffquant" | "peer"


METHODS: dict[str, Method] = {}


def method(name: str, kind: str) -> Callable:
    def wrap(build: Callable[[nn.Linear, CpuFeatures], Runner]) -> Callable:
        METHODS[name] = Method(name, build, kind)
        return build

    return wrap


# -- baselines ---------------------------------------------------------------------------------------


@method("fp32", "baseline")
def _fp32(linear: nn.Linear, cpu: CpuFeatures) -> Runner:
    return Runner(linear, resident_bytes=linear.weight.numel() * 4)


@method("bf16", "baseline")
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
        return Runner(packed, resident_bytes=packed.resident_bytes())

    METHODS[name] = Method(name, build, "diffquant")


def low_rank_split(linear: nn.Linear, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """L1 [in, r], L2 [r, out] with L1 @ L2 ~ W^T (randomized SVD): the branch SVDQuant keeps in float."""
    torch.manual_seed(0)
    u, s, v = torch.svd_lowrank(linear.weight.detach(), q=rank, niter=2)  # W [out, in] ~ u diag(s) v^T
    root = s.sqrt()
    return (v * root).contiguous(), (u * root).t().contiguous()


diffquant_method("diffquant W8A8", INT8_CHANNEL, INT8_TOKEN)
diffquant_method("diffquant W8A8 [fbgemm]", INT8_CHANNEL, INT8_TOKEN, backend="fbgemm")
diffquant_method("diffquant W4A8", INT4_CHANNEL, INT8_TOKEN)
diffquant_method("diffquant W4A4", INT4_G64, INT4_TOKEN_G64)
diffquant_method(f"diffquant W4A4+r{LOW_RANK}", INT4_G64, INT4_TOKEN_G64, rank=LOW_RANK)
diffquant_method("diffquant W4A16", INT4_G64, None)


# -- peers (optional extra; each skipped cleanly when its package is missing) ------------------------------


def peer(name: str, package: str) -> Callable:
    def wrap(build: Callable[[nn.Linear, CpuFeatures], Runner]) -> Callable:
        def guarded(linear: nn.Linear, cpu: CpuFeatures) -> Runner:
            if importlib.util.find_spec(package.split(".")[0]) is None:
                raise Skip(f"package {package!r} is not installed")
            return build(copy.deepcopy(linear), cpu)

        METHODS[name] = Method(name, guarded, "peer")
        return build

    return wrap


@peer("torchao W8A8", "torchao")
def _torchao(linear: nn.Linear, cpu: CpuFeatures) -> Runner:
    from torchao import quantization as tq

    config = getattr(tq, "Int8DynamicActivationInt8WeightConfig", None)
    model = nn.Sequential(linear)
    tq.quantize_(model, config() if config else tq.int8_dynamic_activation_int8_weight())
    return Runner(model)


@peer("optimum-quanto W8A8", "optimum.quanto")
def _quanto(linear: nn.Linear, cpu: CpuFeatures) -> Runner:
    from optimum.quanto import Calibration, freeze, qint8, quantize

    model = nn.Sequential(linear)
    quantize(model, weights=qint8, activations=qint8)
    with Calibration(), torch.no_grad():
        model(torch.randn(64, linear.in_features))
    freeze(model)
    return Runner(model)


@peer("sdnq W8A8", "sdnq")
def _sdnq(linear: nn.Linear, cpu: CpuFeatures) -> Runner:
    from sdnq.quantizer import sdnq_post_load_quant  # API of sdnq >= 0.1; unverified here

    model = sdnq_post_load_quant(nn.Sequential(linear), weights_dtype="int8", use_quantized_matmul=True)
    return Runner(model)


# -- timing ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise CaseTimeout after `seconds` (between Python operations; one long C++ call finishes first)."""
    def expire(_signum, _frame):
        raise CaseTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _timed(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    y = fn(x)
    return time.perf_counter() - start, y


@torch.no_grad()
def time_case(runner: Runner, x: torch.Tensor, runs: int, limit: float) -> dict[str, Any]:
    """Probe, predict, warm up, then time up to `runs` calls: min / all times in ms, plus the output."""
    x = x.to(runner.input_dtype)
    tokens = x.shape[0]
    with deadline(limit):
        probe_s, _ = _timed(runner.fn, x[:PROBE_TOKENS])
    predicted = probe_s * tokens / min(PROBE_TOKENS, tokens)
    if predicted > limit:
        return {"status": "timeout", "note": f"predicted {predicted:.3g} s from {PROBE_TOKENS} tokens"}
    times, started = [], time.perf_counter()
    with deadline(limit):
        _, y = _timed(runner.fn, x)  # warm-up
        for _ in range(runs):
            times.append(_timed(runner.fn, x)[0])
            if time.perf_counter() - started > limit:
                break
    return {"status": "ok", "ms": 1e3 * min(times), "runs_ms": [1e3 * t for t in times], "output": y.float()}


def relative_error(y: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean squared error / mean square of the fp32 output (as in shared/docs/CPU-KERNELS.md)."""
    return float((y.double() - reference.double()).pow(2).mean() / reference.double().pow(2).mean())


# -- the run -----------------------------------------------------------------------------------------------


@dataclass
class Bench:
    shapes: list[tuple[int, int]]
    tokens: list[int]
    runs: int
    limit: float
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

    def _build(self, m: Method, linear: nn.Linear) -> Runner | dict[str, Any]:
        try:
            return m.build(linear, self.cpu)
        except Skip as exc:
            return {"status": "skip", "note": str(exc)}
        except Exception as exc:  # a peer's API drift must not end the run
            return {"status": "error", "note": f"{type(exc).__name__}: {exc}"[:300]}

    def _run_tokens(self, linear: nn.Linear, runners: dict[str, Any], tokens: int) -> None:
        x = torch.randn(tokens, linear.in_features, generator=torch.Generator().manual_seed(1))
        reference = None
        for name, runner in runners.items():
            row = self._case(runner, x)
            output = row.pop("output", None)
            if name == "fp32" and output is not None:
                reference = output
            if output is not None and reference is not None:
                row["rel_err"] = relative_error(output, reference)
            if isinstance(runner, Runner) and runner.resident_bytes is not None:
                row["resident_vs_fp32"] = runner.resident_bytes / (4 * linear.weight.numel())
            row.update(method=name, shape=[linear.in_features, linear.out_features], tokens=tokens)
            self.results.append(row)
            print(_progress_line(row), flush=True)

    def _case(self, runner: Runner | dict[str, Any], x: torch.Tensor) -> dict[str, Any]:
        if not isinstance(runner, Runner):
            return dict(runner)
        try:
            return time_case(runner, x, self.runs, self.limit)
        except CaseTimeout:
            return {"status": "timeout", "note": f"exceeded {self.limit:.3g} s"}


def _progress_line(row: dict[str, Any]) -> str:
    value = f"{row['ms']:.2f} ms" if row["status"] == "ok" else row["status"]
    return f"{row['shape'][0]}x{row['shape'][1]} @ {row['tokens']:>5} tokens  {row['method']:<26} {value}"


def machine(cpu: CpuFeatures) -> dict[str, Any]:
    return {"cpu": cpu.model, "instruction_set": cpu.instruction_set, "cores": cpu.cores,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "kernel_backend": active_backend().name,
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}


def _cell(row: dict[str, Any], fp32_ms: float | None) -> str:
    if row["status"] != "ok":
        return row["status"]
    speed = f" ({fp32_ms / row['ms']:.2f}x)" if fp32_ms else ""
    return f"{row['ms']:.1f}{speed}"


def markdown(bench: Bench, info: dict[str, Any], command: str) -> str:
    names = [m.name for m in bench.methods]
    lines = [f"# Linear layer timings ({info['date']})", "",
             f"`{command}`", "",
             f"CPU: {info['cpu']}, {info['instruction_set']}, {info['cores']} cores, {info['threads']} threads; "
             f"torch {info['torch']}; diffquant kernel backend: {info['kernel_backend']}", "",
             "ms, min of runs (speed-up vs fp32 in the same process). skip / timeout / error: see the JSON notes.",
             "", "| in x out | tokens | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for shape in bench.shapes:
        for tokens in bench.tokens:
            rows = {r["method"]: r for r in bench.results if tuple(r["shape"]) == shape and r["tokens"] == tokens}
            fp32 = rows.get("fp32", {}).get("ms")
            cells = [_cell(rows[n], fp32) if n in rows else "" for n in names]
            lines.append(f"| {shape[0]}x{shape[1]} | {tokens} | " + " | ".join(cells) + " |")
    lines += ["", "| method | rel. error vs fp32 (first case) | resident weight bytes / fp32 |", "|---|---|---|"]
    for name in names:
        row = next((r for r in bench.results if r["method"] == name), {})
        err = f"{row['rel_err']:.1e}" if "rel_err" in row else "-"
        mem = f"{row['resident_vs_fp32']:.3f}" if "resident_vs_fp32" in row else "-"
        lines.append(f"| {name} | {err} | {mem} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run on small shapes")
    parser.add_argument("--peers", action="store_true", help="also time sdnq / torchao / optimum-quanto")
    parser.add_argument("--limit", type=float, default=None, help="seconds per case (default 10 quick, 120 full)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="output folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = QUICK if args.quick else FULL
    methods = [m for m in METHODS.values() if args.peers or m.kind != "peer"]
    bench = Bench(preset["shapes"], preset["tokens"], preset["runs"], args.limit or (10 if args.quick else 120),
                  methods)
    bench.run()
    info, command = machine(bench.cpu), " ".join(["python", *sys.argv])
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_linear-{'quick' if args.quick else 'full'}-{dt.datetime.now(dt.UTC):%Y%m%d-%H%M%S}"
    (args.out / f"{stem}.json").write_text(json.dumps({"machine": info, "command": command,
                                                       "results": bench.results}, indent=2))
    (args.out / f"{stem}.md").write_text(markdown(bench, info, command))
    print(f"wrote {args.out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
