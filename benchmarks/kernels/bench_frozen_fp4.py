"""Frozen FP4 weights on the integer kernels (issue 21): `python benchmarks/kernels/bench_frozen_fp4.py
[--model fmnist-dit] [--recipes fp-w4a8 int-w4a8 w4a8] [--samples 64] [--agree-samples 256]`.

For each recipe's quantized zoo folder (made once, as `diffquant report` makes them, in its work folder):
  * agreement: the frozen model (diffquant.freeze: codes resident, the selected kernel backend) against the
    fake-quant model from the same noise: PSNR of the frozen images vs the fake-quant ones, and the layers per
    kernel path ("int": integer GEMM; fp-w4a8's FP4 codes are decoded through the kernels' 16-entry table);
  * speed: every frozen model and the FP reference generating the same batch, interleaved, best of `rounds`
    (diffquant.eval.speed), all in this one process.
Writes benchmarks/kernels/frozen-fp4-<cpu>.json and .md (the CPU kind and backend in both).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from diffquant import zoo
from diffquant.atomic import write_json_atomic, write_text_atomic
from diffquant.eval.fp_cache import model_fingerprint
from diffquant.eval.metrics import psnr
from diffquant.eval.report import default_work_dir, quantized_folder
from diffquant.eval.runner import balanced_labels
from diffquant.eval.speed import format_speed, time_frozen_against_fp
from diffquant.eval.targets import resolve_target
from diffquant.freeze import freeze, packed_layers
from diffquant.kernels import active_backend, detect_cpu
from diffquant.recipes import resolve_recipe
from diffquant.zoo.model import generate

HERE = Path(__file__).parent


def images(model, labels: torch.Tensor, steps: int) -> torch.Tensor:
    with torch.no_grad():
        return generate(model, labels, 0, steps, batch_size=len(labels), progress=False)


def agreement(folder: Path, samples: int) -> dict:
    """PSNR (dB) of the frozen model's images vs the fake-quant model's, same noise; layers per path."""
    target = resolve_target(folder)
    labels = balanced_labels(samples, target.reference.num_classes)
    steps = target.reference.default_steps
    fake = images(target.model, labels, steps)
    freeze(target.model.denoiser)
    frozen = images(target.model, labels, steps)
    paths: dict[str, int] = {}
    for layer in packed_layers(target.model.denoiser).values():
        paths[layer.path] = paths.get(layer.path, 0) + 1
    return {"psnr_frozen_vs_fake_db": psnr(frozen, fake), "paths": paths}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fmnist-dit")
    parser.add_argument("--recipes", nargs="+", default=["fp-w4a8", "int-w4a8", "w4a8"])
    parser.add_argument("--samples", type=int, default=64, help="samples per timed generation (default 64)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--agree-samples", type=int, default=256, help="samples compared frozen vs fake quant")
    args = parser.parse_args()
    fingerprint = model_fingerprint(zoo.load(args.model))
    folders = [quantized_folder(args.model, fingerprint, resolve_recipe(r), default_work_dir()) for r in args.recipes]
    agree = {recipe: agreement(folder, args.agree_samples) for recipe, folder in zip(args.recipes, folders, strict=True)}
    speed = time_frozen_against_fp(folders, samples=args.samples, rounds=args.rounds)
    cpu = detect_cpu()
    result = {"command": "python benchmarks/kernels/bench_frozen_fp4.py " + " ".join(
                  f"--{k.replace('_', '-')} {' '.join(v) if isinstance(v, list) else v}" for k, v in vars(args).items()),
              "machine": f"{cpu.model}, {cpu.instruction_set}, {torch.get_num_threads()} threads, torch "
                         f"{torch.__version__}", "backend": active_backend().name, "agreement": agree,
              "speed": speed.to_dict()}
    name = f"frozen-fp4-{cpu.instruction_set.split()[0].lower()}"
    write_json_atomic(HERE / f"{name}.json", result, indent=2)
    lines = [f"# Frozen FP4 weights on the integer kernels ({args.model})", "", f"`{result['command']}`", "",
             f"{result['machine']}; kernel backend {result['backend']}.", "",
             "| recipe | PSNR frozen vs fake quant (dB) | layers per path |", "|---|---|---|"]
    lines += [f"| `{r}` | {a['psnr_frozen_vs_fake_db']:.2f} | {a['paths']} |" for r, a in agree.items()]
    text = "\n".join([*lines, "", format_speed(speed), ""])
    write_text_atomic(HERE / f"{name}.md", text)
    print(text)


if __name__ == "__main__":
    main()
