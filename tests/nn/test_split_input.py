"""Split input quantizers (Q-Diffusion's shortcut splitting, QuantSpec.split_shortcut): two static ranges,
one per channel half, each from its own channels; learnable by LSQ; packed layers compute the same as
the fake-quant ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffquant.calib.stats import LayerStats
from diffquant.calib.steps import sampling_step
from diffquant.formats import QuantSpec
from diffquant.formats.base import SpecError
from diffquant.formats.ops import sqnr_db
from diffquant.nn import wrap_layer
from diffquant.nn.learnable import install_lsq
from diffquant.nn.packed import PackedLinear
from diffquant.nn.packed_conv import PackedConv2d
from diffquant.nn.quantizers import ActivationQuantizer

pytestmark = pytest.mark.usefixtures("single_thread")

SPLIT = QuantSpec("int8", "tensor", symmetric=False, split_shortcut=True)
HIDDEN, SKIP = 48, 16  # channels of the two halves
LAYER_MAX_REL = 2e-5  # packed vs fake quant on the same input: only the order of float rounding differs


def concatenation(rows: int = 512, seed: int = 0) -> torch.Tensor:
    """[rows, 64]: decoder channels ~ N(0, 10²) and skip channels ~ N(0.05, 0.1²), 100x smaller."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, HIDDEN, generator=g) * 10
    skip = torch.randn(rows, SKIP, generator=g) * 0.1 + 0.05
    return torch.cat([hidden, skip], dim=1)


def calibrated(spec: QuantSpec, x: torch.Tensor, split: int | None, steps: int = 0) -> ActivationQuantizer:
    quantizer = ActivationQuantizer(spec)
    if split is not None:
        quantizer.set_split(split)
    stats = LayerStats()
    for step in range(max(steps, 1)):
        stats.observe(x * (1 + step), step if steps else None)
    quantizer.calibrate(stats)
    return quantizer


def test_each_half_gets_the_range_of_its_own_channels():
    x = concatenation()
    split, plain = calibrated(SPLIT, x, HIDDEN), calibrated(SPLIT.with_changes(split_shortcut=False), x, None)
    reference = calibrated(SPLIT.with_changes(split_shortcut=False), x[:, HIDDEN:], None)  # skip channels alone
    assert split.scale.shape == (2,) and plain.scale.shape == (1,)
    own = calibrated(SPLIT.with_changes(split_shortcut=False), x[:, :HIDDEN], None)
    assert torch.equal(split.scale, torch.cat([own.scale, reference.scale]))
    assert torch.equal(split.zero_point, torch.cat([own.zero_point, reference.zero_point]))
    assert split.scale[0] / split.scale[1] > 50
    skip = slice(HIDDEN, None)
    split_db, plain_db = sqnr_db(x[:, skip], split(x)[:, skip]), sqnr_db(x[:, skip], plain(x)[:, skip])
    assert split_db > plain_db + 30  # the skip channels are no longer rounded on the decoder's grid
    assert sqnr_db(x, split(x)) >= sqnr_db(x, plain(x))
    assert torch.equal(split(x)[:, :HIDDEN], own(x[:, :HIDDEN]))  # the decoder half is quantized as alone


def test_per_step_split_ranges_follow_the_step():
    x = concatenation()
    quantizer = calibrated(SPLIT.with_changes(per_step=True), x, HIDDEN, steps=3)
    assert quantizer.scale.shape == (3, 2)
    for step in range(3):
        with sampling_step(step, 3):
            alone = calibrated(SPLIT.with_changes(split_shortcut=False), x[:, HIDDEN:] * (1 + step), None)
            assert torch.equal(quantizer(x)[:, HIDDEN:], alone(x[:, HIDDEN:]))


def test_split_state_is_validated():
    x = concatenation()
    with pytest.raises(ValueError, match="cannot be split"):
        ActivationQuantizer(SPLIT.with_changes(split_shortcut=False)).set_split(8)
    with pytest.raises(ValueError, match="cannot be split"):  # dynamic ranges follow each input: never split
        ActivationQuantizer(QuantSpec("int8", "token", dynamic=True, split_shortcut=True)).set_split(8)
    with pytest.raises(ValueError, match="positive integer"):
        ActivationQuantizer(SPLIT).set_split(0)
    with pytest.raises(RuntimeError, match="before"):
        calibrated(SPLIT, x, HIDDEN).set_split(8)
    with pytest.raises(ValueError, match="does not fit"):
        calibrated(SPLIT, x, 64)
    with pytest.raises(SpecError, match="input spec"):
        QuantSpec("int8", "channel", split_shortcut=True).validate_for_weight()
    with pytest.raises(SpecError, match="true or false"):
        QuantSpec("int8", "tensor", split_shortcut="yes")
    assert "split at 48" in repr(calibrated(SPLIT, x, HIDDEN))


