"""Ablation of low-bit FP quantization (METHODS.md §9, issue 21) on one zoo model:
`python benchmarks/quality/fp_ablation.py [--model fmnist-dit] [--samples 256]`.

Rows, each a recipe written to benchmarks/quality/fp-ablation/recipes/ and evaluated by `diffquant report`'s
machinery into benchmarks/quality/fp-ablation/ (results.json, README.md, grids):
  * FP4 weights with INT8 per-token inputs (fp-w4a8's setting): fixed E2M1 vs searched split, with and
    without the clipping search, round-to-nearest; INT4 at the same effort; the learned-rounding rows are
    fp-w4a8 / int-w4a8 (optionally re-run here with --learned; on the scoreboard at 1000 samples).
  * INT vs FP at 4, 6 and 8 bits: weights alone (per channel, inputs in float) and inputs (per token,
    dynamic, beside INT8 per-channel weights), FP with its split searched per layer, round-to-nearest.
Then prints and writes fp-ablation/ABLATION.md: PSNR / SSIM vs FP and eps SQNR per row.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffquant.atomic import write_text_atomic
from diffquant.eval.report import ReportConfig, load_rows, run_report
from diffquant.recipes import Recipe

OUT = Path(__file__).parent / "fp-ablation"
CALIBRATION = {"type": "calibration_selection", "method": "uniform", "samples": 256}
INT8_TOKEN = {"format": "int8", "granularity": "token", "dynamic": True}
RECONSTRUCTION = {"type": "block_reconstruction", "iterations": 1000, "batch_size": 32, "eta": 0.0, "qdrop_p": 0.0,
                  "lambda_round": 0.01, "lr_weight": 1.0e-3, "lr_act": 4.0e-5}


def search(formats: list[str] | None = None, clips: int = 6, weights: bool = True) -> list[dict]:
    """A format search stage (after the calibration selection): `formats` fixed, else the split searched."""
    stage = {"type": "format_search", "weights": weights, "inputs": not weights, "clips": clips, "clip_step": 0.1}
    if formats is not None:
        stage["weight_formats" if weights else "input_formats"] = formats
    return [CALIBRATION, stage]


def weight(fmt: str) -> dict:
    return {"format": fmt, "granularity": "channel", "scale_dtype": "float16"}


def token(fmt: str) -> dict:
    return {"format": fmt, "granularity": "token", "dynamic": True}


# name -> (group, what, recipe fields)
ROWS: dict[str, tuple[str, str, dict]] = {
    "abl-int4-rtn": ("W4 (A: INT8 per token)", "INT4, absmax", dict(weight=weight("int4"), input=INT8_TOKEN)),
    "abl-int4-clip": ("W4 (A: INT8 per token)", "INT4, clipping searched",
                      dict(weight=weight("int4"), input=INT8_TOKEN, stages=search(["int4"]))),
    "abl-e2m1-rtn": ("W4 (A: INT8 per token)", "FP4 E2M1 fixed, absmax", dict(weight=weight("fp4_e2m1"), input=INT8_TOKEN)),
    "abl-e2m1-clip": ("W4 (A: INT8 per token)", "FP4 E2M1 fixed, clipping searched",
                      dict(weight=weight("fp4_e2m1"), input=INT8_TOKEN, stages=search(["fp4_e2m1"]))),
    "abl-fp4-split": ("W4 (A: INT8 per token)", "FP4 split searched, absmax",
                      dict(weight=weight("fp4_e2m1"), input=INT8_TOKEN, stages=search(clips=1))),
    "abl-fp4-search": ("W4 (A: INT8 per token)", "FP4 split + clipping searched (fp-w4a8 before rounding)",
                       dict(weight=weight("fp4_e2m1"), input=INT8_TOKEN, stages=search())),
}
for bits, fp in ((4, "fp4_e2m1"), (6, "fp6_e2m3"), (8, "fp8_e4m3")):
    ROWS[f"abl-w{bits}-int"] = ("INT vs FP, weights only (A: float)", f"INT{bits}, absmax",
                                dict(weight=weight(f"int{bits}"), input=None))
    ROWS[f"abl-w{bits}-fp"] = ("INT vs FP, weights only (A: float)", f"FP{bits}, split searched, absmax",
                               dict(weight=weight(fp), input=None, stages=search(clips=1)))
    # inputs beside INT8 per-channel weights (~50 dB alone): activation-only recipes do not reload yet
    ROWS[f"abl-a{bits}-int"] = ("INT vs FP, inputs (W: INT8 per channel)", f"INT{bits} per token",
                                dict(weight=weight("int8"), input=token(f"int{bits}")))
    ROWS[f"abl-a{bits}-fp"] = ("INT vs FP, inputs (W: INT8 per channel)", f"FP{bits} per token, split searched",
                               dict(weight=weight("int8"), input=token(fp), stages=search(weights=False)))
LEARNED = {
    "abl-e2m1-learned": ("W4 (A: INT8 per token)", "FP4 E2M1 fixed, clipping searched, learned rounding",
                         dict(weight=weight("fp4_e2m1"), input=INT8_TOKEN, stages=[*search(["fp4_e2m1"]), RECONSTRUCTION])),
}


def write_recipe(name: str, fields: dict, folder: Path) -> Path:
    recipe = Recipe.from_dict({"name": name, "description": f"issue-21 ablation: {name}", **fields})
    path = folder / f"{name}.yaml"
    path.write_text(recipe.to_yaml())
    return path


def table(rows: list[dict], plan: dict[str, tuple[str, str, dict]]) -> str:
    by_name = {r["recipe"]: r for r in rows}
    lines = ["| group | recipe | what | PSNR vs FP (dB) | SSIM vs FP | eps SQNR (dB) |", "|---|---|---|---|---|---|"]
    for name, (group, what, _) in plan.items():
        row = by_name.get(name)
        if row is not None:
            lines.append(f"| {group} | `{name}` | {what} | {row['psnr_vs_fp']:.2f} | {row['ssim_vs_fp']:.4f} | "
                         f"{row['eps_sqnr_db']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fmnist-dit")
    parser.add_argument("--samples", type=int, default=256, help="samples per row (default 256)")
    parser.add_argument("--learned", action="store_true", help="also the fixed-E2M1 learned-rounding row (~15 min)")
    parser.add_argument("--only", nargs="*", default=None, help="row names to run (default: all)")
    parser.add_argument("--table-only", action="store_true", help="only rewrite ABLATION.md from results.json")
    args = parser.parse_args()
    plan = {**ROWS, **(LEARNED if args.learned else {})}
    plan = {k: v for k, v in plan.items() if args.only is None or k in args.only}
    folder = OUT / "recipes"
    folder.mkdir(parents=True, exist_ok=True)
    recipes = tuple(str(write_recipe(name, fields, folder)) for name, (_, _, fields) in plan.items())
    command = f"python benchmarks/quality/fp_ablation.py --model {args.model} --samples {args.samples}"
    rows = load_rows(OUT / "results.json") if args.table_only else run_report(
        ReportConfig(out=OUT, models=(args.model,), recipes=recipes, samples=args.samples, command=command))
    text = (f"# FP quantization ablation ({args.model}, {args.samples} samples)\n\n`{command}`"
            f"{' --learned' if args.learned else ''}\n\nCPU and date per row: results.json. fp-w4a8 / int-w4a8 "
            f"(learned rounding, 1000 samples): benchmarks/quality/README.md.\n\n"
            f"{table([r for r in rows if r['model'] == args.model], {**ROWS, **LEARNED})}\n")
    write_text_atomic(OUT / "ABLATION.md", text)
    print(text)


if __name__ == "__main__":
    main()
