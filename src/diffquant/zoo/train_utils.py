"""The zoo's training helpers: the generic ones live in the core (diffquant.train_utils) and are
re-exported here for the zoo's trainers; `atomic_dir` is how they write a weights folder."""

from __future__ import annotations

import argparse
import os
from contextlib import AbstractContextManager
from pathlib import Path

from diffquant.atomic import atomic_directory
from diffquant.cli_args import positive_int
from diffquant.train_utils import (  # noqa: F401  (re-exported: the zoo's modules import them from here)
    CACHE_ROOT_ENV,
    Checkpointer,
    cosine_lr,
    count_params,
    cpu_name,
    default_checkpoint_dir,
    run_loop,
    set_lr,
    step_generator,
    step_seed,
)


def atomic_dir(target: str | os.PathLike) -> AbstractContextManager[Path]:
    """A temporary folder beside `target` that replaces it in one rename if the block succeeds."""
    return atomic_directory(target, overwrite=True)


def training_parser(description: str, steps: int, batch_size: int, out: Path, out_help: str, run_name: str,
                    threads: int) -> argparse.ArgumentParser:
    """The command line every zoo trainer shares (its own options are added after these)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--steps", type=positive_int, default=steps)
    p.add_argument("--batch-size", type=positive_int, default=batch_size)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=out, help=out_help)
    p.add_argument("--checkpoint-dir", type=Path, default=None, help=f"default ~/.cache/diffquant/train/{run_name}")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--threads", type=positive_int, default=threads, help=f"torch intra-op threads (default {threads})")
    return p
