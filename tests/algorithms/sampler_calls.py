"""Calibration functions that watch the data-free training stages (EfficientDM, QuEST): no training image
read, fresh noise each round, an interruption mid-training and the calls a resumed run makes."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from torch import nn

Calibration = Callable[[nn.Module], object]


def refuse_training_images(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any read of the zoo's training data fails the test."""
    import diffquant.zoo.data as data

    def refuse(*_args, **_kwargs):
        raise AssertionError("a data-free stage read training images")

    for name in ("resolve_root", "_read_bytes", "_find_file"):
        monkeypatch.setattr(data, name, refuse)


def reseedable(base: Calibration) -> tuple[Calibration, list[int]]:
    """`base` with a `reseeded(seed)` that records the seeds asked for (and runs `base` again)."""
    seeds: list[int] = []

    def calibration(model):
        base(model)

    def reseeded(seed):
        seeds.append(seed)
        return base

    calibration.reseeded = reseeded
    return calibration, seeds


def interrupted_at(base: Calibration, call: int) -> Calibration:
    """`base`, raising KeyboardInterrupt at its `call`-th run instead."""
    calls = []

    def failing(model):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        base(model)

    return failing


def counted(base: Calibration) -> tuple[Calibration, list[int]]:
    """`base`, with a list that gets an entry per run."""
    calls: list[int] = []

    def counting(model):
        calls.append(1)
        base(model)

    return counting, calls
