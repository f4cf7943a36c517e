"""What the ablation scripts of benchmarks/quality share: each row is a recipe written to <out>/recipes/ and
evaluated by `diffquant report`'s machinery into <out>/ (results.json, README.md, grids); <out>/ABLATION.md
(ABLATION-<model>.md for another model than the script's default) gets a table of PSNR / SSIM vs FP,
eps SQNR, FID, the quantization's wall and CPU seconds, the share of parameters trained and the share of
their codes changed per row. A script gives its rows and calls `main`."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffquant.atomic import write_text_atomic
from diffquant.eval.report import ReportConfig, load_rows, run_report
from diffquant.recipes import Recipe

SCOREBOARD = Path(__file__).parent / "results.json"
# name -> (group, what, recipe fields)
Rows = dict[str, tuple[str, str, dict]]


def write_recipe(name: str, fields: dict, folder: Path, label: str) -> Path:
    recipe = Recipe.from_dict({"name": name, "description": f"{label}: {name}", **fields})
    path = folder / f"{name}.yaml"
    path.write_text(recipe.to_yaml())
    return path


def table(rows: list[dict], plan: Rows) -> str:
    by_name = {r["recipe"]: r for r in rows}
    lines = ["| group | recipe | what | PSNR vs FP (dB) | SSIM vs FP | eps SQNR (dB) | FID (x FP) | samples | "
             "quantize s | quantize CPU s | trained share | codes changed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, (group, what, _) in plan.items():
        row = by_name.get(name)
        if row is not None:
            lines.append(f"| {group} | `{name}` | {what} | {row['psnr_vs_fp']:.2f} | {row['ssim_vs_fp']:.4f} | "
                         f"{row['eps_sqnr_db']:.2f} | {row['fid']:.2f} ({row['fid'] / row['fp_fid']:.2f}x) | "
                         f"{row['samples']} | {_stage_cells(row.get('stages'))} |")
    return "\n".join(lines)


def _stage_cells(stages: list[dict] | None) -> str:
    """The quantization's wall and CPU seconds (its stages'; rows from before the CPU time was recorded show
    –), the share of parameters a training stage trained and the share of their codes it changed."""
    if not stages:
        return "– | – | – | –"
    cpu = f"{sum(s['cpu_seconds'] for s in stages):.0f}" if all("cpu_seconds" in s for s in stages) else "–"
    seconds = f"{sum(s['seconds'] for s in stages):.0f} | {cpu}"
    trainer = next((s for s in stages if "trained_share" in s), None)
    if trainer is None:
        return f"{seconds} | – | –"
    changed = f"{trainer['codes_changed']:.3%}" if "codes_changed" in trainer else "–"
    return f"{seconds} | {trainer['trained_share']:.1%} | {changed}"


def main(script: str, label: str, doc: str, out: Path, rows: Rows, optional: dict[str, tuple[str, Rows]],
         note: str, model: str, samples: int, scoreboard: dict[str, str] | None = None) -> None:
    """The command line of an ablation script (`label` starts its recipes' descriptions): rows (all, or
    --only some; `optional` rows behind their flag: name -> (help, rows)) evaluated on --model, then
    ABLATION.md rewritten with every row known and the `scoreboard` rows (recipe -> what) of
    benchmarks/quality/results.json beside them."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", default=model)
    parser.add_argument("--samples", type=int, default=samples, help=f"samples per row (default {samples})")
    for flag, (help_text, _) in optional.items():
        parser.add_argument(f"--{flag}", action="store_true", help=help_text)
    parser.add_argument("--only", nargs="*", default=None, help="row names to run (default: all)")
    parser.add_argument("--table-only", action="store_true", help="only rewrite ABLATION.md from results.json")
    args = parser.parse_args()
    every = {**rows, **{name: row for _, extra in optional.values() for name, row in extra.items()}}
    plan = {**rows, **{name: row for flag, (_, extra) in optional.items() if getattr(args, flag.replace("-", "_"))
                       for name, row in extra.items()}}
    plan = {k: v for k, v in plan.items() if args.only is None or k in args.only}
    folder = out / "recipes"
    folder.mkdir(parents=True, exist_ok=True)
    recipes = tuple(str(write_recipe(name, fields, folder, label)) for name, (_, _, fields) in plan.items())
    flags = "".join(f" --{flag}" for flag in optional if getattr(args, flag.replace("-", "_")))
    command = f"python benchmarks/quality/{script}.py --model {args.model} --samples {args.samples}{flags}"
    results = load_rows(out / "results.json") if args.table_only else run_report(
        ReportConfig(out=out, models=(args.model,), recipes=recipes, samples=args.samples, command=command))
    shown = {name: ("scoreboard", what, {}) for name, what in (scoreboard or {}).items()}
    results = [*load_rows(SCOREBOARD), *results] if shown else results
    text = (f"# {doc.splitlines()[0].rstrip(':.')} ({args.model})\n\n`{command}`\n\n{note}\n\n"
            f"{table([r for r in results if r['model'] == args.model], {**shown, **every})}\n")
    write_text_atomic(out / ("ABLATION.md" if args.model == model else f"ABLATION-{args.model}.md"), text)
    print(text)
