"""Floating-point formats (formats/floating.py), E4M3 two-level scales (formats/scales.py) and NVFP4.

Oracles: the code table written out by hand (E2M1), brute-force nearest over every finite value of a
format (ties to the even code), torch's own float8 casts (E4M3 / E5M2, round-to-nearest-even), and
exact round trips of every representable value.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffquant.formats import (
    FloatFormat,
    QuantSpec,
    SpecError,
    UnknownFormatError,
    block_view,
    dequantize,
    fake_quantize,
    fake_quantize_dynamic,
    get_format,
    quantize,
    quantize_blocks,
    sqnr_db,
    unblock_view,
)
from diffquant.formats.ops import global_scale_from_range
from diffquant.formats.scales import TwoLevelScale, get_scale_format, known_scale_formats
from diffquant.nn.quantizers import ActivationQuantizer, WeightQuantizer

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
FP_FORMATS = ["fp4_e2m1", "nvfp4", "fp6_e2m3", "fp6_e3m2", "fp8_e4m3", "fp8_e5m2", "fp3_e1m1"]
# (max finite, smallest positive, finite magnitude codes)
FP_RANGES = {
    "fp4_e2m1": (6.0, 0.5, 8), "nvfp4": (6.0, 0.5, 8), "fp6_e2m3": (7.5, 0.125, 32), "fp6_e3m2": (28.0, 0.0625, 32),
    "fp8_e4m3": (448.0, 2.0**-9, 127), "fp8_e5m2": (57344.0, 2.0**-16, 124), "fp3_e1m1": (3.0, 1.0, 4),
}
TORCH_FLOAT8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def signed_table(fmt: FloatFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Every finite code of the format and its value."""
    magnitudes = fmt.magnitudes.numel()
    codes = torch.cat([torch.arange(magnitudes), torch.arange(magnitudes) | (1 << (fmt.bits - 1))])
    values = torch.cat([fmt.magnitudes, -fmt.magnitudes])
    return codes, values


