"""Packed storage of quantization codes: exact round trips and the documented byte layout."""

from __future__ import annotations

import math

import pytest
import torch

from diffquant.formats import get_format
from diffquant.tensors import BITS as BIT_LAYOUT
from diffquant.tensors import (
    BYTES,
    NIBBLES,
    pack_codes,
    pack_format_codes,
    packing_for,
    unpack_codes,
    unpack_format_codes,
)

BITS = list(range(2, 9))
SIGNEDNESS = [pytest.param(True, id="signed"), pytest.param(False, id="unsigned")]
LENGTHS = [pytest.param(64, id="even64"), pytest.param(37, id="odd37"), pytest.param(1, id="len1")]


def random_codes(bits: int, signed: bool, rows: int, length: int, seed: int = 0) -> torch.Tensor:
    """Codes over the whole range of the format, with qmin and qmax present whenever length allows."""
    fmt = get_format(f"{'' if signed else 'u'}int{bits}")
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(int(fmt.qmin), int(fmt.qmax) + 1, (rows, length), generator=g)
    codes[0, 0] = int(fmt.qmin)
    codes[-1, -1] = int(fmt.qmax)
    return codes


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("signed", SIGNEDNESS)
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
def test_pack_unpack_round_trip_is_exact(bits, signed, length):
    codes = random_codes(bits, signed, rows=5, length=length)
    packed = pack_codes(codes, bits, signed)
    unpacked = unpack_codes(packed, bits, signed, length)
    assert unpacked.dtype == (torch.int8 if signed else torch.uint8)
    assert unpacked.shape == codes.shape
    assert torch.equal(unpacked.to(torch.int64), codes)


@pytest.mark.parametrize("signed", SIGNEDNESS)
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
def test_round_trip_of_three_dimensional_codes(bits, signed):
    codes = random_codes(bits, signed, rows=6, length=9, seed=1).reshape(2, 3, 9)
    unpacked = unpack_codes(pack_codes(codes, bits, signed), bits, signed, 9)
    assert torch.equal(unpacked.to(torch.int64), codes)


@pytest.mark.parametrize("signed", SIGNEDNESS)
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"{b}bit")
def test_integral_float_codes_pack_like_integer_codes(bits, signed):
    """quantize() returns codes as floats with integral values; packing accepts them as they are."""
    codes = random_codes(bits, signed, rows=3, length=11, seed=2)
    assert torch.equal(pack_codes(codes.float(), bits, signed), pack_codes(codes, bits, signed))


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("signed", SIGNEDNESS)
@pytest.mark.parametrize("bits", [2, 3, 4], ids=lambda b: f"{b}bit")
def test_nibble_packing_stores_two_codes_per_byte(bits, signed, length):
    assert packing_for(bits) == NIBBLES
    packed = pack_codes(random_codes(bits, signed, rows=4, length=length), bits, signed)
    assert packed.dtype == torch.uint8
    assert packed.shape == (4, math.ceil(length / 2))


@pytest.mark.parametrize("signed", SIGNEDNESS)
@pytest.mark.parametrize("bits", [5, 6, 7, 8], ids=lambda b: f"{b}bit")
def test_byte_packing_stores_one_code_per_byte(bits, signed):
    assert packing_for(bits) == BYTES
    codes = random_codes(bits, signed, rows=4, length=13)
    packed = pack_codes(codes, bits, signed)
    assert packed.dtype == (torch.int8 if signed else torch.uint8)
    assert packed.shape == codes.shape
    assert torch.equal(packed.to(torch.int64), codes)


