"""Packed integer storage of quantization codes.

Layout ("nibbles", used for formats of 2-4 bits): codes of shape [..., L] are padded with zeros to
even L and stored as uint8 [..., L/2]; byte k holds code 2k in its low nibble and code 2k+1 in its
high nibble, each as the code's 4-bit two's complement (signed formats) or plain binary (unsigned):

    byte = (code[2k] & 0xF) | ((code[2k+1] & 0xF) << 4)

Formats of 5-8 bits are stored one code per byte ("bytes": int8 for signed, uint8 for unsigned).
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


def packing_for(bits: int) -> str:
    return NIBBLES if bits <= 4 else BYTES


def pack_codes(codes: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Integer codes (any integer or integral float dtype) -> packed storage tensor."""
    codes = codes.to(torch.int16)
    if packing_for(bits) == BYTES:
        return codes.to(torch.int8 if signed else torch.uint8)
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    low, high = codes[..., 0::2] & 0xF, codes[..., 1::2] & 0xF
    return (low | (high << 4)).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, signed: bool, length: int) -> torch.Tensor:
    """Inverse of pack_codes: codes as int8 (signed) or uint8 (unsigned), last dim `length`."""
    if packing_for(bits) == BYTES:
        return packed
    as_int = packed.to(torch.int16)
    low, high = as_int & 0xF, as_int >> 4
    codes = torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], -1)[..., :length]
    if signed:
        codes = (codes ^ 8) - 8  # sign-extend the 4-bit two's complement
    return codes.to(torch.int8 if signed else torch.uint8)


def pack_format_codes(codes: torch.Tensor, fmt: QFormat) -> torch.Tensor:
    """Stored codes of `fmt` (QFormat.encode) -> packed storage, in the layout its bit width takes."""
    return pack_codes(codes, fmt.bits, fmt.codes_signed)


def unpack_format_codes(packed: torch.Tensor, fmt: QFormat, length: int) -> torch.Tensor:
    """Inverse of pack_format_codes: codes in fmt.storage_dtype(), last dim `length`."""
    return unpack_codes(packed, fmt.bits, fmt.codes_signed, length).to(fmt.storage_dtype())
