"""Frozen (packed) layers and models: equal to the fake-quant ones up to float rounding, compact, saveable.

Model-level comparisons of the tiny UNets with 8-bit activation codes use a looser bound: there the
fake-quant model itself is that sensitive to float rounding (input x (1 + 1e-7 noise) moves its own
output to cosine 0.99984-0.99990, max rel error 1.5e-2-3e-2: a 1e-7 difference flips a code that sits
on a rounding tie, and the random tiny UNet amplifies one 8-bit step). Every layer is additionally
compared on identical inputs (teacher-forced), where only float rounding may differ.
"""

from __future__ import annotations

import copy
import gc
import weakref
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import diffquant
from diffquant.api import quantized_layers
from diffquant.calib.stats import LayerStats
from diffquant.calib.steps import StepContextError, sampling_step
from diffquant.checkpoint import TENSORS, load_quantized, save_quantized
from diffquant.formats import QuantSpec
from diffquant.freeze import freeze, packed_layers, process_rss_bytes, resident_bytes, save_frozen, thawed
from diffquant.kernels import active_backend, detect_cpu, fastest_float_dtype
from diffquant.nn import wrap_layer
from diffquant.nn.packed import PATHS, PackedLinear
from diffquant.nn.packed_conv import PackedConv2d
from diffquant.recipes import Recipe
from tests.layer_outputs import layer_io, worst_layer_rel
from tests.tiny_models import TINY_MODELS

W8 = QuantSpec("int8", "channel", scale_dtype="float16")
STEP_STATIC = Recipe(name="w8a8-static-step", weight=W8,
                     input=QuantSpec("int8", "tensor", symmetric=False, per_step=True))
RECIPES = {name: name for name in ("w8a8", "w4a8", "w4a4", "w4a16", "w8a8-static", "smoothquant-w8a8")}
RECIPES["w8a8-static-step"] = STEP_STATIC
STEPS = 3
LAYER_MAX_REL = 2e-5  # teacher-forced: only the order of float rounding differs
MODEL_COSINE, MODEL_MAX_REL = 0.9999, 1e-3
TIE_SENSITIVE_COSINE = 0.999  # tiny UNets with 8-bit activations (module docstring)


pytestmark = pytest.mark.usefixtures("single_thread")


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float(a @ b / (a.norm() * b.norm()))


def max_rel(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max())


def step_inputs(tiny, step: int) -> dict:
    """The tiny model's inputs with the latent scaled per step, so per-step ranges differ."""
    inputs = tiny.inputs(2)
    key = "sample" if "sample" in inputs else "hidden_states"
    return {**inputs, key: inputs[key] * (1 + step)}


def calibration_for(tiny):
    def run(model):
        for step in range(STEPS):
            with sampling_step(step):
                tiny.run(model, step_inputs(tiny, step))

    return run


def quantized(family: str, recipe) -> nn.Module:
    tiny = TINY_MODELS[family]
    return diffquant.quantize(tiny.build(), recipe, calibration=calibration_for(tiny), progress=False)


@dataclass
class Comparison:
    cosine: float
    max_rel: float
    worst_layer_rel: float


def frozen_vs_fake_quant(family: str, recipe, backend=None, step: int = 1) -> Comparison:
    tiny, model = TINY_MODELS[family], quantized(family, recipe)
    inputs = step_inputs(tiny, step)
    with torch.no_grad(), sampling_step(step):
        expected, captured = layer_io(model, quantized_layers(model), lambda: tiny.run(model, inputs))
        freeze(model, backend=backend, float_dtype=torch.float32)
        got = tiny.run(model, inputs)
        worst = worst_layer_rel(model, captured)
    return Comparison(cosine(got, expected), max_rel(got, expected), worst)


# -- whole models ------------------------------------------------------------------------------------

MODEL_CASES = [("dit", r) for r in RECIPES] + [("unet2d", r) for r in RECIPES] + [
    ("flux", "w4a4"), ("sana", "w4a8"), ("sd3", "w8a8-static-step"), ("unet2d-condition", "smoothquant-w8a8")]


