"""SVDQuant: a function-preserving transform, better than RTN and SmoothQuant on outliers, refits that
never hurt, one λ per shared input, checkpoints / frozen models that keep the low-rank branch, and
GPTQ on the residual whose codes the checkpoints keep; the same for convolutions (scored on im2col
patch rows, branch = conv with the layer's geometry then 1x1), on a single conv and a tiny UNet."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

import diffquant
from diffquant.algorithms.svdquant import (
    SplitSettings,
    SVDQuant,
    fit_low_rank,
    group_factors,
    layer_problem,
    smoothing_grid,
)
from diffquant.api import CalibrationRequiredError, quantized_layers
from diffquant.calib.stats import collect_activation_stats
from diffquant.checkpoint import MANIFEST, TENSORS, load_quantized, save_quantized
from diffquant.formats import QuantSpec
from diffquant.formats.ops import sqnr_db
from diffquant.freeze import freeze, packed_layers, save_frozen
from diffquant.nn import QConv2d, QLinear
from diffquant.nn.layers import low_rank_product
from diffquant.nn.packed_conv import PackedConv2d
from diffquant.recipes import Override, Recipe, RecipeError, get_preset
from tests.tiny_models import TINY_MODELS, run_dit_at_step0

pytestmark = pytest.mark.usefixtures("single_thread")

W4A4 = dict(weight=QuantSpec("int4", "group", 64, scale_dtype="float16"),
            input=QuantSpec("int4", "group", 64, dynamic=True))
INCLUDE_ALL = (Override("role:*", include=True),)  # the one-layer model's only layer is its "head"


def one_layer_recipe(*stages, name: str = "test") -> Recipe:
    return Recipe(name=name, stages=tuple(stages), overrides=INCLUDE_ALL, **W4A4)


# -- a layer with outlier input channels -------------------------------------------------------------

FEATURES, OUTLIERS = 256, (3, 50, 77, 130, 201)


class OneLayer(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(FEATURES, FEATURES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def outlier_inputs(rows: int, seed: int) -> torch.Tensor:
    """Activations whose few outlier channels are 30x the rest (the case smoothing targets)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, FEATURES, generator=g)
    x[:, list(OUTLIERS)] *= 30
    return x


def quantized_one_layer(recipe: Recipe, seed: int = 0) -> nn.Module:
    x = outlier_inputs(512, seed=1)
    return diffquant.quantize(OneLayer(seed), recipe, calibration=lambda m: m(x), progress=False)


def held_out_sqnr(recipe: Recipe) -> float:
    reference = OneLayer()
    model = quantized_one_layer(recipe)
    x = outlier_inputs(256, seed=2)  # not the calibration rows
    with torch.no_grad():
        return sqnr_db(reference(x), model(x))


def test_grid_is_the_methods_39_candidates():
    grid = smoothing_grid(0.05)
    assert len(grid) == len(set(grid)) == 39
    assert grid[0] == (0.0, 0.0)
    assert {(0.5, 0.0), (0.5, 0.5), (0.05, 0.95), (0.95, 0.0)} <= set(grid)
    assert all(beta in (0.0, round(1 - alpha, 10)) for alpha, beta in grid)
    assert len(SVDQuant(smooth=False).grid) == 1


def test_svdquant_beats_rtn_and_smoothquant_on_outlier_channels():
    rtn = held_out_sqnr(one_layer_recipe())
    smooth = held_out_sqnr(one_layer_recipe(get_preset("smoothquant-w4a4").stages[0]))
    svd = held_out_sqnr(one_layer_recipe(SVDQuant(rank=32)))
    assert svd >= rtn + 6.0, (rtn, smooth, svd)
    assert svd >= smooth + 3.0, (rtn, smooth, svd)


def test_transform_alone_leaves_the_full_precision_output_unchanged():
    model = quantized_one_layer(one_layer_recipe(SVDQuant(rank=32)))
    layer = model.proj
    assert layer.smooth is not None and layer.low_rank_down.shape == (FEATURES, 32)
    x = outlier_inputs(64, seed=3)
    with torch.no_grad(), diffquant.quantizers_disabled(model):
        torch.testing.assert_close(model(x), OneLayer()(x), rtol=1e-5, atol=1e-4)


def test_branch_factors_are_16_bit_values():
    layer = quantized_one_layer(one_layer_recipe(SVDQuant(rank=8))).proj
    for factor in layer.low_rank:
        assert factor.dtype == torch.float32
        assert torch.equal(factor.half().float(), factor)


