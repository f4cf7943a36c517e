"""The registry of `diffquant` subcommands, below cli.py: features declare their commands here (their
`cli_commands.py` modules) and cli.py builds the parser from it, so no feature imports cli."""

from __future__ import annotations

import argparse
from collections.abc import Callable

AddArguments = Callable[[argparse.ArgumentParser], None]
Run = Callable[[argparse.Namespace], int]

# Command name -> (help, add_arguments, run), in registration order.
COMMANDS: dict[str, tuple[str, AddArguments, Run]] = {}


def command(name: str, help: str, add_arguments: AddArguments) -> Callable[[Run], Run]:
    """Register the decorated function as `diffquant <name>`."""
    def wrap(run: Run) -> Run:
        COMMANDS[name] = (help, add_arguments, run)
        return run

    return wrap
