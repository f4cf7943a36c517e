"""diffquant's own C kernels (kernels/vnni.c, kernels/avx2.c in its two builds): exact integer accumulations
against the plain-torch reference, the rescale against reference_segmented_matmul, the quantizer bit for
bit against the formats' torch expression, the resident layout, and a clean fallback without a compiler.
Every test runs for each backend whose kernels this CPU executes (`vnni` and `avx_vnni`'s EVEX build on
AVX-512 VNNI machines, `avx2` on every AVX2 one), so no machine skips its own code path."""

from __future__ import annotations

import pytest
import torch

from diffquant import kernels
from diffquant.formats import QuantSpec
from diffquant.formats.ops import quantize_blocks
from diffquant.kernels import (
    CpuFeatures,
    native,
    reference_segment_accumulations,
    reference_segmented_matmul,
    vnni,
)
from diffquant.kernels.native import pack_strips, unpack_strips
from diffquant.kernels.reference import reference_levels

pytestmark = pytest.mark.usefixtures("single_thread")

NATIVE = ("vnni", "avx2", "avx_vnni")
RUNS_HERE = [name for name in NATIVE if kernels.get_backend(name).available(kernels.detect_cpu())]
VNNI_BOX = CpuFeatures("AVX512", frozenset({"avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}), "VNNI", 2)


def fused(name: str):
    return kernels.get_backend(name).fused


native_kernels = pytest.mark.parametrize("name", RUNS_HERE)
# Packed layers need a backend selection accepts: not pathological here (vnni's plain GEMMs are torch._int_mm).
SELECTABLE_HERE = [name for name in RUNS_HERE if kernels.get_backend(name).pathological(kernels.detect_cpu()) is None]


def test_this_cpu_runs_a_native_backend_where_it_should():
    """An AVX2 CPU with a C compiler always has `avx2` (the guard against a silently skipped suite)."""
    cpu = kernels.detect_cpu()
    if {"avx2", "fma"} <= cpu.flags and not isinstance(fused("avx2").library.load(), str):
        assert "avx2" in RUNS_HERE


# (M, K, N, bits, L, threads): row tails of the 4-row tile, strip and 3-strip-block tails, one and many
# segments, long segments (8-bit per token), more threads than work.
CASES = [
    (1, 8, 3, 4, 8, 1),
    (5, 64, 17, 4, 16, 2),
    (13, 96, 50, 8, 12, 3),
    (33, 256, 70, 4, 64, 2),
    (7, 520, 33, 8, 520, 2),
    (70, 192, 100, 3, 64, 4),
    (37, 384, 40, 8, 128, 2),  # avx2's sign transfer: two variant tables per group, three groups, tails
]


def codes(shape, bits, seed):
    lim = 2 ** (bits - 1)
    return torch.randint(-lim, lim, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(seed))


def weights(name, shape, bits, seed):
    """Weight codes a kernel's fused path takes: sign transfer (avx2) has no 8-bit -128 (see the tests below)."""
    b = codes(shape, bits, seed)
    return b if fused(name).accepts(b, bits) else b.clamp(min=-127)


def case_id(case):
    m, k, n, bits, length, threads = case
    return f"{m}x{k}x{n}-w{bits}-L{length}-t{threads}"


def assert_matches_the_float_path(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """A fused layer's output against the "float" backend's. In bf16 the fused epilogue rounds y + bias
    once, the float path rounds y and then the sum: they may differ by an ulp of the largest output."""
    ulp = 1e-5 if dtype == torch.float32 else 2**-8
    torch.testing.assert_close(got.float(), expected.float(), rtol=1e-5 if dtype == torch.float32 else 1e-2,
                               atol=ulp * float(expected.float().abs().max()))


@pytest.fixture
def threads(request):
    before = torch.get_num_threads()
    yield lambda t: torch.set_num_threads(t)
    torch.set_num_threads(before)


@pytest.mark.parametrize("strip", [8, 16])
@pytest.mark.parametrize(("bits", "offset"), [(3, 8), (4, 8), (8, 128), (8, 0)])
def test_weight_layout_round_trips(bits, offset, strip):
    b = codes((24, 37), bits, seed=1)
    packed = pack_strips(b, bits, strip, offset)
    strips = -(-37 // strip)
    assert packed.dtype == torch.uint8
    assert packed.numel() == strips * strip * 24 // (2 if bits <= 4 else 1)  # nibbles: two codes per byte
    assert torch.equal(unpack_strips(packed, 24, 37, bits, offset), b)
    if bits <= 4:
        with pytest.raises(ValueError, match="plus 8"):
            pack_strips(b, bits, strip, 0)


@native_kernels
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_each_segment_accumulates_exactly(name, case, threads):
    """b_scales one-hot on segment s and unit a_scales: the float output is acc_s itself, exactly."""
    m, k, n, bits, length, t = case
    threads(t)
    a, b = codes((m, k), 8, seed=2), weights(name, (k, n), bits, seed=3)
    packed, segments = fused(name).pack(b, bits), k // length
    expected = reference_segment_accumulations(a, b, length)
    for s in {0, segments - 1}:
        one_hot = torch.zeros(segments, n)
        one_hot[s] = 1
        y = fused(name).matmul(a, packed, n, bits, length, torch.ones(m, segments), one_hot)
        assert torch.equal(y.to(torch.int64), expected[s])


@native_kernels
def test_extreme_codes_do_not_overflow(name, threads):
    """The largest products each kernel's exactness argument allows: 8-bit weights at -127 where sign
    transfer takes them (avx2), else -128; 4-bit weights at -8 against 8-bit and 4-bit activations."""
    threads(2)
    f, low = fused(name), -127 if name == "avx2" else -128
    a, b = torch.full((5, 1024), -128, dtype=torch.int8), torch.full((1024, 20), low, dtype=torch.int8)
    y = f.matmul(a, f.pack(b, 8), 20, 8, 1024, torch.ones(5, 1), torch.ones(1, 20))
    assert torch.all(y == 128 * -low * 1024)
    b4 = torch.full((1024, 20), -8, dtype=torch.int8)
    for a4 in (torch.full((5, 1024), -8, dtype=torch.int8), torch.full((5, 1024), -128, dtype=torch.int8)):
        y4 = f.matmul(a4, f.pack(b4, 4), 20, 4, 64, torch.ones(5, 16), torch.ones(16, 20))
        assert torch.all(y4 == -8 * int(a4[0, 0]) * 1024)


@native_kernels
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("scales", ["per-row", "shared-row", "per-tensor-weight"])
def test_fused_matmul_equals_reference(name, case, scales, threads):
    m, k, n, bits, length, t = case
    threads(t)
    g = torch.Generator().manual_seed(4)
    a, b = codes((m, k), 8, seed=5), weights(name, (k, n), bits, seed=6)
    segments = k // length
    a_scales = torch.rand(1 if scales == "shared-row" else m, segments, generator=g) + 0.1
    b_scales = torch.rand(segments, 1 if scales == "per-tensor-weight" else n, generator=g) + 0.1
    y = fused(name).matmul(a, fused(name).pack(b, bits), n, bits, length, a_scales, b_scales)
    expected = reference_segmented_matmul(a, b, length, a_scales, b_scales)
    # float32 rescale of exact sums: errors of a few ulp of the largest partial sums (cancellation)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


@native_kernels
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_the_epilogue_adds_the_bias_and_rounds_once_like_torch(name, case, out_dtype, threads):
    """One segment, unit activation scales: y = acc * b_scale + bias in float32 (two roundings, as torch
    does them), then one cast; the kernel's bf16 rounding (nearest even, overflow to inf) equals torch's."""
    m, k, n, bits, _, t = case
    threads(t)
    g = torch.Generator().manual_seed(10)
    a, b = codes((m, k), 8, seed=11), weights(name, (k, n), bits, seed=12)
    b_scales, bias = torch.rand(1, n, generator=g) + 0.1, torch.randn(n, generator=g) * 100
    bias[0] = 3.4e38  # above bf16's largest finite value: rounds to inf
    acc = reference_segment_accumulations(a, b, k)[0].float()
    expected = (acc * b_scales + bias).to(out_dtype)
    y = fused(name).matmul(a, fused(name).pack(b, bits), n, bits, k, torch.ones(m, 1), b_scales, bias, out_dtype)
    assert y.dtype == out_dtype and torch.equal(y, expected)
    if out_dtype == torch.bfloat16:
        assert torch.isinf(y[:, 0]).all()


@native_kernels
@pytest.mark.parametrize("case", CASES[:4], ids=case_id)
def test_the_epilogue_adds_an_addend_before_the_bias(name, case, threads):
    """A low-rank branch's output joins the epilogue: (acc * scale + addend) + bias in float32, exactly as
    torch orders it; a strided addend (a column slice) is read with its row stride."""
    m, k, n, bits, _, t = case
    threads(t)
    g = torch.Generator().manual_seed(15)
    a, b = codes((m, k), 8, seed=16), weights(name, (k, n), bits, seed=17)
    b_scales, bias = torch.rand(1, n, generator=g) + 0.1, torch.randn(n, generator=g)
    addend = torch.randn(m, n + 3, generator=g)[:, 1:n + 1]
    acc = reference_segment_accumulations(a, b, k)[0].float()
    y = fused(name).matmul(a, fused(name).pack(b, bits), n, bits, k, torch.ones(m, 1), b_scales, bias,
                           torch.float32, addend)
    assert torch.equal(y, (acc * b_scales + addend) + bias)
    with pytest.raises(ValueError, match="addend"):
        fused(name).matmul(a, fused(name).pack(b, bits), n, bits, k, torch.ones(m, 1), b_scales, bias,
                           torch.float32, addend.bfloat16())


@native_kernels
def test_fused_matmul_rejects_segments_it_cannot_cut(name):
    f = fused(name)
    a, b = codes((2, 12), 8, seed=7), weights(name, (12, 3), 8, seed=8)
    with pytest.raises(RuntimeError, match="rejected"):
        f.matmul(a, f.pack(b, 8), 3, 8, 6, torch.ones(2, 2), torch.ones(2, 3))
    assert not f.supports(8, 6, 12) and not f.supports(4, 4, 12)
    assert f.supports(4, 64, 4096) and f.supports(8, 12, 36)


def random_levels(seed: int) -> torch.Tensor:
    levels = torch.randint(-60, 68, (16,), generator=torch.Generator().manual_seed(seed))
    levels[5], levels[12] = -60, 67  # max(u) = 127: the widest table vpmaddubsw takes at |a| = 128
    return levels.to(torch.int16)


# 16 signed integer levels that nibbles index (FusedKernels' `levels`): FP4 E2M1 and E1M2 times 2, a random table.
LEVELS = {
    "e2m1x2": torch.tensor([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=torch.int8),
    "e1m2x2": torch.tensor([*range(8), 0, *range(-1, -8, -1)], dtype=torch.int8),
    "random127": random_levels(30),
}
LEVEL_LENGTHS = [32, 64, 4096]  # K = 4096: groups of 32, 64, and one segment


def extreme_activations(m: int, k: int, seed: int) -> torch.Tensor:
    """Random codes, row 0 all -128 and row 1 all 127: the largest products at every position."""
    a = codes((m, k), 8, seed)
    a[0], a[1] = -128, 127
    return a


def level_indices(k: int, n: int, levels: torch.Tensor, seed: int) -> torch.Tensor:
    """Random indices, stored as index - 8; column 0 all at the largest unsigned level u = levels - min (the int16
    chunks' worst case against rows of -128), column 1 at the smallest."""
    b = codes((k, n), 4, seed)
    u = levels.long() - int(levels.min())
    b[:, 0], b[:, 1] = int(u.argmax()) - 8, int(u.argmin()) - 8
    return b


@native_kernels
@pytest.mark.parametrize("length", LEVEL_LENGTHS)
@pytest.mark.parametrize("table", LEVELS)
def test_levels_decode_nibbles_exactly(name, table, length, threads):
    """Unit scales: y is the exact sum of a * levels[index] over all of K (every partial sum exact in float32,
    so any one wrong product shows); one-hot weight scales: the first and the last segment alone."""
    threads(2)
    m, k, n, levels, f = 9, 4096, 37, LEVELS[table], fused(name)
    a, b = extreme_activations(m, k, seed=20), level_indices(k, n, levels, seed=21)
    expected = reference_segment_accumulations(a, reference_levels(b, levels), length)
    partial = expected.cumsum(0)
    assert torch.equal(partial.float().long(), partial)
    packed, segments = f.pack(b, 4), k // length
    y = f.matmul(a, packed, n, 4, length, torch.ones(m, segments), torch.ones(segments, n), levels=levels)
    assert torch.equal(y.to(torch.int64), partial[-1])
    for s in {0, segments - 1}:
        one_hot = torch.zeros(segments, n)
        one_hot[s] = 1
        y = f.matmul(a, packed, n, 4, length, torch.ones(m, segments), one_hot, levels=levels)
        assert torch.equal(y.to(torch.int64), expected[s])


@native_kernels
@pytest.mark.parametrize("length", LEVEL_LENGTHS)
@pytest.mark.parametrize("table", LEVELS)
def test_levels_through_the_rescale_and_the_epilogue(name, table, length, threads):
    """Random scales, an addend and a bias: float32 against the float64 reference; bf16 is that float32 output
    rounded once (the same epilogue)."""
    threads(2)
    m, k, n, levels, f = 9, 4096, 37, LEVELS[table], fused(name)
    g = torch.Generator().manual_seed(22)
    a, b = extreme_activations(m, k, seed=23), level_indices(k, n, levels, seed=24)
    segments = k // length
    a_scales, b_scales = torch.rand(m, segments, generator=g) + 0.1, torch.rand(segments, n, generator=g) + 0.1
    bias, addend = torch.randn(n, generator=g), torch.randn(m, n, generator=g) * 1000
    packed = f.pack(b, 4)
    y = f.matmul(a, packed, n, 4, length, a_scales, b_scales, bias, torch.float32, addend, levels=levels)
    expected = (reference_segmented_matmul(a, reference_levels(b, levels), length, a_scales, b_scales)
                + addend.double() + bias.double())
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    y16 = f.matmul(a, packed, n, 4, length, a_scales, b_scales, bias, torch.bfloat16, addend, levels=levels)
    assert y16.dtype == torch.bfloat16 and torch.equal(y16, y.to(torch.bfloat16))


@native_kernels
@pytest.mark.parametrize("case", [case for case in CASES if case[3] <= 4], ids=case_id)
def test_the_int4_table_gives_the_plain_nibble_path_bit_for_bit(name, case, threads):
    """levels = the int4 codes themselves (offset 8, through the decode table) and levels=None (no table: the
    path the tests above hold to the reference) give the same bits."""
    m, k, n, bits, length, t = case
    threads(t)
    g = torch.Generator().manual_seed(25)
    a, b, f = codes((m, k), 8, seed=26), codes((k, n), bits, seed=27), fused(name)
    args = (a, f.pack(b, bits), n, bits, length, torch.rand(m, k // length, generator=g),
            torch.rand(k // length, n, generator=g), torch.randn(n, generator=g), torch.bfloat16)
    assert torch.equal(f.matmul(*args, levels=torch.arange(-8, 8, dtype=torch.int8)), f.matmul(*args))


@native_kernels
def test_tables_the_kernels_cannot_take_are_refused(name):
    """max(u) = max - min: 127 at most for vpmaddubsw (avx2), 255 for vpdpbusd; a table the kernels do not take
    is a ValueError, as is one for 8-bit codes."""
    f = fused(name)
    assert all(f.takes_levels(levels) for levels in LEVELS.values())
    span200 = torch.tensor([0] * 15 + [200], dtype=torch.int16)
    span255 = torch.arange(-128, 128, 17, dtype=torch.int16)  # -128, -111, ..., 127
    assert f.takes_levels(span200) is (name != "avx2") and f.takes_levels(span255) is (name != "avx2")
    assert not f.takes_levels(span255 + (torch.arange(16) == 0) * -1)  # span 256: no build
    assert not f.takes_levels(LEVELS["e2m1x2"].float()) and not f.takes_levels(LEVELS["e2m1x2"][:8])
    a, b = extreme_activations(5, 64, seed=28), level_indices(64, 20, span255, seed=29)
    args = (a, f.pack(b, 4), 20, 4, 32, torch.ones(5, 2), torch.ones(2, 20))
    if name == "avx2":
        with pytest.raises(ValueError, match="spanning at most 127"):
            f.matmul(*args, levels=span200)
    else:  # the widest byte table, exactly
        expected = reference_segment_accumulations(a, reference_levels(b, span255), 64)[0]
        assert torch.equal(f.matmul(*args, levels=span255).to(torch.int64), expected)
    with pytest.raises(ValueError, match="8-bit codes"):
        f.matmul(a, f.pack(b, 8), 20, 8, 32, torch.ones(5, 2), torch.ones(2, 20), levels=LEVELS["e2m1x2"])


QUANT_SPECS = {
    "a4-group64": QuantSpec("int4", "group", group_size=64, dynamic=True),
    "a4-group8": QuantSpec("int4", "group", group_size=8, dynamic=True),
    "a8-token": QuantSpec("int8", "token", dynamic=True),
    "a6-token": QuantSpec("int6", "token", dynamic=True),
}


@native_kernels
@pytest.mark.parametrize("smoothed", [False, True], ids=["plain", "smoothed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("spec_name", QUANT_SPECS)
@pytest.mark.parametrize("shape", [(1, 64), (3, 100), (17, 300)], ids=lambda s: "x".join(map(str, s)))
def test_quantizer_matches_the_torch_expression_bit_for_bit(name, shape, spec_name, dtype, smoothed, threads):
    """smoothed: the kernel divides by a smoothing vector itself, as torch's x / smooth.to(x.dtype) does."""
    threads(2)
    spec, (m, c) = QUANT_SPECS[spec_name], shape
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(m, c, generator=g) * (torch.rand(m, 1, generator=g) * 8)).to(dtype)
    x[0, :5] = 0
    x[-1, -3:] = torch.tensor([0.5, -2.5, 3.5]).to(dtype) * x[-1].abs().max()  # ties after division
    if m > 2:
        x[1] = 0  # all-zero rows get the smallest positive scale
    smooth = torch.rand(c, generator=g) * 3 + 0.25 if smoothed else None
    expected_codes, expected_scale, _ = quantize_blocks(x if smooth is None else x / smooth.to(dtype), spec)
    length = spec.group_size if spec.granularity == "group" else c
    got_codes, got_scale = fused(name).quantize(x, length, int(spec.qformat.qmin), int(spec.qformat.qmax), smooth)
    width = expected_codes.numel() // m
    assert torch.equal(got_codes[:, :width], expected_codes.reshape(m, width).to(torch.int8))
    assert torch.equal(got_codes[:, width:], torch.zeros_like(got_codes[:, width:]))
    assert torch.equal(got_scale, expected_scale.float().reshape(m, -1))


@native_kernels
def test_quantizer_declines_other_dtypes(name):
    assert fused(name).quantize(torch.zeros(2, 8, dtype=torch.float16), 8, -8, 7) is None


def test_vnni_cpus_select_vnni_where_the_library_builds(monkeypatch):
    monkeypatch.delenv(kernels.ENV_BACKEND, raising=False)
    builds = not isinstance(vnni.LIBRARY.load(), str)
    assert kernels.select_backend(cpu=VNNI_BOX).name == ("vnni" if builds else "int_mm")
    without_bw = CpuFeatures("AVX512", frozenset({"avx512f", "avx512_vnni"}), "VNNI without BW", 2)
    assert kernels.select_backend(cpu=without_bw).name == "int_mm"


@pytest.fixture
def fresh_libraries():
    """Every native library rebuilt on its next use (and again after the test)."""
    libraries = [fused(name).library for name in NATIVE]
    for library in libraries:
        library.cache_clear()
    yield
    for library in libraries:
        library.cache_clear()


def test_without_a_compiler_the_backends_are_unavailable_and_say_why(monkeypatch, tmp_path, fresh_libraries):
    monkeypatch.delenv(kernels.ENV_BACKEND, raising=False)
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    assert "no C compiler" in vnni.LIBRARY.load()
    for name in NATIVE:
        assert not kernels.get_backend(name).available(VNNI_BOX)
    assert kernels.select_backend(cpu=VNNI_BOX).name == "int_mm"
    with pytest.raises(kernels.BackendUnavailableError, match="no C compiler"):
        kernels.select_backend("vnni", cpu=VNNI_BOX)


@native_kernels
def test_threads_come_from_openmp_and_a_compiler_without_it_gets_the_pthread_build(name, monkeypatch, tmp_path,
                                                                                    threads, fresh_libraries):
    """The default build shares torch's OpenMP pool; when that build fails, the pthread one computes the
    same products (the exact integer sums of a 3-thread GEMM)."""
    f = fused(name)
    assert f.library.load().threading == "openmp"
    assert kernels.get_backend(name).details().endswith("threads: openmp")
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(native, "THREADING", (("openmp", ("-fno-such-option",)), *native.THREADING[1:]))
    f.library.cache_clear()
    assert f.library.load().threading == "pthreads"
    threads(3)
    a, b = codes((13, 96), 8, seed=13), weights(name, (96, 50), 8, seed=14)
    y = f.matmul(a, f.pack(b, 8), 50, 8, 96, torch.ones(13, 1), torch.ones(1, 50))
    assert torch.equal(y.to(torch.int64), reference_segment_accumulations(a, b, 96)[0])


LAYER_SPECS = {
    "w4a4-g64": (QuantSpec("int4", "group", group_size=64, scale_dtype="float16"),
                 QuantSpec("int4", "group", group_size=64, dynamic=True)),
    "w8a8-token": (QuantSpec("int8", "channel", scale_dtype="float16"), QuantSpec("int8", "token", dynamic=True)),
    "w4a8-asym": (QuantSpec("int4", "channel"), QuantSpec("uint8", "token", dynamic=True, symmetric=False)),
}


def packed_pair(spec_name: str, backend: str):
    from diffquant.nn.layers import QLinear
    from diffquant.nn.packed import PackedLinear

    torch.manual_seed(0)
    layer = QLinear(torch.nn.Linear(192, 40), *LAYER_SPECS[spec_name])
    layer.calibrate_weight()
    return PackedLinear.from_layer(layer, backend=backend), PackedLinear.from_layer(layer, backend="float")


@pytest.mark.parametrize("name", SELECTABLE_HERE)
@pytest.mark.parametrize("spec_name", LAYER_SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_packed_layers_use_the_fused_kernels_where_both_sides_are_symmetric(name, spec_name, dtype):
    packed, plain = packed_pair(spec_name, name)
    x = torch.randn(2, 9, 192, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        got, expected = packed(x), plain(x)
    symmetric = spec_name != "w4a8-asym"
    assert (packed.weight.fused is not None) is symmetric and (f"{name} fused" in repr(packed)) is symmetric
    assert got.dtype == dtype
    assert_matches_the_float_path(got, expected, dtype)
    assert torch.equal(packed.weight.int8_codes(), plain.weight.int8_codes())
    strip = fused(name).strip
    if symmetric:  # K x N codes, N padded to whole strips; <= 4-bit codes two per byte
        assert packed.weight.codes.numel() == 192 * -(-40 // strip) * strip // (2 if packed.weight.spec.bits <= 4 else 1)