def test_rank_zero_is_smoothing_only():
    model = quantized_one_layer(one_layer_recipe(SVDQuant(rank=0)))
    layer = model.proj
    assert layer.low_rank is None and layer.smooth is not None
    torch.testing.assert_close(layer.weight, OneLayer().proj.weight * layer.smooth, rtol=0, atol=0)


def test_without_smoothing_only_the_branch_is_added():
    layer = quantized_one_layer(one_layer_recipe(SVDQuant(rank=8, smooth=False))).proj
    assert layer.smooth is None and layer.low_rank is not None


def problem_and_factors():
    model = OneLayer()
    recipe = one_layer_recipe(SVDQuant())
    x = outlier_inputs(512, seed=1)
    stats = collect_activation_stats({"proj": model.proj}, lambda: model(x), sample_rows=256)
    layer = diffquant.nn.wrap_layer(model.proj, recipe.weight, recipe.input)
    factors = torch.ones(FEATURES)  # no smoothing: the branch has the most to do
    return layer_problem("proj", layer, stats), factors


def test_refit_keeps_the_best_iterate_and_stops_when_the_error_rises():
    problem, factors = problem_and_factors()
    settings = SplitSettings(rank=16, branch_dtype=torch.float16, randomized=False)
    fit = fit_low_rank(problem, factors, settings, iterations=30)
    assert fit.best.error == min(fit.errors) <= fit.errors[0]
    assert fit.best.error < fit.errors[0]  # refitting helps on this layer
    assert all(b < a for a, b in zip(fit.errors[:-2], fit.errors[1:-1], strict=True))  # decreasing until the stop
    no_refit = fit_low_rank(problem, factors, settings, iterations=0)
    assert no_refit.errors == fit.errors[:1]


def test_randomized_svd_is_close_to_the_exact_one():
    problem, factors = problem_and_factors()
    exact = fit_low_rank(problem, factors, SplitSettings(16, torch.float32, randomized=False), 0)
    randomized = fit_low_rank(problem, factors, SplitSettings(16, torch.float32, randomized=True), 0)
    assert randomized.best.error == pytest.approx(exact.best.error, rel=0.02)


# -- GPTQ on the residual ----------------------------------------------------------------------------


