"""Shortcut splitting (QuantSpec.split_shortcut) end to end on the tiny UNets: the layers reading a
decoder skip concatenation get two input ranges and every other layer keeps one; the model saves and
reloads bitwise, freezes to integer layers that compute what the fake-quant ones do, and block
reconstruction and range search tune both halves. A DiT quantizes exactly as without the switch."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import diffquant
from diffquant.algorithms.range_search import RangeSearch
from diffquant.algorithms.reconstruction import BlockReconstruction
from diffquant.api import gather_stats, quantized_layers
from diffquant.arch import skip_concat_splits
from diffquant.calib.steps import sampling_step
from diffquant.checkpoint import load_quantized, save_quantized
from diffquant.formats.ops import sqnr_db
from diffquant.plan import plan_layers
from diffquant.recipes import Recipe, get_preset
from tests.nn.test_packed import LAYER_MAX_REL, TIE_SENSITIVE_COSINE, frozen_vs_fake_quant
from tests.tiny_models import TINY_MODELS

pytestmark = pytest.mark.usefixtures("single_thread")

W4A8 = get_preset("w4a8-static")


def split(recipe: Recipe, on: bool = True) -> Recipe:
    return dataclasses.replace(recipe, name=f"{recipe.name}-split", input=recipe.input.with_changes(split_shortcut=on))


def calibration(family: str):
    tiny = TINY_MODELS[family]

    def run(model):
        for seed in range(2):
            with sampling_step(seed):
                tiny.run(model, {**tiny.inputs(4), **_noise(tiny, seed)})

    return run


def _noise(tiny, seed: int) -> dict:
    inputs = tiny.inputs(4)
    key = "sample" if "sample" in inputs else "hidden_states"
    return {key: torch.randn(inputs[key].shape, generator=torch.Generator().manual_seed(seed))}


def quantized(family: str, recipe: Recipe):
    return diffquant.quantize(TINY_MODELS[family].build(), recipe, calibration=calibration(family), progress=False)


def run(family: str, model) -> torch.Tensor:
    with torch.no_grad(), sampling_step(0):
        return TINY_MODELS[family].run(model, TINY_MODELS[family].inputs(2))


def split_layers(model) -> dict[str, int]:
    return {n: layer.input_quantizer.split_at for n, layer in quantized_layers(model).items()
            if layer.input_quantizer is not None and layer.input_quantizer.split is not None}


@pytest.fixture(scope="module")
def unet():
    return quantized("unet2d-condition", split(W4A8))


def test_the_detected_layers_and_only_they_get_two_ranges(unet):
    tiny = TINY_MODELS["unet2d-condition"]
    fp = tiny.build()
    expected = skip_concat_splits(fp, lambda: tiny.run(fp, tiny.inputs(2)))
    assert len(expected) == 8 and split_layers(unet) == expected
    for name, layer in quantized_layers(unet).items():
        assert layer.input_quantizer.scale.shape == ((2,) if name in expected else (1,))
    reference = run("unet2d-condition", fp)
    assert sqnr_db(reference, run("unet2d-condition", unet)) > 8


def test_split_model_saves_and_reloads_bitwise(unet, tmp_path):
    loaded = load_quantized(save_quantized(unet, tmp_path / "q"))
    assert split_layers(loaded) == split_layers(unet)
    assert torch.equal(run("unet2d-condition", loaded), run("unet2d-condition", unet))


@pytest.mark.parametrize("family", ["unet2d", "unet2d-condition"])
def test_frozen_split_model_matches_fake_quant(family):
    result = frozen_vs_fake_quant(family, split(W4A8))  # teacher-forced per layer, then the whole model
    assert result.worst_layer_rel <= LAYER_MAX_REL and result.cosine >= TIE_SENSITIVE_COSINE


def test_a_dit_is_quantized_as_without_the_switch():
    with_switch, without = quantized("dit", split(W4A8)), quantized("dit", W4A8)
    assert split_layers(with_switch) == {}
    assert torch.equal(run("dit", with_switch), run("dit", without))


def test_collected_statistics_must_say_where_the_splits_are():
    tiny = TINY_MODELS["unet2d"]
    model, recipe = tiny.build(), split(W4A8)
    plan = plan_layers(model, recipe)
    stats = diffquant.calib.collect_activation_stats({n: model.get_submodule(n) for n in plan},
                                                     lambda: calibration("unet2d")(model))
    with pytest.raises(ValueError, match="channel_splits"):
        gather_stats(model, plan, stats)
    stats.channel_splits = skip_concat_splits(model, lambda: calibration("unet2d")(model))
    quantized_model = diffquant.quantize(model, recipe, calibration=stats, progress=False)
    assert split_layers(quantized_model) == stats.channel_splits and len(stats.channel_splits) == 8
    dit = TINY_MODELS["dit"].build()  # no up blocks: nothing to split, nothing to ask for
    dit_stats = diffquant.calib.collect_activation_stats(
        {n: dit.get_submodule(n) for n in plan_layers(dit, recipe)}, lambda: calibration("dit")(dit))
    assert split_layers(diffquant.quantize(dit, recipe, calibration=dit_stats, progress=False)) == {}


def test_block_reconstruction_learns_both_halves():
    stage = BlockReconstruction(iterations=4, batch_size=4, adaround=False)
    rtn, learned = quantized("unet2d", split(W4A8)), quantized("unet2d", split(dataclasses.replace(W4A8, stages=(stage,))))
    layers = split_layers(learned)
    assert len(layers) == 8
    for name in layers:
        before, after = quantized_layers(rtn)[name].input_quantizer.scale, quantized_layers(learned)[name].input_quantizer.scale
        assert after.shape == (2,) and torch.all(after != before)
    assert sqnr_db(run("unet2d", TINY_MODELS["unet2d"].build()), run("unet2d", learned)) > 8


def test_range_search_chooses_each_halfs_factor_on_its_own_channels():
    search = RangeSearch(candidates=20, step=0.04, rows=64)
    minmax, searched = quantized("unet2d", split(W4A8)), quantized("unet2d", split(dataclasses.replace(W4A8, stages=(search,))))
    factors = search.factors
    differ = 0
    for name in split_layers(searched):
        base, found = quantized_layers(minmax)[name].input_quantizer, quantized_layers(searched)[name].input_quantizer
        ratio = (found.scale / base.scale).reshape(2)
        assert all(torch.isclose(factors, r, rtol=1e-2, atol=0).any() for r in ratio)  # a candidate per half
        differ += int(not torch.isclose(ratio[0], ratio[1], rtol=1e-2))
    assert differ >= 1
