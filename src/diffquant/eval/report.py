"""The quality report: every available zoo model x every preset recipe (+ the FP row), evaluated.

    diffquant report                                   # or: python -m diffquant.eval.report
    diffquant report --models fmnist-dit --recipes fp w4a8 --samples 200    # partial run, merged

writes into benchmarks/quality/:

    results.json      a list of `diffquant eval --json` objects (plus the machine), one per
                      model x recipe; a partial run replaces the rows it recomputes
    README.md         the table, the machine, the date and the command
    quality_vs_bits.png   FID and PSNR vs FP against the recipe's bits
    grids/MODEL-RECIPE.png  FP samples over quantized samples, one column per class

Quantized folders go to a work folder (default ~/.cache/diffquant/report) named by a hash of the FP
weights and the recipe, so reruns reuse them and a retrained model or an edited recipe never reuses
a stale one. New methods appear here by shipping a preset recipe; this file does not change.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffquant import zoo
from diffquant.atomic import write_text_atomic
from diffquant.cli_args import positive_int
from diffquant.eval.fp_cache import model_fingerprint
from diffquant.eval.output import save_figure, write_json_atomic
from diffquant.eval.runner import Judge, evaluate
from diffquant.eval.targets import FP_RECIPE
from diffquant.recipes import Recipe, list_presets
from diffquant.recipes.presets import resolve_recipe
from diffquant.zoo.train_utils import cpu_name

DEFAULT_OUT = Path("benchmarks/quality")
RESULTS = "results.json"
PLOT = "quality_vs_bits.png"
GRIDS = "grids"


def default_work_dir() -> Path:
    root = os.environ.get("DIFFQUANT_CACHE_DIR") or Path.home() / ".cache" / "diffquant"
    return Path(root) / "report"


@dataclass(frozen=True)
class ReportConfig:
    """models/recipes None: every available zoo model / "fp" + every preset."""

    out: Path = DEFAULT_OUT
    work: Path = field(default_factory=default_work_dir)
    models: tuple[str, ...] | None = None
    recipes: tuple[str, ...] | None = None
    samples: int = 1000
    steps: int | None = None
    seed: int = 0
    sqnr_samples: int = 64
    cache: bool = True
    progress: bool = True
    command: str = "python -m diffquant.eval.report"


def machine() -> dict[str, Any]:
    return {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")}


def available_models() -> list[str]:
    return sorted(name for name, entry in zoo.entries().items() if entry.available)


def recipe_names(config: ReportConfig) -> list[str]:
    return list(config.recipes) if config.recipes else [FP_RECIPE, *list_presets()]


# -- running ----------------------------------------------------------------------------------------


def quantized_folder(model: str, fingerprint: str, recipe: Recipe, work: Path) -> Path:
    """The quantized zoo folder for (FP weights, recipe), made once and reused (written atomically)."""
    from diffquant.checkpoint import saved_by_older_format
    from diffquant.workflows import quantize_zoo_model

    digest = hashlib.sha256((fingerprint + recipe.cache_key()).encode()).hexdigest()
    folder = work / model / f"{recipe.name}-{digest[:16]}"
    if not folder.exists() or saved_by_older_format(folder):  # older folders are not loaded: redone
        quantize_zoo_model(model, recipe, folder, overwrite=True)
    return folder


def evaluate_row(model: str, recipe_name: str, fingerprint: str, config: ReportConfig, judge: Judge) -> dict[str, Any]:
    options = dict(samples=config.samples, steps=config.steps, seed=config.seed, sqnr_samples=config.sqnr_samples,
                   cache=config.cache, judge=judge, progress=config.progress)
    if recipe_name == FP_RECIPE:
        row = evaluate(model, **options)
    else:
        recipe = resolve_recipe(recipe_name)
        target = quantized_folder(model, fingerprint, recipe, config.work)
        grid = config.out / GRIDS / f"{model}-{recipe.name}.png"
        row = evaluate(target, grid_path=grid, **options)
    return {**row, **machine()}


def run_report(config: ReportConfig) -> list[dict[str, Any]]:
    """Evaluate the requested models x recipes, merge them into results.json, rewrite README and plot.
    Rows are merged after each evaluation, so an interrupted run keeps what it finished."""
    models = list(config.models) if config.models else available_models()
    if not models:
        raise ValueError("no zoo model has shipped weights yet: nothing to report (see `diffquant zoo list`)")
    recipes = recipe_names(config)
    judge = Judge()
    rows = load_rows(config.out / RESULTS)  # what the README shows if nothing is evaluated
    for model in models:
        fingerprint = model_fingerprint(zoo.load(model))
        for recipe in recipes:
            print(f"[report] {model} x {recipe}", file=sys.stderr)
            row = evaluate_row(model, recipe, fingerprint, config, judge)
            # re-read: another report process may have added rows meanwhile
            rows = merge_rows(load_rows(config.out / RESULTS), [row])
            write_json_atomic(config.out / RESULTS, rows)
    write_readme(config.out, rows, config)
    plot_quality(config.out / PLOT, rows)
    return rows


# -- results.json -----------------------------------------------------------------------------------


def load_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = json.loads(path.read_text())
    if not isinstance(rows, list):
        raise ValueError(f"{path} is not a list of result rows")
    return rows


def bits_of(label: str) -> tuple[int, int]:
    """"W4A8" -> (4, 8)."""
    match = re.fullmatch(r"W(\d+)A(\d+)", label)
    if match is None:
        raise ValueError(f"bits label {label!r} is not of the form WxAy")
    return int(match[1]), int(match[2])


def row_order(row: dict[str, Any]) -> tuple:
    """By model, then most bits first (FP leads), then recipe name."""
    w, a = bits_of(row["bits"])
    return row["model"], -w, -a, row["recipe"]


def merge_rows(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of `new` replace rows of `old` with the same (model, recipe); sorted by `row_order`."""
    merged = {(r["model"], r["recipe"]): r for r in old}
    merged.update({(r["model"], r["recipe"]): r for r in new})
    return sorted(merged.values(), key=row_order)


