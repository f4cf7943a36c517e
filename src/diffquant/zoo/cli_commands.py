"""`diffquant zoo list`, `diffquant zoo train NAME [training options]` and `diffquant outliers MODEL`."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from diffquant.commands import command

# Trainable zoo parts -> module whose main(argv) trains and ships them (`--help` lists its options).
TRAINERS = {
    "fmnist-classifier": "diffquant.zoo.classifier",
    "fmnist-vae": "diffquant.zoo.vae",
    "fmnist-dit": "diffquant.zoo.models.fmnist_dit",
    "fmnist-sd": "diffquant.zoo.models.fmnist_sd",
}


def _zoo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["list", "train"])
    parser.add_argument("name", nargs="?", help="what to train (with `train`): " + ", ".join(TRAINERS))
    parser.add_argument("options", nargs=argparse.REMAINDER, help="options of the trainer, e.g. --steps 100")


@command("zoo", "list the shipped reference models, or train one (resumable)", _zoo_args)
def _zoo(args: argparse.Namespace) -> int:
    from diffquant import zoo

    if args.action == "list":
        if not zoo.entries():
            print("no zoo models are registered")
        for name, entry in zoo.entries().items():
            state = "shipped" if entry.available else "not trained yet"
            print(f"{name:<20}{state:<18}{entry.description}")
        return 0
    if args.name not in TRAINERS:
        raise ValueError(f"nothing to train called {args.name!r}; trainable: {', '.join(TRAINERS)}")
    importlib.import_module(TRAINERS[args.name]).main(args.options)
    return 0


def _outliers_args(parser: argparse.ArgumentParser) -> None:
    from diffquant.cli_args import positive_int

    parser.add_argument("model", help="a zoo name (a variant such as fmnist-dit-outliers is shown beside its base) "
                                      "or a diffusers pipeline folder")
    parser.add_argument("--profile", help="add a column for the model with this outlier profile applied "
                                          "(realistic, activation-outliers, weight-tails)")
    parser.add_argument("--seed", type=int, default=0, help="the profile's seed (default 0)")
    parser.add_argument("--samples", type=positive_int, default=16, help="calibration samples (default 16)")
    parser.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: the model's own)")
    parser.add_argument("--layers", action="store_true", help="one row per layer instead of per role")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE",
                        help="also write the statistics, the profile record and the published figures as JSON")


@command("outliers", "input-channel outliers per layer (max / median channel), before and after an outlier "
         "profile, beside published figures", _outliers_args)
def _outliers(args: argparse.Namespace) -> int:
    from diffquant.atomic import check_output_file, write_json_atomic
    from diffquant.zoo.outlier_report import format_report, outlier_report

    if args.json is not None:
        check_output_file(args.json)  # before sampling, not after
    report = outlier_report(args.model, args.profile, args.seed, args.samples, args.steps)
    print(format_report(report, per_layer=args.layers))
    if args.json is not None:
        write_json_atomic(args.json, report.to_dict(), indent=2)
    return 0
