"""`diffquant zoo list` and `diffquant zoo train NAME [training options]`."""

from __future__ import annotations

import argparse
import importlib

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
