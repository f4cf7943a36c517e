"""Quantized layers and quantizer modules."""

from diffquant.nn.attention import (
    AttentionQuantConfig,
    AttentionQuantizers,
    QuantAttnProcessor,
    install_attention_quantizers,
    remove_attention_quantizers,
)
from diffquant.nn.layers import QConv2d, QLinear, QuantizedLayer, wrap_layer
from diffquant.nn.quantizers import ActivationQuantizer, WeightQuantizer

__all__ = [
    "ActivationQuantizer",
    "AttentionQuantConfig",
    "AttentionQuantizers",
    "QuantAttnProcessor",
    "install_attention_quantizers",
    "remove_attention_quantizers", "QConv2d", "QLinear", "QuantizedLayer", "WeightQuantizer", "wrap_layer"]
