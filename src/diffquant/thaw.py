"""Frozen models back to codes: packed modules (freeze) to QuantizedLayers holding integer codes.

Below both `freeze` and `checkpoint`: a frozen model is saved as the codes it was frozen from, so the
checkpoint needs the way back without the way there (kernel backends, freezing).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from diffquant.job import replace_submodule
from diffquant.nn.packed import PackedLayer


def packed_layers(model: nn.Module) -> dict[str, PackedLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PackedLayer)}


def thaw(model: nn.Module) -> nn.Module:
    """Inverse of freeze: packed modules back to QuantizedLayers holding codes (no float weights)."""
    for name, packed in packed_layers(model).items():
        replace_submodule(model, name, packed.to_quantized_layer())
    return model


@contextlib.contextmanager
def thawed(model: nn.Module) -> Iterator[nn.Module]:
    """Inside: `model` with codes-holding QuantizedLayers (what checkpoint.save_quantized reads), low-rank
    branches included; after: the same packed modules as before."""
    packed = packed_layers(model)
    thaw(model)
    try:
        yield model
    finally:
        for name, module in packed.items():
            replace_submodule(model, name, module)
