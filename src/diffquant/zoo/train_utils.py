"""The zoo's training helpers: the generic ones live in the core (diffquant.train_utils) and are
re-exported here for the zoo's trainers; `atomic_dir` is how they write a weights folder."""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from pathlib import Path

from diffquant.atomic import atomic_directory
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
