"""The 1-bit sign format (formats/binary.py): its grid, its fitted scale (the L2-optimal σ of σ·sign(w)),
8 codes per byte on disk, a bitwise reload, and frozen layers on the integer GEMM."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

import diffquant
from diffquant.checkpoint import TENSORS, load_quantized, save_quantized
from diffquant.formats import QuantSpec, SpecError, get_format, sqnr_db
from diffquant.freeze import freeze, packed_layers
from diffquant.nn.quantizers import WeightQuantizer
from diffquant.recipes import Recipe
from tests.tiny_models import TINY_MODELS

DIT = TINY_MODELS["dit"]
W1A8 = Recipe(name="test-w1a8", weight=QuantSpec("binary", "channel"),
              input=QuantSpec("int8", "token", dynamic=True))


def test_the_grid_is_plus_and_minus_one_with_zero_going_up():
    fmt = get_format("binary")
    assert (fmt.bits, fmt.qmin, fmt.qmax, fmt.has_zero_point, fmt.integer_codes) == (1, -1.0, 1.0, False, True)
    assert fmt.round(torch.tensor([-2.5, -1e-9, 0.0, 1e-9, 0.3])).tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0]
    with pytest.raises(SpecError, match="zero point"):
        QuantSpec("binary", "channel", symmetric=False)
    with pytest.raises(SpecError, match="weights only"):
        QuantSpec("binary", "token", dynamic=True).validate_for_activation()


def test_the_weight_scale_is_mean_abs_the_l2_optimal_sigma():
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.1, 3.0, 8)[:, None]
    quantizer = WeightQuantizer(QuantSpec("binary", "channel"))
    quantizer.calibrate(weight)
    sigma = weight.abs().mean(dim=1, keepdim=True)
    assert torch.equal(quantizer.scale, sigma)
    assert torch.equal(quantizer(weight), sigma * torch.where(weight >= 0, 1.0, -1.0))

    def error(s: torch.Tensor) -> torch.Tensor:
        return (weight - s * weight.sign()).pow(2).sum(dim=1)

    assert bool((error(sigma) < error(0.95 * sigma)).all() and (error(sigma) < error(1.05 * sigma)).all())


@pytest.fixture(scope="module")
def binary_dit():
    return diffquant.quantize(DIT.build(), W1A8, progress=False)


def test_a_binary_checkpoint_stores_one_bit_per_weight_and_reloads_bitwise(binary_dit, tmp_path):
    inputs = DIT.inputs(2)
    with torch.no_grad():
        expected = DIT.run(binary_dit, inputs)
    folder = save_quantized(binary_dit, tmp_path / "w1")
    tensors = load_file(folder / TENSORS)
    for name, layer in diffquant.quantized_layers(binary_dit).items():
        out, k = layer.weight_matrix(layer.weight).shape
        codes = tensors[f"{name}.weight_codes"]
        assert codes.dtype == torch.uint8 and codes.numel() == out * -(-k // 8)
    with torch.no_grad():
        assert torch.equal(DIT.run(load_quantized(folder), inputs), expected)


def test_frozen_binary_layers_run_the_integer_gemm_as_fake_quantized(binary_dit):
    inputs = DIT.inputs(2)
    with torch.no_grad():
        expected = DIT.run(binary_dit, inputs)
        frozen = freeze(copy.deepcopy(binary_dit))
        assert sqnr_db(expected, DIT.run(frozen, inputs)) > 30
    assert {layer.path for layer in packed_layers(frozen).values()} == {"int"}
