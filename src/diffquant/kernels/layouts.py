"""Resident weight layouts of packed modules: int4 "K-halves" nibbles, unpacked per call into int8.

The checkpoint's canonical packing (tensors/packing.py) pairs neighbouring inputs of [N, K]. A GEMM
wants b as int8 [K, N] contiguous, so the frozen form repacks once at freeze time:

    b        int8  [K, N]        signed 4-bit codes in [-8, 7], K even (callers pad)
    packed   uint8 [K/2, N]      byte [k, n] = (b[k, n] & 0xF) | (b[k + K/2, n] << 4)

Unpacking is two shifts on int8 (arithmetic right shift sign-extends), written straight into the two
halves of the output: ~1 ms for a 4096 x 4096 weight on 2 cores (about 3% of its int8 GEMM at 256
tokens), so packed modules keep the nibbles resident and unpack per call.
"""

from __future__ import annotations

import torch

NIBBLE_MIN, NIBBLE_MAX = -8, 7


def pack_int4_halves(b: torch.Tensor) -> torch.Tensor:
    """int8 [K, N] codes in [-8, 7] (K even) -> uint8 [K/2, N]."""
    k = b.shape[0]
    if k % 2:
        raise ValueError(f"pack_int4_halves needs an even number of rows, got {k}")
    if b.numel() and (int(b.min()) < NIBBLE_MIN or int(b.max()) > NIBBLE_MAX):
        raise ValueError("int4 codes must lie in [-8, 7]")
    low, high = b[: k // 2].to(torch.uint8) & 0xF, b[k // 2:].to(torch.uint8) & 0xF
    return (low | (high << 4)).contiguous()


def unpack_int4_halves(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [K/2, N] -> int8 [K, N], contiguous."""
    half = packed.shape[0]
    out = torch.empty(2 * half, packed.shape[1], dtype=torch.int8, device=packed.device)
    signed = packed.view(torch.int8)
    torch.bitwise_right_shift(torch.bitwise_left_shift(signed, 4), 4, out=out[:half])
    torch.bitwise_right_shift(signed, 4, out=out[half:])
    return out
