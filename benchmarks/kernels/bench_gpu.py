"""Side-by-side timings on a CUDA GPU: bf16 (cuBLAS) against diffquant's triton backend, per Linear layer and
per denoiser step.

    python benchmarks/kernels/bench_gpu.py              # needs a CUDA GPU and triton (pip install -e ".[gpu]")
    python benchmarks/kernels/bench_gpu.py --quick      # small shapes, tiny denoisers

Linear 4096x4096, 3072x12288 and 12288x3072 at 256 / 1024 / 4096 tokens, bf16 input and output:
  bf16, fp16            F.linear (cuBLAS)
  W8A8 / W4A8 / W4A4    diffquant PackedLinear on the triton backend: the activation quantizer kernel plus the
                        fused integer GEMM (int8 per channel x int8 per token; int4 per channel; int4 group-64
                        x int4 group-64), and W4A4 + a rank-32 low-rank branch (SVDQuant)
  GEMM only             the fused GEMM on already-quantized codes (what the quantizer pass costs is the gap)
  W8A8 [_int_mm]        the same codes through torch._int_mm (cuBLAS int8) + rescale in torch: a reference
                        point for the triton GEMM
Denoiser steps (batch 2, random weights from config): DiT-XL/2 and SD-1.5 UNet in bf16, and quantized with
`w8a8` / `w4a4` and frozen on the GPU (attention, norms and unquantized layers stay bf16).

Times: triton.testing.do_bench (L2 flushed between repetitions), median ms, after one untimed call that
autotunes. Each output is checked against bf16 (relative error). Results: JSON and a markdown table with
the GPU, driver, torch and triton versions, to `--out` (default this folder), gpu-<name>[-tag].json/.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from bench_denoiser import DIT_XL2, SD15_UNET, TINY_DIT, TINY_UNET, dit_case, unet_case  # noqa: E402

import diffquant  # noqa: E402
from diffquant.formats import QuantSpec  # noqa: E402
from diffquant.nn.layers import QLinear  # noqa: E402
from diffquant.nn.packed import PackedLinear, quantize_activation  # noqa: E402

FULL = {"shapes": [(4096, 4096), (3072, 12288), (12288, 3072)], "tokens": [256, 1024, 4096]}
QUICK = {"shapes": [(512, 512), (512, 2048)], "tokens": [64, 256]}
DTYPE = torch.bfloat16
SPECS = {
    "W8A8": (QuantSpec("int8", "channel", scale_dtype="float16"), QuantSpec("int8", "token", dynamic=True)),
    "W4A8": (QuantSpec("int4", "channel", scale_dtype="float16"), QuantSpec("int8", "token", dynamic=True)),
    "W4A4": (QuantSpec("int4", "group", group_size=64, scale_dtype="float16"),
             QuantSpec("int4", "group", group_size=64, dynamic=True)),
}
LOW_RANK = 32


def bench_ms(fn: Callable[[], Any]) -> float:
    import triton.testing

    with torch.no_grad():
        fn()  # autotune / compile outside the timed runs
        torch.cuda.synchronize()
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.float(), ref.float()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-12))


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


# -- Linear ------------------------------------------------------------------------------------------------


def packed(linear: nn.Linear, name: str, low_rank: bool = False) -> PackedLinear:
    layer = QLinear(linear, *SPECS[name])
    layer.calibrate_weight()
    if low_rank:
        g = torch.Generator(device="cuda").manual_seed(1)
        down = torch.randn(linear.in_features, LOW_RANK, device="cuda", generator=g) * 0.01
        up = torch.randn(LOW_RANK, linear.out_features, device="cuda", generator=g) * 0.01
        return PackedLinear.from_layer(layer, backend="triton", low_rank=(down, up))
    return PackedLinear.from_layer(layer, backend="triton")


def linear_rows(k: int, n: int, tokens: int) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    linear = nn.Linear(k, n).cuda()
    x = torch.randn(tokens, k, device="cuda", dtype=DTYPE)
    w16, b16 = linear.weight.to(DTYPE), linear.bias.to(DTYPE)
    ref = F.linear(x, w16, b16)
    rows: list[dict[str, Any]] = []

    def add(method: str, fn: Callable[[], torch.Tensor], resident: int | None = None, check: bool = True) -> None:
        try:
            with torch.no_grad():
                err = rel_error(fn(), ref) if check else None  # GEMM only: no bias, float32 out
            rows.append({"shape": f"{k}x{n}", "tokens": tokens, "method": method, "ms": bench_ms(fn),
                         "rel_err_vs_bf16": err, "weight_bytes": resident})
        except Exception as exc:  # a method that fails is reported, the run goes on
            rows.append({"shape": f"{k}x{n}", "tokens": tokens, "method": method, "error": repr(exc)[:300]})

    add("bf16", lambda: F.linear(x, w16, b16), w16.numel() * 2)
    w_half, b_half, x_half = w16.half(), b16.half(), x.half()
    add("fp16", lambda: F.linear(x_half, w_half, b_half), w16.numel() * 2)
    for name in SPECS:
        layer = packed(linear, name)
        add(f"diffquant {name}", lambda m=layer: m(x), layer.resident_bytes())
        add(f"{name} GEMM only", gemm_only(layer, x), None, check=False)
    layer = packed(linear, "W4A4", low_rank=True)
    add("diffquant W4A4+r32", lambda m=layer: m(x), layer.resident_bytes())
    add("W8A8 [_int_mm]", int_mm_w8a8(packed(linear, "W8A8"), x), None)
    return rows


def gemm_only(layer: PackedLinear, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The fused GEMM on codes quantized once, outside the timed call."""
    act = quantize_activation(x, layer.input_quantizer, layer.backend)
    a, scales = act.codes[:, :layer.weight.plan.k_pad].contiguous(), act.scale[:, layer.weight.plan.act_blocks]
    return lambda: layer.weight.fused_matmul(a, scales)


