"""Integer GEMM backends: exact against the plain-torch reference; group-wise path; selection rules."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest
import torch

from diffquant import kernels
from diffquant.kernels import (
    BackendUnavailableError,
    CpuFeatures,
    SegmentZeroPoints,
    fastest_float_dtype,
    get_backend,
    reference_segment_accumulations,
    reference_segmented_matmul,
    segment_accumulations,
    segmented_matmul,
    select_backend,
)
from diffquant.kernels.fbgemm import FbgemmBackend
from diffquant.kernels.layouts import pack_int4_halves, unpack_int4_halves

AVX2_ONLY = CpuFeatures("AVX2", frozenset({"avx", "avx2", "fma"}), "AVX2 box", 2)
AVX2_WITH_AVX_VNNI = CpuFeatures("AVX2", frozenset({"avx", "avx2", "fma", "avx_vnni"}), "client CPU", 8)
AVX512_VNNI = CpuFeatures("AVX512", frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}), "VNNI box", 2)
AMX = CpuFeatures("AVX512", frozenset({"avx2", "avx512f", "amx_int8", "amx_bf16"}), "AMX box", 2)
NO_SIMD = CpuFeatures("DEFAULT", frozenset(), "old box", 1)

RUNNABLE = [name for name, b in kernels.BACKENDS.items() if b.available(kernels.detect_cpu())]
# (M, K, N): odd and tiny sizes (no padding is needed on CPU), M <= 16, K and N not multiples of 8.
SHAPES = [(1, 7, 3), (5, 64, 9), (16, 8, 8), (17, 130, 33), (33, 1000, 65)]


def random_codes(shape, low=-128, high=128, seed=0) -> torch.Tensor:
    return torch.randint(low, high, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", RUNNABLE)
def test_backend_equals_reference_exactly(name, shape):
    m, k, n = shape
    a, b = random_codes((m, k), seed=1), random_codes((k, n), seed=2)
    backend = get_backend(name)
    acc = backend.matmul(a, backend.prepare(b))
    assert acc.shape == (m, n) and acc.dtype in (torch.int32, torch.float32)
    assert torch.equal(acc.to(torch.int64), backend.reference(a, b))


@pytest.mark.parametrize("name", RUNNABLE)
def test_extreme_codes_reach_two_to_the_24_exactly(name):
    a, b = torch.full((3, 1024), -128, dtype=torch.int8), torch.full((1024, 5), -128, dtype=torch.int8)
    backend = get_backend(name)
    acc = backend.matmul(a, backend.prepare(b)).to(torch.int64)
    assert torch.all(acc == 2**24)


@pytest.mark.parametrize("name", RUNNABLE)
def test_int4_codes_in_int8_containers(name):
    a, b = random_codes((19, 96), -8, 8, seed=3), random_codes((96, 24), -8, 8, seed=4)
    backend = get_backend(name)
    assert torch.equal(backend.matmul(a, backend.prepare(b)).to(torch.int64), backend.reference(a, b))


@pytest.mark.parametrize("name", RUNNABLE)
def test_prepared_weight_gives_back_its_codes(name):
    backend, b = get_backend(name), random_codes((40, 12), seed=5)
    assert torch.equal(backend.unprepare(backend.prepare(b)), b)


def test_fbgemm_splits_activations_exactly_when_forced_onto_avx2_kernels():
    """fbgemm's pre-VNNI kernels saturate u8*s8 pair sums in int16; the backend must stay exact."""
    if "fbgemm" not in RUNNABLE:
        pytest.skip("fbgemm is not available on this CPU")
    script = textwrap.dedent("""
        import torch
        from diffquant.kernels import get_backend, detect_cpu
        g = torch.Generator().manual_seed(0)
        a = torch.randint(-128, 128, (32, 256), dtype=torch.int8, generator=g)
        b = torch.randint(-127, 128, (256, 64), dtype=torch.int8, generator=g)
        backend = get_backend("fbgemm")
        acc = backend.matmul(a, backend.prepare(b)).long()
        print(detect_cpu().fbgemm_int16_saturation, torch.equal(acc, backend.reference(a, b)))
    """)
    env = {"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.stdout.split() == ["True", "True"], result.stderr[-2000:]


@pytest.mark.parametrize(("u8_max", "b_max", "cpu", "expected"), [
    (255, 127, AVX2_ONLY, True),   # W8A8 on AVX2: 255*2*127 > 32767
    (255, 64, AVX2_ONLY, False),   # 7-bit weights never saturate
    (15, 127, AVX2_ONLY, False),   # 4-bit activations never saturate
    (255, 8, AVX2_ONLY, False),    # int4 weights never saturate
    (255, 127, AVX512_VNNI, False),  # vpdpbusd accumulates in int32
], ids=["w8a8-avx2", "w7-avx2", "a4-avx2", "w4-avx2", "w8a8-vnni"])
def test_fbgemm_saturation_rule(u8_max, b_max, cpu, expected, monkeypatch):
    monkeypatch.delenv("FBGEMM_ENABLE_INSTRUCTIONS", raising=False)
    assert FbgemmBackend.may_saturate(u8_max, b_max, cpu) is expected


# -- group-wise (segmented) path ---------------------------------------------------------------------

def _zero_points(kind: str, a: torch.Tensor, b: torch.Tensor, segments: int, length: int):
    g = torch.Generator().manual_seed(7)
    m, n = a.shape[0], b.shape[1]
    a_zero = torch.randint(-20, 20, (m, segments), generator=g).float() if "a" in kind else None
    b_zero = torch.randint(-3, 3, (segments, n), generator=g).float() if "b" in kind else None
    sums = b.reshape(segments, length, n).sum(1, dtype=torch.int32).float()
    return a_zero, b_zero, sums


@pytest.mark.parametrize("zero_kind", ["symmetric", "a", "b", "ab"],
                         ids=["symmetric", "input-zero", "weight-zero", "both-zero"])
@pytest.mark.parametrize("name", RUNNABLE)
def test_segmented_matmul_equals_reference(name, zero_kind):
    m, segments, length, n = 13, 4, 16, 10
    a, b = random_codes((m, segments * length), seed=8), random_codes((segments * length, n), -8, 8, seed=9)
    a_scales, b_scales = torch.rand(m, segments) + 0.1, torch.rand(segments, n) + 0.1
    a_zero, b_zero, sums = _zero_points(zero_kind, a, b, segments, length)
    backend = get_backend(name)
    prepared = backend.prepare_segments(b, length)
    accs = torch.stack([acc.to(torch.int64) for acc in segment_accumulations(backend, a, prepared)])
    assert torch.equal(accs, reference_segment_accumulations(a, b, length))
    zp = None if zero_kind == "symmetric" else SegmentZeroPoints(a_zero, b_zero, sums if a_zero is not None else None)
    y = segmented_matmul(backend, a, prepared, a_scales, b_scales, zp)
    expected = reference_segmented_matmul(a, b, length, a_scales, b_scales, a_zero, b_zero)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-3)


