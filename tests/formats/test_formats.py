"""Numerical tests of the reference quantization maths (diffquant.formats) and the quantizer modules.

Exact round trips are built from representable values: x = s·(q − z) with a power-of-two scale s per
block and integer codes q that hit both ends of the code range in every block, so the scale computed
from the data equals s exactly, the zero point equals z, and quantize→dequantize must give x back bitwise.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import pytest
import torch

import diffquant.formats.base as formats_base
from diffquant.calib.stats import LayerStats
from diffquant.formats import (
    IntFormat,
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
    register_format,
    sqnr_db,
    unblock_view,
)
from diffquant.formats.base import known_format_patterns
from diffquant.formats.ops import round_scale
from diffquant.nn.quantizers import ActivationQuantizer

INT_FORMATS = [f"int{b}" for b in range(2, 9)] + [f"uint{b}" for b in range(2, 9)]
SYMMETRY = [pytest.param(True, id="sym"), pytest.param(False, id="asym")]

# Weight layouts: [out, K] with the input axis last. K = 40 with groups of 16 leaves a ragged last
# group of 8 real values (padded with zeros by block_view).
OUT, K, GROUP = 6, 40, 16
WEIGHT_GRANULARITIES = [
    pytest.param("tensor", None, id="tensor"),
    pytest.param("channel", None, id="channel"),
    pytest.param("group", GROUP, id="group16-ragged"),
]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def code_range(fmt_name: str, symmetric: bool) -> tuple[int, int]:
    """Codes a block may use so that its computed range is exactly s·[lo − z, hi − z].

    Signed symmetric ranges are ±absmax: the scale is absmax / qmax, so the codes span [−qmax, qmax]
    (qmin = −qmax − 1 would change the scale). Unsigned symmetric: [0, qmax] (non-negative inputs).
    Asymmetric: the full [qmin, qmax].
    """
    fmt = get_format(fmt_name)
    if symmetric:
        return (-int(fmt.qmax) if fmt.signed else 0), int(fmt.qmax)
    return int(fmt.qmin), int(fmt.qmax)


@dataclass
class Blocks:
    """Representable data in block layout [blocks, block_len]: x = s·(q − z)."""

    q: torch.Tensor  # integer codes (float dtype); padding positions hold z (x = 0 there)
    s: torch.Tensor  # [blocks, 1] powers of two
    z: torch.Tensor | None  # [blocks, 1] integral, None when symmetric

    @property
    def x(self) -> torch.Tensor:
        return self.s * (self.q - (0.0 if self.z is None else self.z))


def make_blocks(
    fmt_name: str, symmetric: bool, blocks: int, block_len: int, real_len: int, g: torch.Generator
) -> Blocks:
    """Random codes per block with both range ends among the first `real_len` positions of every block."""
    lo, hi = code_range(fmt_name, symmetric)
    q = torch.randint(lo, hi + 1, (blocks, block_len), generator=g)
    for b in range(blocks):
        i, j = torch.randperm(real_len, generator=g)[:2].tolist()
        q[b, i], q[b, j] = lo, hi
    s = 2.0 ** torch.randint(-8, 5, (blocks, 1), generator=g).float()
    z = None if symmetric else torch.randint(lo, hi + 1, (blocks, 1), generator=g).float()
    q = q.float()
    if real_len < block_len:  # padding: x = 0, which quantizes to code z
        q[:, real_len:] = 0.0 if z is None else z
    return Blocks(q, s, z)


def weight_blocks(fmt_name: str, symmetric: bool, granularity: str, group_size: int | None) -> tuple[Blocks, torch.Tensor]:
    """Representable [OUT, K] weight and its block-layout description."""
    g = _gen(1)
    if granularity == "tensor":
        blocks = make_blocks(fmt_name, symmetric, 1, OUT * K, OUT * K, g)
        return blocks, blocks.x.reshape(OUT, K)
    if granularity == "channel":
        blocks = make_blocks(fmt_name, symmetric, OUT, K, K, g)
        return blocks, blocks.x
    assert group_size is not None
    groups = math.ceil(K / group_size)
    ragged = K - (groups - 1) * group_size
    # Full groups and the ragged last group of each row are built separately, then interleaved row-wise.
    full = make_blocks(fmt_name, symmetric, OUT * (groups - 1), group_size, group_size, g)
    last = make_blocks(fmt_name, symmetric, OUT, group_size, ragged, g)

    def interleave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cat([a.reshape(OUT, groups - 1, -1), b.reshape(OUT, 1, -1)], dim=1).reshape(OUT * groups, -1)

    z = None if symmetric else interleave(full.z, last.z)
    blocks = Blocks(interleave(full.q, last.q), interleave(full.s, last.s), z)
    return blocks, unblock_view(blocks.x, torch.Size((OUT, K)), "group")


# -- exact round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", SYMMETRY)
@pytest.mark.parametrize("granularity, group_size", WEIGHT_GRANULARITIES)
@pytest.mark.parametrize("fmt_name", INT_FORMATS)
def test_weight_round_trip_is_exact(fmt_name, granularity, group_size, symmetric):
    blocks, x = weight_blocks(fmt_name, symmetric, granularity, group_size)
    spec = QuantSpec(format=fmt_name, granularity=granularity, group_size=group_size, symmetric=symmetric)
    spec.validate_for_weight()

    # block_view / unblock_view are inverse layouts, and block_view gives the layout the data was built in.
    assert torch.equal(block_view(x, granularity, group_size), blocks.x)
    assert torch.equal(unblock_view(block_view(x, granularity, group_size), x.shape, granularity), x)

    codes, scale, zero_point = quantize_blocks(x, spec)
    assert torch.equal(scale, blocks.s)
    if symmetric:
        assert zero_point is None
    else:
        assert torch.equal(zero_point, blocks.z)
    assert torch.equal(codes, blocks.q)
    fmt = spec.qformat
    assert codes.min() >= fmt.qmin and codes.max() <= fmt.qmax
    x_hat = unblock_view(dequantize(codes, scale, zero_point), x.shape, granularity)
    assert torch.equal(x_hat, x)


def activation_case(fmt_name: str, symmetric: bool, mode: str) -> tuple[QuantSpec, torch.Tensor, Blocks]:
    """Representable activations [batch=2, tokens=5, C] (feature axis last) for one quantizer mode."""
    g = _gen(2)
    batch, tokens, channels = 2, 5, 24
    if mode == "dynamic-token":
        spec = QuantSpec(format=fmt_name, granularity="token", symmetric=symmetric, dynamic=True)
        blocks = make_blocks(fmt_name, symmetric, batch * tokens, channels, channels, g)
        return spec, blocks.x.reshape(batch, tokens, channels), blocks
    if mode == "dynamic-group":  # 24 channels in groups of 16: ragged last group of 8 per token
        spec = QuantSpec(format=fmt_name, granularity="group", group_size=16, symmetric=symmetric, dynamic=True)
        full = make_blocks(fmt_name, symmetric, batch * tokens, 16, 16, g)
        last = make_blocks(fmt_name, symmetric, batch * tokens, 16, 8, g)

        def interleave(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.stack([a, b], dim=1).reshape(2 * batch * tokens, -1)

        blocks = Blocks(interleave(full.q, last.q), interleave(full.s, last.s),
                        None if symmetric else interleave(full.z, last.z))
        return spec, unblock_view(blocks.x, torch.Size((batch, tokens, channels)), "group"), blocks
    if mode == "static-tensor":
        spec = QuantSpec(format=fmt_name, granularity="tensor", symmetric=symmetric)
        blocks = make_blocks(fmt_name, symmetric, 1, batch * tokens * channels, batch * tokens * channels, g)
        return spec, blocks.x.reshape(batch, tokens, channels), blocks
    assert mode == "static-channel"  # one range per input channel: blocks are the columns
    spec = QuantSpec(format=fmt_name, granularity="channel", symmetric=symmetric)
    blocks = make_blocks(fmt_name, symmetric, channels, batch * tokens, batch * tokens, g)
    return spec, blocks.x.T.reshape(batch, tokens, channels), blocks


ACTIVATION_MODES = ["dynamic-token", "dynamic-group", "static-tensor", "static-channel"]


@pytest.mark.parametrize("symmetric", SYMMETRY)
@pytest.mark.parametrize("mode", ACTIVATION_MODES)
@pytest.mark.parametrize("fmt_name", INT_FORMATS)
def test_activation_quantizer_round_trip_is_exact(fmt_name, mode, symmetric):
    spec, x, blocks = activation_case(fmt_name, symmetric, mode)
    quantizer = ActivationQuantizer(spec)
    if not spec.dynamic:
        assert not quantizer.calibrated
        stats = LayerStats()
        x2d = x.reshape(-1, x.shape[-1])
        stats.observe(x2d[:4], step=None)  # streamed in two calls: the merged range is what counts
        stats.observe(x2d[4:], step=None)
        quantizer.calibrate(stats)
        expected_shape = (1,) if spec.granularity == "tensor" else (x.shape[-1],)
        assert quantizer.scale.shape == expected_shape
        assert torch.equal(quantizer.scale, blocks.s.reshape(expected_shape))
        if symmetric:
            assert quantizer.zero_point is None
        else:
            assert torch.equal(quantizer.zero_point, blocks.z.reshape(expected_shape))
    else:
        codes, scale, zero_point = quantize_blocks(x, spec)
        assert torch.equal(scale, blocks.s)
        assert torch.equal(codes, blocks.q)
        assert (zero_point is None) if symmetric else torch.equal(zero_point, blocks.z)
    assert quantizer.calibrated
    assert torch.equal(quantizer(x), x)


def test_static_quantizer_refuses_to_run_uncalibrated():
    with pytest.raises(RuntimeError, match="before calibration"):
        ActivationQuantizer(QuantSpec(granularity="tensor"))(torch.ones(2, 3))


@pytest.mark.parametrize("symmetric", SYMMETRY)
def test_fake_quantize_with_grad_matches_quantize_dequantize_bitwise(symmetric):
    """The STE path computes the same floating-point expression as the no-grad path."""
    spec = QuantSpec(format="int4", granularity="group", group_size=16, symmetric=symmetric)
    x = torch.randn(8, 40, generator=_gen(3)) * 3
    xb = block_view(x, spec.granularity, spec.group_size)
    _, scale, zero_point = quantize_blocks(x, spec)
    plain = dequantize(quantize(xb, scale, zero_point, spec.qformat), scale, zero_point)
    ste = fake_quantize(xb.clone().requires_grad_(True), scale, zero_point, spec.qformat)
    assert torch.equal(ste.detach(), plain)
    assert torch.equal(fake_quantize(xb, scale, zero_point, spec.qformat), plain)


# -- SQNR -------------------------------------------------------------------------------------------

# Minimum SQNR (dB) on seeded N(0, 1) weights [256, 1024], keyed by (format, granularity). Unsigned
# formats are used asymmetrically. Measured (seed 4): int8 tensor 39.5, channel 42.0, group64 44.5;
# int4 channel 16.9, group64 19.4; uint8 channel 42.6; uint4 group64 20.8.
SQNR_FLOOR_DB: dict[tuple[str, str], float] = {
    ("int8", "tensor"): 35.0,
    ("int8", "channel"): 38.0,
    ("int8", "group64"): 40.0,
    ("int4", "channel"): 14.0,
    ("int4", "group64"): 18.0,
    ("uint8", "channel"): 38.0,
    ("uint4", "group64"): 18.0,
}


def spec_for(fmt_name: str, granularity: str, symmetric: bool | None = None) -> QuantSpec:
    if symmetric is None:
        symmetric = not fmt_name.startswith("u")
    if granularity.startswith("group"):
        return QuantSpec(format=fmt_name, granularity="group", group_size=int(granularity[5:]), symmetric=symmetric)
    return QuantSpec(format=fmt_name, granularity=granularity, symmetric=symmetric)


def weight_sqnr(w: torch.Tensor, spec: QuantSpec) -> float:
    codes, scale, zero_point = quantize_blocks(w, spec)
    return sqnr_db(w, unblock_view(dequantize(codes, scale, zero_point), w.shape, spec.granularity))


@pytest.fixture(scope="module")
def gaussian_weight() -> torch.Tensor:
    return torch.randn(256, 1024, generator=_gen(4))


@pytest.mark.parametrize("key", list(SQNR_FLOOR_DB), ids=lambda k: f"{k[0]}-{k[1]}")
def test_sqnr_floor_on_gaussian_weights(gaussian_weight, key):
    fmt_name, granularity = key
    assert weight_sqnr(gaussian_weight, spec_for(fmt_name, granularity)) >= SQNR_FLOOR_DB[key]


def test_sqnr_rises_with_bits_per_channel(gaussian_weight):
    values = [weight_sqnr(gaussian_weight, spec_for(f"int{b}", "channel")) for b in range(2, 9)]
    assert all(b > a + 4.0 for a, b in zip(values, values[1:], strict=False)), values  # ~6 dB per bit


def test_group_beats_channel_with_outlier_columns(gaussian_weight):
    w = gaussian_weight.clone()
    w[:, [5, 300, 777]] *= 50.0  # outlier input channels dominate every row's absmax
    group = weight_sqnr(w, spec_for("int4", "group64"))
    channel = weight_sqnr(w, spec_for("int4", "channel"))
    assert group > channel + 3.0, (group, channel)


def test_sqnr_of_exact_copy_is_infinite():
    x = torch.randn(10)
    assert sqnr_db(x, x.clone()) == math.inf


# -- scale rounding ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_round_scale_rounds_up_to_representable_values(dtype):
    g = _gen(5)
    # log-uniform over the dtype's normal range (float16: 2^-14 .. 2^15), plus exactly representable ones
    scale = 2.0 ** (torch.rand(4096, generator=g) * 28 - 14)
    scale = torch.cat([scale, torch.tensor([1.0, 0.5, 3.0, 1024.0])])
    rounded = round_scale(scale, dtype)
    assert rounded.dtype == torch.float32
    assert torch.all(rounded >= scale)
    assert torch.equal(rounded.to(dtype).float(), rounded)
    # tight: the next value of the dtype below the result is below the float32 scale
    below = torch.nextafter(rounded.to(dtype), torch.full_like(rounded, -math.inf, dtype=dtype)).float()
    assert torch.all(below < scale)
    # exactly representable scales are left alone
    assert torch.equal(rounded[-4:], scale[-4:])


def test_round_scale_float32_is_identity():
    scale = torch.rand(100) + 1e-3
    assert torch.equal(round_scale(scale, torch.float32), scale)


def test_round_scale_clamps_to_smallest_normal():
    rounded = round_scale(torch.tensor([1e-9, 0.0]), torch.float16)
    assert torch.all(rounded == torch.finfo(torch.float16).tiny)


@pytest.mark.parametrize(
    "fmt_name, scale_dtype",
    [("int8", "float16"), ("int4", "float16"), ("int4", "bfloat16"), ("uint8", "float16")],
    ids=lambda v: v,
)
def test_absmax_code_is_range_end_after_scale_rounding(fmt_name, scale_dtype):
    """Rounding scales up never clips the block's extreme value, and it still lands on the range end."""
    symmetric = not fmt_name.startswith("u")
    w = torch.randn(64, 256, generator=_gen(6)) * 0.37
    if not symmetric:
        w = w.abs()  # unsigned symmetric: non-negative inputs
    spec = QuantSpec(format=fmt_name, granularity="channel", symmetric=True, scale_dtype=scale_dtype)
    codes, scale, _ = quantize_blocks(w, spec)
    assert torch.equal(scale.to(spec.torch_scale_dtype).float(), scale)
    fmt = spec.qformat
    idx = w.abs().argmax(dim=1, keepdim=True)
    extreme_codes = codes.gather(1, idx)
    extreme_values = w.gather(1, idx)
    assert torch.equal(extreme_codes, torch.sign(extreme_values) * fmt.qmax)
    # and the pre-clamp code never exceeds the range (no clipping anywhere)
    assert torch.all((w / scale).round().abs() <= fmt.qmax)


