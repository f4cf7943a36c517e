"""NVFP4 and OCP MX models end to end: fake quantization, checkpoints (fp4 nibbles + E4M3 scale bytes;
MX codes + E8M0 scale bytes; reloaded bitwise), and frozen layers on the emulated path (nn/emulated.py; MXFP4 weights
are packed for the integer GEMM instead: tests/nn/test_packed_levels.py)
against the fake-quant model."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open

import diffquant
from diffquant.checkpoint import TENSORS, load_quantized, save_quantized
from diffquant.formats import QuantSpec, sqnr_db
from diffquant.freeze import freeze, packed_layers, save_frozen
from diffquant.nn import wrap_layer
from diffquant.nn.emulated import (
    EMULATED,
    EMULATED_PATH,
    EmulatedPackedConv2d,
    EmulatedPackedLinear,
    needs_emulation,
    packed_type,
)
from diffquant.nn.packed import PATHS, PackedLinear
from diffquant.recipes import Recipe
from tests.tiny_models import TINY_MODELS

pytestmark = pytest.mark.usefixtures("single_thread")

NVFP4 = "nvfp4-w4a4"
FAMILIES = ["dit", "unet2d"]  # Linear layers, and Conv2d ones
LAYER_MAX_REL = 2e-5  # float32 product: only the order of float rounding differs
# OCP MX formats, W and A alike (dynamic inputs), and the bits each stores per weight: codes (fp4 two
# per byte; fp6 and fp8 one per byte, tensors/packing.py) plus one E8M0 byte per block of 32
MX_BITS = {"mxfp4": 4 + 8 / 32, "mxfp6_e2m3": 8 + 8 / 32, "mxfp6_e3m2": 8 + 8 / 32, "mxfp8_e4m3": 8 + 8 / 32,
           "mxfp8_e5m2": 8 + 8 / 32}


def mx_recipe(name: str) -> Recipe:
    return Recipe(name=f"{name}-w-a", weight=QuantSpec.for_format(name), input=QuantSpec.for_format(name, dynamic=True))


def quantized(family: str, recipe=NVFP4):
    tiny = TINY_MODELS[family]
    return diffquant.quantize(tiny.build(), recipe, progress=False)


def run(family: str, model) -> torch.Tensor:
    tiny = TINY_MODELS[family]
    with torch.no_grad():
        return tiny.run(model, tiny.inputs(2))


def max_rel(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("family", FAMILIES)
def test_nvfp4_model_saves_and_reloads_bitwise(family, tmp_path):
    model = quantized(family)
    expected = run(family, model)
    folder = save_quantized(model, tmp_path / "q")
    loaded = load_quantized(folder)
    layers = diffquant.quantized_layers(loaded)
    assert all(layer.weight is None and layer.weight_codes.dtype == torch.uint8 for layer in layers.values())
    assert torch.equal(run(family, loaded), expected)
    for name, layer in diffquant.quantized_layers(model).items():  # qparams come back bitwise
        reloaded = layers[name].weight_quantizer
        assert torch.equal(reloaded.scale, layer.weight_quantizer.scale)
        assert torch.equal(reloaded.global_scale, layer.weight_quantizer.global_scale)


def test_nvfp4_checkpoint_stores_nibbles_and_e4m3_scale_bytes(tmp_path):
    """4.5 bits per weight: two E2M1 codes per byte, one E4M3 byte per 16 weights, one float32 per tensor."""
    model = quantized("dit")
    folder = save_quantized(model, tmp_path / "q")
    stored = full = 0
    with safe_open(folder / TENSORS, framework="pt") as f:
        for name, layer in diffquant.quantized_layers(model).items():
            codes, scale = f.get_tensor(f"{name}.weight_codes"), f.get_tensor(f"{name}.weight_quantizer.scale")
            global_scale = f.get_tensor(f"{name}.weight_quantizer.global_scale")
            out, k = layer.weight_matrix(layer.weight).shape
            assert codes.dtype == torch.uint8 and tuple(codes.shape) == (out, math.ceil(k / 2))
            assert scale.dtype == torch.uint8 and scale.numel() == out * math.ceil(k / 16)
            assert global_scale.dtype == torch.float32 and global_scale.shape == (1,)
            stored += codes.numel() + scale.numel()
            full += 2 * out * k
    assert stored / full == pytest.approx(4.5 / 16)


@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_nvfp4_model_is_emulated_and_matches_fake_quant(family):
    model = quantized(family)
    expected = run(family, model)
    freeze(model, float_dtype=torch.float32)
    packed = packed_layers(model)
    assert packed and all(type(m) in (EmulatedPackedLinear, EmulatedPackedConv2d) for m in packed.values())
    assert all(m.path == EMULATED and "emulated" in repr(m) for m in packed.values())
    assert all(m.kernel is EMULATED_PATH and m.kernel.product is PATHS["float"].product for m in packed.values())
    assert max_rel(run(family, model), expected) <= 1e-4
    frozen_bytes = sum(m.weight.resident_bytes() for m in packed.values())
    weights = sum(math.prod(m.weight.shape) for m in packed.values())
    assert frozen_bytes * 8 / weights < 4.6  # codes, E4M3 scales and global scales stay packed


def test_emulated_layers_match_the_fake_quant_layers_on_the_same_input():
    torch.manual_seed(0)
    x_linear, x_conv = torch.randn(3, 5, 40), torch.randn(2, 24, 6, 6)
    for module, x in ((torch.nn.Linear(40, 12), x_linear), (torch.nn.Conv2d(24, 8, 3, padding=1), x_conv)):
        layer = wrap_layer(module, QuantSpec.for_format("nvfp4"), QuantSpec.for_format("nvfp4", dynamic=True))
        layer.calibrate_weight()
        with torch.no_grad():
            expected = layer(x)
            packed = freeze_one(layer)
            assert max_rel(packed(x), expected) <= LAYER_MAX_REL
            thawed = packed.to_quantized_layer()
            assert torch.equal(thawed(x), expected)  # codes and qparams come back exactly


def freeze_one(layer):
    layer.store_codes()
    return packed_type(layer)(layer, float_dtype=torch.float32)


def test_frozen_nvfp4_model_saves_the_same_checkpoint(tmp_path):
    model = quantized("dit")
    expected = run("dit", model)
    freeze(model)
    loaded = load_quantized(save_frozen(model, tmp_path / "q"))
    assert torch.equal(run("dit", loaded), expected)


def test_default_float_dtype_stays_close():
    model = quantized("dit")
    expected = run("dit", model)
    freeze(model)
    assert sqnr_db(expected, run("dit", model)) > 30


def test_int_weights_with_e4m3_scales_are_emulated_too(tmp_path):
    """The integer GEMM's packed weight holds one scale per group: two-level scales go the emulated way."""
    recipe = Recipe(name="int4-e4m3", weight=QuantSpec("int4", "group", 16, scale_dtype="e4m3"),
                    input=QuantSpec("int8", "token", dynamic=True))
    assert needs_emulation(recipe.weight) and not needs_emulation(QuantSpec("int4", "group", 16))
    model = quantized("dit", recipe)
    expected = run("dit", model)
    freeze(model, float_dtype=torch.float32)
    assert all(m.path == EMULATED for m in packed_layers(model).values())
    assert max_rel(run("dit", model), expected) <= 1e-4
    assert torch.equal(run("dit", load_quantized(save_frozen(model, tmp_path / "q"))), expected)


