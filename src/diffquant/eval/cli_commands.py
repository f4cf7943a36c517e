"""`diffquant eval`, `diffquant report` and `diffquant eval-stats`: registered with diffquant.cli's
@command decorator when diffquant.cli imports this module."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from diffquant.cli_args import positive_int
from diffquant.commands import command


def _eval_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", help="zoo model name (full precision) or a folder from `diffquant quantize ZOO_NAME`")
    parser.add_argument("--samples", type=positive_int, default=1000, help="generated samples, balanced classes (default 1000)")
    parser.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: the model's own)")
    parser.add_argument("--seed", type=int, default=0, help="initial-noise seed (default 0)")
    parser.add_argument("--sqnr-samples", type=positive_int, default=64, help="samples for the eps SQNR (default 64)")
    parser.add_argument("--batch-size", type=positive_int, default=250, help="generation batch size (default 250)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the metrics as JSON")
    parser.add_argument("--grid", type=Path, default=None, metavar="FILE", help="write an FP-over-target PNG grid")
    parser.add_argument("--no-cache", action="store_true",
                        help="regenerate the FP reference images instead of using ~/.cache/diffquant/eval")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    parser.add_argument("--frozen", action="store_true",
                        help="run a quantized target through the packed integer kernels (diffquant.freeze) "
                             "instead of fake quantization")


@command("eval", "FID, class accuracy, PSNR/SSIM/feature distance and eps SQNR vs full precision", _eval_args)
def _eval(args: argparse.Namespace) -> int:
    from diffquant.eval.output import format_result
    from diffquant.eval.runner import evaluate

    target = args.target
    result = evaluate(target, args.samples, args.steps, args.seed, sqnr_samples=args.sqnr_samples,
                      batch_size=args.batch_size, cache=not args.no_cache, json_path=args.json,
                      grid_path=args.grid, progress=args.progress,
                      frozen=args.frozen)
    print(format_result(result))
    for label, path in (("metrics", args.json), ("grid", args.grid)):
        if path is not None:
            print(f"wrote {label} to {path}")
    return 0


def _report_args(parser: argparse.ArgumentParser) -> None:
    from diffquant.eval.report import add_arguments

    add_arguments(parser)


@command("report", "regenerate benchmarks/quality/: every zoo model x preset recipe, table, plot, grids",
         _report_args)
def _report(args: argparse.Namespace) -> int:
    from diffquant.eval.report import RESULTS, config_from_args, run_report

    config = config_from_args(args, shlex.join(["diffquant", *sys.argv[1:]]))
    rows = run_report(config)
    print(f"{len(rows)} rows in {config.out / RESULTS}; table in {config.out / 'README.md'}")
    return 0


def _stats_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None,
                        help="output safetensors file (default: the shipped src/diffquant/eval/stats/fmnist-test.safetensors)")
    parser.add_argument("--data-root", type=Path, default=None, help="Fashion-MNIST IDX folder")


@command("eval-stats", "regenerate the shipped real test-set feature statistics (needs the dataset)", _stats_args)
def _eval_stats(args: argparse.Namespace) -> int:
    from diffquant.eval.stats import FMNIST_TEST_STATS, compute_reference_stats

    out = args.out or FMNIST_TEST_STATS
    stats = compute_reference_stats(out, args.data_root)
    print(f"wrote {out}: {stats.count} images, {stats.mu.shape[0]}-d features")
    return 0