def int_mm_w8a8(layer: PackedLinear, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    b = layer.weight.int8_codes().t().contiguous().t()  # column-major [K, N]: cuBLAS int8 wants "TN"
    w_scale = layer.weight.segment_scales()[0].float()

    def run() -> torch.Tensor:
        act = quantize_activation(x, layer.input_quantizer, layer.backend)
        acc = torch._int_mm(act.codes, b)
        return (acc.float() * act.scale * w_scale + layer.bias.float()).to(x.dtype)

    return run


def profile_rows(k: int, n: int, tokens: int) -> list[dict[str, Any]]:
    """GPU time per kernel of one layer call (torch.profiler), W8A8 and W4A4, and the call's host time."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    linear = nn.Linear(k, n).cuda()
    x = torch.randn(tokens, k, device="cuda", dtype=DTYPE)
    rows = []
    for name in ("W8A8", "W4A4"):
        layer = packed(linear, name)
        with torch.no_grad():
            for _ in range(3):
                layer(x)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    layer(x)
                torch.cuda.synchronize()
        for event in prof.key_averages():
            gpu_us = getattr(event, "device_time_total", 0) / 10
            if gpu_us > 0.5 and event.device_type.name == "CUDA":
                rows.append({"method": name, "kernel": event.key[:80], "gpu_us_per_call": round(gpu_us, 2)})
        started = time.perf_counter()
        with torch.no_grad():
            for _ in range(50):
                layer(x)
        torch.cuda.synchronize()
        rows.append({"method": name, "kernel": "wall time per call (50 calls, synchronized at the end)",
                     "gpu_us_per_call": round((time.perf_counter() - started) / 50 * 1e6, 2)})
    return rows


# -- denoisers ---------------------------------------------------------------------------------------------


def graphed(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """fn captured once into a CUDA graph (after warm-up calls that autotune), replayed per call: the
    step's GPU time without the host-side cost of launching each kernel from Python."""
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


def denoiser_rows(case, recipes: list[str], graphs: bool = False) -> list[dict[str, Any]]:
    inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in case.inputs().items()}
    inputs = {k: v.to(DTYPE) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
    model = case.build().to("cuda", DTYPE)

    def run(m: nn.Module) -> Callable[[], torch.Tensor]:
        call = lambda: m(**inputs, return_dict=False)[0]  # noqa: E731
        return graphed(call) if graphs else call

    with torch.no_grad():
        ref = run(model)()
    name = case.name + (" (CUDA graph)" if graphs else "")
    rows = [{"model": name, "variant": "bf16", "ms": bench_ms(run(model)), "weight_bytes": module_bytes(model)}]
    for recipe in recipes:
        started = time.perf_counter()
        try:
            import copy

            quantized = diffquant.freeze(diffquant.quantize(copy.deepcopy(model), recipe, progress=False))
            prep = time.perf_counter() - started
            with torch.no_grad():
                err = rel_error(run(quantized)(), ref)
            backends = sorted({m.backend.name for m in quantized.modules() if getattr(m, "path", "") == "int"})
            rows.append({"model": name, "variant": recipe, "ms": bench_ms(run(quantized)),
                         "rel_err_vs_bf16": err, "weight_bytes": module_bytes(quantized), "prepare_s": prep,
                         "backends": backends})
            del quantized
        except Exception as exc:
            traceback.print_exc()
            rows.append({"model": name, "variant": recipe, "error": repr(exc)[:300]})
        torch.cuda.empty_cache()
    return rows


# -- report ------------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    import triton

    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "sms": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": ".".join(map(str, torch.cuda.get_device_capability())), "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": triton.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def markdown(info: dict[str, Any], linear: list[dict], steps: list[dict], command: str,
             profile: list[dict] | None = None) -> str:
    lines = [f"# GPU kernel benchmark: {info['gpu']}", "",
             f"{info['gpu']} ({info['sms']} SMs, {info['memory_gib']} GiB, sm_{info['capability']}), torch "
             f"{info['torch']} (CUDA {info['cuda']}), triton {info['triton']}, {info['date']}.", "",
             f"Command: `{command}`", "", "## Linear (ms, median; ratio = bf16 / method)", ""]
    methods = list(dict.fromkeys(r["method"] for r in linear))
    lines += ["| shape | tokens | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for key in dict.fromkeys((r["shape"], r["tokens"]) for r in linear):
        row = {r["method"]: r for r in linear if (r["shape"], r["tokens"]) == key}
        base = row.get("bf16", {}).get("ms")
        cells = [_cell(row.get(m), base) for m in methods]
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    lines += ["", "Relative error vs bf16 and weight bytes (first token count of each shape):", "",
              "| shape | method | rel. error | weight MiB |", "|---|---|---|---|"]
    first = {}
    for r in linear:
        first.setdefault(r["shape"], r["tokens"])
    for r in linear:
        if r["tokens"] == first[r["shape"]] and "ms" in r and r.get("weight_bytes"):
            lines.append(f"| {r['shape']} | {r['method']} | {r['rel_err_vs_bf16']:.4f} | {r['weight_bytes'] / 2**20:.1f} |")
    if profile:
        lines += ["", "## Profile of one layer call (4096x4096, 1024 tokens), us", "", "| method | kernel | us |",
                  "|---|---|---|"] + [f"| {r['method']} | {r['kernel']} | {r['gpu_us_per_call']} |" for r in profile]
    lines += ["", "## Denoiser step, batch 2 (ms, median; ratio = bf16 / variant)", "",
              "| model | variant | ms | ratio | rel. error vs bf16 | weight MiB | backends |", "|---|---|---|---|---|---|---|"]
    for r in steps:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['variant']} | error: {r['error']} | | | | |")
            continue
        base = next(s["ms"] for s in steps if s["model"] == r["model"] and s["variant"] == "bf16")
        err = f"{r['rel_err_vs_bf16']:.4f}" if "rel_err_vs_bf16" in r else ""
        lines.append(f"| {r['model']} | {r['variant']} | {r['ms']:.2f} | {base / r['ms']:.2f}x | {err} | "
                     f"{r['weight_bytes'] / 2**20:.0f} | {', '.join(r.get('backends', []))} |")
    return "\n".join(lines) + "\n"


