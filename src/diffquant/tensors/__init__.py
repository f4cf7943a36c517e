"""Packed low-bit storage."""

from diffquant.tensors.packing import BYTES, NIBBLES, pack_codes, packing_for, unpack_codes

__all__ = ["BYTES", "NIBBLES", "pack_codes", "packing_for", "unpack_codes"]
