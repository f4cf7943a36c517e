"""The jitted triton kernels behind kernels/gpu_triton.py (imported only when that backend runs: triton is
optional). Layouts and notation: kernels/gpu_triton.py."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from diffquant.kernels.triton_env import TINY, interpreting

TUNE_ENV = "DIFFQUANT_TRITON_TUNE"  # "0": one tile config, no autotuning (tests: fewer compiles)


def _configs() -> list[triton.Config]:
    shapes = [(128, 128, 8, 4), (128, 256, 8, 3), (256, 128, 8, 3), (64, 128, 4, 4), (128, 64, 4, 4), (64, 64, 4, 5)]
    if interpreting() or os.environ.get(TUNE_ENV) == "0":  # correctness needs one config, not the fastest
        shapes = shapes[-1:]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for bm, bn, w, s in shapes]


@triton.jit
def _tile_product(a_ptr, b_ptr, rm, rn, m_ok, n_ok, k0, K, stride_am, stride_bn,
                  BLOCK_K: tl.constexpr, NIBBLES: tl.constexpr):
    """int32 [BLOCK_M, BLOCK_N] = a[rm, k0:k0+BLOCK_K] @ b[k0:k0+BLOCK_K, rn]; b is stored [N, K] (K-major)."""
    if NIBBLES:  # packed bytes k0/2 + j hold inputs k0 + 64*(j // 32) + j % 32 (low) and 32 more (high)
        j = tl.arange(0, BLOCK_K // 2)
        k_lo = k0 + (j // 32) * 64 + j % 32
        a_rows = a_ptr + rm[:, None] * stride_am
        a_lo = tl.load(a_rows + k_lo[None, :], mask=m_ok[:, None] & (k_lo < K)[None, :], other=0)
        a_hi = tl.load(a_rows + (k_lo + 32)[None, :], mask=m_ok[:, None] & (k_lo + 32 < K)[None, :], other=0)
        p = tl.load(b_ptr + rn[None, :] * stride_bn + (k0 // 2 + j)[:, None],
                    mask=(k0 // 2 + j < K // 2)[:, None] & n_ok[None, :], other=0x88)
        lo = (p & 0xF).to(tl.int8) - 8
        hi = (p >> 4).to(tl.int8) - 8
        part = tl.dot(a_lo, lo, out_dtype=tl.int32)
        part = tl.dot(a_hi, hi, part, out_dtype=tl.int32)
    else:
        k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rm[:, None] * stride_am + k[None, :], mask=m_ok[:, None] & (k < K)[None, :], other=0)
        b = tl.load(b_ptr + rn[None, :] * stride_bn + k[:, None], mask=(k < K)[:, None] & n_ok[None, :], other=0)
        part = tl.dot(a, b, out_dtype=tl.int32)
    return part


@triton.autotune(configs=_configs(), key=["M", "N", "K_TILES", "BLOCK_K", "NIBBLES", "FOLD_EACH", "SCALED"])
@triton.jit
def _group_gemm_kernel(a_ptr, b_ptr, as_ptr, bs_ptr, y_ptr, M, N, K,
                       stride_am, stride_bn, stride_asm, stride_ass, stride_bss, stride_bsn, stride_ym,
                       K_TILES: tl.constexpr, BLOCK_K: tl.constexpr, NIBBLES: tl.constexpr, FOLD_EACH: tl.constexpr, SCALED: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # grouped program order: GROUP_M row tiles share each column tile of b while it is in L2
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    size_m = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N

    y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for i in range(0, K_TILES):  # constexpr: one compile per K (a model has a handful)
        part = _tile_product(a_ptr, b_ptr, rm, rn, m_ok, n_ok, i * BLOCK_K, K, stride_am, stride_bn,
                             BLOCK_K, NIBBLES)
        if FOLD_EACH:  # segment i ends here: fold its scales into the float tile
            sa = tl.load(as_ptr + rm * stride_asm + i * stride_ass, mask=m_ok, other=0.0)
            sb = tl.load(bs_ptr + i * stride_bss + rn * stride_bsn, mask=n_ok, other=0.0)
            y += part.to(tl.float32) * sa[:, None] * sb[None, :]
        else:
            acc += part
    out = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if FOLD_EACH:
        tl.store(out, y, mask=mask)
    elif SCALED:
        sa = tl.load(as_ptr + rm * stride_asm, mask=m_ok, other=0.0)
        sb = tl.load(bs_ptr + rn * stride_bsn, mask=n_ok, other=0.0)
        tl.store(out, acc.to(tl.float32) * sa[:, None] * sb[None, :], mask=mask)
    else:
        tl.store(out, acc, mask=mask)


def group_gemm(a: torch.Tensor, b: torch.Tensor, a_scales: torch.Tensor, b_scales: torch.Tensor, y: torch.Tensor,
               m: int, n: int, k: int, depth: int, nibbles: bool, fold_each: bool, scaled: bool) -> None:
    """Launch _group_gemm_kernel into y (float32 when scaled, else int32); b is [N, K] or packed [N, K/2]."""
    def stride(t: torch.Tensor, dim: int) -> int:
        return 0 if t.dim() <= dim or t.shape[dim] == 1 else t.stride(dim)

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _group_gemm_kernel[grid](
        a, b, a_scales, b_scales, y, m, n, k,
        a.stride(0), b.stride(0), stride(a_scales, 0), stride(a_scales, 1), stride(b_scales, 0), stride(b_scales, 1),
        y.stride(0), K_TILES=triton.cdiv(k, depth), BLOCK_K=depth, NIBBLES=nibbles, FOLD_EACH=fold_each, SCALED=scaled)


@triton.jit
def _round_half_even(v):
    r = tl.floor(v + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(((r - v) == 0.5) & odd, r - 1.0, r)


@triton.jit
def _round_like_input(v, raw, BF16: tl.constexpr):
    """v (float32) rounded to the input's dtype and back. bf16 by integer rounding to nearest even (what
    torch does), since not every triton target (the interpreter) rounds its bf16 conversion."""
    if BF16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return v.to(raw.dtype).to(tl.float32)


@triton.jit
def _quantize_kernel(x_ptr, codes_ptr, scales_ptr, C, stride_xm, stride_cm, groups, qmin, qmax, tiny,
                     LENGTH: tl.constexpr, BLOCK: tl.constexpr, BF16: tl.constexpr):
    """One program per (row, group): scale = amax / qmax and codes = round(x / scale), both rounded to x's
    dtype as torch computes them there (formats/ops.py), so codes equal the fake-quant quantizer's exactly."""
    row, g = tl.program_id(0), tl.program_id(1)
    lane = tl.arange(0, BLOCK)
    col = g * LENGTH + lane
    inside = lane < LENGTH
    raw = tl.load(x_ptr + row * stride_xm + col, mask=inside & (col < C), other=0.0)
    x = raw.to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    scale = tl.maximum(_round_like_input(tl.math.div_rn(amax, qmax), raw, BF16), tiny)
    v = _round_like_input(tl.math.div_rn(x, scale), raw, BF16)
    codes = tl.minimum(tl.maximum(_round_half_even(v), qmin), qmax)
    tl.store(codes_ptr + row * stride_cm + col, codes.to(tl.int8), mask=inside)
    tl.store(scales_ptr + row * groups + g, scale)


def quantize_symmetric(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, length: int, qmin: float,
                       qmax: float) -> None:
    m, c = x.shape
    groups = scales.shape[1]
    block = triton.next_power_of_2(length)
    _quantize_kernel[(m, groups)](x, codes, scales, c, x.stride(0), codes.stride(0), groups, qmin, qmax, TINY,
                                  LENGTH=length, BLOCK=block, BF16=x.dtype == torch.bfloat16, num_warps=4 if block <= 1024 else 8)
