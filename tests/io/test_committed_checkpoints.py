"""Checkpoints written by an earlier diffquant (committed under tests/data/checkpoints, with the output
they gave) load and compute the same: refactors must not change the format or the maths. Bit for bit
only on the CPU kind that wrote them: another one's float GEMMs round their sums differently (an Intel
Xeon with AMX gives differences of 6e-7 on outputs of magnitude 2), so the bound is 1e-5, far below any
change of a code or of a formula."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffquant.checkpoint import load_quantized
from tests.tiny_models import run_dit_at_step0

CHECKPOINTS = Path(__file__).parents[1] / "data" / "checkpoints"


@pytest.mark.parametrize("name", ["tiny-dit-w8a8-static", "tiny-dit-svdquant-w4a4"])
def test_a_committed_checkpoint_loads_and_computes_the_same(name):
    model = load_quantized(CHECKPOINTS / name)
    expected = load_file(CHECKPOINTS / f"{name}-output.safetensors")["output"]
    torch.testing.assert_close(run_dit_at_step0(model), expected, rtol=0, atol=1e-5)