@pytest.mark.parametrize(("family", "recipe"), MODEL_CASES, ids=[f"{f}-{r}" for f, r in MODEL_CASES])
def test_frozen_model_matches_fake_quant(family, recipe):
    result = frozen_vs_fake_quant(family, RECIPES.get(recipe, recipe))
    assert result.worst_layer_rel <= LAYER_MAX_REL
    tie_sensitive = family.startswith("unet") and recipe not in ("w4a4", "w4a16")
    assert result.cosine >= (TIE_SENSITIVE_COSINE if tie_sensitive else MODEL_COSINE)
    if not tie_sensitive:
        assert result.max_rel <= MODEL_MAX_REL


@pytest.mark.parametrize("backend", ["fbgemm", "float"])
@pytest.mark.parametrize(("family", "recipe"), [("dit", "w8a8-static"), ("unet2d", "w4a4")],
                         ids=["dit-w8a8-static", "unet2d-w4a4"])
def test_every_backend_freezes_the_same_model(family, recipe, backend):
    if not diffquant.kernels.get_backend(backend).available(detect_cpu()):
        pytest.skip(f"{backend} is not available on this CPU")
    result = frozen_vs_fake_quant(family, recipe, backend=backend)
    assert result.worst_layer_rel <= LAYER_MAX_REL and result.cosine >= MODEL_COSINE


def test_per_step_scales_follow_the_sampling_step():
    tiny, model = TINY_MODELS["dit"], quantized("dit", STEP_STATIC)
    with torch.no_grad():
        expected = {}
        for step in (0, 2):
            with sampling_step(step):
                expected[step] = tiny.run(model, step_inputs(tiny, 2))
        freeze(model, float_dtype=torch.float32)
        for step in (0, 2):
            with sampling_step(step):
                assert cosine(tiny.run(model, step_inputs(tiny, 2)), expected[step]) >= MODEL_COSINE
        assert max_rel(expected[0], expected[2]) > 1e-3  # the steps really use different ranges
        with pytest.raises(StepContextError):
            tiny.run(model, tiny.inputs(2))


@pytest.mark.skipif(fastest_float_dtype() != torch.bfloat16, reason="bf16 is not native on this CPU")
def test_weight_only_layers_use_native_bf16_by_default():
    tiny, model = TINY_MODELS["dit"], quantized("dit", "w4a16")
    with torch.no_grad():
        expected = tiny.run(model, tiny.inputs(2))
        freeze(model)
        assert {m.float_dtype for m in packed_layers(model).values()} == {torch.bfloat16}
        assert cosine(tiny.run(model, tiny.inputs(2)), expected) >= 0.999


# -- single layers -----------------------------------------------------------------------------------

INPUT_SPECS = {
    "a8-token": QuantSpec("int8", "token", dynamic=True),
    "a4-group8": QuantSpec("int4", "group", group_size=8, dynamic=True),
    "a8-uint-asym-token": QuantSpec("uint8", "token", dynamic=True, symmetric=False),
    "a8-static-asym-tensor": QuantSpec("int8", "tensor", symmetric=False),
    "a8-static-channel": QuantSpec("int8", "channel"),
    "weight-only": None,
}
WEIGHT_SPECS = {
    "w8-channel": W8,
    "w4-group8": QuantSpec("int4", "group", group_size=8, scale_dtype="float16"),
    "w8-uint-asym": QuantSpec("uint8", "channel", symmetric=False),
    "w3-tensor": QuantSpec("int3", "tensor"),
    # FP4 grids are integers times a power of two (nn/packed_weight.py: CodeLevels): the same integer paths
    "fp4-e2m1-channel": QuantSpec("fp4_e2m1", "channel", scale_dtype="float16"),
    "fp4-e3m0-group4": QuantSpec("fp4_e3m0", "group", group_size=4),
    "mxfp4": QuantSpec.for_format("mxfp4"),
}
LAYERS = {
    "linear-ragged": lambda: nn.Linear(20, 6),
    "conv3x3-stride2": lambda: nn.Conv2d(12, 5, 3, stride=2, padding=1),
    "conv1x1": lambda: nn.Conv2d(12, 5, 1),
    "conv-grouped": lambda: nn.Conv2d(12, 6, 3, padding=1, groups=3),
    "conv-same-padding": lambda: nn.Conv2d(12, 5, 3, padding="same"),
}
FLOAT_ONLY_LAYERS = ("conv-grouped", "conv-same-padding")


