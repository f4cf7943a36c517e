"""What the AVX2 backends (kernels/avx2.py, avx2.c) promise beyond the shared native-kernel tests
(tests/kernels/test_native.py): sign transfer's one excluded code, exact int16 sums over many quads, the plain
GEMM of the zero-point paths, compact resident weights, the AVX-VNNI build, and selection on AVX2 CPUs."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch

from diffquant import kernels
from diffquant.formats import QuantSpec
from diffquant.kernels import CpuFeatures, avx2, reference_segmented_matmul
from diffquant.kernels.native import NativeLibrary
from diffquant.nn.layers import QLinear
from diffquant.nn.packed import PackedLinear

pytestmark = pytest.mark.usefixtures("single_thread")

CPU = kernels.detect_cpu()
RUNS_HERE = [name for name in ("avx2", "avx_vnni") if kernels.get_backend(name).available(CPU)]
on_avx2_backends = pytest.mark.parametrize("name", RUNS_HERE)
AVX2_ONLY = CpuFeatures("AVX2", frozenset({"avx", "avx2", "fma"}), "AVX2 box", 2)
CLIENT = CpuFeatures("AVX2", frozenset({"avx", "avx2", "fma", "avx_vnni"}), "client CPU", 8)


def codes(shape, low, high, seed):
    return torch.randint(low, high, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(seed))


@on_avx2_backends
def test_sign_transfer_declines_minus_128_and_the_plain_gemm_splits_it_off(name):
    """avx2's fused path stores 8-bit codes for sign transfer, which cannot negate -128: `accepts` says no
    (the layer then takes the segmented path); the plain GEMM adds -128 back as -127 - 1 (a second part)."""
    backend = kernels.get_backend(name)
    b = codes((70, 24), -127, 128, seed=1)
    b[3, 5] = b[69, 0] = -128
    sign_transfer = name == "avx2"
    assert backend.fused.accepts(b, 8) is not sign_transfer
    assert backend.fused.accepts(b.clamp(min=-127), 8) and backend.fused.accepts(codes((8, 8), -8, 8, 2), 4)
    prepared = backend.prepare(b)
    assert len(prepared.parts) == (2 if sign_transfer else 1)
    a = codes((9, 70), -128, 128, seed=3)
    a[:, 3] = -128
    assert torch.equal(backend.matmul(a, prepared).long(), a.long() @ b.long())
    assert torch.equal(backend.unprepare(prepared), b)


@on_avx2_backends
def test_int16_sums_stay_exact_over_many_quads(name):
    """4-bit weights against 8-bit activations at their extremes over one long group: the int16 chunks
    (8 quads at |a| = 128) are widened before they could saturate."""
    f = kernels.get_backend(name).fused
    for a_value, b_value in ((-128, -8), (-128, 7), (127, -8)):
        a, b = torch.full((6, 4096), a_value, dtype=torch.int8), torch.full((4096, 9), b_value, dtype=torch.int8)
        y = f.matmul(a, f.pack(b, 4), 9, 4, 4096, torch.ones(6, 1), torch.ones(1, 9))
        assert torch.all(y == a_value * b_value * 4096)


@pytest.mark.skipif("avx2" not in RUNS_HERE, reason="the avx2 kernels do not run here")
def test_the_maddubs_build_sizes_its_int16_chunks_by_the_table(monkeypatch):
    """avx2.c's own guard past takes_levels (max(u) <= 127): a table of max(u) = 200 stays exact against 4-bit
    activations (chunks of 32767 / (2 * 200 * 8) = 10 quads) and is refused against 8-bit ones, where one
    pair of products could saturate int16."""
    f = kernels.get_backend("avx2").fused
    levels = torch.tensor([-100, *range(-7, 7), 100], dtype=torch.int16)  # u in [0, 200]
    assert not f.takes_levels(levels)
    monkeypatch.setattr(f, "takes_levels", lambda levels: True)
    b = codes((512, 9), -8, 8, seed=10)
    b[:, 0] = 7  # index 15: u = 200
    for a_low, a_high in ((-8, 8), (-128, 128)):
        a = codes((6, 512), a_low, a_high, seed=11)
        a[0] = a_low
        args = (a, f.pack(b, 4), 9, 4, 512, torch.ones(6, 1), torch.ones(1, 9))
        if a_low == -8:
            expected = a.long() @ (levels.long()[b.long() + 8])
            assert torch.equal(f.matmul(*args, levels=levels).long(), expected)
        else:
            with pytest.raises(RuntimeError, match="rejected"):
                f.matmul(*args, levels=levels)


@on_avx2_backends
@pytest.mark.parametrize("bits", [4, 8])
def test_plain_gemm_is_exact_for_any_k_and_keeps_weights_compact(name, bits):
    backend = kernels.get_backend(name)
    low, high = (-8, 8) if bits == 4 else (-127, 128)
    a, b = codes((21, 37), -128, 128, seed=4), codes((37, 19), low, high, seed=5)  # K pads to 40
    prepared = backend.prepare(b)
    assert torch.equal(backend.matmul(a, prepared).long(), a.long() @ b.long())
    assert backend.prepared_nbytes(prepared) == 40 * 24 // (2 if bits == 4 else 1)  # N in strips of 8


@on_avx2_backends
def test_zero_point_layers_run_on_the_plain_gemm_exactly(name):
    """Asymmetric inputs (zero points) take kernels/segmented.py on this backend's exact int32 GEMM."""
    torch.manual_seed(0)
    layer = QLinear(torch.nn.Linear(96, 24), QuantSpec("int4", "group", group_size=32),
                    QuantSpec("uint8", "token", dynamic=True, symmetric=False))
    layer.calibrate_weight()
    packed, reference = PackedLinear.from_layer(layer, backend=name), PackedLinear.from_layer(layer, backend="float")
    assert packed.weight.fused is None and packed.weight.prepared is not None
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(packed(x), reference(x), rtol=1e-5, atol=1e-5)
    assert packed.weight.resident_bytes() < 96 * 24  # nibbles: under one byte per weight


