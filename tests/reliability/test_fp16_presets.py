"""float16 (and bfloat16) models with every preset: the quantized output is finite, in the model's dtype, and
close to the model's own 16-bit full-precision output.

Quantizers fake-quantize 16-bit inputs in float32 (a float16 step size underflows to 0; LSQ's lower bound
does), the low-rank branch runs in float32 (its rank-r hidden carries a whole output row's norm), and
smoothing caps λ where float16 cannot hold it. SQNR floors are a few dB under what was measured
(tiny random models: they say the machinery works, not how good a method is).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import diffquant
from diffquant.formats.ops import sqnr_db
from diffquant.recipes import list_presets
from tests.models.test_presets_on_families import affordable
from tests.tiny_models import TINY_MODELS

pytestmark = pytest.mark.usefixtures("single_thread")

# measured on the float16 tiny DiT (dB vs its float16 output) minus 3.5-4
DIT_FP16_MIN_SQNR_DB = {
    "edadm-w4a4": 26.0, "edadm-w4a8": 28.0, "edadm-w8a8": 46.0,
    "efficientdm-w4a4": 25.0, "efficientdm-w4a8": 31.0, "efficientdm-w8a8": 45.0,
    "nvfp4-w4a4": 25.0, "qdiffusion-w4a8": 30.0, "qdiffusion-w8a8": 47.0,
    "smoothquant-w4a4": 25.0, "smoothquant-w8a8": 49.0,
    "svdquant-nvfp4": 35.0, "svdquant-w4a4": 35.0, "svdquant-w8a8": 52.0,
    "w4a16": 30.0, "w4a4": 24.0, "w4a4-static": 23.0, "w4a8": 30.0, "w4a8-static": 30.0,
    "w8a8": 47.0, "w8a8-static": 47.0,
    "fp8-w8a8": 36.0, "mxfp8-w8a8": 30.0, "mxfp4-w4a4": 20.5, "fp-w4a8": 30.0, "int-w4a8": 30.0,
    "quest-w4a4": 24.0, "quest-w4a8": 29.5,
}
# the float16 UNet (convolutions, skip concatenations): the presets that gave NaN or crashed before,
# and the cheap ones; those over ~5 s are in the slow tier
UNET_FP16_MIN_SQNR_DB = {
    "nvfp4-w4a4": 6.0, "w8a8-static": 29.0, "efficientdm-w8a8": 27.0, "efficientdm-w4a8": 13.0,
    "qdiffusion-w8a8": 29.0, "qdiffusion-w4a8": 13.0, "edadm-w8a8": 28.0, "edadm-w4a8": 14.0,
    "svdquant-nvfp4": 12.0, "svdquant-w4a4": 10.0,
    "fp8-w8a8": 16.0, "mxfp8-w8a8": 14.5, "mxfp4-w4a4": 3.5, "fp-w4a8": 12.0, "int-w4a8": 12.0,
    "quest-w4a4": 6.0, "quest-w4a8": 12.0,
}
UNET_SLOW = {"qdiffusion-w8a8", "qdiffusion-w4a8", "edadm-w8a8", "edadm-w4a8", "svdquant-nvfp4", "svdquant-w4a4",
             "fp-w4a8", "int-w4a8", "quest-w4a4", "quest-w4a8"}
# quest-w4a4: its Adam steps go through float32 masters of the 16-bit weights (before: Inf weights)
DIT_BF16_MIN_SQNR_DB = {"w8a8": 40.0, "w8a8-static": 40.0, "nvfp4-w4a4": 24.0, "svdquant-w4a4": 33.0,
                        "fp8-w8a8": 34.5, "mxfp4-w4a4": 20.5, "quest-w4a4": 24.0}


def cast_inputs(value, dtype: torch.dtype):
    if isinstance(value, dict):
        return {k: cast_inputs(v, dtype) for k, v in value.items()}
    return value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() else value


class Family:
    """A tiny model in a 16-bit dtype with fixed inputs; run() is also the calibration function."""

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.tiny = TINY_MODELS[name]
        self.model = self.tiny.build().to(dtype)
        self.inputs = cast_inputs(self.tiny.inputs(2), dtype)
        self.reference = self.run(self.model)
        assert torch.isfinite(self.reference).all() and self.reference.dtype == dtype

    def run(self, model: nn.Module) -> torch.Tensor:
        with torch.no_grad(), diffquant.sampling_step(0):
            return self.tiny.run(model, self.inputs)

    def check(self, preset: str, min_sqnr: float) -> None:
        model = diffquant.quantize(copy.deepcopy(self.model), affordable(preset), calibration=self.run,
                                   progress=False)
        out = self.run(model)
        assert out.dtype == self.reference.dtype
        assert torch.isfinite(out).all(), f"{preset}: {int((~torch.isfinite(out)).sum())} non-finite outputs"
        assert sqnr_db(self.reference, out) >= min_sqnr


@pytest.fixture(scope="module")
def family():
    cache = {}

    def get(name: str, dtype: torch.dtype = torch.float16) -> Family:
        if (name, dtype) not in cache:
            cache[name, dtype] = Family(name, dtype)
        return cache[name, dtype]

    return get


def test_fp16_table_covers_every_preset():
    assert set(DIT_FP16_MIN_SQNR_DB) == set(list_presets())


@pytest.mark.parametrize("preset", sorted(DIT_FP16_MIN_SQNR_DB))
def test_fp16_dit_every_preset(family, preset):
    family("dit").check(preset, DIT_FP16_MIN_SQNR_DB[preset])


@pytest.mark.parametrize("preset", [pytest.param(p, marks=pytest.mark.slow) if p in UNET_SLOW else p
                                    for p in UNET_FP16_MIN_SQNR_DB])
def test_fp16_unet(family, preset):
    family("unet2d").check(preset, UNET_FP16_MIN_SQNR_DB[preset])


@pytest.mark.parametrize("preset", sorted(DIT_BF16_MIN_SQNR_DB))
def test_bf16_dit(family, preset):
    family("dit", torch.bfloat16).check(preset, DIT_BF16_MIN_SQNR_DB[preset])


# -- float16 models with large activations: what overflowed -----------------------------------------------


def outlier_mlp(hidden: int, boost: float, column: float | None = None) -> tuple[nn.Module, torch.Tensor]:
    """A float16 MLP (the generic adapter quantizes its middle layer) whose first layer makes two channels
    large (boost); column: the middle layer's weight on those channels (tiny: an extreme smoothing λ)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.Linear(64, hidden), nn.GELU(), nn.Linear(hidden, 16))
    with torch.no_grad():
        model[0].weight[:2] *= boost
        model[0].bias[:2] *= boost
        if column is not None:
            model[1].weight[:, :2] = column
    return model.half(), torch.randn(32, 16).half()


