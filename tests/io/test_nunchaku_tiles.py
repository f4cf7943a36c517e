"""nunchaku's tiled layout: exact round trips for every tensor kind (aligned and ragged shapes), the
padding, and the permutation itself, checked against index formulas written out by hand from the
module docstring (arithmetic on n and k, independent of the reshape/permute code)."""

from __future__ import annotations

import pytest
import torch

from diffquant.export import nunchaku_tiles as nt

pytestmark = pytest.mark.usefixtures("single_thread")

# (O, I, r): aligned; ragged O and I; ragged rank; rank 0; smaller than one tile
SHAPES = [(256, 384, 32), (200, 320, 20), (130, 192, 5), (128, 128, 0), (8, 64, 16)]
SHAPE_IDS = [f"O{o}-I{i}-r{r}" for o, i, r in SHAPES]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_fp8(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Every byte pattern, NaNs included: the tiling moves bytes, it must not care what they mean."""
    return torch.randint(0, 256, (rows, cols), generator=gen(seed), dtype=torch.uint8).view(torch.float8_e4m3fn)


def nibble(tiled: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Nibble number `index` of a tiled qweight read flat (even: low nibble of its byte)."""
    byte = tiled.view(torch.uint8).reshape(-1)[index // 2].to(torch.int64)
    return (byte >> (4 * (index % 2))) & 0xF


# -- hand-written index formulas (module docstring) ----------------------------------------------------

def weight_index(n, k, in_padded):
    nt_, nb, nh, nr = n // 128, n % 128 // 16, n % 16 // 8, n % 8
    kt, kh, kq, ke = k // 64, k % 64 // 32, k % 32 // 8, k % 8
    return ((((((nt_ * (in_padded // 64) + kt) * 8 + nb) * 8 + nr) * 4 + kq) * 2 + nh) * 2 + kh) * 8 + ke


def scale_index(g, n, groups_padded):
    nt_, nb, nh, nq, ne = n // 128, n % 128 // 16, n % 16 // 8, n % 8 // 2, n % 2
    return (nt_ * groups_padded + g) * 128 + 16 * nb + 4 * nq + 2 * nh + ne


def micro_index(g, n, in_padded):
    nt_, ns, nq, nr = n // 128, n % 128 // 32, n % 32 // 8, n % 8
    kt, gj = g // 4, g % 4
    return (nt_ * (in_padded // 64) + kt) * 512 + 64 * nr + 16 * nq + 4 * ns + gj


def fragment_index(row, col, rank_padded, rows_are_n):
    """proj_up (rows are n) / proj_down (rows are k): index of logical element (row, col)."""
    n, k = (row, col) if rows_are_n else (col, row)
    nh, nr = n % 16 // 8, n % 8
    kh, kq, ke = k % 16 // 8, k % 8 // 2, k % 2
    block = (row // 16) * (rank_padded // 16) + col // 16
    return block * 256 + 32 * nr + 8 * kq + 4 * nh + 2 * kh + ke


def grid(rows: int, cols: int):
    return torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")


# -- weights -------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("o", "i", "r"), SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("signed", [True, False], ids=["int4", "e2m1"])
def test_weight_round_trip_and_padding(o, i, r, signed):
    low, high = (-8, 8) if signed else (0, 16)
    codes = torch.randint(low, high, (o, i), generator=gen(o + i + r), dtype=torch.int8)
    tiled = nt.tile_weight(codes)
    o_p, i_p, _ = nt.pad_dims(o, i, r)
    assert tiled.dtype == torch.int8 and tuple(tiled.shape) == (o_p, i_p // 2)
    back = nt.untile_weight(tiled, o, i, signed=signed)
    assert back.dtype == (torch.int8 if signed else torch.uint8)
    assert torch.equal(back.to(torch.int8), codes)
    padded = nt.untile_weight(tiled, o_p, i_p, signed=signed)
    assert padded[o:].eq(0).all() and padded[:, i:].eq(0).all()


@pytest.mark.parametrize(("o", "i", "r"), SHAPES, ids=SHAPE_IDS)
def test_weight_lands_where_the_formula_says(o, i, r):
    codes = torch.randint(0, 16, (o, i), generator=gen(7), dtype=torch.uint8)
    tiled = nt.tile_weight(codes)
    n, k = grid(o, i)
    assert torch.equal(nibble(tiled, weight_index(n, k, nt.ceil_to(i, 128))), codes.to(torch.int64))


def test_weight_spot_positions():
    """A few positions by hand: one lane's 128-bit load is words (nh, kh) = (0,0) (0,1) (1,0) (1,1)."""
    cases = {(0, 0): 0, (0, 1): 1, (0, 32): 8, (8, 0): 16, (8, 32): 24, (0, 8): 32, (1, 0): 128,
             (16, 0): 1024, (0, 64): 8192, (128, 0): 16384, (130, 70): 16384 + 8192 + 2 * 128 + 6}
    for (n, k), index in cases.items():
        codes = torch.zeros(256, 128, dtype=torch.int8)
        codes[n, k] = 5
        flat = nibble(nt.tile_weight(codes), torch.arange(256 * 128))
        assert flat.nonzero().flatten().tolist() == [index], (n, k)


@pytest.mark.parametrize(("o", "i", "r"), SHAPES, ids=SHAPE_IDS)
def test_logical_qweight_round_trip(o, i, r):
    qweight = torch.randint(-128, 128, (o, i // 2), generator=gen(3), dtype=torch.int8)
    tiled = nt.tile_qweight(qweight)
    assert torch.equal(nt.untile_qweight(tiled, o, i), qweight)
    codes = nt.untile_weight(tiled, o, i, signed=False)  # logical byte j: codes 2j (low), 2j+1 (high)
    assert torch.equal(codes[:, 0::2], qweight.view(torch.uint8) & 0xF)
    assert torch.equal(codes[:, 1::2], qweight.view(torch.uint8) >> 4)


# -- scales and vectors --------------------------------------------------------------------------------

@pytest.mark.parametrize(("o", "i", "r"), SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_int4_scales(o, i, r, dtype):
    wscales = torch.rand(i // 64, o, generator=gen(1)).add(0.5).to(dtype)
    tiled = nt.tile_scales(wscales, i)
    o_p, i_p, _ = nt.pad_dims(o, i, r)
    assert tiled.dtype == dtype and tuple(tiled.shape) == (i_p // 64, o_p)
    assert torch.equal(nt.untile_scales(tiled, o, i), wscales)
    g, n = grid(i // 64, o)
    assert torch.equal(tiled.reshape(-1)[scale_index(g, n, i_p // 64)], wscales)
    assert tiled.eq(1).sum() >= i_p // 64 * o_p - wscales.numel()  # padding is 1


@pytest.mark.parametrize(("o", "i", "r"), SHAPES, ids=SHAPE_IDS)
def test_nvfp4_micro_scales(o, i, r):
    wscales = random_fp8(i // 16, o, seed=o)
    tiled = nt.tile_micro_scales(wscales, i)
    o_p, i_p, _ = nt.pad_dims(o, i, r)
    assert tiled.dtype == torch.float8_e4m3fn and tuple(tiled.shape) == (i_p // 16, o_p)
    back = nt.untile_micro_scales(tiled, o, i)
    assert torch.equal(back.view(torch.uint8), wscales.view(torch.uint8))
    g, n = grid(i // 16, o)
    assert torch.equal(tiled.view(torch.uint8).reshape(-1)[micro_index(g, n, i_p)], wscales.view(torch.uint8))
    padded = nt.untile_micro_scales(tiled, o_p, i_p).float()
    assert padded[: i // 16, o:].eq(1).all() and padded[i // 16:].eq(1).all()


def test_micro_scales_refuse_16_bit():
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        nt.tile_micro_scales(torch.ones(8, 128, dtype=torch.float16), 128)


@pytest.mark.parametrize("length", [128, 384, 200, 7])
@pytest.mark.parametrize(("name", "fill"), [("bias", 0.0), ("smooth_factor", 1.0), ("wcscales", 1.0)])
def test_vectors(length, name, fill):
    vector = torch.randn(length, generator=gen(length)).to(torch.bfloat16)
    tiled = nt.tile_vector(vector, nt.FILL[name])
    assert nt.FILL[name] == fill and tiled.shape[0] == nt.ceil_to(length, 128)
    assert torch.equal(nt.untile_vector(tiled, length), vector)
    n = torch.arange(length)
    assert torch.equal(tiled[scale_index(torch.zeros_like(n), n, 1)], vector)
    assert nt.untile_vector(tiled, tiled.shape[0])[length:].eq(fill).all()


def test_vector_spot_positions():
    """One lane's four scales are n = 2q, 2q+1, 2q+8, 2q+9: stored order 0 1 8 9 2 3 10 11 ..."""
    tiled = nt.tile_vector(torch.arange(256, dtype=torch.float32), 0.0)
    assert tiled[:12].tolist() == [0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13]
    assert tiled[16:20].tolist() == [16, 17, 24, 25] and tiled[128:132].tolist() == [128, 129, 136, 137]


# -- low-rank factors ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("o", "i", "r"), SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("factor", ["proj_down", "proj_up"])
def test_lowrank(o, i, r, factor):
    rows = i if factor == "proj_down" else o
    weight = torch.randn(rows, r, generator=gen(rows + r)).to(torch.float16)
    tile, untile = (nt.tile_proj_down, nt.untile_proj_down) if factor == "proj_down" else \
        (nt.tile_proj_up, nt.untile_proj_up)
    tiled = tile(weight)
    rows_p, r_p = nt.ceil_to(rows, 128), nt.ceil_to(r, 16)
    assert tiled.dtype == torch.float16 and tuple(tiled.shape) == (rows_p, r_p)
    assert torch.equal(untile(tiled, rows, r), weight)
    x, c = grid(rows, r)
    assert torch.equal(tiled.reshape(-1)[fragment_index(x, c, r_p, factor == "proj_up")], weight)
    assert untile(tiled, rows_p, r_p).abs().sum() == weight.abs().sum()  # padding is 0


def test_lowrank_spot_positions():
    """In a 16x16 block, n = 1 is 32 elements on and k = 2 is 8 on; proj_down swaps which is which."""
    block = torch.arange(16 * 16, dtype=torch.float32).reshape(16, 16)  # value = 16 * row + col
    up = nt.tile_proj_up(block)[:16].reshape(-1)  # first 16 rows of the [128, 16] padded result
    down = nt.tile_proj_down(block)[:16].reshape(-1)
    # positions: ke = 1, kh = 1, nh = 1, kq = 1, nr = 1 -> (n, k) = (0, 1) (0, 8) (8, 0) (0, 2) (1, 0)
    assert up[[1, 2, 4, 8, 32]].tolist() == [1, 8, 128, 2, 16]  # n = row, k = column
    assert down[[1, 2, 4, 8, 32]].tolist() == [16, 128, 8, 32, 1]  # n = column, k = row


# -- a whole layer -------------------------------------------------------------------------------------

def logical_layer(o: int, i: int, r: int, nvfp4: bool) -> dict[str, torch.Tensor]:
    tensors = {"qweight": torch.randint(-128, 128, (o, i // 2), generator=gen(0), dtype=torch.int8),
               "smooth_factor": torch.rand(i, generator=gen(1)).add(0.5).half(),
               "proj_down": torch.randn(i, r, generator=gen(2)).half(),
               "proj_up": torch.randn(o, r, generator=gen(3)).half(),
               "bias": torch.randn(o, generator=gen(4)).half()}
    tensors["smooth_factor_orig"] = tensors["smooth_factor"].clone()
    if nvfp4:
        tensors |= {"wscales": random_fp8(i // 16, o, seed=5), "wtscale": torch.tensor([0.01]),
                    "wcscales": torch.ones(o, dtype=torch.float16)}
    else:
        tensors["wscales"] = torch.rand(i // 64, o, generator=gen(5)).half()
    return tensors


@pytest.mark.parametrize(("o", "i", "r"), SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("nvfp4", [False, True], ids=["int4", "nvfp4"])
def test_layer_round_trip(o, i, r, nvfp4):
    logical = logical_layer(o, i, r, nvfp4)
    tiled = nt.tile_layer(logical)
    shapes = nt.tiled_shapes(o, i, r, 16 if nvfp4 else 64)
    assert set(tiled) == set(logical)
    for name, tensor in tiled.items():
        assert tensor.dtype == logical[name].dtype, name
        if name != "wtscale":
            assert tuple(tensor.shape) == shapes[name], name
    back = nt.untile_layer(tiled, o, i, r)
    assert set(back) == set(logical)
    for name, tensor in back.items():
        as_bits = torch.uint8 if tensor.dtype == torch.float8_e4m3fn else tensor.dtype
        assert torch.equal(tensor.view(as_bits), logical[name].view(as_bits)), name
