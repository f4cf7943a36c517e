"""Triton kernels for CUDA GPUs: W8A8 / W4A8 / W4A4 integer GEMMs with the group-wise rescale fused in, and
symmetric dynamic activation quantization. Backend "triton": CUDA tensors, where triton imports and a GPU is
present; the project builds, runs and tests without it (`pip install -e ".[gpu]"` adds triton).

Notation (kernels/backend.py, kernels/vnni.py):

    a         int8 [M, K]       activation codes
    b         int8 [K, N]       weight codes of a signed symmetric format of `bits` bits
    packed    bits > 4:  int8 [N, K], b transposed (K contiguous)
              bits <= 4: uint8 [N, K/2], two codes per byte, offset 8 (K % 64 == 0). In each block of 64
                         inputs of an output's row, input j < 32 goes to the low nibble and input 32 + j to
                         the high nibble of byte 32 * block + j. Why: a 64-input tile unpacks into two
                         contiguous 32-input halves, each one tensor-core dot, with no interleaving shuffle.
              K-major because the tensor cores take 8-bit operands only K-major (Hopper's wgmma, and the
              ldmatrix path before it): an N-major weight would be transposed in shared memory per tile.
    a_scales  float32 [M, S] or [1, S]
    b_scales  float32 [S, N] or [S, 1]
    y         float32 [M, N] = sum_s a_scales[:, s] * b_scales[s] * (a_s @ b_s), K = S * L

The GEMM keeps each segment's int32 sum in registers and folds a_scale * b_scale into a float32 tile:
after every tile when L equals the tile depth (W4A4's group 64), or once at the end when S == 1 (per-channel
W8A8 / W4A8). Other segmentings (a convolution's per-pixel scales with c_in > 128) take the backend's plain
int32 GEMM per segment (kernels/segmented.py). The plain-torch oracle is kernels/reference.py; tests compare
exactly (tests/kernels/test_triton.py, also on CPU under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from diffquant.kernels.backend import IntGemmBackend, register_backend
from diffquant.kernels.cpu import CpuFeatures
from diffquant.kernels.triton_env import TINY, interpreting  # noqa: F401  (interpreting: tests read it here)

PACK_BLOCK = 64  # rows of b per nibble-packing block (module docstring)
FOLD_DEPTHS = (32, 64, 128)  # segment lengths folded after every tile (tile depth = L)
SINGLE_DEPTH = 128  # tile depth of a one-segment GEMM


@functools.lru_cache(maxsize=1)
def triton_reason() -> str | None:
    """Why the triton backend cannot run here (a sentence), or None."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install -e \".[gpu]\")"
    if not torch.cuda.is_available() and not interpreting():
        return "no CUDA GPU is visible"
    return None


@functools.lru_cache(maxsize=1)
def _kernels():  # noqa: ANN202  (module of jitted kernels, built on first use: triton is optional)
    from diffquant.kernels import _triton_kernels

    return _triton_kernels


# -- weight layout (plain torch: also the layout's test oracle) -----------------------------------------------