def test_segment_zero_points_need_the_weight_sums():
    with pytest.raises(ValueError, match="column sums"):
        SegmentZeroPoints(a_zero=torch.zeros(1, 1))


def test_int4_halves_layout_round_trips_and_rejects_bad_input():
    b = random_codes((10, 7), -8, 8, seed=11)
    b[0, 0], b[9, 6] = -8, 7
    packed = pack_int4_halves(b)
    assert packed.shape == (5, 7) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4_halves(packed), b)
    with pytest.raises(ValueError, match="even"):
        pack_int4_halves(b[:9])
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4_halves(torch.full((2, 2), 9, dtype=torch.int8))


# -- selection ---------------------------------------------------------------------------------------

@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(kernels.ENV_BACKEND, raising=False)


@pytest.mark.parametrize("cpu", [AVX2_ONLY, AVX2_WITH_AVX_VNNI, NO_SIMD], ids=["avx2", "avx2-avx-vnni", "no-simd"])
def test_cpus_without_avx512_int8_never_get_int_mm_or_bf16(cpu, no_env):
    assert select_backend(cpu=cpu).name != "int_mm"
    assert "int_mm" not in [b.name for b in kernels.usable_backends(cpu)]
    assert fastest_float_dtype(cpu) == torch.float32


def test_avx2_gets_its_own_kernels_or_fbgemm_and_a_cpu_without_avx2_the_float_fallback(no_env, monkeypatch):
    fallback = "fbgemm" if "fbgemm" in torch.backends.quantized.supported_engines else "float"
    builds = not isinstance(get_backend("avx2").fused.library.load(), str)
    assert select_backend(cpu=AVX2_ONLY).name == ("avx2" if builds else fallback)
    monkeypatch.setattr(type(get_backend("avx2")), "available", lambda self, cpu: False)  # e.g. no C compiler
    monkeypatch.setattr(type(get_backend("avx_vnni")), "available", lambda self, cpu: False)
    assert select_backend(cpu=AVX2_ONLY).name == fallback
    assert select_backend(cpu=NO_SIMD).name == "float"


@pytest.mark.parametrize("cpu", [AVX512_VNNI, AMX], ids=["avx512-vnni", "amx"])
def test_vnni_and_amx_cpus_get_int_mm_and_bf16(cpu, no_env):
    assert select_backend(cpu=cpu).name == "int_mm"
    assert fastest_float_dtype(cpu) == torch.bfloat16


def test_environment_and_argument_override(monkeypatch):
    monkeypatch.setenv(kernels.ENV_BACKEND, "float")
    assert select_backend(cpu=AVX512_VNNI).name == "float"
    assert select_backend("int_mm", cpu=AVX512_VNNI).name == "int_mm"  # the argument wins


def test_overrides_to_a_pathological_or_unknown_backend_are_refused(monkeypatch):
    monkeypatch.setenv(kernels.ENV_BACKEND, "int_mm")
    with pytest.raises(BackendUnavailableError, match="pathological"):
        select_backend(cpu=AVX2_ONLY)
    with pytest.raises(BackendUnavailableError, match="not available"):
        select_backend("fbgemm", cpu=NO_SIMD)
    with pytest.raises(BackendUnavailableError, match="unknown kernel backend"):
        select_backend("cuda-magic", cpu=AVX2_ONLY)


def test_active_backend_is_chosen_once_and_logged(no_env, caplog):
    kernels.reset_active_backend()
    with caplog.at_level(logging.INFO, logger="diffquant.kernels"):
        first, second = kernels.active_backend(), kernels.active_backend()
    assert first is second is select_backend()
    assert sum("diffquant kernels: backend" in r.getMessage() for r in caplog.records) == 1
    kernels.reset_active_backend()


def test_this_machine_is_described():
    cpu = kernels.detect_cpu()
    assert cpu.capability == torch.backends.cpu.get_cpu_capability() and cpu.cores >= 1
    assert cpu.instruction_set.startswith(cpu.capability)
