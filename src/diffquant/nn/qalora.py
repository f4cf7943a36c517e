"""Quantization-aware LoRA (EfficientDM, METHODS.md §1): the low-rank update is merged into the weight
*before* the weight quantizer,

    Y = Q(X; s_x) · Q(W0 + B·A; s_w)ᵀ,     A [r, K] Kaiming-uniform (a = √5), B [out, r] zeros,

so training sees exactly the quantized weight it will keep, and afterwards only Q(W0 + B·A) remains:
the finished layer has no extra branch and no extra inference cost. The product is formed in the
layer's [out, K] weight-matrix layout, which covers convolutions too: a conv A with the original
kernel (c_in -> r) followed by a 1×1 conv B (r -> c_out) is the same low-rank matrix over the
(kh, kw, c_in) inputs. The weight grid s_w stays the one round-to-nearest calibrated on W0 (the
paper's learning rate for s_w, 1e-6, leaves it all but fixed), so W0 + B·A is rounded onto it.

`QALoRAWeight` is installed as the layer's weight quantizer while training (like AdaRound in
diffquant.nn.learnable); `merge_qalora` writes W0 + B·A into the float weight and puts the base
quantizer back, leaving an ordinary round-to-nearest layer that saves, freezes and packs unchanged.
With quantization disabled the layer computes with W0 alone: the full-precision teacher.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from diffquant.nn.layers import QuantizedLayer
from diffquant.nn.learnable import OnFixedGrid
from diffquant.nn.quantizers import WeightQuantizer


class QALoRAWeight(OnFixedGrid):
    """Q(W0 + up·down) on the base quantizer's fixed grid; `down` = A [r, K], `up` = B [out, r]."""

    def __init__(self, base: WeightQuantizer, weight2d: torch.Tensor, rank: int,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if base.scale is None:
            raise RuntimeError("QALoRA needs a calibrated weight quantizer (round-to-nearest scales first)")
        if rank < 1:
            raise ValueError(f"QALoRA rank must be >= 1, got {rank}")
        out, inputs = weight2d.shape
        rank = min(rank, out, inputs)
        self.base = base
        down = torch.empty(rank, inputs, dtype=torch.float32)
        # kaiming_uniform_(a=√5) on [r, K]: U(±1/√K), drawn from `generator` for reproducibility
        bound = 1.0 / math.sqrt(inputs)
        down.uniform_(-bound, bound, generator=generator)
        self.down = nn.Parameter(down.to(weight2d.device))
        self.up = nn.Parameter(torch.zeros(out, rank, dtype=torch.float32, device=weight2d.device))

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        """B·A [out, K] in the weight-matrix layout."""
        return self.up @ self.down

    def forward(self, weight2d: torch.Tensor) -> torch.Tensor:
        return self.base(weight2d + self.delta().to(weight2d.dtype))


def install_qalora(layer: QuantizedLayer, rank: int, generator: torch.Generator | None = None) -> QALoRAWeight:
    if layer.weight is None or layer.weight_quantizer is None:
        raise ValueError("QALoRA needs a layer with a float weight and a weight quantizer")
    qalora = QALoRAWeight(layer.weight_quantizer, layer.weight_matrix(layer.weight.detach()), rank, generator)
    layer.weight_quantizer = qalora
    return qalora


@torch.no_grad()
def merge_qalora(layer: QuantizedLayer) -> None:
    """W ← W0 + B·A, base quantizer back: the layer now quantizes exactly what training quantized."""
    qalora = layer.weight_quantizer
    merged = layer.weight_matrix(layer.weight.detach().float()) + qalora.delta().float()
    layer.weight.copy_(layer.weight_from_matrix(merged).to(layer.weight.dtype))
    layer.weight_quantizer = qalora.base


def remove_qalora(layer: QuantizedLayer) -> None:
    """Drop the adapter without merging (after a failure): W0 and the base quantizer as they were."""
    if isinstance(layer.weight_quantizer, QALoRAWeight):
        layer.weight_quantizer = layer.weight_quantizer.base
