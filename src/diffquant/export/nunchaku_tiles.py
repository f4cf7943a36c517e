"""nunchaku's runtime ("tiled") layout of SVDQuant layer tensors, and the way back to the logical one.

export/nunchaku.py writes each layer's tensors row-major ("logical-v1"). nunchaku's W4A4 kernels
read them in the order their warps load MMA fragments instead: every tensor below is the same
values, padded and permuted. The functions here convert in both directions; each inverse crops the
padding away, so tile -> untile is the identity (bit for bit, fp8 and NaN patterns included).

Notation: O = out_features, I = in_features, r = rank; X_p is X padded (table below); "n" is a GEMM's
output dimension, "k" its reduction dimension. Every position is written as a mixed-radix number,
outermost digit first, e.g. n = 128·nt + 16·nb + 8·nh + nr with nb < 8, nh < 2, nr < 8. A tiled
tensor's elements, read flat (row-major), run through the listed digits in the listed order, the
last one fastest; its *shape* is the logical one, padded (nunchaku's parameter shapes): the shape
does not say where an element is, only the flat order does.

Padding (pad_dims, FILL):
    O_p, I_p = O, I rounded up to 128 (a warp's 128 output rows; two unrolled 64-wide k tiles)
    r_p      = r rounded up to 16   (one 16x16 fragment of the low-rank GEMMs)
    padded with 0: weight codes (INT4 0 and E2M1 +0), bias, proj_down, proj_up;
    padded with 1: wscales (fp16/bf16 or fp8 1.0), wcscales, smooth_factor — no zero divisors.

qweight, 4-bit codes [O, I] -> int8 [O_p, I_p/2] (tile_weight / tile_qweight).
    n = 128·nt + 16·nb + 8·nh + nr        nr = lane // 4: the n row of an m16n8k64 B fragment
    k =  64·kt + 32·kh + 8·kq + ke        kq = lane % 4; kh: which of the lane's 2 registers
    flat nibble order: nt, kt, nb, nr, kq, nh, kh, ke   (ke fastest: 8 codes fill a 32-bit word)
    Two nibbles per byte, the even-numbered one in the low nibble (little-endian words), so lane
    4·nr + kq loads its 4 words (nh, kh) of one 16x64 block as one 128-bit access.
    Index of code (n, k): ((((((nt·KT + kt)·8 + nb)·8 + nr)·4 + kq)·2 + nh)·2 + kh)·8 + ke, KT = I_p/64.

wscales, INT4 (fp16/bf16, group 64): logical [I/64, O] -> [I_p/64, O_p] (tile_scales).
    n = 128·nt + 16·nb + 8·nh + 2·nq + ne   (nq, ne: the two accumulator columns lane nq holds)
    flat order: nt, g, nb, nq, nh, ne       (g = group = k // 64)
    So one group row of a 128-wide n tile is 128 contiguous scales; lane 4·nb + nq loads the 4
    (nh, ne) it needs as 64 bits: (0, 1, 8, 9), (2, 3, 10, 11), ... for nb = 0.
    Index of (g, n): (nt·G_p + g)·128 + 16·nb + 4·nq + 2·nh + ne, G_p = I_p/64.

Per-channel vectors (bias [O], wcscales [O], smooth_factor(_orig) [I]) -> [N_p] (tile_vector):
    the same order as one group row of wscales: flat order nt, nb, nq, nh, ne.

wscales, NVFP4 (float8_e4m3fn, group 16): logical [I/16, O] -> [I_p/16, O_p] (tile_micro_scales).
    n = 128·nt + 32·ns + 8·nq + nr          g = 4·kt + gj   (4 groups per 64-wide k tile)
    flat order: nt, kt, nr, nq, ns, gj
    Lane 4·nr + nq loads 16 bytes: 4 output rows ns (32 apart) x the 4 group scales of its k tile
    (the block-scale operand of the fp4 MMA).
    Index of (g, n): (nt·KT + kt)·512 + 64·nr + 16·nq + 4·ns + gj, KT = I_p/64.

Low-rank factors, 16-bit: cut the logical [X, r] tensor (X = I for proj_down, O for proj_up) into
16x16 blocks (xb, rb) = (x // 16, c // 16); blocks are stored row-block major (xb, then rb) and each
block is one m16n8k16 B operand of 256 elements:
    a block's n = 8·nh + nr,  k = 8·kh + 2·kq + ke;  flat order within it: nr, kq, nh, kh, ke
    proj_up   [O, r]  -> [O_p, r_p]: n = the block's row (o),  k = its column (rank)
    proj_down [I, r]  -> [I_p, r_p]: n = the block's column (rank), k = its row (i)
    (y = (x·proj_down)·proj_upᵀ: the down GEMM reduces over I and outputs r, the up GEMM the reverse.)
    Index of (x, c): (xb·RB + rb)·256 + 32·nr + 8·kq + 4·nh + 2·kh + ke, RB = r_p/16.

wtscale ([1], NVFP4) is a scalar and keeps its layout. Source of the layout: deepcompressor's
NunchakuWeightPacker (warp_n = 128, 2 k unrolls), which these functions reimplement from the index
algebra above; tests/io/test_nunchaku_tiles.py checks the algebra with hand-written index formulas.
"""