@pytest.mark.parametrize(("preset", "hidden", "boost", "column", "min_sqnr"), [
    # the branch's hidden x̂·L1 exceeds 65504 although every output fits (before: NaN outputs)
    ("svdquant-w4a4", 1024, 25000.0, None, 58.0),
    ("svdquant-nvfp4", 1024, 25000.0, None, 58.0),
    ("svdquant-w8a8", 1024, 25000.0, None, 58.0),
    # λ = sqrt(max|x| / max|w|) beyond 65504: an Inf weight after folding (before: NaN outputs)
    ("smoothquant-w8a8", 64, 10000.0, 1e-7, 40.0),
    ("smoothquant-w4a4", 64, 10000.0, 1e-7, 16.0),
], ids=lambda v: v if isinstance(v, str) else None)
def test_fp16_large_activations(preset, hidden, boost, column, min_sqnr):
    model, x = outlier_mlp(hidden, boost, column)

    def run(m):
        with torch.no_grad(), diffquant.sampling_step(0):
            return m(x)

    reference = run(model)
    assert torch.isfinite(reference).all() and run(model[0]).abs().max() > 10000  # large, yet finite
    out = run(diffquant.quantize(copy.deepcopy(model), preset, calibration=run, progress=False))
    assert torch.isfinite(out).all()
    assert sqnr_db(reference, out) >= min_sqnr
