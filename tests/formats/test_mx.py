"""OCP MX block formats (formats/floating.py: mxfp8_e4m3, mxfp8_e5m2, mxfp6_e3m2, mxfp6_e2m3, mxfp4)
and their E8M0 power-of-two scales (formats/scales.py).

Oracles: the E8M0 code table written as 2^(code - 127) in float64; the OCP MX v1.0 shared exponent
floor(log2(absmax)) - emax_elem, worked out by hand for chosen blocks and with Python's float64 log2
for random ones; saturation to the element maximum; SQNR on a seeded Gaussian weight beside NVFP4 and
beside the same element format with exact float32 group scales.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffquant.formats import (
    FloatFormat,
    QuantSpec,
    SpecError,
    dequantize,
    fake_quantize_dynamic,
    get_format,
    quantize_blocks,
    sqnr_db,
    unblock_view,
)
from diffquant.formats.scales import PowerOfTwoScale, get_scale_format, known_scale_formats
from diffquant.nn.quantizers import ActivationQuantizer, WeightQuantizer

# format -> (element, emax_elem: exponent of the largest normal, element maximum), from the OCP MX spec
MX_FORMATS = {
    "mxfp8_e4m3": ("fp8_e4m3", 8, 448.0),
    "mxfp8_e5m2": ("fp8_e5m2", 15, 57344.0),
    "mxfp6_e3m2": ("fp6_e3m2", 4, 28.0),
    "mxfp6_e2m3": ("fp6_e2m3", 2, 7.5),
    "mxfp4": ("fp4_e2m1", 2, 6.0),
}
MX_NAMES = list(MX_FORMATS)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def e8m0() -> PowerOfTwoScale:
    scale_format = get_scale_format("e8m0")
    assert isinstance(scale_format, PowerOfTwoScale) and not scale_format.two_level
    return scale_format


def one_block(values: list[float], length: int = 32) -> torch.Tensor:
    """A [1, 32] block holding `values` then zeros."""
    block = torch.zeros(1, length)
    block[0, : len(values)] = torch.tensor(values, dtype=torch.float32)
    return block


def block_code(block: torch.Tensor, name: str) -> int:
    """The stored E8M0 byte of a single block quantized with format `name`."""
    _, scale, _ = quantize_blocks(block, QuantSpec.for_format(name))
    return int(e8m0().encode(scale).item())


# -- E8M0 scales --------------------------------------------------------------------------------------


def test_e8m0_is_a_registered_one_level_scale_format():
    assert "e8m0" in known_scale_formats()
    scale_format = e8m0()
    assert scale_format.torch_dtype == torch.float32
    assert scale_format.global_scale(torch.tensor(3.0), 6.0) is None


def test_every_e8m0_code_round_trips_exactly():
    scale_format = e8m0()
    codes = torch.arange(255, dtype=torch.uint8).reshape(-1, 1)
    decoded = scale_format.decode(codes)
    expected = torch.tensor([math.ldexp(1.0, c - 127) for c in range(255)], dtype=torch.float64)
    assert decoded.dtype == torch.float32 and torch.equal(decoded.double().flatten(), expected)
    assert decoded[0].item() == 2.0**-127 and decoded[127].item() == 1.0 and decoded[254].item() == 2.0**127
    stored = scale_format.encode(decoded)
    assert stored.dtype == torch.uint8 and torch.equal(stored, codes)


def test_e8m0_refuses_nan_code_and_values_off_its_grid():
    scale_format = e8m0()
    with pytest.raises(ValueError, match="code 255 is NaN"):
        scale_format.decode(torch.tensor([[255]], dtype=torch.uint8))
    with pytest.raises(ValueError, match="powers of two"):
        scale_format.encode(torch.tensor([[0.75]]))
    with pytest.raises(ValueError, match="powers of two"):
        scale_format.encode(torch.tensor([[2.0**-130]]))  # below E8M0's range
    with pytest.raises(ValueError, match="uint8"):
        scale_format.decode(torch.tensor([[127]], dtype=torch.int16))


def test_e8m0_round_of_a_raw_scale_rounds_up_to_a_power_of_two():
    """round() (a scale without its block, e.g. a learned step size) never shrinks it: no clipping."""
    raw = torch.tensor([[1.0], [1.1], [0.75], [0.0], [3e-39], [2.0**127], [3e38]])
    expected = torch.tensor([[1.0], [2.0], [1.0], [2.0**-127], [2.0**-127], [2.0**127], [2.0**127]])
    assert torch.equal(e8m0().round(raw), expected)


# -- the OCP shared exponent ---------------------------------------------------------------------------

BELOW_FOUR = float(torch.nextafter(torch.tensor(4.0), torch.tensor(0.0)))  # 3.9999998


@pytest.mark.parametrize(
    "values, name, code",
    [
        # E2M1, emax 2: x = floor(log2 absmax) - 2, stored x + 127
        pytest.param([4.0, -1.0], "mxfp4", 127, id="pow2-absmax-4"),  # 2^2: x = 0
        pytest.param([BELOW_FOUR, 0.5], "mxfp4", 126, id="just-below-4"),  # floor(log2) = 1: x = -1
        pytest.param([-6.0, 2.0], "mxfp4", 127, id="absmax-6"),
        pytest.param([7.99], "mxfp4", 127, id="absmax-7.99"),  # still binade 2: 7.99 saturates to 6
        pytest.param([8.0], "mxfp4", 128, id="pow2-absmax-8"),
        pytest.param([0.0], "mxfp4", 0, id="zeros"),  # smallest scale, 2^-127
        pytest.param([2.0**-120], "mxfp4", 5, id="tiny-2^-120"),  # x = -122
        pytest.param([1e-40], "mxfp4", 0, id="subnormal-clamped"),  # floor(log2) = -133: x clamps to -127
        pytest.param([3e38], "mxfp4", 252, id="huge"),  # floor(log2) = 127: x = 125
        pytest.param([3e38], "mxfp8_e5m2", 239, id="huge-e5m2"),  # x = 127 - 15
        pytest.param([2.0**-118], "mxfp8_e4m3", 1, id="e4m3-2^-118"),  # x = -126; -127 from absmax / 448 * 448
        pytest.param([1.0], "mxfp8_e4m3", 119, id="one-e4m3"),  # x = -8
        pytest.param([1.0], "mxfp8_e5m2", 112, id="one-e5m2"),  # x = -15
        pytest.param([1.0], "mxfp6_e3m2", 123, id="one-e3m2"),  # x = -4
        pytest.param([1.0], "mxfp6_e2m3", 125, id="one-e2m3"),  # x = -2
        pytest.param([BELOW_FOUR], "mxfp6_e3m2", 124, id="just-below-4-e3m2"),  # x = 1 - 4
    ],
)
def test_shared_exponent_of_hand_computed_blocks(values, name, code):
    assert block_code(one_block(values), name) == code


@pytest.mark.parametrize("name", MX_NAMES)
def test_shared_exponent_follows_the_spec_formula(name):
    """Random blocks over ~280 binades (subnormal to near float32's max): E8M0 byte =
    clamp(floor(log2(absmax)) - emax_elem, -127, 127) + 127, with log2 taken in float64."""
    _, emax, _ = MX_FORMATS[name]
    g = _gen(MX_NAMES.index(name))
    peaks = 2.0 ** (torch.rand(2000, 1, generator=g, dtype=torch.float64) * 270 - 145)
    blocks = (torch.rand(2000, 32, generator=g, dtype=torch.float64) * 2 - 1) * peaks
    blocks[:, 0] = peaks[:, 0]  # the absmax itself, so it is exactly the float32 peak
    blocks = blocks.float()
    blocks[:5] = 2.0 ** torch.tensor([[-3.0], [0.0], [7.0], [-126.0], [100.0]])  # exact powers of two
    _, scale, _ = quantize_blocks(blocks, QuantSpec.for_format(name))
    absmax = blocks.abs().amax(-1).tolist()
    expected = [min(max(math.floor(math.log2(a)) - emax, -127), 127) + 127 if a > 0 else 0 for a in absmax]
    assert e8m0().encode(scale).flatten().tolist() == expected


def test_e8m0_scales_with_an_integer_grid_are_mxint8s():
    """The rule on int8 (qmax 127, emax 6): 2^(floor(log2 absmax) - 6), as MXINT8's 1.6 fixed point."""
    spec = QuantSpec("int8", "group", 32, scale_dtype="e8m0")
    _, scale, _ = quantize_blocks(one_block([1.0, -0.3]), spec)
    assert scale.item() == 2.0**-6


# -- saturation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MX_NAMES)
def test_elements_past_the_maximum_saturate(name):
    """A block whose absmax / 2^x lies between max and 2^(emax+1): the absmax clips to +-max."""
    _, emax, top = MX_FORMATS[name]
    peak = (top + 2.0 ** (emax + 1)) / 2  # inside the top binade, past the maximum (7 for E2M1)
    block = one_block([peak, -peak, 1.0, -0.25])
    codes, scale, _ = quantize_blocks(block, QuantSpec.for_format(name))
    assert scale.item() == 1.0 and codes[0, :2].tolist() == [top, -top]
    out = fake_quantize_dynamic(block, QuantSpec.for_format(name, dynamic=True))
    assert out[0, :2].tolist() == [top, -top] and torch.all(torch.isfinite(out))


def test_zero_blocks_get_the_smallest_scale_and_zero_codes():
    x = torch.randn(4, 96, generator=_gen(3))
    x[2, 32:64] = 0.0
    for name in MX_NAMES:
        codes, scale, _ = quantize_blocks(x, QuantSpec.for_format(name))
        assert scale.reshape(4, 3)[2, 1].item() == 2.0**-127 and torch.all(codes.reshape(4, 3, 32)[2, 1] == 0)
        assert torch.all(scale > 0) and torch.all(torch.isfinite(scale))


# -- specs ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MX_NAMES)
def test_mx_spec_implies_group_32_and_e8m0_scales(name):
    element, _, top = MX_FORMATS[name]
    spec = QuantSpec.from_dict({"format": name})
    assert (spec.granularity, spec.group_size, spec.scale_dtype, spec.symmetric) == ("group", 32, "e8m0", True)
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    assert QuantSpec(format=name, granularity="group", group_size=32, scale_dtype="e8m0") == spec
    fmt, elem = spec.qformat, get_format(element)
    assert isinstance(fmt, FloatFormat) and fmt.qmax == top and fmt.bits == elem.bits
    assert torch.equal(fmt.magnitudes, elem.magnitudes)  # the OCP element grid, its non-finite codes too
    spec.validate_for_weight()
    QuantSpec.for_format(name, dynamic=True).validate_for_activation()


@pytest.mark.parametrize(
    "fields, message",
    [
        pytest.param({"scale_dtype": "float16"}, r"'mxfp4' fixes granularity: group, group_size: 32, "
                                                  r"scale_dtype: e8m0; got scale_dtype: float16", id="fp16-scales"),
        pytest.param({"scale_dtype": "e4m3"}, r"got scale_dtype: e4m3", id="e4m3-scales"),
        pytest.param({"group_size": 16}, r"got group_size: 16", id="group16"),
        pytest.param({"granularity": "channel", "group_size": None}, r"got granularity: channel", id="channel"),
        pytest.param({"symmetric": False}, r"no zero point: set symmetric: true", id="asymmetric"),
    ],
)
def test_mx_spec_rejects_other_block_layouts(fields, message):
    with pytest.raises(SpecError, match=message):
        QuantSpec.for_format("mxfp4", **fields)


def test_switching_between_mx_and_nvfp4_follows_what_each_fixes():
    mx = QuantSpec.for_format("mxfp4")
    assert mx.with_changes(format="nvfp4") == QuantSpec.for_format("nvfp4")
    assert QuantSpec.for_format("nvfp4").with_changes(format="mxfp8_e4m3") == QuantSpec.for_format("mxfp8_e4m3")
    assert mx.with_changes(format="int8") == QuantSpec("int8", "channel")


# -- SQNR ----------------------------------------------------------------------------------------------

# Seeded N(0, 1) [256, 1024] (as test_fp4.py). Measured (dB): MX with E8M0 scales / the same element
# format in groups of 32 with exact float32 scales:
#   mxfp8_e4m3 30.62 / 32.40    mxfp8_e5m2 25.38 / 26.40    mxfp6_e3m2 25.38 / 26.40
#   mxfp6_e2m3 30.91 / 32.30    mxfp4      18.79 / 19.89    (nvfp4 20.45)
# E5M2 and E3M2 agree: both have 2 mantissa bits and a Gaussian block of 32 never reaches E3M2's
# subnormals. Power-of-two scales cost 1.0-1.8 dB against exact ones (up to a binade of the range).
MX_SQNR_FLOOR_DB = {"mxfp8_e4m3": 30.3, "mxfp8_e5m2": 25.0, "mxfp6_e3m2": 25.0, "mxfp6_e2m3": 30.6, "mxfp4": 18.5}


@pytest.fixture(scope="module")
def gaussian() -> torch.Tensor:
    return torch.randn(256, 1024, generator=_gen(4))


def weight_sqnr(w: torch.Tensor, spec: QuantSpec) -> float:
    codes, scale, zero_point = quantize_blocks(w, spec)
    return sqnr_db(w, unblock_view(dequantize(codes, scale, zero_point), w.shape, spec.granularity))


@pytest.mark.parametrize("name", MX_NAMES)
def test_mx_sqnr_on_gaussian_weights(gaussian, name):
    mx = weight_sqnr(gaussian, QuantSpec.for_format(name))
    exact = weight_sqnr(gaussian, QuantSpec(MX_FORMATS[name][0], "group", 32))
    assert MX_SQNR_FLOOR_DB[name] <= mx <= MX_SQNR_FLOOR_DB[name] + 1.0
    assert 0.8 < exact - mx < 2.0  # what powers of two cost
    assert abs(weight_sqnr(gaussian * 2.0**-10, QuantSpec.for_format(name)) - mx) < 1e-9  # scale-free


def test_mxfp4_is_below_nvfp4(gaussian):
    """Blocks of 32 with power-of-two scales vs blocks of 16 with E4M3 scales: 18.79 vs 20.45 dB."""
    mxfp4 = weight_sqnr(gaussian, QuantSpec.for_format("mxfp4"))
    nvfp4 = weight_sqnr(gaussian, QuantSpec.for_format("nvfp4"))
    assert 1.2 < nvfp4 - mxfp4 < 2.2


# -- quantizers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MX_NAMES)
def test_weight_quantizer_stores_codes_and_e8m0_bytes_and_decodes_bitwise(name):
    w = torch.randn(8, 72, generator=_gen(5)) * 0.05  # 72: a ragged last block
    quantizer = WeightQuantizer(QuantSpec.for_format(name))
    quantizer.calibrate(w)
    assert quantizer.global_scale is None and quantizer.scale.shape == (8 * 3, 1)
    codes = quantizer.codes(w)
    assert codes.dtype == torch.uint8 and codes.shape == w.shape
    assert torch.equal(quantizer.decode(codes), quantizer(w))
    stored = quantizer.spec.scale_format.encode(quantizer.scale)
    assert stored.dtype == torch.uint8 and torch.equal(quantizer.spec.scale_format.decode(stored), quantizer.scale)


def test_dynamic_mxfp4_activations_pass_the_gradient_inside_the_range():
    spec = QuantSpec.for_format("mxfp4", dynamic=True)
    x = torch.randn(3, 5, 40, generator=_gen(6)).requires_grad_(True)
    out = ActivationQuantizer(spec)(x)
    assert out.shape == x.shape and torch.equal(out.detach(), fake_quantize_dynamic(x.detach(), spec))
    assert sqnr_db(x, out) > MX_SQNR_FLOOR_DB["mxfp4"] - 2
    out.sum().backward()
    _, scale, _ = quantize_blocks(x.detach(), spec)
    scaled = unblock_view(spec.grain.view(x.detach(), 32) / scale, x.shape, "group")
    assert torch.equal(x.grad, (scaled.abs() < 7).float())  # 7 rounds to 8: outside E2M1's range