# -- straight-through estimator ---------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", SYMMETRY)
def test_ste_gradient_is_one_inside_and_zero_when_clipped(symmetric):
    fmt = get_format("int8")
    x = (torch.randn(4, 64, generator=_gen(7)) * 4).requires_grad_(True)
    scale = torch.full((4, 1), 2.0**-5)  # static range ±127/32 ≈ ±3.97: the tails of x clip
    zero_point = None if symmetric else torch.full((4, 1), 10.0)
    out = fake_quantize(x, scale, zero_point, fmt)
    out.sum().backward()
    codes = torch.round(x.detach() / scale) + (0.0 if zero_point is None else zero_point)
    inside = (codes >= fmt.qmin) & (codes <= fmt.qmax)
    assert 0 < int((~inside).sum()) < inside.numel() // 2  # some, not most, values clip
    assert torch.equal(x.grad, inside.float())


def test_ste_gradient_reaches_a_learnable_scale():
    fmt = get_format("int4")
    x = torch.randn(4, 64, generator=_gen(8))
    scale = torch.full((4, 1), 0.3, requires_grad=True)
    fake_quantize(x, scale, None, fmt).pow(2).sum().backward()
    assert scale.grad is not None
    assert torch.all(scale.grad != 0)


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec(format="int8", granularity="token", dynamic=True),
        QuantSpec(format="int4", granularity="group", group_size=16, dynamic=True),
        QuantSpec(format="uint4", granularity="tensor", symmetric=False, dynamic=True),
    ],
    ids=["int8-token", "int4-group16", "uint4-tensor-asym"],
)
def test_dynamic_fake_quantize_passes_gradient_one(spec):
    x = torch.randn(3, 7, 40, generator=_gen(9)).requires_grad_(True)
    out = fake_quantize_dynamic(x, spec)
    assert out.shape == x.shape
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