def correlated_outlier_inputs(rows: int, seed: int) -> torch.Tensor:
    """outlier_inputs plus a component shared by all channels through 8 directions, as real activations
    have (with independent channels, GPTQ has nothing to trade and only fits the sample's noise)."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(8, FEATURES, generator=torch.Generator().manual_seed(7)) * 2
    return outlier_inputs(rows, seed) + torch.randn(rows, 8, generator=g) @ mixing


def held_out_sqnr_correlated(stage: SVDQuant) -> float:
    x = correlated_outlier_inputs(1024, seed=1)
    model = diffquant.quantize(OneLayer(), one_layer_recipe(stage), calibration=lambda m: m(x), progress=False)
    x = correlated_outlier_inputs(256, seed=2)  # not the calibration rows
    with torch.no_grad():
        return sqnr_db(OneLayer()(x), model(x))


def test_gptq_residual_beats_round_to_nearest_on_held_out_correlated_rows():
    rtn = held_out_sqnr_correlated(SVDQuant(rank=16))
    gptq = held_out_sqnr_correlated(SVDQuant(rank=16, gptq=True))
    assert gptq >= rtn + 1.0, (rtn, gptq)


def test_gptq_leaves_the_smoothing_and_the_branch_as_they_were():
    """The search and refit score on the same sample_rows rows when GPTQ asks for more (scoring_rows)."""
    plain = quantized_one_layer(one_layer_recipe(SVDQuant(rank=8, sample_rows=128))).proj
    gptq = quantized_one_layer(one_layer_recipe(SVDQuant(rank=8, sample_rows=128, gptq=True, gptq_rows=512))).proj
    assert torch.equal(plain.smooth, gptq.smooth)
    assert all(torch.equal(a, b) for a, b in zip(plain.low_rank, gptq.low_rank, strict=True))
    assert not torch.equal(plain.weight_quantizer(plain.weight), gptq.weight)


def test_gptq_codes_survive_calibration_and_storage():
    """(Saving and reloading: the tiny-DiT test below.)"""
    model = quantized_one_layer(one_layer_recipe(SVDQuant(rank=8, gptq=True)))
    layer = model.proj
    weight, scale = layer.weight.detach().clone(), layer.weight_quantizer.scale.clone()
    assert torch.equal(layer.effective_weight(), weight)  # the layer computes with GPTQ's values as they are
    residual = OneLayer().proj.weight.detach() * layer.smooth - low_rank_product(*layer.low_rank)
    rtn = copy.deepcopy(layer.weight_quantizer)
    rtn.calibrate(residual)
    assert not torch.equal(rtn.scale, scale)  # GPTQ's scales, not those the job would have calibrated
    assert not torch.equal(rtn(residual), weight)
    x = outlier_inputs(64, seed=3)
    with torch.no_grad():
        expected = model(x)
        layer.store_codes()  # what a checkpoint and freeze hold
        assert torch.equal(layer.weight_quantizer.scale, scale)
        assert torch.equal(layer.weight_quantizer.decode(layer.weight_codes), weight)
        assert torch.equal(model(x), expected)


# -- tiny diffusers models ---------------------------------------------------------------------------

DIT = TINY_MODELS["dit"]


dit_calibration = dit_output = run_dit_at_step0


@pytest.fixture(scope="module")
def svdquant_dit():
    return diffquant.quantize(DIT.build(), "svdquant-w4a4", calibration=dit_calibration, progress=False)


def test_q_k_v_of_one_attention_share_their_smoothing(svdquant_dit):
    layers = quantized_layers(svdquant_dit)
    attentions = {n.rpartition(".")[0] for n in layers if n.endswith(".to_q")}
    assert attentions
    for attn in attentions:
        q, k, v = (layers[f"{attn}.{p}"] for p in ("to_q", "to_k", "to_v"))
        assert q.smooth is not None and torch.equal(q.smooth, k.smooth) and torch.equal(q.smooth, v.smooth)
        assert not torch.equal(q.low_rank_down, k.low_rank_down)  # one branch per layer
        out = layers[f"{attn}.to_out.0"]
        assert out.smooth is None or out.smooth.shape != q.smooth.shape or not torch.equal(out.smooth, q.smooth)


def test_svdquant_beats_rtn_on_a_tiny_dit(svdquant_dit):
    reference = dit_output(DIT.build())
    rtn = diffquant.quantize(DIT.build(), "w4a4", progress=False)
    assert sqnr_db(reference, dit_output(svdquant_dit)) >= sqnr_db(reference, dit_output(rtn)) + 3.0


def test_save_load_round_trip_is_bitwise(svdquant_dit, tmp_path):
    expected = dit_output(svdquant_dit)
    folder = save_quantized(svdquant_dit, tmp_path / "q")
    manifest = json.loads((folder / MANIFEST).read_text())
    branches = {n: e["low_rank"] for n, e in manifest["layers"].items() if e["low_rank"] is not None}
    assert branches and all(b == {"rank": 32, "dtype": "float16"} for b in branches.values())
    with safe_open(folder / TENSORS, framework="pt") as f:
        name = next(iter(branches))
        assert f.get_tensor(f"{name}.low_rank_down").dtype == torch.float16
        assert f.get_slice(f"{name}.low_rank_up").get_shape()[0] == 32
    loaded = load_quantized(folder)
    assert all(layer.weight is None for layer in quantized_layers(loaded).values())
    assert torch.equal(dit_output(loaded), expected)
    again = save_quantized(loaded, tmp_path / "again")
    assert (again / TENSORS).read_bytes() == (folder / TENSORS).read_bytes()


def with_gptq(preset: str) -> Recipe:
    recipe = get_preset(preset)
    return dataclasses.replace(recipe, stages=(dataclasses.replace(recipe.stages[0], gptq=True),))


@pytest.mark.parametrize("preset", ["svdquant-w4a4", "svdquant-nvfp4"])
def test_gptq_on_a_tiny_dit_is_no_worse_and_saves_reloads_and_freezes(preset, svdquant_dit, tmp_path):
    reference = dit_output(DIT.build())
    plain = svdquant_dit if preset == "svdquant-w4a4" else \
        diffquant.quantize(DIT.build(), preset, calibration=dit_calibration, progress=False)
    model = diffquant.quantize(DIT.build(), with_gptq(preset), calibration=dit_calibration, progress=False)
    branched = [layer for layer in quantized_layers(model).values() if layer.low_rank is not None]
    assert branched and all(torch.equal(layer.weight_quantizer(layer.weight), layer.weight) for layer in branched)
    expected = dit_output(model)
    assert sqnr_db(reference, expected) >= sqnr_db(reference, dit_output(plain))
    folder = save_quantized(model, tmp_path / "q")
    assert torch.equal(dit_output(load_quantized(folder)), expected)
    frozen = freeze(model, float_dtype=torch.float32)
    assert cosine(dit_output(frozen), expected) >= 0.9999
    assert (save_frozen(frozen, tmp_path / "frozen") / TENSORS).read_bytes() == (folder / TENSORS).read_bytes()


def cheap_svdquant() -> Recipe:
    """svdquant-w4a4 with a short grid and few refits: the machinery on every family, quickly."""
    preset = get_preset("svdquant-w4a4")
    return dataclasses.replace(preset, stages=(SVDQuant(rank=8, grid_step=0.25, iterations=3, sample_rows=64),))


@pytest.mark.parametrize("family", ["flux", "sd3", "unet2d-condition", "wan"])
def test_round_trip_and_freezing_on_other_families(family, tmp_path):
    """Joint attention, single blocks (q/k/v and the MLP share one input), cross attention, video."""
    tiny = TINY_MODELS[family]
    inputs = tiny.inputs(2)

    def calibrate(m):
        with diffquant.sampling_step(0):
            tiny.run(m, inputs)

    def run(m):
        with torch.no_grad(), diffquant.sampling_step(0):
            return tiny.run(m, inputs)

    model = diffquant.quantize(tiny.build(), cheap_svdquant(), calibration=calibrate, progress=False)
    assert any(layer.low_rank is not None for layer in quantized_layers(model).values())
    expected = run(model)
    assert torch.equal(run(load_quantized(save_quantized(model, tmp_path / "q"))), expected)
    assert cosine(run(freeze(model, float_dtype=torch.float32)), expected) >= 0.999


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float(a @ b / (a.norm() * b.norm()))


def test_frozen_model_keeps_the_branch_and_matches_fake_quant(svdquant_dit, tmp_path):
    expected = dit_output(svdquant_dit)
    first = save_quantized(svdquant_dit, tmp_path / "q")
    frozen = freeze(copy.deepcopy(svdquant_dit), float_dtype=torch.float32)
    packed = packed_layers(frozen)
    with_branch = [m for m in packed.values() if m.low_rank_down is not None]
    assert with_branch and all(m.low_rank_down.dtype == torch.float16 for m in with_branch)  # 16-bit resident
    got = dit_output(frozen)
    assert cosine(got, expected) >= 0.9999
    assert float((got - expected).abs().max() / expected.abs().max()) <= 1e-3
    second = save_frozen(frozen, tmp_path / "frozen")
    assert (second / TENSORS).read_bytes() == (first / TENSORS).read_bytes()


def test_grouped_convolutions_have_no_low_rank_branch():
    layer = QConv2d(nn.Conv2d(8, 8, 1, groups=2), W4A4["weight"], None)
    with pytest.raises(NotImplementedError, match="ungrouped convolutions only"):
        layer.set_low_rank(torch.zeros(4, 2), torch.zeros(2, 8))


def test_low_rank_layer_computes_the_method_s_expression():
    torch.manual_seed(0)
    layer = QLinear(nn.Linear(64, 32), W4A4["weight"], W4A4["input"])
    layer.fold_input_scale(torch.rand(64) + 0.5)
    down, up = torch.randn(64, 4), torch.randn(4, 32)
    layer.split_low_rank(down, up)
    layer.calibrate_weight()
    x = torch.randn(5, 64)
    xs = x / layer.smooth
    expected = layer.input_quantizer(xs) @ layer.weight_quantizer(layer.weight).t() + layer.bias + xs @ down @ up
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        layer.set_low_rank(down, up.t())
    with pytest.raises(RuntimeError, match="before the weight is quantized"):
        layer.split_low_rank(down, up)


# -- configuration -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "message"), [
    pytest.param({"rank": -1}, r"rank must be an integer >= 0", id="negative-rank"),
    pytest.param({"rank": 2.5}, r"rank must be an integer", id="fractional-rank"),
    pytest.param({"iterations": -1}, r"iterations must be an integer >= 0", id="negative-iterations"),
    pytest.param({"sample_rows": 0}, r"sample_rows must be an integer >= 1", id="no-rows"),
    pytest.param({"grid_step": 0.3}, r"grid_step must lie in \(0, 0\.5\] and divide 1", id="step-not-dividing-1"),
    pytest.param({"grid_step": 0.0}, r"grid_step", id="zero-step"),
    pytest.param({"branch_dtype": "int8"}, r"branch_dtype must be one of", id="bad-branch-dtype"),
    pytest.param({"randomized_svd_from": 0}, r"randomized_svd_from must be an integer >= 1", id="bad-randomized"),
    pytest.param({"gptq": "yes"}, r"gptq must be true or false", id="gptq-not-bool"),
    pytest.param({"gptq": True, "gptq_rows": 0}, r"gptq_rows must be an integer >= 1", id="no-gptq-rows"),
    pytest.param({"convs": 1}, r"convs must be true or false", id="convs-not-bool"),
    pytest.param({"alpha": 0.5}, r"unknown stage 'svdquant' keys \['alpha'\]", id="unknown-key"),
])
def test_bad_options_are_recipe_errors(options, message):
    data = {"name": "bad", "weight": {"format": "int4", "granularity": "group", "group_size": 64},
            "stages": [{"type": "svdquant", **options}]}
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict(data)


def test_recipe_round_trips_and_asks_calibration_for_rows():
    recipe = get_preset("svdquant-w4a4")
    assert Recipe.from_dict(json.loads(recipe.to_json())) == recipe
    assert recipe.needs_calibration and recipe.calibration_rows == 256
    custom = dataclasses.replace(recipe, stages=(SVDQuant(rank=8, sample_rows=64),))
    assert Recipe.from_dict(custom.to_dict()).stages[0] == SVDQuant(rank=8, sample_rows=64)
    assert custom.calibration_rows == 64


def test_gptq_options_round_trip_and_ask_calibration_for_the_hessian_s_rows():
    assert "gptq_rows" not in SVDQuant().to_dict()  # the default: older recipes serialise (and hash) as before
    assert SVDQuant(gptq=True).calibration_rows() == 1024
    assert SVDQuant(gptq=True, gptq_rows=100).calibration_rows() == 256  # never fewer than the scoring rows
    assert SVDQuant(gptq_rows=4096).calibration_rows() == 256  # no effect without gptq
    for stage in (SVDQuant(gptq=True), SVDQuant(gptq=True, gptq_rows=512)):
        recipe = dataclasses.replace(get_preset("svdquant-w4a4"), stages=(stage,))
        assert Recipe.from_dict(json.loads(recipe.to_json())) == recipe
    assert SVDQuant(gptq=True, gptq_rows=512).to_dict()["gptq_rows"] == 512


def test_convs_switch_round_trips_and_is_left_out_at_its_default():
    assert "convs" not in SVDQuant().to_dict()  # existing recipes serialise (and hash) as before
    assert SVDQuant(convs=False).to_dict()["convs"] is False
    recipe = dataclasses.replace(get_preset("svdquant-w4a4"), stages=(SVDQuant(convs=False),))
    assert Recipe.from_dict(json.loads(recipe.to_json())) == recipe
    assert get_preset("svdquant-w4a4").stages[0].convs


def test_statistics_without_sampled_rows_are_refused():
    model = OneLayer()
    x = outlier_inputs(64, seed=1)
    stats = collect_activation_stats({"proj": model.proj}, lambda: model(x))  # ranges only
    with pytest.raises(CalibrationRequiredError, match="sampled input rows"):
        diffquant.quantize(model, one_layer_recipe(SVDQuant()), calibration=stats, progress=False)


# -- convolutions ------------------------------------------------------------------------------------

CHANNELS, CONV_OUTLIERS = 64, (3, 20, 41, 58)
GEOMETRIES = {
    "3x3": dict(kernel_size=3, padding=1),
    "3x3-stride2": dict(kernel_size=3, stride=2, padding=1),
    "3x3-dilated": dict(kernel_size=3, padding=2, dilation=2),
    "1x1": dict(kernel_size=1, padding=0),
    "3x2-same": dict(kernel_size=(3, 2), padding="same"),
}


class OneConv(nn.Module):
    def __init__(self, seed: int = 0, **geometry) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(CHANNELS, CHANNELS, **(geometry or GEOMETRIES["3x3"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def conv_outlier_inputs(batch: int, seed: int) -> torch.Tensor:
    """Feature maps whose few outlier channels are 30x the rest."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, CHANNELS, 8, 8, generator=g)
    x[:, list(CONV_OUTLIERS)] *= 30
    return x