@pytest.mark.parametrize(
    "codes, bits, signed, expected",
    [
        pytest.param([-1, 3], 4, True, [0x3F], id="int4[-1,3]->0x3F"),  # low nibble = code 0
        pytest.param([3, -1], 4, True, [0xF3], id="int4[3,-1]->0xF3"),
        pytest.param([-8, 7], 4, True, [0x78], id="int4[-8,7]->0x78"),
        pytest.param([-4, 3], 3, True, [0x3C], id="int3[-4,3]->0x3C"),
        pytest.param([-2, 1], 2, True, [0x1E], id="int2[-2,1]->0x1E"),
        pytest.param([15, 1], 4, False, [0x1F], id="uint4[15,1]->0x1F"),
        pytest.param([0, 15, 9], 4, False, [0xF0, 0x09], id="uint4-odd-pads-high-nibble"),
        pytest.param([-1], 4, True, [0x0F], id="int4[-1]-pads-high-nibble"),
    ],
)
def test_documented_nibble_order(codes, bits, signed, expected):
    packed = pack_codes(torch.tensor(codes), bits, signed)
    assert packed.tolist() == expected
    assert unpack_codes(packed, bits, signed, len(codes)).tolist() == codes


def test_unpack_truncates_padding_to_recorded_length():
    packed = pack_codes(torch.tensor([[1, 2, 3], [-1, -2, -3]]), 4, True)
    assert packed.shape == (2, 2)
    assert unpack_codes(packed, 4, True, 3).tolist() == [[1, 2, 3], [-1, -2, -3]]
    assert unpack_codes(packed, 4, True, 4).tolist() == [[1, 2, 3, 0], [-1, -2, -3, 0]]


# -- format-driven packing (pack_format_codes) ------------------------------------------------------

FP4_FORMATS = ["fp4_e2m1", "nvfp4"]


@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("name", FP4_FORMATS)
def test_fp4_bit_patterns_pack_two_per_byte_and_round_trip(name, length):
    fmt = get_format(name)
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (4, length), generator=g, dtype=torch.uint8)
    codes[0, 0], codes[-1, -1] = 15, 8  # -6 and -0
    packed = pack_format_codes(codes, fmt)
    assert packed.dtype == torch.uint8 and packed.shape == (4, math.ceil(length / 2))
    unpacked = unpack_format_codes(packed, fmt, length)
    assert unpacked.dtype == torch.uint8 and torch.equal(unpacked, codes)
    assert torch.equal(fmt.decode(unpacked), fmt.decode(codes))


def test_fp4_documented_nibble_order():
    """E2M1 -0.5 is code 0x9 (sign bit + 0.5's code 1), 6 is 0x7: [-0.5, 6] packs to 0x79."""
    fmt = get_format("nvfp4")
    codes = fmt.encode(torch.tensor([-0.5, 6.0, 1.5]))
    assert codes.tolist() == [0x9, 0x7, 0x3]
    assert pack_format_codes(codes, fmt).tolist() == [0x79, 0x03]


@pytest.mark.parametrize("name", ["int4", "uint4", "int8", "uint6"])
def test_format_packing_of_integer_formats_is_the_plain_packing(name):
    fmt = get_format(name)
    codes = random_codes(fmt.bits, fmt.signed, rows=3, length=11, seed=4)
    packed = pack_format_codes(fmt.encode(codes), fmt)
    assert torch.equal(packed, pack_codes(codes, fmt.bits, fmt.signed))
    assert torch.equal(unpack_format_codes(packed, fmt, 11).to(torch.int64), codes)


# -- 1 bit: 8 codes per byte (formats/binary.py) --------------------------------------------------------


@pytest.mark.parametrize("length", [64, 37, 1, 8, 9])
def test_binary_codes_take_one_bit_each_and_round_trip(length):
    fmt = get_format("binary")
    g = torch.Generator().manual_seed(length)
    codes = fmt.encode(torch.where(torch.rand(5, length, generator=g) < 0.5, -1.0, 1.0))
    packed = pack_format_codes(codes, fmt)
    assert packing_for(1) == BIT_LAYOUT and packed.dtype == torch.uint8 and packed.shape == (5, math.ceil(length / 8))
    unpacked = unpack_format_codes(packed, fmt, length)
    assert unpacked.dtype == torch.int8 and torch.equal(unpacked, codes)


def test_documented_bit_order():
    """Code 8k + j in bit j of byte k, 1 for +1: [+1, -1, -1, +1, -1, -1, -1, -1, +1] -> 0b1001, 0b1."""
    codes = torch.tensor([[1, -1, -1, 1, -1, -1, -1, -1, 1]], dtype=torch.int8)
    assert pack_codes(codes, 1, True).tolist() == [[0b1001, 0b1]]