def _cell(row: dict | None, base: float | None) -> str:
    if row is None:
        return ""
    if "error" in row:
        return "error"
    return f"{row['ms']:.3f}" + (f" ({base / row['ms']:.2f}x)" if base else "")


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes and tiny denoisers")
    parser.add_argument("--skip", nargs="*", default=[], choices=["profile", "linear", "dit-xl2", "sd15-unet"])
    parser.add_argument("--graphs", action="store_true", help="also time denoiser steps replayed as CUDA graphs")
    parser.add_argument("--tag", default="")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA GPU", file=sys.stderr)
        return 2
    preset = QUICK if args.quick else FULL
    info = machine_info()
    command = "python benchmarks/kernels/bench_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    slug = info["gpu"].lower().replace(" ", "-") + (f"-{args.tag}" if args.tag else "")
    linear: list[dict] = []
    steps: list[dict] = []
    prof: list[dict] = []

    def save() -> None:
        args.out.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out / f"gpu-{slug}.json", json.dumps({"machine": info, "command": command,
                                                                 "linear": linear, "steps": steps, "profile": prof},
                                                                indent=1))
        write_atomic(args.out / f"gpu-{slug}.md", markdown(info, linear, steps, command, prof))

    if "profile" not in args.skip:
        try:
            prof += profile_rows(*((512, 512, 256) if args.quick else (4096, 4096, 1024)))
        except Exception:  # the profile is a diagnosis; the timings go on without it
            traceback.print_exc()
        print(*prof, sep="\n", flush=True)
        save()
    if "linear" not in args.skip:
        for (k, n) in preset["shapes"]:
            for tokens in preset["tokens"]:
                linear += linear_rows(k, n, tokens)
                print(*(f"{r['shape']} @ {r['tokens']:5d}  {r['method']:22s} "
                        + (f"{r['ms']:.3f} ms" if "ms" in r else r["error"]) for r in linear[-9:]), sep="\n",
                      flush=True)
                save()
    cases = {"dit-xl2": dit_case("dit-xl2", TINY_DIT if args.quick else DIT_XL2),
             "sd15-unet": unet_case("sd15-unet", TINY_UNET if args.quick else SD15_UNET)}
    for name, case in cases.items():
        if name in args.skip:
            continue
        for graphs in (False, True) if args.graphs else (False,):
            steps += denoiser_rows(case, ["w8a8", "w4a4"], graphs)
            print(json.dumps(steps[-3:], indent=None), flush=True)
            save()
    save()
    print(markdown(info, linear, steps, command, prof))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