from __future__ import annotations

import torch

from diffquant.tensors.packing import pack_codes, unpack_codes

ROW_TILE = 128  # O and I are padded to this (warp_n, and 2 k tiles of 64)
RANK_TILE = 16  # r is padded to this (one 16x16 low-rank fragment)
INT4_GROUP = 64  # the group of the 16-bit scales the INT4 kernel reads: one per 64-wide k tile
NVFP4_GROUP = 16  # the group of the fp8 block scales: four per 64-wide k tile
FILL = {"qweight": 0, "wscales": 1.0, "wcscales": 1.0, "smooth_factor": 1.0, "smooth_factor_orig": 1.0,
        "bias": 0.0, "proj_down": 0.0, "proj_up": 0.0}
_E4M3_ONE = 0x38  # 1.0 as a float8_e4m3fn bit pattern (exponent 7 = bias, mantissa 0)

# digit names of each tiling: the logical tensor read row-major, and the stored order
_WEIGHT = ("nt nb nh nr kt kh kq ke", "nt kt nb nr kq nh kh ke")
_SCALES = ("g nt nb nh nq ne", "nt g nb nq nh ne")
_MICRO = ("kt gj nt ns nq nr", "nt kt nr nq ns gj")
_UP = ("xb nh nr rb kh kq ke", "xb rb nr kq nh kh ke")  # rows are n
_DOWN = ("xb kh kq ke rb nh nr", "xb rb nr kq nh kh ke")  # rows are k


# -- padding ------------------------------------------------------------------------------------------

def ceil_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pad_dims(out_features: int, in_features: int, rank: int) -> tuple[int, int, int]:
    """(O_p, I_p, r_p): the dimensions nunchaku's module must be built with to load tiled tensors."""
    return ceil_to(out_features, ROW_TILE), ceil_to(in_features, ROW_TILE), ceil_to(rank, RANK_TILE)


