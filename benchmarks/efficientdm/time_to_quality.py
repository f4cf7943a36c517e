"""Time to quality: EfficientDM vs plain QAT on a zoo model (issue 8; the paper: "16.2x faster").

    OMP_NUM_THREADS=1 python benchmarks/efficientdm/time_to_quality.py            # both methods
    OMP_NUM_THREADS=1 python benchmarks/efficientdm/time_to_quality.py --methods qat-w4a4 --budget-factor 3

Each method (`efficientdm-w4a4`, the preset; `qat-w4a4`, benchmarks/efficientdm/recipes) is quantized
from the same starting point (the FP calibration run, the Lp range search, round-to-nearest weights)
as `diffquant quantize ZOO_MODEL RECIPE` does it (workflows.quantize_zoo_model: the zoo model's
sampler, 64 samples, seed 1234; for QAT the zoo's diffusion objective on the training latents). A
progress callback (diffquant.algorithms.training.progress_callback) evaluates the model being trained
at `--points` + 1 evenly spaced points of its training stage (before the first step, ..., after the
last: the finished model, bit for bit) on a fixed seed set: `--samples` images from the model's own
sampler against the FP images of the same noise (computed once), with the project's eval machinery
(diffquant.eval.runner: FID and class accuracy on the evaluation classifier, PSNR / SSIM / feature
distance vs FP, eps SQNR along the FP trajectory).

Clock: CPU seconds of the training thread at one torch thread (TrainingClock: other jobs on the
machine do not count; the evaluations are left out) -- wall seconds are recorded too. Checkpoints are
off, so nothing but training is timed. Summary, per method: the training time to reach (a) its own
best PSNR vs FP within 0.1 dB, (b) EfficientDM's final PSNR, (c) its best FID (the first point at the
minimum), and the ratio QAT / EfficientDM; resolution: the evaluation points.

The methods run side by side (--jobs 2: one process and one core each; the clock is per thread, so
they do not count each other's work). Writes time_to_quality.json (merged by method: a run of some methods keeps the others), .md and .png
beside this file (or --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffquant import zoo
from diffquant.algorithms.qat import QAT
from diffquant.algorithms.training import Progress, progress_callback
from diffquant.api import STATE_ATTR, quantize
from diffquant.eval import metrics
from diffquant.eval.evaluation import EvalSettings
from diffquant.eval.output import write_json_atomic
from diffquant.eval.runner import Judge, balanced_labels, eps_sqnr_per_step, fp_images, timed_generate
from diffquant.recipes.config import Recipe
from diffquant.recipes.presets import resolve_recipe
from diffquant.zoo.model import LatentDiffusionModel
from diffquant.zoo.train_utils import cpu_name

HERE = Path(__file__).resolve().parent
RECIPES = {"efficientdm-w4a4": "efficientdm-w4a4", "qat-w4a4": str(HERE / "recipes" / "qat-w4a4.yaml")}
REFERENCE = "efficientdm-w4a4"  # whose final PSNR the others must reach
CALIB_SAMPLES, CALIB_SEED = 64, 1234  # workflows.quantize_zoo_model's defaults
PSNR_TOLERANCE_DB = 0.1
STEM = "time_to_quality"


@dataclass(frozen=True)
class Config:
    model: str = "fmnist-dit"
    methods: tuple[str, ...] = tuple(RECIPES)
    points: int = 8
    samples: int = 256
    steps: int | None = None  # the model's own
    seed: int = 0
    sqnr_samples: int = 64
    budget_factor: float = 1.0  # QAT's iterations x this
    threads: int = 1
    jobs: int = 2  # methods side by side, one process each (a 2-core machine; the clock is per thread)
    out: Path = HERE
    command: str = "python benchmarks/efficientdm/time_to_quality.py"
    render_only: bool = False  # no runs: the .md and .png again from the JSON

    def protocol(self) -> dict[str, Any]:
        """What makes two runs' numbers comparable (a merge across different protocols starts afresh)."""
        return {"model": self.model, "samples": self.samples, "steps": self.steps, "seed": self.seed,
                "sqnr_samples": self.sqnr_samples, "points": self.points, "threads": self.threads}