def calibrated_layer(make, weight_spec, input_spec, x):
    torch.manual_seed(0)
    module = make()
    layer = wrap_layer(module, weight_spec, input_spec)
    if input_spec is not None and not input_spec.dynamic:
        stats = LayerStats()
        stats.observe(x.movedim(1, -1).reshape(-1, x.shape[1]) if x.dim() == 4 else x.reshape(-1, x.shape[-1]), None)
        layer.input_quantizer.calibrate(stats)
    if isinstance(module, nn.Linear) or module.groups == 1:
        layer.fold_input_scale(torch.rand(x.shape[1] if x.dim() == 4 else x.shape[-1]) + 0.5)
    layer.calibrate_weight()
    return layer


def layer_input(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 7, 20, generator=g) if name.startswith("linear") else torch.randn(2, 12, 7, 6, generator=g)


@pytest.mark.parametrize("input_name", INPUT_SPECS)
@pytest.mark.parametrize("weight_name", WEIGHT_SPECS)
@pytest.mark.parametrize("layer_name", LAYERS)
def test_packed_layer_equals_fake_quant_layer(layer_name, weight_name, input_name):
    x = layer_input(layer_name)
    layer = calibrated_layer(LAYERS[layer_name], WEIGHT_SPECS[weight_name], INPUT_SPECS[input_name], x)
    packed_type = PackedLinear if layer_name.startswith("linear") else PackedConv2d
    with torch.no_grad():
        expected = layer(x)
        packed = packed_type.from_layer(layer, float_dtype=torch.float32)
        got = packed(x)
    integer = (INPUT_SPECS[input_name] is not None and input_name != "a8-static-channel"
               and layer_name not in FLOAT_ONLY_LAYERS)
    assert packed.path == ("int" if integer else "float")
    assert packed.kernel is PATHS[packed.path] and packed.kernel.integer == integer
    assert (packed.weight.backend is not None) == integer  # a float-path weight is never prepared for a GEMM
    assert got.shape == expected.shape
    assert max_rel(got, expected) <= LAYER_MAX_REL


def test_low_rank_branch_adds_smoothed_input_times_factors():
    x = layer_input("linear")
    layer = calibrated_layer(LAYERS["linear-ragged"], WEIGHT_SPECS["w4-group8"], INPUT_SPECS["a8-token"], x)
    g = torch.Generator().manual_seed(3)
    down, up = torch.randn(20, 4, generator=g), torch.randn(4, 6, generator=g)
    plain = PackedLinear.from_layer(layer, float_dtype=torch.float32)
    with_branch = PackedLinear.from_layer(layer, float_dtype=torch.float32, low_rank=(down, up))
    with torch.no_grad():
        branch = (x / layer.smooth) @ down @ up
        torch.testing.assert_close(with_branch(x) - plain(x), branch, rtol=1e-5, atol=1e-5)
    assert "low_rank=4" in repr(with_branch)
    with pytest.raises(ValueError, match="do not fit"):
        PackedLinear.from_layer(layer, low_rank=(down, up.t()))


def test_packed_weight_answers_like_a_float_weight():
    layer = calibrated_layer(LAYERS["linear-ragged"], W8, None, layer_input("linear"))
    packed = PackedLinear.from_layer(layer)
    assert packed.weight.shape == (6, 20) and packed.weight.dtype == torch.float32
    assert packed.weight.device.type == "cpu" and list(packed.parameters()) == []


# -- memory ------------------------------------------------------------------------------------------

RESIDENT_LIMITS = {"w8a8": 0.27, "w4a8": 0.14, "w4a4": 0.14, "w4a16": 0.14}


