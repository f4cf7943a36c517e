"""QLinear / QConv2d: weight views, smoothing invariance, code storage equivalence."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffquant.formats import QuantSpec
from diffquant.nn import QConv2d, QLinear, wrap_layer

INT4_G8 = QuantSpec(format="int4", granularity="group", group_size=8)
INT8_TOKEN = QuantSpec(format="int8", granularity="token", dynamic=True)


def test_conv_weight_matrix_is_kernel_position_major_channel_fastest():
    conv = nn.Conv2d(3, 5, (2, 4))
    layer = QConv2d(conv, INT4_G8, None)
    matrix = layer.weight_matrix(conv.weight)
    assert matrix.shape == (5, 2 * 4 * 3)
    assert torch.equal(matrix[1, :3], conv.weight[1, :, 0, 0])  # first kernel position, all channels
    assert torch.equal(layer.weight_from_matrix(matrix), conv.weight)


@pytest.mark.parametrize("make", [lambda: nn.Linear(16, 12), lambda: nn.Conv2d(16, 12, 3, padding=1)],
                         ids=["linear", "conv"])
def test_folding_an_input_scale_preserves_the_function(make):
    torch.manual_seed(0)
    module = make()
    x = torch.randn(2, 16, 5, 5) if isinstance(module, nn.Conv2d) else torch.randn(4, 16)
    reference = module(x)
    layer = wrap_layer(module, INT4_G8, INT8_TOKEN)
    layer.fold_input_scale(torch.rand(16) * 4 + 0.25)
    layer.fold_input_scale(torch.rand(16) + 0.5)  # repeated folds compose
    layer.quant_enabled = False
    torch.testing.assert_close(layer(x), reference, rtol=1e-5, atol=1e-5)


def test_fold_after_weight_calibration_is_refused():
    layer = QLinear(nn.Linear(8, 8), INT4_G8, None)
    layer.calibrate_weight()
    with pytest.raises(RuntimeError, match="before the weight is quantized"):
        layer.fold_input_scale(torch.ones(8))


@pytest.mark.parametrize("make", [lambda: nn.Linear(20, 6), lambda: nn.Conv2d(12, 6, 3, groups=3)],
                         ids=["linear-ragged-group", "grouped-conv"])
@pytest.mark.parametrize("spec", [INT4_G8, QuantSpec(format="uint8", symmetric=False),
                                  QuantSpec(format="int3", granularity="tensor")], ids=["int4-g8", "uint8-asym", "int3-tensor"])
def test_stored_codes_reproduce_fake_quantization_bitwise(make, spec):
    torch.manual_seed(0)
    module = make()
    x = torch.randn(2, 12, 6, 6) if isinstance(module, nn.Conv2d) else torch.randn(3, 20)
    layer = wrap_layer(module, spec, None)
    layer.calibrate_weight()
    expected = layer(x)
    layer.store_codes()
    assert layer.weight is None and layer.weight_codes.dtype in (torch.int8, torch.uint8)
    assert torch.equal(layer(x), expected)


def test_unsupported_layer_type():
    with pytest.raises(TypeError, match="no quantized layer for Conv1d"):
        wrap_layer(nn.Conv1d(2, 2, 1), INT4_G8, None)
