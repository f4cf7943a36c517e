"""Packed low-bit storage."""

from diffquant.tensors.packing import (
    BYTES,
    NIBBLES,
    pack_codes,
    pack_format_codes,
    packing_for,
    unpack_codes,
    unpack_format_codes,
)

__all__ = ["BYTES", "NIBBLES", "pack_codes", "pack_format_codes", "packing_for", "unpack_codes",
           "unpack_format_codes"]
