"""Checkpoints written by an earlier diffquant (committed under tests/data/checkpoints, with the output
they gave) load and compute bit for bit the same: refactors must not change the format or the maths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffquant.checkpoint import load_quantized
from tests.tiny_models import run_dit_at_step0

CHECKPOINTS = Path(__file__).parents[1] / "data" / "checkpoints"


@pytest.mark.parametrize("name", ["tiny-dit-w8a8-static", "tiny-dit-svdquant-w4a4"])
def test_a_committed_checkpoint_loads_and_computes_bitwise(name):
    model = load_quantized(CHECKPOINTS / name)
    expected = load_file(CHECKPOINTS / f"{name}-output.safetensors")["output"]
    assert torch.equal(run_dit_at_step0(model), expected)