# -- README -------------------------------------------------------------------------------------------

# (header, key, format, against FP): the table is a registry of columns, not code per metric. Columns
# against FP read "ref" in the FP row, where they only restate the caps (PSNR 100 dB, SSIM 1, ...).
COLUMNS: tuple[tuple[str, str, str, bool], ...] = (
    ("recipe", "recipe", "`{}`", False),
    ("bits", "bits", "{}", False),
    ("weights KiB", "weight_bytes", "{:,.0f}", False),
    ("FID ↓", "fid", "{:.2f}", False),
    ("class acc ↑", "class_accuracy", "{:.3f}", False),
    ("PSNR vs FP ↑", "psnr_vs_fp", "{:.2f}", True),
    ("SSIM vs FP ↑", "ssim_vs_fp", "{:.4f}", True),
    ("feat. dist ↓", "feature_distance_vs_fp", "{:.4f}", True),
    ("eps SQNR dB ↑", "eps_sqnr_db", "{:.2f}", True),
    ("gen s", "wall_time_s", "{:.1f}", False),
    ("samples", "samples", "{}", False),
    ("steps", "steps", "{}", False),
)


# Columns shown only in the tables where some row has a value: attention-matmul quantization (a recipe's
# `attention`, e.g. edadm-w4a4) is named beside the bits label, which counts the layers only.
OPTIONAL_COLUMNS: tuple[tuple[str, str, str, bool], ...] = (
    ("attention matmuls", "attention_quantized", "{}", False),
)


def table_columns(rows: list[dict[str, Any]]) -> tuple[tuple[str, str, str, bool], ...]:
    """COLUMNS with the optional columns some row has a value for, after "bits"."""
    optional = tuple(c for c in OPTIONAL_COLUMNS if any(r.get(c[1]) for r in rows))
    return COLUMNS[:2] + optional + COLUMNS[2:]