# -- spec validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        pytest.param({"format": "fp4"}, UnknownFormatError, r"unknown number format 'fp4'", id="unknown-format"),
        pytest.param({"format": "int9"}, UnknownFormatError, r"unsupported bit width 9", id="int9"),
        pytest.param({"format": "int1"}, UnknownFormatError, r"unsupported bit width 1", id="int1"),
        pytest.param({"format": "uint16"}, UnknownFormatError, r"unsupported bit width 16", id="uint16"),
        pytest.param({"granularity": "row"}, SpecError, r"unknown granularity 'row'", id="unknown-granularity"),
        pytest.param({"granularity": "group"}, SpecError, r"group_size is required", id="group-without-size"),
        pytest.param({"granularity": "channel", "group_size": 64}, SpecError, r"group_size is required .* only then",
                     id="size-without-group"),
        pytest.param({"granularity": "group", "group_size": 0}, SpecError, r"group_size must be positive",
                     id="group-size-zero"),
        pytest.param({"dynamic": True, "per_step": True}, SpecError, r"per_step .* dynamic", id="dynamic-per-step"),
        pytest.param({"scale_dtype": "float64"}, SpecError, r"scale_dtype must be one of .*'float64'",
                     id="bad-scale-dtype"),
    ],
)
def test_invalid_spec_raises(kwargs, error, message):
    with pytest.raises(error, match=message):
        QuantSpec(**kwargs)