def tiled_shapes(out_features: int, in_features: int, rank: int, group_size: int) -> dict[str, tuple[int, ...]]:
    """The shape of each tiled tensor of a layer (wtscale, a scalar, is not listed)."""
    o, i, r = pad_dims(out_features, in_features, rank)
    return {"qweight": (o, i // 2), "wscales": (i // group_size, o), "wcscales": (o,), "bias": (o,),
            "smooth_factor": (i,), "smooth_factor_orig": (i,), "proj_down": (i, r), "proj_up": (o, r)}


def _pad(x: torch.Tensor, shape: tuple[int, ...], fill: float) -> torch.Tensor:
    if tuple(x.shape) == tuple(shape):
        return x
    out = x.new_full(shape, fill)
    out[tuple(slice(0, s) for s in x.shape)] = x
    return out


def _crop(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return x[tuple(slice(0, s) for s in shape)].contiguous()


def _rearrange(x: torch.Tensor, src: str, dst: str, sizes: dict[str, int]) -> torch.Tensor:
    """x read row-major as the digits `src` (outermost first), its elements listed in `dst` order, flat.

    Swapping src and dst gives the inverse, so each untile function is its tile function read back.
    """
    src_axes, dst_axes = src.split(), dst.split()
    digits = x.reshape([sizes[a] for a in src_axes])
    return digits.permute([src_axes.index(a) for a in dst_axes]).reshape(-1)


# -- 4-bit weights ------------------------------------------------------------------------------------

def _weight_sizes(o: int, i: int) -> dict[str, int]:
    return {"nt": o // 128, "nb": 8, "nh": 2, "nr": 8, "kt": i // 64, "kh": 2, "kq": 4, "ke": 8}


def tile_weight(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes [O, I] (INT4 -8..7 or E2M1 patterns 0..15, any integer dtype) -> int8 [O_p, I_p/2]."""
    o, i = (ceil_to(s, ROW_TILE) for s in codes.shape)
    nibbles = _pad(codes.to(torch.int16) & 0xF, (o, i), FILL["qweight"])
    flat = _rearrange(nibbles, *_WEIGHT, _weight_sizes(o, i))
    return pack_codes(flat.reshape(o, i), 4, signed=False).view(torch.int8)


def untile_weight(tiled: torch.Tensor, out_features: int, in_features: int, *, signed: bool) -> torch.Tensor:
    """Inverse of tile_weight: codes [O, I], int8 sign-extended (signed) or uint8 nibbles 0..15."""
    o, i = tiled.shape[0], 2 * tiled.shape[1]
    nibbles = unpack_codes(tiled.view(torch.uint8), 4, signed=signed, length=i)
    flat = _rearrange(nibbles, *reversed(_WEIGHT), _weight_sizes(o, i))
    return _crop(flat.reshape(o, i), (out_features, in_features))


def tile_qweight(qweight: torch.Tensor) -> torch.Tensor:
    """Logical qweight int8 [O, I/2] (nibbles in input order, see nunchaku.py) -> tiled int8 [O_p, I_p/2]."""
    in_features = 2 * qweight.shape[1]
    return tile_weight(unpack_codes(qweight.view(torch.uint8), 4, signed=False, length=in_features))


def untile_qweight(tiled: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Inverse of tile_qweight: logical int8 [O, I/2]."""
    codes = untile_weight(tiled, out_features, in_features, signed=False)
    return pack_codes(codes, 4, signed=False).view(torch.int8)


# -- scales and per-channel vectors --------------------------------------------------------------------

def _scale_sizes(groups: int, n: int) -> dict[str, int]:
    return {"g": groups, "nt": n // 128, "nb": 8, "nh": 2, "nq": 4, "ne": 2}


def tile_scales(wscales: torch.Tensor, in_features: int) -> torch.Tensor:
    """INT4 group scales [I/64, O] (fp16/bf16) -> [I_p/64, O_p] in the order above."""
    groups, n = ceil_to(in_features, ROW_TILE) // INT4_GROUP, ceil_to(wscales.shape[1], ROW_TILE)
    padded = _pad(wscales, (groups, n), FILL["wscales"])
    return _rearrange(padded, *_SCALES, _scale_sizes(groups, n)).reshape(groups, n)


def untile_scales(tiled: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Inverse of tile_scales: [I/64, O]."""
    groups, n = tiled.shape
    flat = _rearrange(tiled, *reversed(_SCALES), _scale_sizes(groups, n))
    return _crop(flat.reshape(groups, n), (in_features // INT4_GROUP, out_features))


def tile_vector(vector: torch.Tensor, fill: float) -> torch.Tensor:
    """Per-channel vector [N] -> [N_p]; fill is FILL[name] (0 for bias, 1 for smooth and wcscales)."""
    n = ceil_to(vector.shape[0], ROW_TILE)
    return _rearrange(_pad(vector, (n,), fill), *_SCALES, _scale_sizes(1, n))


def untile_vector(tiled: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of tile_vector: [length]."""
    return _rearrange(tiled, *reversed(_SCALES), _scale_sizes(1, tiled.shape[0]))[:length].contiguous()


def _micro_sizes(groups: int, n: int) -> dict[str, int]:
    return {"kt": groups // 4, "gj": 4, "nt": n // 128, "ns": 4, "nq": 4, "nr": 8}


def tile_micro_scales(wscales: torch.Tensor, in_features: int) -> torch.Tensor:
    """NVFP4 block scales float8_e4m3fn [I/16, O] -> [I_p/16, O_p] in the order above."""
    if wscales.dtype != torch.float8_e4m3fn:
        raise TypeError(f"NVFP4 block scales are float8_e4m3fn, got {wscales.dtype}")
    groups, n = ceil_to(in_features, ROW_TILE) // NVFP4_GROUP, ceil_to(wscales.shape[1], ROW_TILE)
    padded = _pad(wscales.view(torch.uint8), (groups, n), _E4M3_ONE)  # bytes: exact, and fp8 lacks new_full
    flat = _rearrange(padded, *_MICRO, _micro_sizes(groups, n))
    return flat.reshape(groups, n).view(torch.float8_e4m3fn)


def untile_micro_scales(tiled: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Inverse of tile_micro_scales: float8_e4m3fn [I/16, O]."""
    groups, n = tiled.shape
    flat = _rearrange(tiled.view(torch.uint8), *reversed(_MICRO), _micro_sizes(groups, n))
    return _crop(flat.reshape(groups, n), (in_features // NVFP4_GROUP, out_features)).view(torch.float8_e4m3fn)


# -- low-rank factors ----------------------------------------------------------------------------------

def _lowrank_sizes(rows: int, rank: int) -> dict[str, int]:
    return {"xb": rows // 16, "rb": rank // 16, "nh": 2, "nr": 8, "kh": 2, "kq": 4, "ke": 2}


def _tile_lowrank(factor: torch.Tensor, tiling: tuple[str, str], fill: float) -> torch.Tensor:
    rows, rank = ceil_to(factor.shape[0], ROW_TILE), ceil_to(factor.shape[1], RANK_TILE)
    padded = _pad(factor, (rows, rank), fill)
    return _rearrange(padded, *tiling, _lowrank_sizes(rows, rank)).reshape(rows, rank)


def _untile_lowrank(tiled: torch.Tensor, tiling: tuple[str, str], shape: tuple[int, int]) -> torch.Tensor:
    rows, rank = tiled.shape
    flat = _rearrange(tiled, *reversed(tiling), _lowrank_sizes(rows, rank))
    return _crop(flat.reshape(rows, rank), shape)


def tile_proj_down(proj_down: torch.Tensor) -> torch.Tensor:
    """proj_down [I, r] -> [I_p, r_p]; in each 16x16 block n is the rank, k the input channel."""
    return _tile_lowrank(proj_down, _DOWN, FILL["proj_down"])


def untile_proj_down(tiled: torch.Tensor, in_features: int, rank: int) -> torch.Tensor:
    """Inverse of tile_proj_down: [I, r]."""
    return _untile_lowrank(tiled, _DOWN, (in_features, rank))


def tile_proj_up(proj_up: torch.Tensor) -> torch.Tensor:
    """proj_up [O, r] -> [O_p, r_p]; in each 16x16 block n is the output channel, k the rank."""
    return _tile_lowrank(proj_up, _UP, FILL["proj_up"])


def untile_proj_up(tiled: torch.Tensor, out_features: int, rank: int) -> torch.Tensor:
    """Inverse of tile_proj_up: [O, r]."""
    return _untile_lowrank(tiled, _UP, (out_features, rank))


# -- one layer -----------------------------------------------------------------------------------------

def tile_layer(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A layer's logical tensors (nunchaku.layer_tensors) -> the same keys, tiled and padded.

    The precision follows wscales' dtype (float8_e4m3fn: NVFP4). Keys absent stay absent.
    """
    in_features = 2 * tensors["qweight"].shape[1]
    micro = tensors["wscales"].dtype == torch.float8_e4m3fn
    tiled = {"qweight": tile_qweight(tensors["qweight"]),
             "wscales": (tile_micro_scales if micro else tile_scales)(tensors["wscales"], in_features),
             "proj_down": tile_proj_down(tensors["proj_down"]), "proj_up": tile_proj_up(tensors["proj_up"])}
    for name in ("wcscales", "bias", "smooth_factor", "smooth_factor_orig"):
        if name in tensors:
            tiled[name] = tile_vector(tensors[name], FILL[name])
    if "wtscale" in tensors:
        tiled["wtscale"] = tensors["wtscale"]
    return tiled


def untile_layer(tiled: dict[str, torch.Tensor], out_features: int, in_features: int,
                 rank: int) -> dict[str, torch.Tensor]:
    """Inverse of tile_layer, given the layer's logical dimensions (the metadata's per-layer config)."""
    micro = tiled["wscales"].dtype == torch.float8_e4m3fn
    logical = {"qweight": untile_qweight(tiled["qweight"], out_features, in_features),
               "wscales": (untile_micro_scales if micro else untile_scales)(tiled["wscales"], out_features,
                                                                             in_features),
               "proj_down": untile_proj_down(tiled["proj_down"], in_features, rank),
               "proj_up": untile_proj_up(tiled["proj_up"], out_features, rank)}
    lengths = {"wcscales": out_features, "bias": out_features, "smooth_factor": in_features,
               "smooth_factor_orig": in_features}
    for name, length in lengths.items():
        if name in tiled:
            logical[name] = untile_vector(tiled[name], length)
    if "wtscale" in tiled:
        logical["wtscale"] = tiled["wtscale"]
    return logical
