"""Operand quantizers: the registry of quantizer factories by format, and the container of one
attention module's quantizers (its `matmul_quantizers` submodule)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from diffquant.calib.stats import LayerStats
from diffquant.formats.spec import QuantSpec
from diffquant.nn.attention.config import OPERANDS, AttentionQuantConfig
from diffquant.nn.quantizers import ActivationQuantizer

MATMUL_QUANTIZERS = "matmul_quantizers"  # submodule name on each instrumented Attention

OperandQuantizerFactory = Callable[[QuantSpec], nn.Module]
_OPERAND_QUANTIZERS: list[tuple[re.Pattern[str], frozenset[str], OperandQuantizerFactory]] = []


def register_operand_quantizer(
    format_pattern: str, factory: OperandQuantizerFactory | None = None, *, operands: Iterable[str] = OPERANDS
) -> Any:
    """Build the quantizer of `operands` whose spec format fully matches `format_pattern` with `factory`.

    `factory(spec)` returns a module with the ActivationQuantizer interface: `forward(x)` on a
    feature-last tensor, `calibrate(LayerStats)`, and a `spec` attribute. The latest matching
    registration wins; without one an operand gets an ActivationQuantizer. Usable as a decorator:

        @register_operand_quantizer(r"log2_\\d+", operands=("probs",))
        class Log2Quantizer(nn.Module): ...
    """
    ops = frozenset(operands)
    if not ops or not ops <= set(OPERANDS):
        raise ValueError(f"operands must be a non-empty subset of {OPERANDS}, got {sorted(ops)}")
    pattern = re.compile(format_pattern)

    def register(fn: OperandQuantizerFactory) -> OperandQuantizerFactory:
        _OPERAND_QUANTIZERS.append((pattern, ops, fn))
        return fn

    return register if factory is None else register(factory)


def make_operand_quantizer(operand: str, spec: QuantSpec) -> nn.Module:
    """The quantizer module for one attention operand (registered factory, else ActivationQuantizer)."""
    if operand not in OPERANDS:
        raise ValueError(f"unknown attention operand {operand!r}; known: {OPERANDS}")
    for pattern, ops, factory in reversed(_OPERAND_QUANTIZERS):
        if operand in ops and pattern.fullmatch(spec.format):
            return factory(spec)
    return ActivationQuantizer(spec)


class AttentionQuantizers(nn.Module):
    """The operand quantizers of one attention module: submodules `query`, `key`, `value`, `probs`,
    each a quantizer module or None (full precision). `quant_enabled` = False lets every operand pass
    unquantized (full-precision reference passes), like QuantizedLayer.quant_enabled."""

    def __init__(self, config: AttentionQuantConfig) -> None:
        super().__init__()
        self.config = config
        self.quant_enabled = True  # False: operands pass unquantized (the switch nn.layers.quantization_enabled sets)
        for operand in OPERANDS:
            spec = getattr(config, operand)
            self.register_module(operand, None if spec is None else make_operand_quantizer(operand, spec))

    def quantizers(self) -> dict[str, nn.Module]:
        """The present operand quantizers by operand name."""
        return {op: q for op in OPERANDS if (q := self._modules[op]) is not None}

    @property
    def calibrated(self) -> bool:
        return all(getattr(q, "calibrated", True) for q in self.quantizers().values())

    def quantize(self, operand: str, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize one operand (feature axis last); identity when the operand has no quantizer."""
        quantizer = self._modules[operand]
        return x if quantizer is None or not self.quant_enabled else quantizer(x)

    def calibrate(self, stats_by_operand: Mapping[str, LayerStats]) -> None:
        """Set the static ranges from operand statistics keyed by operand name ("query", ..., "probs")."""
        for operand, quantizer in self.quantizers().items():
            spec = getattr(quantizer, "spec", None)
            if spec is not None and spec.dynamic:
                continue
            stats = stats_by_operand.get(operand)
            if stats is None or stats.overall is None:
                raise KeyError(f"no calibration statistics for attention operand {operand!r}")
            quantizer.calibrate(stats)

    def extra_repr(self) -> str:
        full_precision = [op for op in OPERANDS if self._modules[op] is None]
        return f"fp: {', '.join(full_precision)}" if full_precision else ""