def test_spec_leaves_the_switch_out_of_its_dict_while_off():
    assert "split_shortcut" not in SPLIT.with_changes(split_shortcut=False).to_dict()
    assert SPLIT.to_dict()["split_shortcut"] is True
    assert QuantSpec.from_dict(SPLIT.to_dict()) == SPLIT


def test_lsq_learns_both_halves_step_sizes():
    layer = wrap_layer(nn.Linear(HIDDEN + SKIP, 8), None, SPLIT)
    x = concatenation(64)
    layer.input_quantizer.set_split(HIDDEN)
    stats = LayerStats()
    stats.observe(x, None)
    layer.input_quantizer.calibrate(stats)
    before = layer.input_quantizer.scale.clone()
    lsq = install_lsq(layer)
    with torch.no_grad():
        assert torch.equal(layer(x), layer.matmul(lsq.base(x), layer.weight))  # same function at the start
    layer(x).pow(2).sum().backward()
    assert lsq.scale.shape == (2,) and torch.all(lsq.scale.grad != 0)
    with torch.no_grad():
        lsq.scale.mul_(torch.tensor([1.5, 0.5]))
    lsq.write_back()
    layer.input_quantizer = lsq.base
    assert torch.allclose(layer.input_quantizer.scale, before * torch.tensor([1.5, 0.5]), rtol=1e-6)


# -- packed layers --------------------------------------------------------------------------------------


def _calibrate_layer(layer, x: torch.Tensor, split: int) -> None:
    layer.input_quantizer.set_split(split)
    stats = LayerStats()
    stats.observe(x.movedim(1, -1).reshape(-1, x.shape[1]) if x.dim() == 4 else x, None)
    layer.input_quantizer.calibrate(stats)
    layer.calibrate_weight()


def max_rel(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("symmetric", [False, True], ids=["asymmetric", "symmetric"])
@pytest.mark.parametrize(("kernel", "padding"), [(3, 1), (1, 0)], ids=["3x3", "1x1"])
def test_packed_conv_with_a_split_input_matches_fake_quant(kernel, padding, symmetric):
    torch.manual_seed(0)
    conv = nn.Conv2d(HIDDEN + SKIP, 32, kernel, padding=padding)
    layer = wrap_layer(conv, QuantSpec("int4", "channel", scale_dtype="float16"), SPLIT.with_changes(symmetric=symmetric))
    x = concatenation(2 * 6 * 6).reshape(2, 6, 6, -1).movedim(-1, 1).contiguous()
    _calibrate_layer(layer, x, HIDDEN)
    with torch.no_grad():
        expected = layer(x)
        packed = PackedConv2d.from_layer(layer, float_dtype=torch.float32)
        assert packed.path == "int" and packed.weight.plan.count == kernel * kernel * (HIDDEN + SKIP) // SKIP
        assert max_rel(packed(x), expected) <= LAYER_MAX_REL


def test_packed_linear_with_a_split_input_matches_fake_quant():
    torch.manual_seed(0)
    layer = wrap_layer(nn.Linear(HIDDEN + SKIP, 32), QuantSpec("int8", "channel", scale_dtype="float16"), SPLIT)
    x = concatenation(40)
    _calibrate_layer(layer, x, HIDDEN)
    with torch.no_grad():
        packed = PackedLinear.from_layer(layer, float_dtype=torch.float32)
        assert packed.path == "int" and packed.weight.plan.count == (HIDDEN + SKIP) // SKIP
        assert max_rel(packed(x), layer(x)) <= LAYER_MAX_REL


@pytest.mark.parametrize("symmetric", [False, True], ids=["asymmetric", "symmetric"])
@pytest.mark.parametrize("backend", ["fbgemm", "float", "triton"])
def test_every_backend_packs_a_split_conv(backend, symmetric, monkeypatch):
    from diffquant import kernels

    if backend == "triton":
        from diffquant.kernels import gpu_triton

        if torch.cuda.is_available() or not gpu_triton.interpreting():
            pytest.skip("triton runs here only through its interpreter on CPU tensors (tests/kernels/test_triton.py)")
        monkeypatch.setattr(gpu_triton.TritonBackend, "device_type", "cpu")
    elif not kernels.get_backend(backend).available(kernels.detect_cpu()):
        pytest.skip(f"{backend} is not available on this CPU")
    torch.manual_seed(0)
    layer = wrap_layer(nn.Conv2d(HIDDEN + SKIP, 16, 3, padding=1), QuantSpec("int8", "channel"),
                       SPLIT.with_changes(symmetric=symmetric))
    x = concatenation(2 * 5 * 5).reshape(2, 5, 5, -1).movedim(-1, 1).contiguous()
    _calibrate_layer(layer, x, HIDDEN)
    with torch.no_grad():
        packed = PackedConv2d.from_layer(layer, backend=backend, float_dtype=torch.float32)
        assert packed.path == "int" and packed.backend.name == backend
        assert max_rel(packed(x), layer(x)) <= LAYER_MAX_REL