def test_unknown_format_error_lists_known_patterns():
    with pytest.raises(UnknownFormatError) as info:
        get_format("log4")
    for pattern in known_format_patterns():
        assert pattern in str(info.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        pytest.param({"granularity": "token", "dynamic": True}, r"weights take granularity .*'token'", id="token"),
        pytest.param({"dynamic": True}, r"dynamic/per_step do not apply", id="dynamic"),
        pytest.param({"per_step": True}, r"dynamic/per_step do not apply", id="per-step"),
    ],
)
def test_invalid_weight_spec_raises(kwargs, message):
    with pytest.raises(SpecError, match=message):
        QuantSpec(**kwargs).validate_for_weight()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        pytest.param({"granularity": "token"}, r"per-token .* set dynamic=true", id="static-token"),
        pytest.param({"granularity": "group", "group_size": 16}, r"per-group .* set dynamic=true", id="static-group"),
    ],
)
def test_invalid_activation_spec_raises(kwargs, message):
    spec = QuantSpec(**kwargs)
    with pytest.raises(SpecError, match=message):
        spec.validate_for_activation()
    with pytest.raises(SpecError, match=message):
        ActivationQuantizer(spec)


def test_dynamic_per_channel_activation_is_rejected():
    spec = QuantSpec(granularity="channel", dynamic=True)
    with pytest.raises(SpecError, match="channel"):
        spec.validate_for_activation()


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(SpecError, match=r"unknown quantization spec keys \['bitz', 'grp'\]"):
        QuantSpec.from_dict({"format": "int4", "bitz": 4, "grp": 2})