def correlated_conv_inputs(batch: int, seed: int) -> torch.Tensor:
    """conv_outlier_inputs plus a spatially smooth component shared by all channels through 8 directions
    (with independent pixels and channels GPTQ has nothing to trade)."""
    g = torch.Generator().manual_seed(seed)
    shared = F.interpolate(torch.randn(batch, 8, 4, 4, generator=g), size=(8, 8), mode="bilinear")
    mixing = torch.randn(8, CHANNELS, generator=torch.Generator().manual_seed(7)) * 2
    return conv_outlier_inputs(batch, seed) + torch.einsum("bkhw,kc->bchw", shared, mixing)


def quantized_conv(*stages, model: nn.Module | None = None, x: torch.Tensor | None = None) -> nn.Module:
    x = conv_outlier_inputs(8, seed=1) if x is None else x
    return diffquant.quantize(OneConv() if model is None else model, one_layer_recipe(*stages),
                              calibration=lambda m: m(x), progress=False)


def conv_held_out_sqnr(*stages) -> float:
    model = quantized_conv(*stages)
    x = conv_outlier_inputs(4, seed=2)  # not the calibration inputs
    with torch.no_grad():
        return sqnr_db(OneConv()(x), model(x))


def test_svdquant_on_a_convolution_beats_rtn_and_smoothquant():
    rtn = conv_held_out_sqnr()
    smooth = conv_held_out_sqnr(get_preset("smoothquant-w4a4").stages[0])
    svd = conv_held_out_sqnr(SVDQuant(rank=16))
    assert svd >= rtn + 6.0 and svd >= smooth + 2.0, (rtn, smooth, svd)
    assert conv_held_out_sqnr(SVDQuant(rank=16, convs=False)) == rtn  # the method's coverage: plain rounding