# -- the recipes ------------------------------------------------------------------------------------


def timed_recipe(method: str, budget_factor: float) -> Recipe:
    """The method's recipe with checkpoints off (nothing but training on the clock; no stale resume)
    and, for QAT, `budget_factor` x its iterations (a longer schedule, not a continuation)."""
    recipe = resolve_recipe(RECIPES[method])
    stages = []
    for stage in recipe.stages:
        if hasattr(stage, "checkpoint_dir"):
            changes: dict[str, Any] = {"checkpoint_dir": ""}
            if isinstance(stage, QAT):
                changes["iterations"] = round(stage.iterations * budget_factor)
            stage = dataclasses.replace(stage, **changes)
        stages.append(stage)
    return dataclasses.replace(recipe, stages=tuple(stages))


def run_label(method: str, budget_factor: float) -> str:
    return method if budget_factor == 1 or method != "qat-w4a4" else f"{method}-x{budget_factor:g}"


# -- the measurement ---------------------------------------------------------------------------------


@dataclass
class Probe:
    """The fixed evaluation: balanced labels, seeded noise, FP images and features computed once."""

    reference: LatentDiffusionModel
    settings: EvalSettings
    judge: Judge
    labels: torch.Tensor
    fp: torch.Tensor
    fp_features: torch.Tensor
    fp_row: dict[str, float]

    @classmethod
    def build(cls, config: Config) -> Probe:
        reference = zoo.load(config.model)
        settings = EvalSettings(config.samples, config.steps, config.seed, config.sqnr_samples)
        judge = Judge()
        labels = balanced_labels(config.samples, reference.num_classes)
        fp, fp_wall = fp_images(reference, config.model, labels, settings, settings.steps or reference.default_steps)
        fid, accuracy, features = judge.quality(fp, labels)
        return cls(reference, settings, judge, labels, fp, features,
                   {"fid": fid, "class_accuracy": accuracy, "generate_wall_s": fp_wall})

    @property
    def steps(self) -> int:
        return self.settings.steps or self.reference.default_steps

    def measure(self, model: LatentDiffusionModel) -> dict[str, Any]:
        """The model's metrics on the seed set (generation, FID, accuracy, paired metrics, eps SQNR)."""
        start = time.perf_counter()
        images, _ = timed_generate(model, self.labels, self.settings, self.steps)
        fid, accuracy, features = self.judge.quality(images, self.labels)
        n = min(self.settings.sqnr_samples, self.settings.samples)
        noise = self.reference.initial_noise(self.settings.samples, self.settings.seed)[:n]
        per_step = eps_sqnr_per_step(model, self.reference, self.labels[:n], noise, self.steps,
                                     self.settings.batch_size)
        return {"fid": fid, "class_accuracy": accuracy, "psnr_vs_fp": metrics.psnr(images, self.fp),
                "ssim_vs_fp": metrics.ssim(images, self.fp),
                "feature_distance_vs_fp": metrics.feature_distance(features, self.fp_features),
                "eps_sqnr_db": sum(per_step) / len(per_step), "eval_wall_s": time.perf_counter() - start}


