"""argparse pieces the command lines share: count options checked at parse time, one-line usage errors.

Low in the package (no diffquant imports) so that feature modules (eval/report.py, zoo trainers) use
them without importing diffquant.cli, which sits on top of everything.
"""

from __future__ import annotations

import argparse
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """A usage error is one line, `<prog>: error: <message>`, exit code 2 — like the library's errors in
    diffquant.cli.main — instead of argparse's usage block followed by the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _count(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type of a count (samples, steps, batch size): 0 is refused, not read as "the default"."""
    return _count(text, 1)


def non_negative_int(text: str) -> int:
    """argparse type of a count where 0 means something documented (e.g. --speed-samples 0: skip)."""
    return _count(text, 0)
