"""The triton backend (kernels/gpu_triton.py): exact integer accumulations against the plain-torch reference,
the fused rescale against reference_segmented_matmul, the quantizer bit for bit against the formats' torch
expression, the resident layout, packed layers and a frozen model against fake quantization, and the choice
of backend by device.

Where to run: on a CUDA GPU the kernels run compiled. Without one, where triton is installed
(`pip install -e ".[gpu]"`), the same tests run through triton's interpreter on CPU tensors
(TRITON_INTERPRET=1, which tests/conftest.py sets before anything imports triton; the backend is then
pointed at CPU tensors for the test's layers). Without triton only the layout and selection tests run.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from diffquant import kernels
from diffquant.formats import QuantSpec
from diffquant.formats.ops import quantize_blocks
from diffquant.kernels import (
    gpu_triton,
    reference_int_matmul,
    reference_segment_accumulations,
    reference_segmented_matmul,
)
from diffquant.kernels.gpu_triton import TritonKernels, pack_weight, unpack_weight
from tests.kernels.test_native import assert_matches_the_float_path

CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
os.environ.setdefault("DIFFQUANT_TRITON_TUNE", "0")  # one tile config: correctness, with few compiles
RUNNABLE = HAS_TRITON and (CUDA or gpu_triton.interpreting())  # tests/conftest.py switches the interpreter on
DEVICE = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(not RUNNABLE, reason="triton is not installed (pip install -e '.[gpu]'), or it "
                                                       "was imported before TRITON_INTERPRET=1 could be set")

# (M, K, N, bits, L): row / column tails of the tiles, one and many segments, fold depths 32 / 64 / 128,
# a one-segment K that is no multiple of the tile depth (masked).
CASES = [
    (5, 128, 17, 4, 64),
    (33, 256, 70, 8, 256),
    (70, 192, 100, 4, 64),
    (3, 128, 5, 8, 32),
    (7, 256, 33, 4, 256),
    (9, 384, 40, 8, 128),
    (4, 200, 24, 8, 200),
]


def codes(shape, bits, seed):
    lim = 2 ** (bits - 1)
    return torch.randint(-lim, lim, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(seed))


def case_id(case):
    m, k, n, bits, length = case
    return f"{m}x{k}x{n}-w{bits}-L{length}"


def on_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_weight_layout_round_trips(bits):
    b = codes((128, 37), bits, seed=1)
    packed = pack_weight(b, bits)
    assert packed.numel() == 128 * 37 // (2 if bits <= 4 else 1)  # nibbles: two codes per byte
    assert torch.equal(unpack_weight(packed, 128, 37, bits), b)
    if bits <= 4:  # K-major: input j of a 64-input block in the low nibble, input 32 + j in the high one
        assert packed.shape == (37, 64)
        assert torch.equal((packed[:, 0].to(torch.int16) & 0xF) - 8, b[0].to(torch.int16))
        assert torch.equal((packed[:, 0].to(torch.int16) >> 4) - 8, b[32].to(torch.int16))
        assert torch.equal((packed[:, 32].to(torch.int16) & 0xF) - 8, b[64].to(torch.int16))
    else:
        assert packed.shape == (37, 128) and packed.is_contiguous()


def test_supported_segmentings():
    assert TritonKernels.supports(4, 64, 4096) and TritonKernels.supports(8, 4096, 4096)
    assert TritonKernels.supports(8, 32, 96) and TritonKernels.supports(8, 100, 100)
    assert not TritonKernels.supports(4, 100, 100)  # nibble blocks of 64 rows
    assert not TritonKernels.supports(8, 256, 1024)  # several long segments: per-segment GEMMs instead
    assert not TritonKernels.supports(8, 12, 36)


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_each_segment_accumulates_exactly(case):
    """b_scales one-hot on segment s and unit a_scales: the float output is acc_s itself, exactly."""
    m, k, n, bits, length = case
    a, b = codes((m, k), 8, seed=2), codes((k, n), bits, seed=3)
    expected = reference_segment_accumulations(a, b, length)
    segments = k // length
    for s in {0, segments - 1}:
        one_hot = torch.zeros(segments, n)
        one_hot[s] = 1
        a_dev, packed, ones, hot = on_device(a, pack_weight(b, bits), torch.ones(m, segments), one_hot)
        y = TritonKernels.matmul(a_dev, packed, n, bits, length, ones, hot)
        assert torch.equal(y.cpu().to(torch.int64), expected[s])


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("scales", ["per-row", "shared-row", "per-tensor-weight"])
def test_fused_matmul_equals_reference(case, scales):
    m, k, n, bits, length = case
    g = torch.Generator().manual_seed(4)
    a, b = codes((m, k), 8, seed=5), codes((k, n), bits, seed=6)
    segments = k // length
    a_scales = torch.rand(1 if scales == "shared-row" else m, segments, generator=g) + 0.1
    b_scales = torch.rand(segments, 1 if scales == "per-tensor-weight" else n, generator=g) + 0.1
    y = TritonKernels.matmul(*on_device(a, pack_weight(b, bits)), n, bits, length, *on_device(a_scales, b_scales))
    expected = reference_segmented_matmul(a, b, length, a_scales, b_scales)
    torch.testing.assert_close(y.cpu().double(), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


@needs_triton
@pytest.mark.parametrize("shape", [(1, 7, 3), (17, 100, 13), (64, 300, 129)], ids=lambda s: "x".join(map(str, s)))
def test_plain_int32_matmul_is_exact_for_any_shape(shape):
    m, k, n = shape
    a, b = codes((m, k), 8, seed=7), codes((k, n), 8, seed=8)
    backend = kernels.get_backend("triton")
    y = backend.matmul(*on_device(a, backend.prepare(b)))
    assert y.dtype == torch.int32
    assert torch.equal(y.cpu().to(torch.int64), reference_int_matmul(a, b))


@needs_triton
def test_extreme_codes_do_not_overflow():
    a, b = torch.full((5, 1024), -128, dtype=torch.int8), torch.full((1024, 20), -128, dtype=torch.int8)
    y = TritonKernels.matmul(*on_device(a, pack_weight(b, 8)), 20, 8, 1024, *on_device(torch.ones(5, 1),
                                                                                         torch.ones(1, 20)))
    assert torch.all(y.cpu() == 2**24)
    a4, b4 = torch.full((5, 1024), -8, dtype=torch.int8), torch.full((1024, 20), -8, dtype=torch.int8)
    y4 = TritonKernels.matmul(*on_device(a4, pack_weight(b4, 4)), 20, 4, 64, *on_device(torch.ones(5, 16),
                                                                                         torch.ones(16, 20)))
    assert torch.all(y4.cpu() == 64 * 1024)


QUANT_SPECS = {
    "a4-group64": QuantSpec("int4", "group", group_size=64, dynamic=True),
    "a4-group8": QuantSpec("int4", "group", group_size=8, dynamic=True),
    "a8-token": QuantSpec("int8", "token", dynamic=True),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec_name", QUANT_SPECS)
@pytest.mark.parametrize("shape", [(1, 64), (3, 100), (17, 300)], ids=lambda s: "x".join(map(str, s)))
def test_quantizer_matches_the_torch_expression_bit_for_bit(shape, spec_name, dtype):
    spec, (m, c), dtype = QUANT_SPECS[spec_name], shape, DTYPES[dtype]
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(m, c, generator=g) * (torch.rand(m, 1, generator=g) * 8)).to(dtype)
    x[0, :5] = 0
    x[-1, -3:] = torch.tensor([0.5, -2.5, 3.5]).to(dtype) * x[-1].abs().max()  # ties after division
    if m > 2 and dtype != torch.float16:  # fp16's torch expression underflows the smallest scale to 0
        x[1] = 0  # all-zero rows get the smallest positive scale
    expected_codes, expected_scale, _ = quantize_blocks(x, spec)
    length = spec.group_size if spec.granularity == "group" else c
    got_codes, got_scale = TritonKernels.quantize(x.to(DEVICE), length, int(spec.qformat.qmin),
                                                  int(spec.qformat.qmax))
    got_codes, got_scale = got_codes.cpu(), got_scale.cpu()
    width = expected_codes.numel() // m
    assert torch.equal(got_codes[:, :width], expected_codes.reshape(m, width).to(torch.int8))
    assert torch.equal(got_codes[:, width:], torch.zeros_like(got_codes[:, width:]))
    assert torch.equal(got_scale, expected_scale.float().reshape(m, -1))


LAYER_SPECS = {
    "w4a4-g64": (QuantSpec("int4", "group", group_size=64, scale_dtype="float16"),
                 QuantSpec("int4", "group", group_size=64, dynamic=True)),
    "w8a8-token": (QuantSpec("int8", "channel", scale_dtype="float16"), QuantSpec("int8", "token", dynamic=True)),
    "w4a8-asym": (QuantSpec("int4", "channel"), QuantSpec("uint8", "token", dynamic=True, symmetric=False)),
}


@pytest.fixture
def triton_on_test_device(monkeypatch):
    """The backend multiplies CUDA tensors; under the interpreter, the test's CPU tensors."""
    if not CUDA:
        monkeypatch.setattr(gpu_triton.TritonBackend, "device_type", "cpu")