def run_method(method: str, config: Config, probe: Probe) -> dict[str, Any]:
    """Quantize a fresh copy of the model with the method, measuring at the progress points."""
    model = zoo.load(config.model)
    recipe = timed_recipe(method, config.budget_factor)
    calibration = model.calibration(CALIB_SAMPLES, seed=CALIB_SEED, progress=False)
    training = None
    if recipe.needs_training_data:
        from diffquant.zoo.training import diffusion_objective

        training = diffusion_objective(model)
    points: list[dict[str, Any]] = []

    def measure(progress: Progress) -> None:
        assert progress.model is model.denoiser
        point = {"stage": progress.stage, "done": progress.done, "total": progress.total,
                 "train_cpu_s": progress.cpu_s, "train_wall_s": progress.wall_s, **probe.measure(model)}
        points.append(point)
        print(f"[{method}] {progress.done}/{progress.total} cpu {progress.cpu_s:.1f} s: FID {point['fid']:.3f}, "
              f"PSNR {point['psnr_vs_fp']:.2f} dB, eps SQNR {point['eps_sqnr_db']:.2f} dB "
              f"(eval {point['eval_wall_s']:.0f} s)", file=sys.stderr, flush=True)

    wall, cpu, process = time.perf_counter(), time.thread_time(), time.process_time()
    with progress_callback(measure, points=config.points):
        quantize(model.denoiser, recipe, calibration=calibration, training=training, progress=False)
    reports = getattr(model.denoiser, STATE_ATTR).stage_reports
    evals_wall = sum(p["eval_wall_s"] for p in points)
    return {"method": method, "recipe": recipe.to_dict(), "points": points, "stage_reports": reports,
            "quantize_wall_s_without_evals": time.perf_counter() - wall - evals_wall,
            # equal when all work runs on the training thread (what the per-thread clock assumes)
            "quantize_thread_cpu_s_with_evals": time.thread_time() - cpu,
            "quantize_process_cpu_s_with_evals": time.process_time() - process}


# -- the summary -------------------------------------------------------------------------------------


