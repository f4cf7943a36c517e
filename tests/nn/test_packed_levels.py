"""FP4 weights on the integer GEMM (nn/packed_weight.py: CodeLevels): every FP4 grid is int8 integers times
one power of two, so frozen FP4 / MXFP4 weights with 8-bit integer inputs take the "int" path, equal the
fake-quant layers up to float rounding, keep their stored codes (-0 included) and E8M0 scale bytes, and
save the same checkpoint. Formats whose grid is not (FP8, FP6 E3M2) or with two-level scales (NVFP4) stay
emulated."""

from __future__ import annotations

import math

import pytest
import torch

import diffquant
from diffquant.checkpoint import load_quantized
from diffquant.formats import QuantSpec
from diffquant.formats.base import get_format
from diffquant.freeze import freeze, packed_layers, save_frozen
from diffquant.kernels import BACKENDS, detect_cpu
from diffquant.nn import wrap_layer
from diffquant.nn.emulated import EMULATED, needs_emulation
from diffquant.nn.packed import PackedLinear
from diffquant.nn.packed_weight import code_levels
from diffquant.recipes import Recipe
from tests.tiny_models import TINY_MODELS

pytestmark = pytest.mark.usefixtures("single_thread")

FP4 = ("fp4_e2m1", "fp4_e1m2", "fp4_e3m0", "mxfp4")
INT8_TOKEN = QuantSpec("int8", "token", dynamic=True)
LAYER_MAX_REL = 2e-5  # the float product's rounding order only


def usable_backends() -> list[str]:
    cpu = detect_cpu()
    return [n for n, b in BACKENDS.items() if b.device_type == "cpu" and b.available(cpu) and b.pathological(cpu) is None]


@pytest.mark.parametrize("name", [*FP4, "nvfp4"])
def test_levels_times_unit_are_the_format_values(name):
    fmt = get_format(name)
    levels = code_levels(fmt)
    codes = torch.arange(16)
    assert levels is not None and levels.table.dtype == torch.int8
    assert torch.equal(levels.table.double() * levels.unit, fmt.decode(codes).double())
    assert math.log2(levels.unit).is_integer()


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "int4", "int8"])
def test_other_formats_have_no_levels(name):
    assert code_levels(get_format(name)) is None


def test_which_weights_are_emulated():
    assert not needs_emulation(QuantSpec("fp4_e2m1", "channel"))
    assert not needs_emulation(QuantSpec.for_format("mxfp4"))
    assert needs_emulation(QuantSpec.for_format("nvfp4"))  # two-level scales
    assert needs_emulation(QuantSpec("fp8_e4m3", "channel"))


def fp4_layer(fmt: str, k: int = 64, n: int = 24) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    linear = torch.nn.Linear(k, n)
    with torch.no_grad():
        linear.weight[0, :8] = -1e-6  # rounds to -0: its code (8) must survive freezing and thawing
    spec = QuantSpec.for_format("mxfp4") if fmt == "mxfp4" else QuantSpec(fmt, "channel", scale_dtype="float16")
    layer = wrap_layer(linear, spec, INT8_TOKEN)
    layer.calibrate_weight()
    return layer, torch.randn(3, 5, k) * 2


@pytest.mark.parametrize("backend", usable_backends())
@pytest.mark.parametrize("fmt", FP4)
def test_fp4_weights_run_on_the_integer_path_of_every_backend(fmt, backend):
    layer, x = fp4_layer(fmt)
    with torch.no_grad():
        expected = layer(x)
        codes = layer.weight_quantizer.codes(layer.weight_matrix(layer.weight))
        assert bool((codes == 8).any())  # the -0 code is there to keep
        packed = PackedLinear.from_layer(layer, backend=backend, float_dtype=torch.float32)
        assert packed.path == "int" and "int8 levels" in repr(packed.weight)
        assert float((packed(x) - expected).abs().max() / expected.abs().max()) <= LAYER_MAX_REL
        thawed = packed.to_quantized_layer()
        assert torch.equal(thawed.weight_codes, codes.to(thawed.weight_codes.dtype))
        assert torch.equal(thawed(x), expected)


def test_mxfp4_stays_four_bits_with_e8m0_scale_bytes():
    layer, _ = fp4_layer("mxfp4", k=256, n=64)
    packed = PackedLinear.from_layer(layer, float_dtype=torch.float32)
    assert packed.weight.scale.dtype == torch.uint8  # one E8M0 byte per block of 32
    own = sum(t.numel() * t.element_size() for name, t in packed.weight.named_buffers() if name != "levels")
    assert own * 8 / (256 * 64) <= 4.25 + 0.05  # codes two per byte (the kernel's N padding aside)


def test_a_learned_scale_that_is_no_power_of_two_stays_float32():
    layer, x = fp4_layer("mxfp4")
    layer.weight_quantizer.scale = layer.weight_quantizer.scale * 1.1
    with torch.no_grad():
        expected = layer(x)
        packed = PackedLinear.from_layer(layer, float_dtype=torch.float32)
        assert packed.weight.scale.dtype == torch.float32
        assert float((packed(x) - expected).abs().max() / expected.abs().max()) <= LAYER_MAX_REL


FP_W4A8 = Recipe(name="fp4-int8", weight=QuantSpec("fp4_e2m1", "channel", scale_dtype="float16"), input=INT8_TOKEN)
MXFP4_A8 = Recipe(name="mxfp4-int8", weight=QuantSpec.for_format("mxfp4"), input=INT8_TOKEN)
MXFP4_A4 = Recipe(name="mxfp4-a4", weight=QuantSpec.for_format("mxfp4"),
                  input=QuantSpec.for_format("mxfp4", dynamic=True))


@pytest.mark.parametrize("recipe", [FP_W4A8, MXFP4_A8, MXFP4_A4], ids=lambda r: r.name)
@pytest.mark.parametrize("family", ["dit", "unet2d"])
def test_frozen_fp4_model_matches_fake_quant_and_saves_the_same_checkpoint(family, recipe, tmp_path):
    tiny = TINY_MODELS[family]
    model = diffquant.quantize(tiny.build(), recipe, progress=False)
    inputs = tiny.inputs(2)
    with torch.no_grad():
        expected = tiny.run(model, inputs)
        freeze(model, float_dtype=torch.float32)
        got = tiny.run(model, inputs)
    paths = {m.path for m in packed_layers(model).values()}
    integer_inputs = recipe.input.format == "int8"
    assert EMULATED not in paths and (paths == {"int"} if integer_inputs else "float" in paths)
    a, b = got.flatten().double(), expected.flatten().double()
    # tiny UNets with 8-bit input codes: a code on a rounding tie flips with float order (tests/nn/test_packed.py)
    tie_sensitive = family.startswith("unet") and integer_inputs
    assert float(a @ b / (a.norm() * b.norm())) >= (0.999 if tie_sensitive else 0.9999)
    assert torch.equal(tiny.run(load_quantized(save_frozen(model, tmp_path / "q")), inputs), expected)
