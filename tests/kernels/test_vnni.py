"""diffquant's own VNNI kernels (kernels/vnni.c): exact integer accumulations against the plain-torch
reference, the rescale against reference_segmented_matmul, the quantizer bit for bit against the formats'
torch expression, the resident layout, and a clean fallback without a compiler."""

from __future__ import annotations

import pytest
import torch

from diffquant import kernels
from diffquant.formats import QuantSpec
from diffquant.formats.ops import quantize_blocks
from diffquant.kernels import CpuFeatures, reference_segment_accumulations, reference_segmented_matmul, vnni
from diffquant.kernels.vnni import VnniKernels, pack_weight, unpack_weight

pytestmark = pytest.mark.usefixtures("single_thread")

HERE = kernels.get_backend("vnni").available(kernels.detect_cpu())
needs_vnni = pytest.mark.skipif(not HERE, reason="the vnni kernels do not run on this CPU / without a compiler")
VNNI_BOX = CpuFeatures("AVX512", frozenset({"avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}), "VNNI", 2)

# (M, K, N, bits, L, threads): row tails of the 4-row tile, strip and 3-strip-block tails, one and many
# segments, long segments (8-bit per token), more threads than work.
CASES = [
    (1, 8, 3, 4, 8, 1),
    (5, 64, 17, 4, 16, 2),
    (13, 96, 50, 8, 12, 3),
    (33, 256, 70, 4, 64, 2),
    (7, 520, 33, 8, 520, 2),
    (70, 192, 100, 3, 64, 4),
]


def codes(shape, bits, seed):
    lim = 2 ** (bits - 1)
    return torch.randint(-lim, lim, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(seed))


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


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_weight_layout_round_trips(bits):
    b = codes((24, 37), bits, seed=1)
    packed = pack_weight(b, bits)
    strips = -(-37 // 16)
    assert packed.dtype == torch.uint8
    assert packed.numel() == strips * 16 * 24 // (2 if bits <= 4 else 1)  # nibbles: two codes per byte
    assert torch.equal(unpack_weight(packed, 24, 37, bits), b)


@needs_vnni
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_each_segment_accumulates_exactly(case, threads):
    """b_scales one-hot on segment s and unit a_scales: the float output is acc_s itself, exactly."""
    m, k, n, bits, length, t = case
    threads(t)
    a, b = codes((m, k), 8, seed=2), codes((k, n), bits, seed=3)
    packed, segments = pack_weight(b, bits), k // length
    expected = reference_segment_accumulations(a, b, length)
    for s in {0, segments - 1}:
        one_hot = torch.zeros(segments, n)
        one_hot[s] = 1
        y = VnniKernels.matmul(a, packed, n, bits, length, torch.ones(m, segments), one_hot)
        assert torch.equal(y.to(torch.int64), expected[s])


@needs_vnni
def test_extreme_codes_do_not_overflow(threads):
    threads(2)
    a, b = torch.full((5, 1024), -128, dtype=torch.int8), torch.full((1024, 20), -128, dtype=torch.int8)
    y = VnniKernels.matmul(a, pack_weight(b, 8), 20, 8, 1024, torch.ones(5, 1), torch.ones(1, 20))
    assert torch.all(y == 2**24)
    a4, b4 = torch.full((5, 1024), -8, dtype=torch.int8), torch.full((1024, 20), -8, dtype=torch.int8)
    y4 = VnniKernels.matmul(a4, pack_weight(b4, 4), 20, 4, 64, torch.ones(5, 16), torch.ones(16, 20))
    assert torch.all(y4 == 64 * 1024)


@needs_vnni
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("scales", ["per-row", "shared-row", "per-tensor-weight"])
def test_fused_matmul_equals_reference(case, scales, threads):
    m, k, n, bits, length, t = case
    threads(t)
    g = torch.Generator().manual_seed(4)
    a, b = codes((m, k), 8, seed=5), codes((k, n), bits, seed=6)
    segments = k // length
    a_scales = torch.rand(1 if scales == "shared-row" else m, segments, generator=g) + 0.1
    b_scales = torch.rand(segments, 1 if scales == "per-tensor-weight" else n, generator=g) + 0.1
    y = VnniKernels.matmul(a, pack_weight(b, bits), n, bits, length, a_scales, b_scales)
    expected = reference_segmented_matmul(a, b, length, a_scales, b_scales)
    # float32 rescale of exact sums: errors of a few ulp of the largest partial sums (cancellation)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


@needs_vnni
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_the_epilogue_adds_the_bias_and_rounds_once_like_torch(case, out_dtype, threads):
    """One segment, unit activation scales: y = acc * b_scale + bias in float32 (two roundings, as torch
    does them), then one cast; the kernel's bf16 rounding (nearest even, overflow to inf) equals torch's."""
    m, k, n, bits, _, t = case
    threads(t)
    g = torch.Generator().manual_seed(10)
    a, b = codes((m, k), 8, seed=11), codes((k, n), bits, seed=12)
    b_scales, bias = torch.rand(1, n, generator=g) + 0.1, torch.randn(n, generator=g) * 100
    bias[0] = 3.4e38  # above bf16's largest finite value: rounds to inf
    acc = reference_segment_accumulations(a, b, k)[0].float()
    expected = (acc * b_scales + bias).to(out_dtype)
    y = VnniKernels.matmul(a, pack_weight(b, bits), n, bits, k, torch.ones(m, 1), b_scales, bias, out_dtype)
    assert y.dtype == out_dtype and torch.equal(y, expected)
    if out_dtype == torch.bfloat16:
        assert torch.isinf(y[:, 0]).all()


@needs_vnni
def test_fused_matmul_rejects_segments_it_cannot_cut():
    a, b = codes((2, 12), 8, seed=7), codes((12, 3), 8, seed=8)
    with pytest.raises(RuntimeError, match="rejected"):
        VnniKernels.matmul(a, pack_weight(b, 8), 3, 8, 6, torch.ones(2, 2), torch.ones(2, 3))
    assert not VnniKernels.supports(8, 6, 12) and not VnniKernels.supports(4, 4, 12)
    assert VnniKernels.supports(4, 64, 4096) and VnniKernels.supports(8, 12, 36)


QUANT_SPECS = {
    "a4-group64": QuantSpec("int4", "group", group_size=64, dynamic=True),
    "a4-group8": QuantSpec("int4", "group", group_size=8, dynamic=True),
    "a8-token": QuantSpec("int8", "token", dynamic=True),
    "a6-token": QuantSpec("int6", "token", dynamic=True),
}


@needs_vnni
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("spec_name", QUANT_SPECS)
@pytest.mark.parametrize("shape", [(1, 64), (3, 100), (17, 300)], ids=lambda s: "x".join(map(str, s)))
def test_quantizer_matches_the_torch_expression_bit_for_bit(shape, spec_name, dtype, threads):
    threads(2)
    spec, (m, c) = QUANT_SPECS[spec_name], shape
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(m, c, generator=g) * (torch.rand(m, 1, generator=g) * 8)).to(dtype)
    x[0, :5] = 0
    x[-1, -3:] = torch.tensor([0.5, -2.5, 3.5]).to(dtype) * x[-1].abs().max()  # ties after division
    if m > 2:
        x[1] = 0  # all-zero rows get the smallest positive scale
    expected_codes, expected_scale, _ = quantize_blocks(x, spec)
    length = spec.group_size if spec.granularity == "group" else c
    got_codes, got_scale = VnniKernels.quantize(x, length, int(spec.qformat.qmin), int(spec.qformat.qmax))
    width = expected_codes.numel() // m
    assert torch.equal(got_codes[:, :width], expected_codes.reshape(m, width).to(torch.int8))
    assert torch.equal(got_codes[:, width:], torch.zeros_like(got_codes[:, width:]))
    assert torch.equal(got_scale, expected_scale.float().reshape(m, -1))


@needs_vnni
def test_quantizer_declines_other_dtypes():
    assert VnniKernels.quantize(torch.zeros(2, 8, dtype=torch.float16), 8, -8, 7) is None


def test_vnni_cpus_select_vnni_where_the_library_builds(monkeypatch):
    monkeypatch.delenv(kernels.ENV_BACKEND, raising=False)
    builds = not isinstance(vnni.load_library(), str)
    assert kernels.select_backend(cpu=VNNI_BOX).name == ("vnni" if builds else "int_mm")
    without_bw = CpuFeatures("AVX512", frozenset({"avx512f", "avx512_vnni"}), "VNNI without BW", 2)
    assert kernels.select_backend(cpu=without_bw).name == "int_mm"


def test_without_a_compiler_the_backend_is_unavailable_and_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setenv(vnni.CACHE_ENV, str(tmp_path))
    vnni.load_library.cache_clear()
    try:
        assert "no C compiler" in vnni.load_library()
        backend = kernels.get_backend("vnni")
        assert not backend.available(VNNI_BOX)
        assert kernels.select_backend(cpu=VNNI_BOX).name == "int_mm"
        with pytest.raises(kernels.BackendUnavailableError, match="no C compiler"):
            kernels.select_backend("vnni", cpu=VNNI_BOX)
    finally:
        vnni.load_library.cache_clear()


@needs_vnni
def test_threads_come_from_openmp_and_a_compiler_without_it_gets_the_pthread_build(monkeypatch, tmp_path, threads):
    """The default build shares torch's OpenMP pool; when that build fails, the pthread one computes the
    same products (the exact integer sums of a 3-thread GEMM)."""
    assert vnni.load_library().threading == "openmp"
    assert kernels.get_backend("vnni").details() == "threads: openmp"
    monkeypatch.setenv(vnni.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(vnni, "THREADING", (("openmp", ("-fno-such-option",)), *vnni.THREADING[1:]))
    vnni.load_library.cache_clear()
    try:
        assert vnni.load_library().threading == "pthreads"
        threads(3)
        a, b = codes((13, 96), 8, seed=13), codes((96, 50), 8, seed=14)
        y = VnniKernels.matmul(a, pack_weight(b, 8), 50, 8, 96, torch.ones(13, 1), torch.ones(1, 50))
        assert torch.equal(y.to(torch.int64), reference_segment_accumulations(a, b, 96)[0])
    finally:
        vnni.load_library.cache_clear()


LAYER_SPECS = {
    "w4a4-g64": (QuantSpec("int4", "group", group_size=64, scale_dtype="float16"),
                 QuantSpec("int4", "group", group_size=64, dynamic=True)),
    "w8a8-token": (QuantSpec("int8", "channel", scale_dtype="float16"), QuantSpec("int8", "token", dynamic=True)),
    "w4a8-asym": (QuantSpec("int4", "channel"), QuantSpec("uint8", "token", dynamic=True, symmetric=False)),
}


def packed_pair(name: str):
    from diffquant.nn.layers import QLinear
    from diffquant.nn.packed import PackedLinear

    torch.manual_seed(0)
    layer = QLinear(torch.nn.Linear(192, 40), *LAYER_SPECS[name])
    layer.calibrate_weight()
    return PackedLinear.from_layer(layer, backend="vnni"), PackedLinear.from_layer(layer, backend="int_mm")


@needs_vnni
@pytest.mark.parametrize("name", LAYER_SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_packed_layers_use_the_fused_kernels_where_both_sides_are_symmetric(name, dtype):
    fused, plain = packed_pair(name)
    x = torch.randn(2, 9, 192, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        got, expected = fused(x), plain(x)
    symmetric = name != "w4a8-asym"
    assert (fused.weight.fused is not None) is symmetric and ("vnni fused" in repr(fused)) is symmetric
    assert got.dtype == dtype
    assert_matches_the_float_path(got, expected, dtype)
    assert torch.equal(fused.weight.int8_codes(), plain.weight.int8_codes())
    if symmetric:  # K x N codes, N padded to 48 (strips of 16); <= 4-bit codes two per byte
        assert fused.weight.codes.numel() == 192 * 48 // (2 if fused.weight.spec.bits <= 4 else 1)