@pytest.mark.parametrize("recipe", RESIDENT_LIMITS)
def test_resident_weight_bytes_are_compact(recipe):
    model = freeze(quantized("dit", recipe))
    layers = packed_layers(model).values()
    fp32 = sum(m.weight.shape.numel() * 4 for m in layers)
    packed = sum(m.weight.resident_bytes() for m in layers)
    backend = active_backend()
    if backend.prepare_free or backend.fused is not None:  # compact codes (own layout or the fused kernels')
        assert packed / fp32 <= RESIDENT_LIMITS[recipe]
    else:  # fbgemm keeps its own int8 copy (nn/packed.py): 0.25 of fp32, plus per-group scales and its
        # offsets, ~0.024 at group 64 (w4a4) on these 64-wide layers
        assert packed / fp32 <= 0.28


def test_freezing_keeps_no_float_weight_alive():
    model = quantized("dit", "w8a8")
    layers = quantized_layers(model)
    weights = [weakref.ref(layer.weight) for layer in layers.values()]
    quantized_numel = sum(layer.weight.numel() for layer in layers.values())
    before = sum(p.numel() for p in model.parameters())
    fp_bytes = resident_bytes(model)
    del layers
    freeze(model)
    gc.collect()
    assert all(ref() is None for ref in weights)
    assert sum(p.numel() for p in model.parameters()) == before - quantized_numel - sum(
        m.bias.numel() for m in packed_layers(model).values() if m.bias is not None)
    assert fp_bytes - resident_bytes(model) >= 0.7 * 4 * quantized_numel  # W8: ~0.26x of fp32 remains
    assert process_rss_bytes() > 0


# -- checkpoints -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "recipe"), [("dit", "w8a8-static"), ("unet2d", "w4a4")],
                         ids=["dit-w8a8-static", "unet2d-w4a4"])
def test_load_quantized_then_freeze_and_save_again(family, recipe, tmp_path):
    """Layer by layer on the reloaded model's own inputs the frozen layers compute what it does. (The whole
    output is not compared: at 4-bit activations a last-bit difference of the float sums can flip a code
    and the flips cascade through a random tiny UNet, by a few % on some CPUs; the scoreboard's
    frozen rows measure what that does on trained models.)"""
    tiny, model = TINY_MODELS[family], quantized(family, recipe)
    first = save_quantized(model, tmp_path / "q")
    loaded = load_quantized(first)
    with torch.no_grad(), sampling_step(0):
        expected, captured = layer_io(loaded, quantized_layers(loaded), lambda: tiny.run(loaded, tiny.inputs(2)))
        assert torch.equal(expected, tiny.run(model, tiny.inputs(2)))
        frozen = freeze(loaded, float_dtype=torch.float32)
        assert worst_layer_rel(frozen, captured) <= LAYER_MAX_REL
    second = save_frozen(frozen, tmp_path / "again")
    assert (second / TENSORS).read_bytes() == (first / TENSORS).read_bytes()
    assert packed_layers(frozen)  # still frozen after saving
    with torch.no_grad(), sampling_step(0):
        assert torch.equal(tiny.run(load_quantized(second), tiny.inputs(2)), expected)


def test_low_rank_branches_are_saved_and_reloaded(tmp_path):
    tiny, model = TINY_MODELS["dit"], freeze(quantized("dit", "w8a8"), float_dtype=torch.float32)
    name, packed = next(iter(packed_layers(model).items()))
    g = torch.Generator().manual_seed(0)
    branch = (torch.randn(packed.in_features, 2, generator=g), torch.randn(2, packed.out_features, generator=g))
    layer = copy.deepcopy(packed).to_quantized_layer()
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, PackedLinear.from_layer(layer, low_rank=branch, float_dtype=torch.float32))
    with thawed(model):
        assert torch.equal(model.get_submodule(name).low_rank_down, branch[0])  # float32: not 16-bit values
    with torch.no_grad(), sampling_step(0):
        expected = tiny.run(model, tiny.inputs(2))
        reloaded = load_quantized(save_frozen(model, tmp_path / "q"))
        assert torch.equal(reloaded.get_submodule(name).low_rank_up, branch[1])
        got = tiny.run(freeze(reloaded, float_dtype=torch.float32), tiny.inputs(2))
    assert torch.equal(got, expected)
