"""Range search (EfficientDM's activation-range initialisation): candidates shrink the calibrated range,
the chosen one has the lowest Lp error on the calibration inputs (per sampling step when ranges are
per step), and on a tiny DiT it brings the W4A4 output closer to full precision than min / max."""

from __future__ import annotations

import pytest
import torch

import diffquant
from diffquant.algorithms.range_search import RangeSearch
from diffquant.api import CalibrationRequiredError, gather_stats, quantized_layers
from diffquant.calib import replay
from diffquant.formats.ops import fake_quantize, sqnr_db
from diffquant.plan import plan_layers
from diffquant.recipes import Recipe, RecipeError
from diffquant.recipes.config import stage_from_dict
from tests.algorithms.test_efficientdm import CALIBRATION, HELD_OUT, W4A4_STEPS, outputs
from tests.algorithms.test_reconstruction import DIT

pytestmark = pytest.mark.usefixtures("single_thread")


def w4a4(*stages) -> torch.nn.Module:
    r = Recipe(name="w4a4-steps", stages=stages, **W4A4_STEPS)
    return diffquant.quantize(DIT.build(), r, calibration=replay(CALIBRATION, 32), progress=False)


@pytest.fixture(scope="module")
def minmax():
    return w4a4()


@pytest.fixture(scope="module")
def searched():
    return w4a4(RangeSearch())


def test_ranges_only_shrink_and_differ_per_step(minmax, searched):
    base, found = quantized_layers(minmax), quantized_layers(searched)
    shrunk = 0
    for name, layer in found.items():
        scale, reference = layer.input_quantizer.scale, base[name].input_quantizer.scale
        assert scale.shape == reference.shape == (2, 1)
        assert torch.all(scale <= reference * (1 + 1e-6)) and torch.all(scale >= reference * 0.2)
        shrunk += int(torch.any(scale < reference * 0.999))
    assert shrunk >= len(found) // 2


def test_chosen_range_minimises_the_lp_error_of_the_calibration_inputs(minmax, searched):
    name = "transformer_blocks.0.ff.net.2"
    inputs = {0: [], 1: []}
    layer_fp = quantized_layers(minmax)[name]
    hook = layer_fp.register_forward_pre_hook(lambda _m, args: inputs[diffquant.calib.current_step()].append(args[0]))
    with diffquant.api.quantizers_disabled(minmax):
        replay(CALIBRATION, 32)(minmax)
    hook.remove()
    chosen, base = quantized_layers(searched)[name].input_quantizer, layer_fp.input_quantizer

    def error(x, quantizer, step):
        q = fake_quantize(x, quantizer.scale[step], quantizer.zero_point[step], quantizer.spec.qformat)
        return float((q - x).abs().pow(2.4).sum())

    for step in (0, 1):
        x = torch.cat(inputs[step]).reshape(-1, inputs[step][0].shape[-1])
        assert error(x, chosen, step) < error(x, base, step)


def test_search_brings_w4a4_closer_to_full_precision(minmax, searched):
    reference = outputs(DIT.build(), HELD_OUT)
    assert sqnr_db(reference, outputs(searched, HELD_OUT)) > sqnr_db(reference, outputs(minmax, HELD_OUT)) + 1.0


def test_validation_and_calibration_requirements():
    with pytest.raises(RecipeError, match="positive"):
        stage_from_dict({"type": "range_search", "candidates": 101, "step": 0.01})
    with pytest.raises(RecipeError, match="rows"):
        stage_from_dict({"type": "range_search", "rows": 0})
    r = Recipe(name="x", stages=(RangeSearch(),), **W4A4_STEPS)
    model = DIT.build()
    stats = gather_stats(model, plan_layers(model, r), replay(CALIBRATION, 32))
    with pytest.raises(CalibrationRequiredError, match="replays"):
        diffquant.quantize(model, r, calibration=stats, progress=False)
