"""Packed low-bit storage."""

from diffquant.tensors.packing import (
    BITS,
    BYTES,
    NIBBLES,
    pack_codes,
    pack_format_codes,
    packing_for,
    unpack_codes,
    unpack_format_codes,
)

__all__ = ["BITS", "BYTES", "NIBBLES", "pack_codes", "pack_format_codes", "packing_for", "unpack_codes",
           "unpack_format_codes"]
