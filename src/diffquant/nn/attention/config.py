"""AttentionQuantConfig: which attention operands are quantized and how (a recipe's `attention:`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from diffquant.configs import reject_unknown_keys
from diffquant.formats.spec import QuantSpec, SpecError

OPERANDS = ("query", "key", "value", "probs")
SHORT_NAMES = {"query": "q", "key": "k", "value": "v", "probs": "probs"}  # in labels


@dataclass(frozen=True)
class AttentionQuantConfig:
    """Which attention operands are quantized and how; None leaves an operand in full precision."""

    query: QuantSpec | None = None
    key: QuantSpec | None = None
    value: QuantSpec | None = None
    probs: QuantSpec | None = None

    def __post_init__(self) -> None:
        for operand in OPERANDS:
            spec = getattr(self, operand)
            if spec is None:
                continue
            if not isinstance(spec, QuantSpec):
                raise SpecError(f"attention operand {operand!r} takes a QuantSpec or None, got {type(spec).__name__}")
            spec.validate_for_activation()

    def specs(self) -> dict[str, QuantSpec]:
        """The quantized operands and their specs."""
        return {op: spec for op in OPERANDS if (spec := getattr(self, op)) is not None}

    def calibrated_operands(self) -> tuple[str, ...]:
        """The operands with static (calibrated) ranges: those whose statistics calibration must record."""
        return tuple(op for op, spec in self.specs().items() if not spec.dynamic)

    @property
    def label(self) -> str:
        """The quantized operands by format, e.g. "q,k,v int4; probs uint8" ("none" when none is)."""
        by_format: dict[str, list[str]] = {}
        for op, spec in self.specs().items():
            kind = spec.format + (" dynamic" if spec.dynamic else "")
            by_format.setdefault(kind, []).append(SHORT_NAMES[op])
        return "; ".join(f"{','.join(ops)} {kind}" for kind, ops in by_format.items()) or "none"

    def to_dict(self) -> dict[str, Any]:
        return {op: None if (spec := getattr(self, op)) is None else spec.to_dict() for op in OPERANDS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AttentionQuantConfig:
        if not isinstance(data, Mapping):
            raise SpecError(f"attention maps operands ({', '.join(OPERANDS)}) to specs, got {data!r}")
        reject_unknown_keys("attention operand", data, cls, SpecError)
        for operand, spec in data.items():
            if spec is not None and not isinstance(spec, Mapping | QuantSpec):
                raise SpecError(f"attention operand {operand!r} takes a spec mapping or null (full precision), "
                                f"got {spec!r}")
        return cls(**{
            op: spec if spec is None or isinstance(spec, QuantSpec) else QuantSpec.from_dict(spec)
            for op, spec in data.items()
        })


def summary_of(configs: Iterable[AttentionQuantConfig]) -> str | None:
    """The distinct labels of attention configs joined by " | ", e.g. "q,k,v int4; probs uint8"; None
    for no config."""
    labels = dict.fromkeys(config.label for config in configs)
    return " | ".join(labels) if labels else None