def test_spec_dict_round_trip():
    spec = QuantSpec(format="uint4", granularity="group", group_size=32, symmetric=False, scale_dtype="bfloat16")
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    assert spec.bits == 4 and spec.torch_scale_dtype == torch.bfloat16


@pytest.mark.parametrize("fmt_name", INT_FORMATS)
def test_int_format_ranges(fmt_name):
    fmt = get_format(fmt_name)
    bits = int(fmt_name.removeprefix("u").removeprefix("int"))
    assert isinstance(fmt, IntFormat) and fmt.bits == bits and fmt.name == fmt_name
    if fmt_name.startswith("u"):
        assert (fmt.qmin, fmt.qmax, fmt.signed) == (0, 2**bits - 1, False)
        assert fmt.storage_dtype() == torch.uint8
    else:
        assert (fmt.qmin, fmt.qmax, fmt.signed) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1, True)
        assert fmt.storage_dtype() == torch.int8


def test_int_round_is_half_to_even():
    fmt = get_format("int8")
    assert torch.equal(fmt.round(torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5])), torch.tensor([0.0, 2.0, 2.0, -0.0, -2.0]))


# -- registry extension point -----------------------------------------------------------------------


@dataclass(frozen=True)
class OddIntFormat(IntFormat):
    """Test-only mid-rise grid: odd integers in [−(2^(b−1) − 1), 2^(b−1) − 1] (no code for zero)."""

    @property
    def qmin(self) -> float:
        return -self.qmax

    def round(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * torch.floor(x / 2) + 1


def test_registering_a_format_makes_get_format_parse_it(monkeypatch):
    monkeypatch.setattr(formats_base, "_FORMATS", list(formats_base._FORMATS))

    @register_format(r"int(\d)-odd")
    def _odd(match: re.Match[str]) -> OddIntFormat:
        return OddIntFormat(name=match.group(0), bits=int(match.group(1)), is_signed=True)

    assert r"int(\d)-odd" in known_format_patterns()
    fmt = get_format("int3-odd")
    assert isinstance(fmt, OddIntFormat) and (fmt.qmin, fmt.qmax) == (-3.0, 3.0)

    spec = QuantSpec(format="int3-odd", granularity="channel")  # specs validate against the registry
    w = torch.randn(4, 32, generator=_gen(10))
    codes, scale, _ = quantize_blocks(w, spec)
    assert torch.equal(torch.remainder(codes, 2), torch.ones_like(codes))  # only odd codes
    assert codes.abs().max() == 3
    assert torch.equal(scale, w.abs().amax(dim=1, keepdim=True) / 3)

    monkeypatch.undo()
    with pytest.raises(UnknownFormatError):
        get_format("int3-odd")
    assert get_format("int3") == IntFormat(name="int3", bits=3, is_signed=True)
