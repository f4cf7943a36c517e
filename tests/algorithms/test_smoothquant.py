"""SmoothQuant, the stage contract's worked example (algorithms/README.md): the factors' formula, a
function-preserving transform, better than plain RTN on outlier channels, checked fields, bitwise reload."""

from __future__ import annotations

import pytest
import torch

import diffquant
from diffquant.algorithms.smoothquant import FACTOR_RANGE, SmoothQuant, smoothing_factors
from diffquant.checkpoint import load_quantized, save_quantized
from diffquant.formats.ops import sqnr_db
from diffquant.recipes import RecipeError, get_preset
from tests.algorithms.test_svdquant import OneLayer, one_layer_recipe, outlier_inputs, quantized_one_layer
from tests.tiny_models import TINY_MODELS, run_dit_at_step0

pytestmark = pytest.mark.usefixtures("single_thread")


def test_factors_follow_the_formula_and_spare_dead_channels():
    x = torch.tensor([4.0, 0.0, 9.0, 1e12])
    w = torch.tensor([1.0, 2.0, 0.0, 1e-12])
    factors = smoothing_factors(x, w, alpha=0.5, beta=0.5)
    assert factors[0] == pytest.approx(2.0)  # 4^0.5 / 1^0.5
    assert factors[1] == factors[2] == 1.0  # a zero statistic on either side: left alone
    assert factors[3] == FACTOR_RANGE[1]  # clamped


def test_the_transform_alone_preserves_the_function_in_float64():
    calibration = outlier_inputs(512, seed=1).double()
    model = diffquant.quantize(OneLayer().double(), one_layer_recipe(SmoothQuant(alpha=0.5)),
                               calibration=lambda m: m(calibration), progress=False)
    assert model.proj.smooth is not None and not torch.all(model.proj.smooth == 1)
    x = outlier_inputs(64, seed=3).double()
    with torch.no_grad(), diffquant.quantizers_disabled(model):
        torch.testing.assert_close(model(x), OneLayer().double()(x), rtol=1e-10, atol=1e-10)


def test_smoothing_beats_plain_rtn_on_outlier_channels():
    x = outlier_inputs(256, seed=2)
    with torch.no_grad():
        reference = OneLayer()(x)
        rtn = sqnr_db(reference, quantized_one_layer(one_layer_recipe())(x))
        smooth = sqnr_db(reference, quantized_one_layer(one_layer_recipe(SmoothQuant(alpha=0.5)))(x))
    assert smooth >= rtn + 3.0, (rtn, smooth)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), "high", True])
def test_a_bad_alpha_is_one_recipe_error(alpha):
    with pytest.raises(RecipeError, match="alpha"):
        get_preset("smoothquant-w8a8").from_dict(
            {**get_preset("smoothquant-w8a8").to_dict(), "stages": [{"type": "smoothquant", "alpha": alpha}]})


def test_a_smoothed_model_reloads_bitwise(tmp_path):
    dit = TINY_MODELS["dit"]
    model = diffquant.quantize(dit.build(), "smoothquant-w8a8", calibration=run_dit_at_step0, progress=False)
    reloaded = load_quantized(save_quantized(model, tmp_path / "q"))
    assert torch.equal(reloaded.transformer_blocks[0].attn1.to_q.smooth, model.transformer_blocks[0].attn1.to_q.smooth)
    assert torch.equal(run_dit_at_step0(reloaded), run_dit_at_step0(model))