def _cell(row: dict[str, Any], key: str, fmt: str, vs_fp: bool) -> str:
    value = row.get(key)
    if vs_fp and row["recipe"] == FP_RECIPE:
        return "ref"
    if value is None:
        return "–"
    return fmt.format(value / 1024 if key == "weight_bytes" else value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = []
    for model in sorted({r["model"] for r in rows}):
        model_rows = [r for r in rows if r["model"] == model]
        fp = next((r for r in model_rows if r["recipe"] == FP_RECIPE), None)
        lines += [f"### {model}", "", _regime_line(model), ""]
        if fp is not None:
            lines += [f"Full precision: FID {fp['fid']:.2f}, class accuracy {fp['class_accuracy']:.3f}.", ""]
        columns = table_columns(model_rows)
        lines.append("| " + " | ".join(column[0] for column in columns) + " |")
        lines.append("|" + "---|" * len(columns))
        lines += ["| " + " | ".join(_cell(r, *column[1:]) for column in columns) + " |" for r in model_rows]
        lines.append("")
    return "\n".join(lines)


REGIMES = {
    "easy": "Easy: the weights as trained; layer inputs with mild channel outliers (2-12x the median channel, "
            "`diffquant outliers`), so most recipes stay close to FP.",
    "realistic": "Realistic: {description}. The FP model generates the same images as its base; its layer "
                 "inputs carry channel outliers of 10-100x the median channel, as real diffusion models' do.",
}


def _regime_line(model: str) -> str:
    entry = zoo.entries().get(model)
    if entry is None:
        return "(no longer a registered zoo model)"
    return REGIMES[entry.regime].format(description=entry.description)


def _machines(rows: list[dict[str, Any]]) -> str:
    seen = sorted({f"{r.get('cpu', '?')}, {r.get('threads', '?')} threads, torch {r.get('torch', '?')}, "
                   f"{r.get('date', '?')}" for r in rows})
    return "; ".join(seen) or "–"


def _attention_note(rows: list[dict[str, Any]]) -> str:
    if not any(r.get("attention_quantized") for r in rows):
        return ""
    return ("\n- **attention matmuls**: the attention operands a recipe quantizes besides the layers (bits counts"
            "\n  weights / layer inputs only); Q·Kᵀ and softmax·V then run in float on the quantized operands.")


def write_readme(out: Path, rows: list[dict[str, Any]], config: ReportConfig) -> Path:
    grids = sorted((out / GRIDS).glob("*.png")) if (out / GRIDS).is_dir() else []
    grid_lines = [f"- [{g.stem}]({GRIDS}/{g.name})" for g in grids]
    text = f"""# Quality benchmarks

Generated by `{config.command}` — regenerate with `diffquant report` (partial runs with `--models`,
`--recipes`, `--samples` merge into `results.json`). Machine(s): {_machines(rows)}.

Models: the zoo's models as trained are *easy* (their layer inputs have mild channel outliers, and
most W4A4 rows stay near FP's FID); their `-outliers` variants are *realistic*: the same FP images,
with the 10-100x channel outliers and weight tails of real diffusion models given by a function-preserving
outlier profile (`diffquant outliers MODEL` shows them). Every method reports on both; judge it on the
realistic ones, and by PSNR / SSIM vs FP where FID cannot tell rows apart.

Protocol (`diffquant eval`): balanced class labels (sample i has class i % 10), fixed seeds, the
quantized model and its full-precision (FP) reference start from the same initial noise.

- **FID**: Fréchet distance (float64 closed form) between the generated images' and the 10k real
  Fashion-MNIST test images' features from the evaluation classifier (256-d penultimate layer);
  not comparable with Inception-FID. Few samples bias it upwards.
- **class acc**: share of samples the classifier assigns to the requested class.
- **PSNR / SSIM vs FP**: against the FP image from the same noise (SVDQuant's protocol); PSNR per
  image, capped at 100 dB (identical images), averaged; SSIM with an 11x11 Gaussian window.
- **feat. dist**: mean L2 distance between L2-normalised classifier features of paired images.
- **eps SQNR**: noise-prediction SQNR against FP along the FP trajectory, mean over steps.
- **weights KiB**: quantized layers as stored (codes + scales) plus every other denoiser
  parameter at 16 bits. **gen s**: wall time to generate the samples.{_attention_note(rows)}

![FID and PSNR vs bits]({PLOT})

{markdown_table(rows)}
## Sample grids (FP row over quantized row)

{chr(10).join(grid_lines) or "none yet"}
"""
    return write_text_atomic(out / "README.md", text)


# -- plot -----------------------------------------------------------------------------------------------


def plot_quality(path: Path, rows: list[dict[str, Any]]) -> Path:
    """FID (FP as a dashed line) and PSNR vs FP against the bits label, one series per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({r["bits"] for r in rows}, key=bits_of)
    x_of = {label: i for i, label in enumerate(labels)}
    fig, (ax_fid, ax_psnr) = plt.subplots(1, 2, figsize=(10, 4))
    for i, model in enumerate(sorted({r["model"] for r in rows})):
        model_rows = [r for r in rows if r["model"] == model]
        _plot_model(ax_fid, ax_psnr, model, model_rows, x_of, color=f"C{i}")  # one colour per model
    for ax, title in ((ax_fid, "FID vs real test set (lower is better)"), (ax_psnr, "PSNR vs FP, dB")):
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel("bits (weights / activations)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)


def _plot_model(ax_fid: Any, ax_psnr: Any, model: str, rows: list[dict[str, Any]], x_of: dict[str, int],
                color: str) -> None:
    for ax, key in ((ax_fid, "fid"), (ax_psnr, "psnr_vs_fp")):
        points = [r for r in rows if r["recipe"] != FP_RECIPE and r.get(key) is not None]
        ax.scatter([x_of[r["bits"]] for r in points], [r[key] for r in points], color=color, label=model)
        for r in points:
            ax.annotate(r["recipe"], (x_of[r["bits"]], r[key]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    # The FP row's PSNR vs itself is only the cap: FP appears as a line in the FID panel alone.
    for r in rows:
        if r["recipe"] == FP_RECIPE and r.get("fid") is not None:
            ax_fid.axhline(r["fid"], linestyle="--", color=color, label=f"{model} FP")


# -- command line -------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", help="zoo models (default: every one with shipped weights)")
    parser.add_argument("--recipes", nargs="+", help="'fp' and preset names / recipe files (default: fp + all presets)")
    parser.add_argument("--samples", type=positive_int, default=1000, help="samples per model x recipe (default 1000)")
    parser.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: the model's own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sqnr-samples", type=positive_int, default=64, help="samples for the eps SQNR (default 64)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"report folder (default {DEFAULT_OUT})")
    parser.add_argument("--work", type=Path, default=None, help="quantized folders (default ~/.cache/diffquant/report)")
    parser.add_argument("--no-cache", action="store_true", help="regenerate FP images instead of using the cache")


def config_from_args(args: argparse.Namespace, command: str) -> ReportConfig:
    return ReportConfig(
        out=args.out, work=args.work or default_work_dir(),
        models=tuple(args.models) if args.models else None, recipes=tuple(args.recipes) if args.recipes else None,
        samples=args.samples, steps=args.steps, seed=args.seed, sqnr_samples=args.sqnr_samples,
        cache=not args.no_cache, command=command,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffquant.eval.report",
                                     description="Regenerate benchmarks/quality/ (zoo models x preset recipes).")
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "-m", "diffquant.eval.report", *argv])
    config = config_from_args(parser.parse_args(argv), command)
    try:
        rows = run_report(config)
    except ValueError as exc:  # no zoo model, bad recipe name, ...: one line, as the CLI reports it
        print(f"report: error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(rows)} rows in {config.out / RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