def pack_weight(b: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 [K, N] signed codes -> the kernel's resident layout (module docstring)."""
    if bits > 4:
        return b.t().contiguous()
    k, n = b.shape
    u = (b.t().to(torch.int16) + 8).to(torch.uint8).reshape(n, k // PACK_BLOCK, 2, PACK_BLOCK // 2)
    return (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def unpack_weight(packed: torch.Tensor, k: int, n: int, bits: int) -> torch.Tensor:
    """Inverse of pack_weight: int8 [K, N] (a transposed view for 8-bit codes)."""
    if bits > 4:
        return packed.t()
    halves = packed.reshape(n, k // PACK_BLOCK, 1, PACK_BLOCK // 2)
    u = torch.cat([halves & 0xF, halves >> 4], dim=2).reshape(n, k)
    return (u.to(torch.int16) - 8).to(torch.int8).t()


# -- kernels -------------------------------------------------------------------------------------------------


def _tile_depth(length: int, k: int) -> tuple[int, bool]:
    """(tile depth along K, fold after every tile) for segments of `length` over K = k."""
    if length == k:
        return SINGLE_DEPTH, False
    return length, True


class TritonKernels:
    """The fused operations a PackedWeight / PackedLayer use on CUDA tensors (FusedKernels protocol)."""

    @staticmethod
    def supports(bits: int, length: int, k: int) -> bool:
        """Can the fused GEMM take a weight of `bits` bits with segments of `length` over K = k?"""
        if bits > 8 or k % length:
            return False
        if bits <= 4 and (k % PACK_BLOCK or (length != k and length % PACK_BLOCK)):
            return False
        return length == k or length in FOLD_DEPTHS

    @staticmethod
    def accepts(b: torch.Tensor, bits: int) -> bool:
        """Every signed code fits the layout."""
        return True

    pack = staticmethod(pack_weight)
    unpack = staticmethod(unpack_weight)

    @staticmethod
    def takes_levels(levels: torch.Tensor) -> bool:
        """Nibbles are always codes plus 8 here: no decode table (FusedKernels' `levels`)."""
        return False

    @staticmethod
    def matmul(a: torch.Tensor, packed: torch.Tensor, n: int, bits: int, length: int, a_scales: torch.Tensor,
               b_scales: torch.Tensor, bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
               addend: torch.Tensor | None = None, levels: torch.Tensor | None = None) -> torch.Tensor:
        """y [M, N] = sum_s a_scales[:, s] * b_scales[s] * (a_s @ b_s) + addend + bias in float32, then cast to
        out_dtype (module docstring); the addend, the bias and the cast are torch ops after the kernel here."""
        if levels is not None:
            raise ValueError("the triton kernels take no decode table (levels): takes_levels is False")
        m, k = a.shape
        depth, fold_each = _tile_depth(length, k)
        a = a if a.stride(1) == 1 else a.contiguous()
        a_scales, b_scales = a_scales.float().contiguous(), b_scales.float().contiguous()
        y = torch.empty(m, n, dtype=torch.float32, device=a.device)
        if m:
            _kernels().group_gemm(a, packed, a_scales, b_scales, y, m, n, k, depth, nibbles=bits <= 4,
                                  fold_each=fold_each, scaled=True)
        if addend is not None:
            y += addend.float()
        if bias is not None:
            y += bias.float()
        return y.to(out_dtype)

    @staticmethod
    def quantize(x: torch.Tensor, length: int, qmin: int, qmax: int,
                 divisor: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Symmetric dynamic codes of x [M, C] (divided by `divisor` [C] first, a torch op here) in blocks of
        `length` along C: codes int8 [M, G*length] (zero-padded), scales float32 [M, G]; the same expression
        as the fake-quant quantizer, in x's dtype."""
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return None
        x = x if divisor is None else x / divisor.to(x.dtype)
        x = x if x.stride(-1) == 1 else x.contiguous()
        m, c = x.shape
        groups = -(-c // length)
        codes = torch.empty(m, groups * length, dtype=torch.int8, device=x.device)
        scales = torch.empty(m, groups, dtype=torch.float32, device=x.device)
        if m:
            _kernels().quantize_symmetric(x, codes, scales, length, float(qmin), float(qmax))
        return codes, scales


@register_backend
class TritonBackend(IntGemmBackend):
    """CUDA GPUs: triton int8 tensor-core GEMMs (int32 accumulation), fused group-wise rescale."""

    name = "triton"
    priority = 50
    prepare_free = False  # prepare() transposes to K-major (module docstring)
    device_type = "cuda"
    fused = TritonKernels()

    def available(self, cpu: CpuFeatures) -> bool:
        return triton_reason() is None

    def unavailable_reason(self, cpu: CpuFeatures) -> str | None:
        return triton_reason()

    def prepare(self, b: torch.Tensor) -> torch.Tensor:
        """int8 [K, N] -> int8 [N, K], K contiguous."""
        return b.t().contiguous()

    def unprepare(self, prepared: torch.Tensor) -> torch.Tensor:
        return prepared.t()

    def prepared_nbytes(self, prepared: torch.Tensor) -> int:
        return prepared.numel()

    def matmul(self, a: torch.Tensor, prepared: torch.Tensor) -> torch.Tensor:
        """Exact int32 [M, N] = a @ b, any shape (prepared: b as [N, K])."""
        m, k = a.shape
        n = prepared.shape[0]
        a = a if a.stride(1) == 1 else a.contiguous()
        y = torch.empty(m, n, dtype=torch.int32, device=a.device)
        if m and n:
            none = torch.empty(0, device=a.device)
            _kernels().group_gemm(a, prepared, none, none, y, m, n, k, SINGLE_DEPTH, nibbles=False,
                                  fold_each=False, scaled=False)
        return y