@needs_triton
@pytest.mark.parametrize("name", LAYER_SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_packed_layers_on_triton_equal_the_float_backend(name, dtype, triton_on_test_device):
    from diffquant.nn.layers import QLinear
    from diffquant.nn.packed import PackedLinear

    torch.manual_seed(0)
    layer = QLinear(torch.nn.Linear(192, 40), *LAYER_SPECS[name])
    layer.calibrate_weight()
    plain = PackedLinear.from_layer(layer, backend="float")
    fused = PackedLinear.from_layer(layer.to(DEVICE), backend="triton")
    x = torch.randn(2, 9, 192, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        got, expected = fused(x.to(DEVICE)).cpu(), plain(x)
    symmetric = name != "w4a8-asym"
    assert (fused.weight.fused is not None) is symmetric and ("triton fused" in repr(fused)) is symmetric
    assert got.dtype == dtype
    assert_matches_the_float_path(got, expected, dtype)
    assert torch.equal(fused.weight.int8_codes().cpu(), plain.weight.int8_codes())


def test_backends_are_chosen_by_device(monkeypatch):
    monkeypatch.delenv(kernels.ENV_BACKEND, raising=False)
    assert kernels.select_backend(device="cpu").device_type == "cpu"
    with pytest.raises(kernels.BackendUnavailableError, match="cpu tensors, not cuda"):
        kernels.select_backend("int_mm", device="cuda")
    with pytest.raises(kernels.BackendUnavailableError, match="cuda tensors, not cpu"):
        kernels.select_backend("triton", device="cpu")
    monkeypatch.setenv(kernels.ENV_BACKEND, "float")  # a CPU override does not apply to GPU layers
    if kernels.get_backend("triton").available(kernels.detect_cpu()):
        assert kernels.select_backend(device="cuda").name == "triton"
    else:
        with pytest.raises(kernels.BackendUnavailableError, match="for cuda tensors"):
            kernels.select_backend(device="cuda")


def test_a_layer_frozen_for_one_device_refuses_inputs_on_another():
    from diffquant.nn.layers import QLinear
    from diffquant.nn.packed import PackedLinear

    layer = QLinear(torch.nn.Linear(64, 8), *LAYER_SPECS["w8a8-token"])
    layer.calibrate_weight()
    packed = PackedLinear.from_layer(layer, backend="float")
    packed.backend = kernels.get_backend("triton")  # as if frozen on a GPU and moved back to the CPU
    with pytest.raises(RuntimeError, match="freeze the model on the device it runs on"):
        packed(torch.randn(3, 64))


def to_device(value):
    if torch.is_tensor(value):
        return value.to(DEVICE)
    return {k: to_device(v) for k, v in value.items()} if isinstance(value, dict) else value


@needs_triton
@pytest.mark.parametrize(("family", "recipe"), [("dit", "w8a8"), ("dit", "w4a4"), ("unet2d", "w4a4")])
def test_a_model_frozen_on_its_device_matches_fake_quantization(family, recipe, triton_on_test_device,
                                                                  monkeypatch):
    """Quantize on the CPU, move to the device, freeze there (a GPU model picks triton by itself)."""
    import diffquant
    from diffquant.freeze import packed_layers
    from tests.layer_outputs import layer_io, worst_layer_rel
    from tests.tiny_models import TINY_MODELS

    if CUDA:  # an exact reference: cuDNN convolutions default to TF32
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    tiny = TINY_MODELS[family]
    model = diffquant.quantize(tiny.build(), recipe, progress=False).to(DEVICE)
    inputs = to_device(tiny.inputs(2))
    with torch.no_grad():
        # layer by layer (tests/layer_outputs.py): whole outputs at 4-bit activations hang on last bits
        _, captured = layer_io(model, diffquant.quantized_layers(model), lambda: tiny.run(model, inputs))
        diffquant.freeze(model, backend=None if CUDA else "triton", float_dtype=torch.float32)
        assert worst_layer_rel(model, captured) <= 1e-4
    integer = [m for m in packed_layers(model).values() if m.path == "int"]
    assert integer and all(m.backend.name == "triton" for m in integer)
    assert sum(m.weight.fused is not None for m in integer) >= len(integer) // 2