def test_int_weights_with_nvfp4_inputs_keep_the_integer_packing():
    recipe = Recipe(name="w4-nvfp4-inputs", weight=QuantSpec("int4", "group", 16, scale_dtype="float16"),
                    input=QuantSpec.for_format("nvfp4", dynamic=True))
    model = quantized("dit", recipe)
    expected = run("dit", model)
    freeze(model, float_dtype=torch.float32)
    packed = packed_layers(model).values()
    assert all(type(m) is PackedLinear and m.path == "float" for m in packed)  # fp4 inputs: float product
    assert max_rel(run("dit", model), expected) <= 1e-4


# -- OCP MX ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list(MX_BITS))
def test_mx_model_saves_and_reloads_bitwise(name, family, tmp_path):
    model = quantized(family, mx_recipe(name))
    expected = run(family, model)
    loaded = load_quantized(save_quantized(model, tmp_path / "q"))
    layers = diffquant.quantized_layers(loaded)
    assert all(layer.weight is None and layer.weight_codes.dtype == torch.uint8 for layer in layers.values())
    assert torch.equal(run(family, loaded), expected)
    for layer_name, layer in diffquant.quantized_layers(model).items():  # codes and qparams come back bitwise
        reloaded = layers[layer_name]
        assert torch.equal(reloaded.weight_codes, layer.weight_quantizer.codes(layer.weight_matrix(layer.weight)))
        assert torch.equal(reloaded.weight_quantizer.scale, layer.weight_quantizer.scale)
        assert reloaded.weight_quantizer.global_scale is None


@pytest.mark.parametrize("name", list(MX_BITS))
def test_mx_checkpoint_stores_codes_and_e8m0_scale_bytes(name, tmp_path):
    model = quantized("dit", mx_recipe(name))
    folder = save_quantized(model, tmp_path / "q")
    stored = full = 0
    with safe_open(folder / TENSORS, framework="pt") as f:
        keys = f.keys()
        assert not any(key.endswith("global_scale") for key in keys)  # one-level scales
        for layer_name, layer in diffquant.quantized_layers(model).items():
            codes, scale = f.get_tensor(f"{layer_name}.weight_codes"), f.get_tensor(f"{layer_name}.weight_quantizer.scale")
            out, k = layer.weight_matrix(layer.weight).shape
            per_byte = 2 if name == "mxfp4" else 1
            assert codes.dtype == torch.uint8 and tuple(codes.shape) == (out, math.ceil(k / per_byte))
            assert scale.dtype == torch.uint8 and scale.numel() == out * math.ceil(k / 32)
            assert torch.equal(torch.pow(2.0, scale.double() - 127).float(), layer.weight_quantizer.scale)
            stored += codes.numel() + scale.numel()
            full += 2 * out * k
    assert stored / full == pytest.approx(MX_BITS[name] / 16)


@pytest.mark.parametrize("family", FAMILIES)
def test_frozen_mxfp4_model_takes_the_float_path_and_matches_fake_quant(family, tmp_path):
    # MXFP4 weights are integers times powers of two (tests/nn/test_packed_levels.py): a PackedWeight, not
    # emulated; with MXFP4 inputs (no integer codes) the product is the float path's
    model = quantized(family, mx_recipe("mxfp4"))
    expected = run(family, model)
    freeze(model, float_dtype=torch.float32)
    packed = packed_layers(model)
    assert packed and all(m.path == "float" and "int8 levels" in repr(m.weight) for m in packed.values())
    assert max_rel(run(family, model), expected) <= 1e-4
    frozen_bytes = sum(m.weight.resident_bytes() for m in packed.values())
    weights = sum(math.prod(m.weight.shape) for m in packed.values())
    assert frozen_bytes * 8 / weights < 4.3  # codes and E8M0 scales stay packed
    assert torch.equal(run(family, load_quantized(save_frozen(model, tmp_path / "q"))), expected)
