"""Format search (METHODS.md §9): on one Linear layer it picks the exponent/mantissa split the data
favours (more exponent bits for heavy-tailed weights or inputs) and is at least as good as each fixed
split it tried; on the tiny DiT and UNet an FP4-weight / FP8-activation model gets closer to full
precision than with the fixed E2M1 / E4M3 split; the chosen formats and clipping are saved, reloaded
bitwise and shown by `diffquant info`; bad fields are RecipeErrors naming the field."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import diffquant
from diffquant.algorithms.format_search import FormatSearch, candidate_specs
from diffquant.api import CalibrationRequiredError, gather_stats, quantized_layers
from diffquant.calib import sampling_step
from diffquant.checkpoint import load_quantized, save_quantized
from diffquant.formats import QuantSpec
from diffquant.formats.ops import sqnr_db
from diffquant.info import checkpoint_info, format_info
from diffquant.job import quantization_state
from diffquant.plan import plan_layers
from diffquant.recipes import Recipe, RecipeError
from diffquant.recipes.config import Override, stage_from_dict
from tests.tiny_models import TINY_MODELS

pytestmark = pytest.mark.usefixtures("single_thread")

FP4_SPLITS = ("fp4_e2m1", "fp4_e1m2", "fp4_e3m0")
W4A8 = dict(weight=QuantSpec("fp4_e2m1", "channel"), input=QuantSpec("fp8_e4m3", "tensor", per_step=True))


def recipe(*stages, include_all: bool = False, **specs) -> Recipe:
    """A preset-free recipe: the given specs (default FP4 weights / FP8 per-step inputs) and stages;
    include_all: quantize every role (the one-layer model's only layer is its "head", kept in FP by default)."""
    overrides = (Override("role:*", include=True),) if include_all else ()
    return Recipe(name="test-format-search", stages=tuple(stages), overrides=overrides, **{**W4A8, **specs})


# -- one Linear layer ------------------------------------------------------------------------------


class OneLayer(nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.proj = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.proj.weight.copy_(weight)
            self.proj.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def sample(kind: str, *shape: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(*shape) if kind == "gaussian" else torch.distributions.StudentT(2.0).sample(shape)


def output_mse(weight: torch.Tensor, x: torch.Tensor, r: Recipe) -> tuple[float, nn.Module]:
    model = diffquant.quantize(OneLayer(weight), r, calibration=lambda m: m(x), progress=False)
    with torch.no_grad():
        return float((model(x) - OneLayer(weight)(x)).double().square().mean()), model


def test_weight_search_gives_heavy_tailed_weights_more_exponent_bits_and_beats_every_fixed_split():
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(1))
    chosen = {}
    for kind in ("gaussian", "student-t"):
        weight = sample(kind, 32, 64, seed=0)
        fixed = {f: output_mse(weight, x, recipe(weight=QuantSpec(f, "channel"), input=None, include_all=True))[0] for f in FP4_SPLITS}
        searched, model = output_mse(weight, x, recipe(FormatSearch(rows=512), input=None, include_all=True))
        chosen[kind] = model.proj.weight_quantizer.spec.format
        # every row scored (rows >= the calibration's): the search's objective is this MSE
        assert searched <= min(fixed.values()) * (1 + 1e-6), (kind, searched, fixed)
    # Student-t (2 degrees of freedom) wants the widest range: E3M0 (fixed E3M0 halves E2M1's error)
    assert chosen == {"gaussian": chosen["gaussian"], "student-t": "fp4_e3m0"} and chosen["gaussian"] != "fp4_e3m0"


def test_heavy_tailed_inputs_get_more_exponent_bits_and_the_search_beats_every_fixed_split():
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    chosen = {}
    for kind in ("gaussian", "student-t"):
        x = sample(kind, 512, 64, seed=1)
        fixed = {f: output_mse(weight, x, recipe(weight=None, input=QuantSpec(f, "tensor"), include_all=True))[0] for f in FP4_SPLITS}
        searched, model = output_mse(weight, x, recipe(FormatSearch(rows=512), weight=None, include_all=True,
                                                       input=QuantSpec("fp4_e2m1", "tensor")))
        chosen[kind] = model.proj.input_quantizer.spec.qformat.exponent_bits
        assert searched <= min(fixed.values()) * (1 + 1e-6), (kind, searched, fixed)
    assert chosen["student-t"] > chosen["gaussian"], chosen


def test_candidates_come_from_the_bit_width_and_the_registry():
    def names(spec, include_int=False):
        return [s.format for s in candidate_specs(spec, include_int)]

    assert names(QuantSpec("fp4_e2m1", "channel")) == ["fp4_e2m1", "fp4_e1m2", "fp4_e3m0"]
    assert names(QuantSpec("fp8_e4m3", "tensor")) == ["fp8_e4m3", *(f"fp8_e{e}m{7 - e}" for e in (1, 2, 3, 5, 6, 7))]
    assert names(QuantSpec("fp6_e2m3", "channel"), include_int=True)[-1] == "int6"
    assert names(QuantSpec("int4", "channel", symmetric=False)) == ["fp4_e1m2", "fp4_e2m1", "fp4_e3m0"]
    nvfp4 = candidate_specs(QuantSpec.for_format("nvfp4"), False)  # the block layout stays
    assert [s.format for s in nvfp4] == ["nvfp4", "fp4_e1m2", "fp4_e3m0"]
    assert {(s.granularity, s.group_size, s.scale_dtype) for s in nvfp4} == {("group", 16, "e4m3")}


def test_named_candidates_replace_the_automatic_list():
    fp8 = QuantSpec("fp8_e4m3", "tensor", split_shortcut=True)
    assert [s.format for s in candidate_specs(fp8, False, ("int8",))] == ["int8"]
    int8 = candidate_specs(fp8, False, ("int8", "fp8_e5m2"))[0]
    assert int8.symmetric and int8.split_shortcut  # the spec's layout, symmetric like the FP spec
    asym = QuantSpec("int8", "tensor", symmetric=False)
    assert candidate_specs(asym, False, ("int8",)) == [asym]  # the spec itself: its zero point kept
    w = QuantSpec("fp4_e1m2", "channel", scale_dtype="float16")
    assert [s.format for s in candidate_specs(w, False, ("fp4_e2m1",))] == ["fp4_e2m1"]
    with pytest.raises(RecipeError, match="8 bits.*fp4_e2m1 has 4"):
        candidate_specs(QuantSpec("fp4_e2m1", "channel"), False, ("fp8_e4m3",))


@pytest.mark.parametrize(("field", "value", "match"), [
    ("input_formats", ["fp9_x"], "input_formats"), ("weight_formats", [], "weight_formats is empty"),
    ("weight_formats", "fp4_e2m1", "weight_formats")])
def test_bad_candidate_lists_are_recipe_errors(field, value, match):
    with pytest.raises(RecipeError, match=match):
        stage_from_dict({"type": "format_search", field: value})


def test_fixed_weight_format_searches_only_the_clipping():
    model = TINY_MODELS["dit"].build()
    r = recipe(FormatSearch(weight_formats=("fp4_e2m1",), input_formats=("int8",)),
               input=QuantSpec("int8", "tensor"))
    q = diffquant.quantize(model, r, calibration=runner("dit", 1), progress=False)
    layers = quantized_layers(q)
    assert {layer.weight_quantizer.spec.format for layer in layers.values()} == {"fp4_e2m1"}
    assert {layer.input_quantizer.spec.format for layer in layers.values()} == {"int8"}
    assert Recipe.from_dict(r.to_dict()) == r
    assert r.to_dict()["stages"][0]["input_formats"] == ["int8"]


# -- tiny models -------------------------------------------------------------------------------------


def runner(name: str, seed: int):
    """Two sampling steps of the tiny model on seeded inputs: a calibration function, or the outputs compared."""
    tiny = TINY_MODELS[name]

    @torch.no_grad()
    def run(model: nn.Module) -> torch.Tensor:
        outs = []
        for step in (0, 1):
            kwargs = tiny.inputs(8)
            key = "sample" if "sample" in kwargs else "hidden_states"
            kwargs[key] = torch.randn(kwargs[key].shape, generator=torch.Generator().manual_seed(100 * seed + step))
            kwargs["timestep"] = torch.full_like(kwargs["timestep"], 900 - 500 * step)
            with sampling_step(step):
                outs.append(tiny.run(model, kwargs))
        return torch.cat(outs)

    return run


def quantized_tiny(name: str, *stages) -> nn.Module:
    return diffquant.quantize(TINY_MODELS[name].build(), recipe(*stages), calibration=runner(name, 1), progress=False)


@pytest.fixture(scope="module", params=["dit", "unet2d-condition"])
def searched(request):
    return request.param, quantized_tiny(request.param, FormatSearch())


def test_search_brings_fp4_fp8_closer_to_full_precision_than_the_fixed_split(searched):
    name, model = searched
    held_out = runner(name, 2)
    reference = held_out(TINY_MODELS[name].build())
    fixed = sqnr_db(reference, held_out(quantized_tiny(name)))
    found = sqnr_db(reference, held_out(model))
    # measured: dit 28.66 -> 31.97 dB, unet2d-condition 10.60 -> 13.64 dB
    assert found >= fixed + 1.0, (fixed, found)


def test_chosen_formats_and_clipping_are_in_the_plan_the_layers_and_the_report(searched):
    _, model = searched
    state = quantization_state(model)
    report = state.stage_reports[0]
    layers = quantized_layers(model)
    assert set(report["layers"]) == set(layers)
    clipped = 0
    for name, layer in layers.items():
        choice = report["layers"][name]
        assert layer.weight_quantizer.spec == state.plan[name].weight
        assert layer.weight_quantizer.spec.format == choice["weight"] in FP4_SPLITS
        assert layer.input_quantizer.spec.format == choice["input"] and choice["input"].startswith("fp8_")
        assert len(choice["input_clip"]) == 2 == layer.input_quantizer.scale.shape[0]  # one factor per step
        w = layer.weight_matrix(layer.weight.detach())
        absmax = w.abs().amax(dim=1, keepdim=True)
        qmax = layer.weight_quantizer.spec.qformat.qmax
        # the installed per-channel scale is the chosen factor times absmax / qmax
        torch.testing.assert_close(layer.weight_quantizer.scale, choice["weight_clip"] * absmax / qmax)
        clipped += choice["weight_clip"] < 1.0
    assert clipped > 0
    assert sum(report["formats"]["weight"].values()) == len(layers)


def test_chosen_formats_survive_save_and_load_and_info_shows_them(searched, tmp_path):
    name, model = searched
    folder = save_quantized(model, tmp_path / "q")
    reloaded = load_quantized(folder)
    for path, layer in quantized_layers(reloaded).items():
        original = quantized_layers(model)[path]
        assert layer.weight_quantizer.spec == original.weight_quantizer.spec
        assert layer.input_quantizer.spec == original.input_quantizer.spec
        assert torch.equal(layer.weight_quantizer.scale, original.weight_quantizer.scale)
        assert torch.equal(layer.input_quantizer.scale, original.input_quantizer.scale)
    run = runner(name, 2)
    assert torch.equal(run(reloaded), run(model))
    assert quantization_state(reloaded).stage_reports[0]["layers"] == quantization_state(model).stage_reports[0]["layers"]
    info = checkpoint_info(folder)
    counts = quantization_state(model).stage_reports[0]["formats"]["weight"]
    shown = {}
    for row in info["roles"].values():
        for fmt, n in row["weight_formats"].items():
            shown[fmt] = shown.get(fmt, 0) + n
    assert shown == counts
    text = format_info(info)
    assert all(f"{fmt}x" in text for fmt in counts)


# -- configuration -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [
    ("clips", 0), ("clips", 1.5), ("clip_step", 0.0), ("clip_step", 0.3), ("rows", 0), ("rows", "all"),
    ("include_int", "yes"), ("weights", 1), ("seed", -1),
])
def test_a_bad_field_is_one_recipe_error_naming_it(field, value):
    with pytest.raises(RecipeError, match=field):
        stage_from_dict({"type": "format_search", field: value})
    with pytest.raises(RecipeError, match=field):
        FormatSearch(**{field: value})


def test_searching_nothing_and_statistics_instead_of_a_replay_are_refused():
    with pytest.raises(RecipeError, match="weights and inputs"):
        FormatSearch(weights=False, inputs=False)
    r = recipe(FormatSearch())
    model = TINY_MODELS["dit"].build()
    stats = gather_stats(model, plan_layers(model, r), runner("dit", 1))
    with pytest.raises(CalibrationRequiredError, match="replays"):
        diffquant.quantize(model, r, calibration=stats, progress=False)


def test_the_stage_round_trips_through_a_recipe_dict():
    r = recipe(FormatSearch(include_int=True, clips=4, clip_step=0.05, rows=64, seed=3))
    assert Recipe.from_dict(r.to_dict()) == r
