"""QuantSpec: what a quantizer does — format, granularity, symmetry, static or dynamic range."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from diffquant.configs import reject_unknown_keys
from diffquant.formats.base import QFormat, SpecError, get_format

# Granularity names. For weights (viewed as a [out, K] matrix) "channel" means one range per output
# channel; for activations (feature axis last) "channel" means one range per input channel (static
# only), "token" one range per token. "group" splits the input/feature axis into blocks of group_size.
WEIGHT_GRANULARITIES = ("tensor", "channel", "group")
ACTIVATION_GRANULARITIES = ("tensor", "channel", "token", "group")
SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor (a weight or a layer input) is quantized.

    format:      number format name, e.g. "int8", "uint4" (see formats.get_format).
    granularity: "tensor" | "channel" | "token" | "group" (see module comment).
    group_size:  block length along the input/feature axis; required iff granularity == "group".
    symmetric:   zero point fixed at 0 (range ±absmax) or an affine range [min, max] with zero point.
    dynamic:     activations only — range computed from each input at run time instead of calibrated.
    per_step:    static activations only — one calibrated range per sampling step.
    scale_dtype: dtype the scales are rounded to and stored in.
    """

    format: str = "int8"
    granularity: str = "channel"
    group_size: int | None = None
    symmetric: bool = True
    dynamic: bool = False
    per_step: bool = False
    scale_dtype: str = "float32"

    def __post_init__(self) -> None:
        get_format(self.format)  # raises for unknown formats / bit widths
        if self.granularity not in ACTIVATION_GRANULARITIES:
            raise SpecError(
                f"unknown granularity {self.granularity!r}; choose one of {ACTIVATION_GRANULARITIES}"
            )
        if (self.granularity == "group") != (self.group_size is not None):
            raise SpecError("group_size is required with granularity 'group' and only then")
        if self.group_size is not None and self.group_size < 1:
            raise SpecError(f"group_size must be positive, got {self.group_size}")
        if self.dynamic and self.per_step:
            raise SpecError("per_step applies to static (calibrated) ranges; a dynamic range has no steps")
        if self.scale_dtype not in SCALE_DTYPES:
            raise SpecError(f"scale_dtype must be one of {list(SCALE_DTYPES)}, got {self.scale_dtype!r}")

    @property
    def qformat(self) -> QFormat:
        return get_format(self.format)

    @property
    def bits(self) -> int:
        return self.qformat.bits

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    def validate_for_weight(self) -> None:
        if self.granularity not in WEIGHT_GRANULARITIES:
            raise SpecError(f"weights take granularity {WEIGHT_GRANULARITIES}, got {self.granularity!r}")
        if self.dynamic or self.per_step:
            raise SpecError("weight ranges come from the weight itself: dynamic/per_step do not apply")

    def validate_for_activation(self) -> None:
        if self.granularity == "channel" and self.dynamic:
            raise SpecError("per-input-channel activation ranges are calibrated (static): set dynamic=false, "
                            "or use granularity 'token' / 'group' for dynamic ranges")
        if self.granularity == "token" and not self.dynamic:
            raise SpecError("per-token activation ranges change with every input: set dynamic=true")
        if self.granularity == "group" and not self.dynamic:
            raise SpecError("per-group activation ranges are computed at run time: set dynamic=true")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantSpec:
        reject_unknown_keys("quantization spec", data, cls, SpecError)
        return cls(**data)