@on_avx2_backends
def test_group_rescale_of_a_realistic_w4a4_layer(name):
    f = kernels.get_backend(name).fused
    a, b = codes((37, 512), -8, 8, seed=6), codes((512, 72), -8, 8, seed=7)
    g = torch.Generator().manual_seed(8)
    a_scales, b_scales = torch.rand(37, 8, generator=g) + 0.1, torch.rand(8, 72, generator=g) + 0.1
    y = f.matmul(a, f.pack(b, 4), 72, 4, 64, a_scales, b_scales)
    expected = reference_segmented_matmul(a, b, 64, a_scales, b_scales)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


@pytest.mark.skipif(shutil.which("objdump") is None or shutil.which("cc") is None, reason="needs cc and objdump")
def test_the_avx_vnni_build_uses_vex_encoded_vpdpbusd(tmp_path, monkeypatch):
    """Intel client CPUs get AVX-VNNI's VEX encoding (this machine may not execute it: only built and read)."""
    monkeypatch.setenv(kernels.native.CACHE_ENV, str(tmp_path))
    library = NativeLibrary("avx2.c", avx2.AVX2_FLAGS + avx2.VEX_VNNI, avx2.SIGNATURES)
    assert not isinstance(library.load(), str)
    listing = subprocess.run(["objdump", "-d", next(tmp_path.rglob("avx2-*.so"))], capture_output=True, text=True,
                             check=True).stdout
    assert "{vex} vpdpbusd" in listing and "zmm" not in listing


def test_avx2_cpus_select_diffquant_kernels(monkeypatch):
    monkeypatch.delenv(kernels.ENV_BACKEND, raising=False)
    builds = not isinstance(kernels.get_backend("avx2").fused.library.load(), str)
    fallback = "fbgemm" if "fbgemm" in torch.backends.quantized.supported_engines else "float"
    assert kernels.select_backend(cpu=AVX2_ONLY).name == ("avx2" if builds else fallback)
    assert kernels.select_backend(cpu=CLIENT).name == ("avx_vnni" if builds else fallback)
    with pytest.raises(kernels.BackendUnavailableError, match="neither AVX-VNNI"):
        kernels.select_backend("avx_vnni", cpu=AVX2_ONLY)
    no_fma = CpuFeatures("AVX2", frozenset({"avx", "avx2"}), "AVX2 without FMA", 2)
    with pytest.raises(kernels.BackendUnavailableError, match="lacks fma"):
        kernels.select_backend("avx2", cpu=no_fma)


@on_avx2_backends
def test_kernels_command_names_the_dot_product(name):
    details = kernels.get_backend(name).details()
    assert details.startswith("vpmaddubsw, sign transfer" if name == "avx2" else "vpdpbusd (")