def test_conv_transform_alone_leaves_the_full_precision_output_unchanged():
    model = quantized_conv(SVDQuant(rank=16))
    layer = model.conv
    assert isinstance(layer, QConv2d) and layer.smooth.shape == (CHANNELS,)
    assert layer.low_rank_down.shape == (9 * CHANNELS, 16) and layer.low_rank_up.shape == (16, CHANNELS)
    assert all(torch.equal(f.half().float(), f) for f in layer.low_rank)  # 16-bit values, as for Linear
    x = conv_outlier_inputs(2, seed=3)
    reference = OneConv()(x)
    with torch.no_grad(), diffquant.quantizers_disabled(model):
        torch.testing.assert_close(model(x), reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))


@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=GEOMETRIES)
def test_conv_smoothing_and_branch_are_function_preserving_in_float64(geometry):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, **geometry).double()
    layer = QConv2d(copy.deepcopy(conv), None, None)
    factors = torch.rand(16, dtype=torch.float64) + 0.5
    layer.fold_input_scale(factors)
    layer.split_low_rank(torch.randn(layer.taps * 16, 4, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64))
    x = torch.randn(2, 16, 9, 7, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), conv(x), rtol=1e-12, atol=1e-12)


def unfolded_patches(x: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """F.unfold's patches [B, L, K] reordered to K = (kh, kw, c), channels fastest (the weight matrix's order)."""
    patches = F.unfold(x, kernel, padding=padding, stride=stride)  # [B, C·kh·kw, L], channels slowest
    return patches.reshape(x.shape[0], x.shape[1], kernel * kernel, -1).permute(0, 3, 2, 1).flatten(2)


def test_low_rank_conv_computes_the_method_s_expression_and_freezes_with_it():
    torch.manual_seed(0)
    conv = nn.Conv2d(64, 32, 3, stride=2, padding=1)
    layer = QConv2d(conv, W4A4["weight"], W4A4["input"])
    layer.fold_input_scale(torch.rand(64) + 0.5)
    down, up = torch.randn(9 * 64, 4), torch.randn(4, 32)
    layer.split_low_rank(down, up)
    layer.calibrate_weight()
    x = torch.randn(2, 64, 8, 8)
    xs = x / layer.smooth.reshape(-1, 1, 1)
    xq = layer.input_quantizer(xs.movedim(1, -1)).movedim(-1, 1)
    wq = layer.weight_from_matrix(layer.weight_quantizer(layer.weight_matrix(layer.weight)))
    branch = (unfolded_patches(xs, 3, 2, 1) @ down @ up).transpose(1, 2).reshape(2, 32, 4, 4)
    expected = F.conv2d(xq, wq, layer.bias, 2, 1) + branch
    with torch.no_grad():
        got = layer(x)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
        packed = PackedConv2d.from_layer(layer, float_dtype=torch.float32)
        assert packed.low_rank_down is not None and "low_rank=4" in repr(packed)
        torch.testing.assert_close(packed(x), got, rtol=1e-4, atol=1e-4 * float(got.abs().max()))
        thawed = packed.to_quantized_layer()
        assert all(torch.equal(a, b) for a, b in zip(thawed.low_rank, layer.low_rank, strict=True))
        assert torch.equal(thawed(x), got)  # codes decode to the fake-quant weight bit for bit
    with pytest.raises(ValueError, match="do not fit"):
        layer.set_low_rank(torch.randn(64, 4), up)


@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=GEOMETRIES)
def test_conv_scoring_rows_give_the_layer_s_own_output_error(geometry):
    """With every patch sampled, the fit's error is the quantized layer's squared output error: the patch
    rows, their per-pixel input quantization, the zero padding and the branch conv all agree."""
    model = OneConv(**geometry)
    reference = copy.deepcopy(model)
    x = conv_outlier_inputs(2, seed=1)
    stats = collect_activation_stats({"conv": model.conv}, lambda: model(x), sample_rows=10_000)
    layer = diffquant.nn.wrap_layer(model.conv, W4A4["weight"], W4A4["input"])
    problem = layer_problem("conv", layer, stats)
    assert problem.x.shape == (stats["conv"].sample.seen, layer.taps * CHANNELS)
    factors = group_factors([problem], stats["conv"].overall.absmax, 0.5, 0.5)
    fit = fit_low_rank(problem, factors, SplitSettings(8, torch.float16, randomized=False), iterations=3)
    layer.fold_input_scale(factors)
    layer.split_low_rank(fit.best.down, fit.best.up)
    layer.calibrate_weight()
    with torch.no_grad():
        actual = float((reference(x) - layer(x)).double().pow(2).sum())
    assert fit.best.error == pytest.approx(actual, rel=1e-4)