def first_time(points: list[dict[str, Any]], reached) -> float | None:
    """Training CPU seconds at the first point where reached(point) holds; None if none does."""
    return next((p["train_cpu_s"] for p in points if p.get("psnr_vs_fp") is not None and reached(p)), None)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def summarize(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per run the times to (a) own best PSNR within the tolerance, (b) the reference's final PSNR,
    (c) own best FID; and each time's ratio to the reference's."""
    target = runs[REFERENCE]["points"][-1]["psnr_vs_fp"] if REFERENCE in runs else None
    rows = {}
    for label, run in runs.items():
        pts = run["points"]
        best_psnr, best_fid = max(p["psnr_vs_fp"] for p in pts), min(p["fid"] for p in pts)
        rows[label] = {
            "final_psnr_vs_fp": pts[-1]["psnr_vs_fp"], "final_fid": pts[-1]["fid"],
            "final_eps_sqnr_db": pts[-1]["eps_sqnr_db"], "train_cpu_s": pts[-1]["train_cpu_s"],
            "train_wall_s": pts[-1]["train_wall_s"], "best_psnr_vs_fp": best_psnr, "best_fid": best_fid,
            "t_best_psnr": first_time(pts, lambda p, b=best_psnr: p["psnr_vs_fp"] >= b - PSNR_TOLERANCE_DB),
            "t_reference_final_psnr": None if target is None else first_time(pts, lambda p: p["psnr_vs_fp"] >= target),
            "t_best_fid": first_time(pts, lambda p, b=best_fid: p["fid"] <= b),
        }
    reference = rows.get(REFERENCE, {})
    for row in rows.values():
        for key in ("t_best_psnr", "t_reference_final_psnr", "t_best_fid", "train_cpu_s"):
            row[f"ratio_{key}"] = ratio(row[key], reference.get(key))
    # every method starts from the same model (range search, round-to-nearest): step 0 must agree exactly
    starts = {(run["points"][0]["fid"], run["points"][0]["psnr_vs_fp"]) for run in runs.values()}
    return {"reference": REFERENCE, "reference_final_psnr_vs_fp": target, "psnr_tolerance_db": PSNR_TOLERANCE_DB,
            "same_start": len(starts) == 1, "runs": rows}


# -- output ------------------------------------------------------------------------------------------


def machine(config: Config) -> dict[str, Any]:
    return {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "load_average": os.getloadavg(), "command": config.command}


def merged(path: Path, config: Config, runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Runs already in `path` under the same protocol, updated with `runs`."""
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("protocol") == config.protocol():
            return {**old["runs"], **runs}
        print(f"{path}: another protocol, its runs are dropped", file=sys.stderr)
    return dict(runs)


def _fmt(value: Any, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


POINT_COLUMNS = (("step", "done", "{}"), ("train CPU s", "train_cpu_s", "{:.1f}"),
                 ("train wall s", "train_wall_s", "{:.1f}"), ("FID ↓", "fid", "{:.3f}"),
                 ("class acc", "class_accuracy", "{:.3f}"), ("PSNR vs FP dB ↑", "psnr_vs_fp", "{:.2f}"),
                 ("SSIM vs FP", "ssim_vs_fp", "{:.4f}"), ("eps SQNR dB ↑", "eps_sqnr_db", "{:.2f}"))
SUMMARY_COLUMNS = (("final PSNR", "final_psnr_vs_fp", "{:.2f}"), ("final FID", "final_fid", "{:.3f}"),
                   ("training CPU s", "train_cpu_s", "{:.0f}"),
                   ("(a) to own best PSNR −0.1 dB", "t_best_psnr", "{:.0f} s"),
                   ("(b) to EfficientDM's final PSNR", "t_reference_final_psnr", "{:.0f} s"),
                   ("(c) to own best FID", "t_best_fid", "{:.0f} s"))


def run_lines(runs: dict[str, dict[str, Any]]) -> list[str]:
    """Which command made each run, when and where (runs merged from several invocations)."""
    lines = []
    for label, run in runs.items():
        m = run.get("machine")
        if m is not None:
            lines.append(f"- `{label}`: `{m['command']}` ({m['date']}; {m['cpu']}, {m['cores']} cores, "
                         f"{m['torch_threads']} torch thread(s), torch {m['torch']}; load average at the end "
                         f"{m['load_average'][0]:.1f})")
    return lines


def markdown(result: dict[str, Any]) -> str:
    summary, p = result["summary"], result["protocol"]
    lines = [f"# Time to quality on {p['model']}", "", "Runs:", "", *run_lines(result["runs"]), "",
             f"Evaluation: {p['samples']} samples, seed {p['seed']}, {result['steps']} steps; eps SQNR on the first "
             f"{p['sqnr_samples']}. FP on this seed set: FID {result['fp']['fid']:.3f}, class accuracy "
             f"{result['fp']['class_accuracy']:.3f}. Times: CPU seconds of the training thread.", "",
             "| method | " + " | ".join(h for h, _, _ in SUMMARY_COLUMNS) + " | ratio (a) | ratio (b) | ratio (c) |",
             "|---" * (len(SUMMARY_COLUMNS) + 4) + "|"]
    for label, row in summary["runs"].items():
        cells = [_fmt(row[k], f) for _, k, f in SUMMARY_COLUMNS]
        ratios = [_fmt(row[f"ratio_{k}"], "{:.2f}x") for k in ("t_best_psnr", "t_reference_final_psnr", "t_best_fid")]
        lines.append(f"| `{label}` | " + " | ".join(cells + ratios) + " |")
    lines += ["", f"Ratios: the method's time / `{summary['reference']}`'s (the paper's 16.2x is this ratio for "
              "QAT; below 1: faster than EfficientDM). Step 0 identical across methods (same starting point): "
              f"{summary['same_start']}."]
    for label, run in result["runs"].items():
        lines += ["", f"## `{label}`", "", "| " + " | ".join(h for h, _, _ in POINT_COLUMNS) + " |",
                  "|---" * len(POINT_COLUMNS) + "|"]
        for point in run["points"]:
            lines.append("| " + " | ".join(_fmt(point.get(k), f) for _, k, f in POINT_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def plot(path: Path, result: dict[str, Any]) -> None:
    """FID, PSNR vs FP and eps SQNR against training CPU seconds, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("fid", "FID (lower is better)"), ("psnr_vs_fp", "PSNR vs FP, dB"), ("eps_sqnr_db", "eps SQNR, dB"))
    fig, axes = plt.subplots(1, len(panels), figsize=(13, 3.8))
    for i, (label, run) in enumerate(result["runs"].items()):
        x = [p["train_cpu_s"] for p in run["points"]]
        for ax, (key, _) in zip(axes, panels, strict=True):
            ax.plot(x, [p[key] for p in run["points"]], marker="o", color=f"C{i}", label=label)
    axes[0].axhline(result["fp"]["fid"], linestyle="--", color="gray", label="FP")
    target = result["summary"]["reference_final_psnr_vs_fp"]
    if target is not None:
        axes[1].axhline(target, linestyle=":", color="gray", label=f"{REFERENCE} final")
    for ax, (_, title) in zip(axes, panels, strict=True):
        ax.set_xlabel("training CPU seconds (1 thread)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{result['protocol']['model']}: quality during training ({result['protocol']['samples']} samples)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(config: Config, probe: Probe, runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    path = config.out / f"{STEM}.json"
    here = machine(config)
    runs = merged(path, config, {label: {**run, "machine": here} for label, run in runs.items()})
    result = {"protocol": config.protocol(), "steps": probe.steps, "fp": probe.fp_row, "summary": summarize(runs),
              "runs": runs}
    write_json_atomic(path, result)
    render(config.out, result)
    return result


def render(out: Path, result: dict[str, Any]) -> None:
    """The markdown tables and the plot of a result (as in the JSON)."""
    (out / f"{STEM}.md").write_text(markdown(result))
    plot(out / f"{STEM}.png", result)


# -- command line ------------------------------------------------------------------------------------


def parse(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=Config.model)
    parser.add_argument("--methods", nargs="+", choices=list(RECIPES), default=list(Config.methods))
    parser.add_argument("--points", type=int, default=Config.points, help="evaluations per run besides step 0")
    parser.add_argument("--samples", type=int, default=Config.samples)
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    parser.add_argument("--seed", type=int, default=Config.seed)
    parser.add_argument("--sqnr-samples", type=int, default=Config.sqnr_samples)
    parser.add_argument("--budget-factor", type=float, default=Config.budget_factor,
                        help="QAT's iterations x this (a longer schedule)")
    parser.add_argument("--threads", type=int, default=Config.threads, help="torch threads (the clock is per thread)")
    parser.add_argument("--jobs", type=int, default=Config.jobs,
                        help="methods run side by side in separate processes (CPU clocks are per thread)")
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--render-only", action="store_true", help="rewrite the .md and .png from the JSON")
    args = parser.parse_args(argv)
    command = "python benchmarks/efficientdm/time_to_quality.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    return Config(args.model, tuple(args.methods), args.points, args.samples, args.steps, args.seed,
                  args.sqnr_samples, args.budget_factor, args.threads, args.jobs, args.out, command.strip(),
                  args.render_only)


def run_in_worker(job: tuple[str, Config]) -> dict[str, Any]:
    """One method in a worker process (the FP images come from the cache the parent filled)."""
    method, config = job
    torch.set_num_threads(config.threads)
    return run_method(method, config, Probe.build(config))


def run_methods(config: Config, probe: Probe) -> dict[str, dict[str, Any]]:
    labels = [run_label(m, config.budget_factor) for m in config.methods]
    if config.jobs == 1 or len(config.methods) == 1:
        return {label: run_method(m, config, probe) for label, m in zip(labels, config.methods, strict=True)}
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(min(config.jobs, len(config.methods))) as pool:
        runs = pool.map(run_in_worker, [(m, config) for m in config.methods], chunksize=1)
    return dict(zip(labels, runs, strict=True))


def main(argv: list[str] | None = None) -> None:
    config = parse(argv)
    if config.render_only:
        render(config.out, json.loads((config.out / f"{STEM}.json").read_text()))
        return
    torch.set_num_threads(config.threads)
    config.out.mkdir(parents=True, exist_ok=True)
    probe = Probe.build(config)
    runs = run_methods(config, probe)
    result = write_outputs(config, probe, runs)
    for label, row in result["summary"]["runs"].items():
        print(f"{label}: " + ", ".join(f"{h} {_fmt(row[k], f)}" for h, k, f in SUMMARY_COLUMNS)
              + f"; ratios vs {REFERENCE}: " + ", ".join(_fmt(row[f'ratio_{k}'], '{:.2f}x') for k in
                                                         ("t_best_psnr", "t_reference_final_psnr", "t_best_fid")))


if __name__ == "__main__":
    main()
