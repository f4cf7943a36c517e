"""Quantized layers and quantizer modules."""

from diffquant.nn.attention import (
    AttentionQuantConfig,
    AttentionQuantizers,
    QuantAttnProcessor,
    install_attention_quantizers,
    remove_attention_quantizers,
)
from diffquant.nn.layers import QConv2d, QLinear, QuantizedLayer, wrap_layer
from diffquant.nn.packed import PackedLinear
from diffquant.nn.packed_conv import PackedConv2d
from diffquant.nn.quantizers import ActivationQuantizer, WeightQuantizer

__all__ = [
    "ActivationQuantizer",
    "AttentionQuantConfig",
    "AttentionQuantizers",
    "PackedConv2d",
    "PackedLinear",
    "QConv2d",
    "QLinear",
    "QuantAttnProcessor",
    "QuantizedLayer",
    "WeightQuantizer",
    "install_attention_quantizers",
    "remove_attention_quantizers",
    "wrap_layer",
]