def test_gptq_on_a_convolution_keeps_its_codes_and_helps_on_held_out_inputs():
    """GPTQ on the Hessian of the smoothed patch rows (1024 rows for K = 576 inputs)."""
    x = correlated_conv_inputs(16, seed=1)
    plain = quantized_conv(SVDQuant(rank=8, sample_rows=128), x=x)
    gptq = quantized_conv(SVDQuant(rank=8, sample_rows=128, gptq=True), x=x)
    assert torch.equal(plain.conv.smooth, gptq.conv.smooth)
    assert all(torch.equal(a, b) for a, b in zip(plain.conv.low_rank, gptq.conv.low_rank, strict=True))
    layer = gptq.conv
    assert torch.equal(layer.effective_weight(), layer.weight)  # GPTQ's grid values, kept as they are
    x = correlated_conv_inputs(4, seed=2)
    with torch.no_grad():
        reference = OneConv()(x)
        plain_db, gptq_db = sqnr_db(reference, plain(x)), sqnr_db(reference, gptq(x))
    assert gptq_db >= plain_db + 0.5, (plain_db, gptq_db)


@pytest.mark.parametrize("preset", ["svdquant-w4a4", "svdquant-nvfp4"])
def test_a_frozen_svdquant_conv_keeps_its_branch(preset):
    """Integer (INT4) and emulated (NVFP4) packed convs add the branch as the fake-quant layer does."""
    formats = get_preset(preset)
    recipe = Recipe(name="t", stages=(SVDQuant(rank=8, grid_step=0.25, iterations=2),), overrides=INCLUDE_ALL,
                    weight=formats.weight, input=formats.input)
    x = conv_outlier_inputs(8, seed=1)
    model = diffquant.quantize(OneConv(), recipe, calibration=lambda m: m(x), progress=False)
    x = conv_outlier_inputs(2, seed=3)
    with torch.no_grad():
        want = model(x)
        frozen = freeze(copy.deepcopy(model), float_dtype=torch.float32)
        packed = packed_layers(frozen)["conv"]
        assert packed.low_rank_down is not None and packed.low_rank_down.dtype == torch.float16
        torch.testing.assert_close(frozen(x), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


class ConvThenDepthwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1)
        self.depthwise = nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1, groups=CHANNELS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.depthwise(self.conv(x))


