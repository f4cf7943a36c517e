"""Models quantize cannot take as they are, and calibration statistics that belong to another model.

A model with no quantizable layer (or a recipe that keeps every layer in full precision) is refused
rather than "quantized" with 0 layers; statistics from a model of another width are refused naming the
layer and both shapes. In each case the model is left exactly as it was.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import diffquant
from diffquant.api import UnsupportedModelError
from diffquant.calib.stats import CalibrationMismatchError, collect_activation_stats, modules_by_name
from diffquant.plan import plan_layers
from diffquant.recipes import get_preset
from diffquant.recipes.config import Override
from tests.reliability.intact import Snapshot, left_intact, run_dit, run_unet
from tests.tiny_models import DIT_CONFIG, TINY_MODELS, UNET2D_CONFIG, fill_zero_params

pytestmark = pytest.mark.usefixtures("single_thread")

DIT, UNET = TINY_MODELS["dit"], TINY_MODELS["unet2d"]


# -- nothing to quantize ----------------------------------------------------------------------------------------


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv1d(4, 8, 3, padding=1), nn.Conv1d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class VolumeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.conv = nn.Embedding(10, 4), nn.Conv3d(4, 4, 1)

    def forward(self, x):
        return self.conv(self.embed(x).permute(0, 3, 1, 2)[..., None])


NO_LAYER_MODELS = {
    "conv1d-only": (Conv1dNet, lambda: torch.randn(2, 4, 16), "Conv1d"),
    "conv3d-and-embedding": (VolumeNet, lambda: torch.randint(0, 10, (2, 3, 3)), "Conv3d"),
    "norm-only": (lambda: nn.Sequential(nn.LayerNorm(8), nn.GELU()), lambda: torch.randn(2, 8), "LayerNorm"),
}


@pytest.mark.parametrize("case", list(NO_LAYER_MODELS))
@pytest.mark.parametrize("preset", ["w8a8", "w8a8-static"])
def test_model_without_quantizable_layers_is_refused(case, preset):
    build, make_input, kind = NO_LAYER_MODELS[case]
    torch.manual_seed(0)
    model, x = build(), make_input()
    run = lambda m: m(x).detach()  # noqa: E731
    before = Snapshot.of(model, run)
    with pytest.raises(UnsupportedModelError) as err:
        diffquant.quantize(model, preset, calibration=run, progress=False)
    message = str(err.value)
    assert "has no layer diffquant quantizes (nn.Linear, nn.Conv2d)" in message and kind in message
    assert "0 quantized layers" in message
    before.assert_intact(model, run)


def test_model_whose_only_layers_the_adapter_keeps_in_full_precision_is_refused():
    """A model no adapter knows keeps its first (embed) and last (head) layer in full precision."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)), torch.randn(4, 8)
    run = lambda m: m(x).detach()  # noqa: E731
    with left_intact(model, run), pytest.raises(UnsupportedModelError, match=r"leaves every one of the 2 quantizable layers of Sequential"):
        diffquant.quantize(model, "w8a8", progress=False)


def test_recipe_that_skips_every_layer_is_refused():
    model = DIT.build()
    recipe = dataclasses.replace(get_preset("w8a8"), overrides=(Override(match="*", skip=True),))
    with left_intact(model, run_dit), pytest.raises(UnsupportedModelError, match=r"recipe 'w8a8' leaves every one of the \d+ quantizable"):
        diffquant.quantize(model, recipe, progress=False)


# -- statistics of another model -----------------------------------------------------------------------------


def build(cls_name: str, config: dict) -> nn.Module:
    import diffusers

    torch.manual_seed(0)
    return fill_zero_params(getattr(diffusers, cls_name)(**config)).eval()


def stats_of(model: nn.Module, run, preset: str, sample_rows: int = 0):
    plan = plan_layers(model, get_preset(preset))
    return collect_activation_stats(modules_by_name(model, plan), lambda: run(model), sample_rows=sample_rows)


WIDTH_CASES = {
    # (model quantized, model the statistics came from, run, preset, first layer named, its shape, channels)
    "dit-stats-from-wider-dit": (
        lambda: DIT.build(), lambda: build("DiTTransformer2DModel", {**DIT_CONFIG, "num_attention_heads": 3}),
        run_dit, "w8a8-static", "transformer_blocks.0.attn1.to_q", "(96,)", 64),
    "wide-dit-stats-from-dit": (
        lambda: build("DiTTransformer2DModel", {**DIT_CONFIG, "num_attention_heads": 3}), lambda: DIT.build(),
        run_dit, "smoothquant-w8a8", "transformer_blocks.0.attn1.to_q", "(64,)", 96),
    "unet-stats-from-narrower-unet": (
        lambda: UNET.build(), lambda: build("UNet2DModel", {**UNET2D_CONFIG, "block_out_channels": (32, 64)}),
        run_unet, "w8a8-static", "down_blocks.0.resnets.0.conv1", "(32,)", 64),
}


@pytest.mark.parametrize("case", list(WIDTH_CASES))
def test_statistics_of_another_width_are_refused(case):
    make_model, make_other, run, preset, layer, shape, channels = WIDTH_CASES[case]
    model, other = make_model(), make_other()
    stats = stats_of(other, run, preset)
    assert set(plan_layers(model, get_preset(preset))) <= set(stats)  # same names: only widths differ
    before = Snapshot.of(model, run)
    with pytest.raises(CalibrationMismatchError) as err:
        diffquant.quantize(model, preset, calibration=stats, progress=False)
    message = str(err.value)
    assert f"layer {layer!r}" in message and f"shape {shape}" in message
    assert f"reads {channels} input channels" in message and "another model" in message
    before.assert_intact(model, run)


def truncate_step_range(stats, layer):
    rng = stats[layer].per_step[0]
    stats[layer].per_step[0] = dataclasses.replace(rng, lo=rng.lo[:-8], hi=rng.hi[:-8])
    return "step 0 range has shape (56,)"


def narrow_row_sample(stats, layer):
    stats[layer].sample.rows = stats[layer].sample.rows[:, :32]
    return "row sample has shape (16, 32)"


@pytest.mark.parametrize("damage", [truncate_step_range, narrow_row_sample], ids=lambda f: f.__name__)
def test_statistics_of_one_damaged_layer_are_refused(damage):
    model, layer = DIT.build(), "transformer_blocks.1.attn1.to_out.0"
    stats = stats_of(model, run_dit, "svdquant-w4a4", sample_rows=16)
    expected = damage(stats, layer)
    before = Snapshot.of(model, run_dit)
    with pytest.raises(CalibrationMismatchError) as err:
        diffquant.quantize(model, "svdquant-w4a4", calibration=stats, progress=False)
    assert f"layer {layer!r}" in str(err.value) and expected in str(err.value)
    before.assert_intact(model, run_dit)


def test_statistics_lacking_a_layer_are_refused():
    model = DIT.build()
    stats = stats_of(model, run_dit, "w8a8-static")
    del stats["transformer_blocks.1.ff.net.2"]
    with left_intact(model, run_dit), pytest.raises(ValueError, match=r"lack 1 planned layers .*transformer_blocks.1.ff.net.2"):
        diffquant.quantize(model, "w8a8-static", calibration=stats, progress=False)