def brute_force_nearest(x: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Nearest finite value of the format to each x; on a tie the even magnitude code wins."""
    table = fmt.magnitudes.double()
    distance = (x.double().abs().unsqueeze(-1) - table).abs()
    nearest = distance == distance.min(dim=-1, keepdim=True).values
    even = (torch.arange(table.numel()) % 2 == 0)
    code = torch.where(nearest.sum(-1) > 1, (nearest & even).int().argmax(-1), nearest.int().argmax(-1))
    return (torch.sign(x.double()) * table[code]).float()


def random_inputs(fmt: FloatFormat, count: int, seed: int) -> torch.Tensor:
    """Uniform over ±1.1·max, log-uniform magnitudes over the whole range, and every midpoint (tie)."""
    g = _gen(seed)
    uniform = (torch.rand(count, generator=g) * 2 - 1) * fmt.qmax * 1.1
    low, high = math.log2(fmt.min_positive) - 2, math.log2(fmt.qmax) + 0.5
    logs = 2.0 ** (torch.rand(count, generator=g) * (high - low) + low) * torch.sign(torch.randn(count, generator=g))
    table = fmt.magnitudes
    ties = (table[1:] + table[:-1]) / 2
    return torch.cat([uniform, logs, ties, -ties])


# -- the E2M1 code table ----------------------------------------------------------------------------


def test_e2m1_code_table():
    fmt = get_format("fp4_e2m1")
    assert isinstance(fmt, FloatFormat) and (fmt.bits, fmt.exponent_bits, fmt.mantissa_bits, fmt.bias) == (4, 2, 1, 1)
    assert fmt.magnitudes.tolist() == E2M1
    assert (fmt.qmin, fmt.qmax, fmt.signed, fmt.codes_signed) == (-6.0, 6.0, True, False)
    assert fmt.storage_dtype() == torch.uint8 and not fmt.has_zero_point
    decoded = fmt.decode(torch.arange(16, dtype=torch.uint8))
    assert decoded.tolist() == E2M1 + [-v for v in E2M1]
    assert torch.signbit(decoded[8])  # code 8 is -0: the sign bit survives


@pytest.mark.parametrize("name", FP_FORMATS)
def test_format_ranges(name):
    fmt = get_format(name)
    top, smallest, count = FP_RANGES[name]
    assert (fmt.qmax, fmt.min_positive, fmt.magnitudes.numel()) == (top, smallest, count)
    assert torch.all(fmt.magnitudes[1:] > fmt.magnitudes[:-1])  # codes ordered like their values


@pytest.mark.parametrize("name", FP_FORMATS)
def test_every_representable_value_round_trips(name):
    fmt = get_format(name)
    codes, values = signed_table(fmt)
    assert torch.equal(fmt.round(values), values)
    assert torch.equal(quantize(values, torch.ones(1), None, fmt), values)
    encoded = fmt.encode(values)
    assert encoded.dtype == torch.uint8 and torch.equal(encoded.long(), codes)
    assert torch.equal(fmt.decode(encoded), values)


@pytest.mark.parametrize("name", FP_FORMATS)
def test_rounding_is_nearest_with_ties_to_even_code(name):
    fmt = get_format(name)
    x = random_inputs(fmt, 4000, seed=len(name))
    expected = brute_force_nearest(x, fmt)
    inside = x.abs() <= fmt.qmax
    assert torch.equal(fmt.round(x)[inside], expected[inside])
    # beyond the maximum, quantize() clamps the exponent-extended rounding to the nearest finite value
    assert torch.equal(quantize(x, torch.ones(1), None, fmt), expected)


def test_e2m1_ties_go_to_the_even_code():
    """Midpoints between E2M1 neighbours: 0.25 -> 0 (code 0), 0.75 -> 1 (code 2), 1.25 -> 1, 1.75 -> 2,
    2.5 -> 2 (code 4), 3.5 -> 4 (code 6), 5 -> 4: IEEE round-to-nearest-even on the code."""
    fmt = get_format("fp4_e2m1")
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert fmt.round(ties).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert fmt.round(-ties).tolist() == [-0.0, -1.0, -1.0, -2.0, -2.0, -4.0, -4.0]
    assert fmt.encode(fmt.round(ties)).tolist() == [0, 2, 2, 4, 4, 6, 6]


@pytest.mark.parametrize("name", list(TORCH_FLOAT8))
def test_fp8_rounding_matches_torch_float8_casts(name):
    fmt = get_format(name)
    x = random_inputs(fmt, 20000, seed=11)
    x = x[x.abs() <= fmt.qmax]
    assert torch.equal(fmt.round(x), x.to(TORCH_FLOAT8[name]).float())
    codes, values = signed_table(fmt)
    assert torch.equal(values.to(TORCH_FLOAT8[name]).view(torch.uint8).long(), codes)  # same bit patterns


def test_round_keeps_dtype_and_sign_of_zero():
    fmt = get_format("fp4_e2m1")
    x = torch.tensor([0.3, -0.1, 2.6, -7.0], dtype=torch.bfloat16)
    out = fmt.round(x)
    assert out.dtype == torch.bfloat16 and out.float().tolist() == [0.5, -0.0, 3.0, -8.0]
    assert torch.signbit(out[1])


def test_encode_refuses_values_off_the_grid():
    with pytest.raises(ValueError, match="on the format's grid"):
        get_format("fp4_e2m1").encode(torch.tensor([0.7]))


@pytest.mark.parametrize(
    "name, message",
    [("fp4_e3m1", "is not 4 bits"), ("fp8_e3m5", "is not 8 bits"),
     ("fp9_e4m4", "unsupported floating-point format"), ("fp2_e1m0", "unsupported floating-point format"),
     ("fp4_e0m3", "is not 4 bits")],
)
def test_invalid_float_format_names(name, message):
    with pytest.raises(UnknownFormatError, match=message):
        get_format(name)


# -- E4M3 two-level scales --------------------------------------------------------------------------


def e4m3_scale() -> TwoLevelScale:
    scale_format = get_scale_format("e4m3")
    assert isinstance(scale_format, TwoLevelScale) and scale_format.two_level
    return scale_format


def test_scale_format_registry():
    assert {"float32", "float16", "bfloat16", "e4m3"} <= set(known_scale_formats())
    assert get_scale_format(torch.float16) is get_scale_format("float16")
    assert get_scale_format("e4m3").torch_dtype == torch.float32
    assert get_scale_format("float16").global_scale(torch.tensor(3.0), 7.0) is None
    with pytest.raises(SpecError, match=r"scale_dtype must be one of .*'e3m4'"):
        get_scale_format("e3m4")


def test_e4m3_scales_of_representable_values_are_exact():
    """Block scales that are E4M3 values times the global scale are kept, encoded and decoded exactly."""
    scale_format = e4m3_scale()
    element = get_format("fp8_e4m3")
    values = element.magnitudes[1:].reshape(-1, 1)  # every positive E4M3 value
    global_scale = torch.tensor([3.0e-4])
    scale = values * global_scale
    assert torch.equal(scale_format.round(scale, global_scale), scale)
    stored = scale_format.encode(scale, global_scale)
    assert stored.dtype == torch.uint8 and torch.equal(stored.long().flatten(), torch.arange(1, 127))
    assert torch.equal(scale_format.decode(stored, global_scale), scale)


def test_e4m3_scale_rounding_matches_brute_force():
    scale_format = e4m3_scale()
    element = get_format("fp8_e4m3")
    global_scale = torch.tensor([1.7e-3])
    units = 2.0 ** (torch.rand(5000, 1, generator=_gen(12)) * 18 - 10)  # 2^-10 .. 2^8
    rounded = scale_format.round(units * global_scale, global_scale)
    expected = brute_force_nearest((units * global_scale / global_scale).flatten(), element)
    expected = expected.clamp(min=element.min_positive).reshape(-1, 1)  # tiny scales: smallest positive
    assert torch.equal(rounded, expected * global_scale)
    stored = scale_format.encode(rounded, global_scale)
    assert torch.equal(scale_format.decode(stored, global_scale), rounded)  # bitwise, what reload relies on


def test_global_scale_maps_the_tensor_absmax_onto_448_by_6():
    x = torch.randn(32, 64, generator=_gen(13)) * 0.01
    spec = QuantSpec.for_format("nvfp4")
    lo, hi = block_view(x, "group", 16).amin(-1, keepdim=True), block_view(x, "group", 16).amax(-1, keepdim=True)
    global_scale = global_scale_from_range(lo, hi, spec.qformat, spec.symmetric, spec.scale_format)
    assert torch.equal(global_scale, (x.abs().amax() / (6 * 448)).reshape(1))  # NVIDIA's amax / (448 * 6)
    codes, scale, _ = quantize_blocks(x, spec)
    peak = x.abs().argmax()
    assert scale.flatten()[peak // 16] == 448 * global_scale  # the largest block uses E4M3's maximum
    assert codes.flatten()[peak].abs() == 6  # and the absmax lands on ±6 exactly
    assert x.flatten()[peak] == dequantize(codes, scale, None).flatten()[peak]


def test_zero_groups_and_zero_tensors():
    spec = QuantSpec.for_format("nvfp4")
    x = torch.randn(4, 64, generator=_gen(14))
    x[1, 16:32] = 0.0  # one all-zero group
    codes, scale, _ = quantize_blocks(x, spec)
    assert torch.all(scale > 0) and torch.all(torch.isfinite(scale))
    assert torch.all(codes.reshape(4, 4, 16)[1, 1] == 0)
    fq = fake_quantize_dynamic(x, spec)
    assert torch.all(fq[1, 16:32] == 0) and torch.all(torch.isfinite(fq))
    zeros = torch.zeros(3, 32)
    codes, scale, _ = quantize_blocks(zeros, spec)
    assert torch.all(codes == 0) and torch.all(scale > 0)
    assert torch.equal(fake_quantize_dynamic(zeros, spec), zeros)


# -- the nvfp4 spec ---------------------------------------------------------------------------------


def test_nvfp4_spec_implies_group_16_and_e4m3_scales():
    spec = QuantSpec.from_dict({"format": "nvfp4"})
    assert (spec.granularity, spec.group_size, spec.scale_dtype, spec.bits) == ("group", 16, "e4m3", 4)
    assert QuantSpec.for_format("nvfp4", dynamic=True) == QuantSpec.from_dict({"format": "nvfp4", "dynamic": True})
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    explicit = QuantSpec(format="nvfp4", granularity="group", group_size=16, scale_dtype="e4m3")
    assert explicit == spec
    spec.validate_for_weight()
    QuantSpec.for_format("nvfp4", dynamic=True).validate_for_activation()


@pytest.mark.parametrize(
    "fields, message",
    [
        pytest.param({"group_size": 32}, r"'nvfp4' fixes granularity: group, group_size: 16, scale_dtype: e4m3; "
                                          r"got group_size: 32", id="group32"),
        pytest.param({"scale_dtype": "float16"}, r"got scale_dtype: float16", id="fp16-scales"),
        pytest.param({"granularity": "channel", "group_size": None}, r"got granularity: channel", id="channel"),
        pytest.param({"symmetric": False}, r"no zero point: set symmetric: true", id="asymmetric"),
    ],
)
def test_nvfp4_spec_rejects_other_block_layouts(fields, message):
    with pytest.raises(SpecError, match=message):
        QuantSpec.for_format("nvfp4", **fields)


def test_constructor_does_not_guess_format_fields():
    with pytest.raises(SpecError, match="fixes granularity: group"):
        QuantSpec(format="nvfp4")  # the dataclass defaults (channel, float32) contradict nvfp4


def test_element_formats_take_any_granularity_but_only_symmetric_ranges():
    QuantSpec(format="fp8_e4m3", granularity="channel", scale_dtype="float16").validate_for_weight()
    QuantSpec(format="fp4_e2m1", granularity="group", group_size=32, scale_dtype="e4m3").validate_for_weight()
    with pytest.raises(SpecError, match="'fp8_e5m2' has a sign bit and no zero point"):
        QuantSpec(format="fp8_e5m2", symmetric=False)


def test_changing_the_format_follows_what_each_format_fixes():
    nvfp4 = QuantSpec.for_format("nvfp4")
    int8 = nvfp4.with_changes(format="int8")  # nvfp4's group / e4m3 go with it
    assert int8 == QuantSpec("int8", "channel")
    assert nvfp4.with_changes(format="int4", granularity="group", group_size=64, scale_dtype="float16") == QuantSpec(
        "int4", "group", 64, scale_dtype="float16")
    int4 = QuantSpec("int4", "group", 64, scale_dtype="float16", dynamic=True)
    assert int4.with_changes(format="nvfp4") == QuantSpec.for_format("nvfp4", dynamic=True)
    assert nvfp4.with_changes(symmetric=True) == nvfp4
    with pytest.raises(SpecError, match="got group_size: 32"):
        int4.with_changes(format="nvfp4", group_size=32)


def test_recipe_overrides_switch_formats_cleanly():
    from diffquant.recipes import Recipe
    from diffquant.recipes.config import patch_spec

    recipe = Recipe.from_dict({"name": "r", "weight": {"format": "nvfp4"}, "input": {"format": "nvfp4", "dynamic": True},
                               "overrides": [{"match": "role:ffn.down", "weight": {"format": "int8"}}]})
    assert patch_spec(recipe.weight, recipe.overrides[0].weight, "weight") == QuantSpec("int8", "channel")


# -- SQNR -------------------------------------------------------------------------------------------

# Seeded N(0, 1) [256, 1024] (the weight of test_formats.py's SQNR table). Measured: nvfp4 20.45 dB
# (NVIDIA's RTN numbers; E2M1's 8 levels per sign over groups of 16), fp4_e2m1 group 16 with exact
# float32 scales 20.54, int4 group 16 float16 scales 21.37, int4 group 64 19.35.
NVFP4_SQNR_FLOOR_DB = 19.5


@pytest.fixture(scope="module")
def gaussian() -> torch.Tensor:
    return torch.randn(256, 1024, generator=_gen(4))


def weight_sqnr(w: torch.Tensor, spec: QuantSpec) -> float:
    codes, scale, zero_point = quantize_blocks(w, spec)
    return sqnr_db(w, unblock_view(dequantize(codes, scale, zero_point), w.shape, spec.granularity))


def test_nvfp4_sqnr_on_gaussian_weights(gaussian):
    nvfp4 = weight_sqnr(gaussian, QuantSpec.for_format("nvfp4"))
    exact_scales = weight_sqnr(gaussian, QuantSpec("fp4_e2m1", "group", 16))
    assert NVFP4_SQNR_FLOOR_DB <= nvfp4 <= 22.0
    assert 0 < exact_scales - nvfp4 < 0.5  # E4M3 block scales cost little
    assert abs(weight_sqnr(gaussian * 1e-3, QuantSpec.for_format("nvfp4")) - nvfp4) < 1e-3  # scale-free


def test_nearest_scale_rounding_beats_rounding_up(gaussian):
    """formats/scales.py's choice: nearest E4M3 block scales (some block maxima clip to 6) beat
    rounded-up ones (nothing clips, every grid up to 12.5% coarser)."""
    spec = QuantSpec.for_format("nvfp4")
    fmt, element = spec.qformat, get_format("fp8_e4m3")
    xb = block_view(gaussian, "group", 16)
    global_scale = (gaussian.abs().amax() / (6 * 448)).reshape(1)
    units = xb.abs().amax(-1, keepdim=True) / 6 / global_scale
    table = element.magnitudes
    up = table[torch.searchsorted(table, units.clamp(max=448))] * global_scale
    rounded_up = sqnr_db(xb, dequantize(quantize(xb, up, None, fmt), up, None))
    nearest = weight_sqnr(gaussian, spec)
    assert nearest > rounded_up + 0.2, (nearest, rounded_up)


# -- fake quantization and quantizers ---------------------------------------------------------------


def test_ste_gradient_is_one_where_the_rounded_value_is_in_range():
    """As for integer formats: gradient 1 where round(x / s) lies in [qmin, qmax], else 0 (E2M1: |x / s| < 7,
    since 7 is the tie between 6 and 8 and rounds to 8)."""
    fmt = get_format("fp4_e2m1")
    x = (torch.randn(4, 64, generator=_gen(15)) * 4).requires_grad_(True)
    scale = torch.full((4, 1), 1.0)  # range ±6: the tails of x clip
    out = fake_quantize(x, scale, None, fmt)
    assert torch.equal(out.detach(), dequantize(quantize(x.detach(), scale, None, fmt), scale, None))
    out.sum().backward()
    inside = fmt.round(x.detach()).abs() <= 6
    assert torch.equal(inside, x.detach().abs() < 7)
    assert 0 < int((~inside).sum()) < inside.numel() // 4
    assert torch.equal(x.grad, inside.float())


def test_dynamic_nvfp4_fake_quantize_passes_the_gradient():
    spec = QuantSpec.for_format("nvfp4", dynamic=True)
    x = torch.randn(3, 7, 40, generator=_gen(16)).requires_grad_(True)  # 40: a ragged last group
    out = fake_quantize_dynamic(x, spec)
    assert out.shape == x.shape and torch.equal(out.detach(), fake_quantize_dynamic(x.detach(), spec))
    out.sum().backward()
    _, scale, _ = quantize_blocks(x.detach(), spec)
    scaled = unblock_view(block_view(x.detach(), "group", 16) / scale, x.shape, "group")
    assert torch.all(scaled.abs() < 7)  # nearest E4M3 scales clip a block maximum by at most 6.4 / 6
    assert torch.equal(x.grad, torch.ones_like(x))


def test_weight_quantizer_stores_fp4_bit_patterns_and_decodes_bitwise():
    w = torch.randn(8, 40, generator=_gen(17)) * 0.05
    quantizer = WeightQuantizer(QuantSpec.for_format("nvfp4"))
    quantizer.calibrate(w)
    assert quantizer.global_scale.shape == (1,) and quantizer.scale.shape == (8 * 3, 1)
    codes = quantizer.codes(w)
    assert codes.dtype == torch.uint8 and codes.shape == w.shape and int(codes.max()) <= 15
    assert torch.equal(quantizer.decode(codes), quantizer(w))
    scale_format = quantizer.spec.scale_format
    stored = scale_format.encode(quantizer.scale, quantizer.global_scale)
    assert stored.dtype == torch.uint8
    assert torch.equal(scale_format.decode(stored, quantizer.global_scale), quantizer.scale)


def test_int_formats_keep_one_level_scales():
    quantizer = WeightQuantizer(QuantSpec("int4", "group", 16, scale_dtype="float16"))
    quantizer.calibrate(torch.randn(4, 32, generator=_gen(18)))
    assert quantizer.global_scale is None and quantizer.codes(torch.randn(4, 32)).dtype == torch.int8


def test_dynamic_activation_quantizer_with_nvfp4():
    quantizer = ActivationQuantizer(QuantSpec.for_format("nvfp4", dynamic=True))
    x = torch.randn(2, 5, 48, generator=_gen(19))
    out = quantizer(x)
    assert sqnr_db(x, out) > NVFP4_SQNR_FLOOR_DB - 1
    # The global scale is per call (per tensor, as NVIDIA's): quantized alone, a row gets another global
    # scale and so other E4M3 roundings of its block scales (up to 12.5% apart), of the same quality.
    per_row = torch.stack([quantizer(row) for row in x.reshape(10, 48)]).reshape(x.shape)
    assert not torch.equal(per_row, out)
    assert abs(sqnr_db(x, per_row) - sqnr_db(x, out)) < 1.0