def test_grouped_convolutions_are_left_to_plain_rounding_with_a_logged_reason(caplog):
    stage = SVDQuant(rank=8, grid_step=0.25, iterations=2)
    with caplog.at_level(logging.INFO, logger="diffquant.svdquant"):
        model = quantized_conv(stage, model=ConvThenDepthwise())
    assert model.conv.low_rank is not None
    assert model.depthwise.low_rank is None and model.depthwise.smooth is None
    assert "1 layers left to plain rounding, grouped convolution" in caplog.text and "depthwise" in caplog.text


# -- convolutions in a tiny UNet ---------------------------------------------------------------------

UNET = TINY_MODELS["unet2d"]


def unet_output(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return UNET.run(model, UNET.inputs(2))


def quantized_unet(recipe: Recipe | str) -> nn.Module:
    return diffquant.quantize(UNET.build(), recipe, calibration=lambda m: UNET.run(m, UNET.inputs(2)), progress=False)


def cheap_svdquant_stage(**options) -> Recipe:
    preset = get_preset("svdquant-w4a4")
    return dataclasses.replace(preset, stages=(SVDQuant(rank=8, grid_step=0.25, iterations=3, sample_rows=64,
                                                        **options),))


@pytest.fixture(scope="module")
def svdquant_unet():
    return quantized_unet(cheap_svdquant_stage())


def unet_convs(model: nn.Module) -> dict[str, QConv2d]:
    return {n: layer for n, layer in quantized_layers(model).items() if isinstance(layer, QConv2d)}


def test_svdquant_fits_a_unet_s_convolutions_and_beats_linear_only_and_rtn(svdquant_unet):
    convs = unet_convs(svdquant_unet)
    assert convs and all(layer.low_rank is not None and layer.smooth is not None for layer in convs.values())
    reference = unet_output(UNET.build())
    svd = sqnr_db(reference, unet_output(svdquant_unet))
    linear_only = sqnr_db(reference, unet_output(quantized_unet(cheap_svdquant_stage(convs=False))))
    rtn = sqnr_db(reference, unet_output(quantized_unet("w4a4")))
    assert svd >= linear_only + 1.0 and svd >= rtn + 1.0, (rtn, linear_only, svd)  # ~8 dB W4A4 on random weights


def test_unet_conv_branches_save_reload_freeze_and_thaw(svdquant_unet, tmp_path):
    expected = unet_output(svdquant_unet)
    convs = unet_convs(svdquant_unet)
    folder = save_quantized(svdquant_unet, tmp_path / "q")
    manifest = json.loads((folder / MANIFEST).read_text())
    assert all(manifest["layers"][n]["low_rank"] == {"rank": 8, "dtype": "float16"} for n in convs)
    loaded = load_quantized(folder)
    assert torch.equal(unet_output(loaded), expected)  # bitwise
    frozen = freeze(copy.deepcopy(svdquant_unet), float_dtype=torch.float32)
    packed = packed_layers(frozen)
    assert all(packed[n].low_rank_down is not None and packed[n].low_rank_down.dtype == torch.float16 for n in convs)
    inputs = conv_inputs(svdquant_unet, convs)
    with torch.no_grad():
        for name, layer in convs.items():  # on the same input, the packed conv is the fake-quant one
            want = layer(inputs[name])
            torch.testing.assert_close(packed[name](inputs[name]), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    # end to end, float-rounding differences (~1e-7) flip a few 4-bit input codes downstream (a flip moves
    # a smoothed conv's output by ~0.5%), so the whole UNet agrees less tightly than each layer
    assert cosine(unet_output(frozen), expected) >= 0.999
    assert (save_frozen(frozen, tmp_path / "frozen") / TENSORS).read_bytes() == (folder / TENSORS).read_bytes()


def conv_inputs(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Each layer's input in one run of the tiny UNet (its first call)."""
    seen: dict[str, torch.Tensor] = {}
    handles = [layer.register_forward_pre_hook(lambda _m, args, n=name: seen.setdefault(n, args[0].detach()))
               for name, layer in layers.items()]
    try:
        unet_output(model)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def test_the_dit_plan_has_no_convolution_so_its_results_do_not_change(svdquant_dit):
    """The DiT's only conv (the patch embedding) stays in full precision by default: `convs` changes nothing."""
    assert not unet_convs(svdquant_dit)
