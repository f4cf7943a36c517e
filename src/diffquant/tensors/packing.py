"""Packed integer storage of quantization codes.

Layout ("nibbles", used for formats of 2-4 bits): codes of shape [..., L] are padded with zeros to
even L and stored as uint8 [..., L/2]; byte k holds code 2k in its low nibble and code 2k+1 in its
high nibble, each as the code's 4-bit two's complement (signed formats) or plain binary (unsigned):

    byte = (code[2k] & 0xF) | ((code[2k+1] & 0xF) << 4)

Formats of 5-8 bits are stored one code per byte ("bytes": int8 for signed, uint8 for unsigned).

1-bit formats ("bits"; formats/binary.py) take 8 codes per byte: codes of shape [..., L] are padded to a
multiple of 8 and stored as uint8 [..., L/8], code 8k + j in bit j of byte k, as 1 for the code +1 and
0 for -1 (a signed 1-bit code is a sign), or as the code itself (unsigned):

    byte = sum_j bit(code[8k + j]) << j

A checkpoint records the layout name and the unpacked length L, so unpacking is exact.

Which codes a format stores is the format's business (QFormat.encode): integer formats store their
integers, floating-point formats their sign-magnitude bit pattern as an unsigned code, so an fp4
value takes one nibble like an int4 (e.g. E2M1 -0.5 is 0x9 and 6 is 0x7: [-0.5, 6] packs to 0x79).
pack_format_codes / unpack_format_codes pick bits and signedness from the format.
"""

from __future__ import annotations

import torch

from diffquant.formats.base import QFormat

NIBBLES = "nibbles"
BYTES = "bytes"
BITS = "bits"
_BIT_WEIGHTS = 2 ** torch.arange(8, dtype=torch.int16)  # bit j of a "bits" byte holds the byte's code j


def packing_for(bits: int) -> str:
    return BITS if bits == 1 else (NIBBLES if bits <= 4 else BYTES)


def _storage(signed: bool) -> torch.dtype:
    return torch.int8 if signed else torch.uint8


def _pack_bytes(codes: torch.Tensor, signed: bool) -> torch.Tensor:
    return codes.to(_storage(signed))


def _unpack_bytes(packed: torch.Tensor, signed: bool, length: int) -> torch.Tensor:
    return packed


def _pack_nibbles(codes: torch.Tensor, signed: bool) -> torch.Tensor:
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    low, high = codes[..., 0::2] & 0xF, codes[..., 1::2] & 0xF
    return (low | (high << 4)).to(torch.uint8)


def _unpack_nibbles(packed: torch.Tensor, signed: bool, length: int) -> torch.Tensor:
    as_int = packed.to(torch.int16)
    low, high = as_int & 0xF, as_int >> 4
    codes = torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], -1)[..., :length]
    if signed:
        codes = (codes ^ 8) - 8  # sign-extend the 4-bit two's complement
    return codes.to(_storage(signed))


def _pack_bits(codes: torch.Tensor, signed: bool) -> torch.Tensor:
    """Bit j of byte k from code 8k + j: 1 for +1 (signed) or the code itself (unsigned)."""
    ones = (codes > 0 if signed else codes != 0).to(torch.int16)
    ones = torch.nn.functional.pad(ones, (0, -ones.shape[-1] % 8)).reshape(*ones.shape[:-1], -1, 8)
    return (ones * _BIT_WEIGHTS).sum(dim=-1).to(torch.uint8)


def _unpack_bits(packed: torch.Tensor, signed: bool, length: int) -> torch.Tensor:
    ones = ((packed.to(torch.int16).unsqueeze(-1) // _BIT_WEIGHTS) % 2).reshape(*packed.shape[:-1], -1)[..., :length]
    return (2 * ones - 1 if signed else ones).to(_storage(signed))


# layout -> (pack(codes int16, signed), unpack(packed, signed, length))
_LAYOUTS = {BYTES: (_pack_bytes, _unpack_bytes), NIBBLES: (_pack_nibbles, _unpack_nibbles),
            BITS: (_pack_bits, _unpack_bits)}


def pack_codes(codes: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Integer codes (any integer or integral float dtype) -> packed storage tensor."""
    return _LAYOUTS[packing_for(bits)][0](codes.to(torch.int16), signed)


def unpack_codes(packed: torch.Tensor, bits: int, signed: bool, length: int) -> torch.Tensor:
    """Inverse of pack_codes: codes as int8 (signed) or uint8 (unsigned), last dim `length`."""
    return _LAYOUTS[packing_for(bits)][1](packed, signed, length)


def pack_format_codes(codes: torch.Tensor, fmt: QFormat) -> torch.Tensor:
    """Stored codes of `fmt` (QFormat.encode) -> packed storage, in the layout its bit width takes."""
    return pack_codes(codes, fmt.bits, fmt.codes_signed)


def unpack_format_codes(packed: torch.Tensor, fmt: QFormat, length: int) -> torch.Tensor:
    """Inverse of pack_format_codes: codes in fmt.storage_dtype(), last dim `length`."""
    return unpack_codes(packed, fmt.bits, fmt.codes_signed, length).to(fmt.storage_dtype())
