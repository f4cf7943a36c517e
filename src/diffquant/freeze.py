"""Freeze a quantized model into its packed form, and back for saving; memory accounting helpers.

    model = diffquant.load_quantized(folder)     # QuantizedLayers holding integer codes
    freeze(model)                                # in place: PackedLinear / PackedConv2d
    with thawed(model):                          # codes-holding QuantizedLayers again, briefly
        diffquant.save_quantized(model, out)

freeze() works on a fake-quant model too: each layer first trades its float weight for codes
(QuantizedLayer.store_codes), so no full-precision copy outlives its own layer's conversion.
Layers without a weight quantizer (activation-only) have no integer weight and stay as they are.

Attention-matmul quantization (a recipe's `attention`, nn.attention) is left as it is: the operand
quantizers stay submodules of their attention modules and keep fake-quantizing q, k, v and the
softmax output in float, and the two matmuls (q·kᵀ, probs·v) then run in float on those values —
there is no integer attention kernel. The projections around them are packed like any layer.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import torch
from torch import nn

from diffquant.checkpoint import save_quantized
from diffquant.job import quantized_layers, replace_submodule
from diffquant.kernels import IntGemmBackend, select_backend
from diffquant.lora import require_detached
from diffquant.nn.attention import attention_quantizers, attention_summary
from diffquant.nn.emulated import EMULATED_PATH, packed_type
from diffquant.nn.layers import QuantizedLayer
from diffquant.thaw import packed_layers, thaw, thawed  # noqa: F401  (thaw: re-exported beside freeze)

log = logging.getLogger("diffquant.freeze")
PROC_STATUS = Path("/proc/self/status")


def model_device(model: nn.Module) -> torch.device:
    """Where the model's tensors live (the first parameter or buffer; CPU for an empty model)."""
    tensors = (t for t in (*model.parameters(), *model.buffers()) if t.device.type != "meta")
    return next((t.device for t in tensors), torch.device("cpu"))


def freeze(model: nn.Module, backend: str | IntGemmBackend | None = None,
           float_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every QuantizedLayer of `model` by its packed module, in place; returns `model`.

    backend: kernel backend name or object (default: the best for the device the model is on:
             diffquant.kernels.select_backend(device=...); a model on a GPU gets "triton").
    float_dtype: dtype of the float paths (weight-only layers; default: the device's fastest).
    """
    require_detached(model, "freeze a model")
    backend = select_backend(backend, device=model_device(model))
    names = [n for n, layer in quantized_layers(model).items() if layer.weight_quantizer is not None]
    for name in names:
        layer: QuantizedLayer = model.get_submodule(name)
        layer.store_codes()  # drops the float weight before the packed copy is made
        replace_submodule(model, name, packed_type(layer)(layer, backend=backend, float_dtype=float_dtype))
        del layer
    emulated = sum(model.get_submodule(n).kernel is EMULATED_PATH for n in names)  # fp formats: nn/emulated.py
    log.info("froze %d layers with kernel backend %r, %d of them emulated (decoded to float per call)",
             len(names), backend.name, emulated)
    attention = attention_quantizers(model)
    if attention:
        log.info("attention operands (%s) of %d attention modules stay fake-quantized, matmuls in float",
                 attention_summary(model), len(attention))
    return model


def save_frozen(model: nn.Module, path: str | Path, **kwargs) -> Path:
    """checkpoint.save_quantized for a frozen model (the same files as for the model before freezing)."""
    with thawed(model):
        return save_quantized(model, path, **kwargs)


# -- memory accounting ------------------------------------------------------------------------------


def resident_bytes(model: nn.Module) -> int:
    """Bytes of every distinct tensor the model keeps (parameters, buffers, kernel-prepared weights)."""
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = tensor.untyped_storage().data_ptr() if tensor.device.type != "meta" else id(tensor)
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes() if tensor.device.type != "meta" else 0
    for module in packed_layers(model).values():
        total += sum(module.weight.backend.prepared_nbytes(p) for p in module.weight.prepared or ())
    return total


def process_rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable), after a gc pass."""
    gc.collect()
    if not PROC_STATUS.is_file():
        return 0
    for line in PROC_STATUS.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0
