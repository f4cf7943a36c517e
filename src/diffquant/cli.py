"""Command line: thin over the library. `diffquant --help` lists the commands."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import yaml

from diffquant.checkpoint import CheckpointError
from diffquant.cli_args import OneLineParser, non_negative_int, positive_int
from diffquant.commands import COMMANDS, command
from diffquant.formats.base import UnknownFormatError
from diffquant.formats.spec import SpecError
from diffquant.recipes.config import RecipeError

# Errors that are the user's input, reported as one line without a traceback. OSError covers paths (missing,
# a folder where a file belongs, no permission). TypeError and KeyError are left out on purpose: where user
# input causes them the library raises a typed error instead, so one that reaches main is a bug to see.
USER_ERRORS = (RecipeError, SpecError, UnknownFormatError, CheckpointError, OSError, yaml.YAMLError, ValueError)


def _recipes_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--yaml", metavar="NAME", help="print the full recipe file of one preset")


@command("recipes", "list the preset recipes", _recipes_args)
def _recipes(args: argparse.Namespace) -> int:
    from diffquant.recipes import get_preset, list_presets

    if args.yaml:
        print(get_preset(args.yaml).to_yaml(), end="")
        return 0
    for name, recipe in list_presets().items():
        print(f"{name:<20}{recipe.label:<8}{recipe.description}")
    return 0


def _quantize_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="zoo model name (see `diffquant zoo list`), diffusers model or pipeline folder")
    parser.add_argument("--recipe", required=True, help="preset name (see `diffquant recipes`) or recipe file")
    parser.add_argument("--out", required=True, type=Path, help="output folder (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--calib-samples", type=positive_int, default=None,
                        help="conditions sampled for calibration (default: 64 for zoo models, 8 for pipelines)")
    parser.add_argument("--calib-steps", type=positive_int, default=None,
                        help="sampling steps during calibration (default: the model's sampler, 20 for pipelines)")
    parser.add_argument("--seed", type=int, default=None, help="calibration seed")


@command("quantize", "quantize a diffusers model or pipeline folder with a recipe", _quantize_args)
def _quantize(args: argparse.Namespace) -> int:
    from diffquant.workflows import quantize_folder

    out = quantize_folder(args.model, args.recipe, args.out, overwrite=args.overwrite,
                          calib_samples=args.calib_samples, calib_steps=args.calib_steps, seed=args.seed)
    print(f"wrote {out}")
    return 0


def _info_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, help="quantized model or pipeline folder")
    parser.add_argument("--json", action="store_true", help="print JSON")


@command("info", "bits per layer role, parameters, bytes on disk vs 16-bit", _info_args)
def _info(args: argparse.Namespace) -> int:
    from diffquant.info import checkpoint_info, format_info, info_json

    info = checkpoint_info(args.path)
    print(info_json(info) if args.json else format_info(info))
    return 0


def _demo_args(parser: argparse.ArgumentParser) -> None:
    from diffquant.demo import DemoConfig

    d = DemoConfig()
    parser.add_argument("--model", default=d.model, help=f"zoo model (default {d.model})")
    parser.add_argument("--recipes", nargs="+", default=list(d.recipes),
                        help=f"presets or recipe files (default: {' '.join(d.recipes)})")
    parser.add_argument("--samples", type=positive_int, default=d.samples,
                        help=f"samples per evaluation (default {d.samples})")
    parser.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: the model's own)")
    parser.add_argument("--out", type=Path, default=d.out, help=f"output folder (default {d.out})")
    parser.add_argument("--speed-samples", type=non_negative_int, default=d.speed_samples,
                        help=f"samples per timed frozen-vs-FP generation, 0 to skip (default {d.speed_samples})")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


@command("demo", "the main job: quantize the shipped zoo model with w8a8 and w4a4 and evaluate vs FP", _demo_args)
def _demo(args: argparse.Namespace) -> int:
    from diffquant.demo import DemoConfig, format_demo, run_demo, run_speed
    from diffquant.eval.speed import format_speed

    config = DemoConfig(args.model, tuple(args.recipes), args.samples, args.steps, args.out, not args.quiet,
                        args.speed_samples)
    results = run_demo(config)
    print(format_demo(results))
    speed = run_speed(config)
    if speed is not None:
        print("\n" + format_speed(speed))
    print(f"quantized folders, metrics JSON and FP-over-quantized grids in {config.out}/")
    return 0


def _selfcheck_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipes", nargs="*", help="preset names (default: every post-training preset)")
    parser.add_argument("--all", action="store_true",
                        help="also the presets whose stages optimise (block reconstruction, EfficientDM: minutes)")


@command("selfcheck", "quantize a small seeded random DiT with the presets: SQNR, size, bitwise reload, time",
         _selfcheck_args)
def _selfcheck(args: argparse.Namespace) -> int:
    from diffquant.selfcheck import format_rows, run_selfcheck

    rows = run_selfcheck(args.recipes, everything=args.all)
    print(format_rows(rows))
    return 0 if all(r.reload_bitwise for r in rows) else 1


def _register_feature_commands() -> None:
    """Commands that live beside their features (imported here so they register)."""
    import diffquant.eval.cli_commands  # noqa: F401
    import diffquant.export.cli_commands  # noqa: F401
    import diffquant.zoo.cli_commands  # noqa: F401


@command("kernels", "the CPU's instruction set and the integer-GEMM backend diffquant selects", lambda p: None)
def _kernels(args: argparse.Namespace) -> int:
    from diffquant.kernels import active_backend, detect_cpu, fastest_float_dtype

    cpu = detect_cpu()
    print(f"cpu: {cpu.model} ({cpu.capability}, {cpu.cores} cores)")
    backend = active_backend()
    details = backend.details()
    print(f"integer GEMM backend: {backend.name}{f' ({details})' if details else ''}  "
          "(override: DIFFQUANT_KERNEL_BACKEND)")
    print(f"float dtype for unquantized work: {fastest_float_dtype()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    _register_feature_commands()
    parser = OneLineParser(prog="diffquant", description="Low-bit quantization of diffusion models")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details and show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(run=run, parser=p)
    return parser


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """Arguments, with an unknown option reported by the command's own parser (`diffquant quantize:
    error: ...`), not the top-level one."""
    args, extra = build_parser().parse_known_args(argv)
    if extra:
        args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def user_error_message(exc: Exception) -> str | None:
    """The one-line report of an error in the user's input; None for a bug (which keeps its traceback).

    A NotImplementedError with a message says "this model / format is not supported" (unsupported
    attention processors, packed non-integer formats); a bare one is a missing method: a bug.
    """
    if isinstance(exc, NotImplementedError):
        return str(exc) or None
    if not isinstance(exc, USER_ERRORS):
        return None
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        return f"{exc.strerror}: {exc.filename}"  # rather than "[Errno 13] Permission denied: 'x'"
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parse(argv)
    except SystemExit as exc:  # --help, or a usage error already printed as one line: a return code
        return 0 if exc.code is None else int(exc.code)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return args.run(args)
    except Exception as exc:
        message = None if args.verbose else user_error_message(exc)
        if message is None:
            raise
        print(f"diffquant {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
