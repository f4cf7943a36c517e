"""QuantSpec: what a quantizer does — format, granularity, symmetry, static or dynamic range."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch

from diffquant.configs import check_field_types, check_instance_types, reject_unknown_keys
from diffquant.formats.base import QFormat, SpecError, get_format
from diffquant.formats.granularity import GRANULARITIES, Granularity, get_granularity
from diffquant.formats.scales import ScaleFormat, get_scale_format

# Granularity names (formats/granularity.py). For weights (viewed as a [out, K] matrix) "channel" means one
# range per output channel; for activations (feature axis last) "channel" means one range per input channel
# (static only), "token" one range per token. "group" splits the input/feature axis into blocks of group_size.
WEIGHT_GRANULARITIES = tuple(name for name, g in GRANULARITIES.items() if g.for_weights)
ACTIVATION_GRANULARITIES = tuple(GRANULARITIES)
# How per-step state trained for S steps serves a run of another length (calib/steps.py: step_rows).
STEP_INTERPOLATIONS = ("linear", "nearest")


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor (a weight or a layer input) is quantized.

    format:      number format name, e.g. "int8", "uint4", "fp8_e4m3", "nvfp4", "mxfp4" (formats.get_format).
                 A block format fixes some fields (QFormat.spec_defaults; nvfp4: group 16, e4m3
                 scales; mxfp*: group 32, e8m0 scales): from_dict / for_format fill in the ones not
                 given, and a spec that sets them otherwise is an error.
    granularity: "tensor" | "channel" | "token" | "group" (see module comment); `grain` is its object.
    group_size:  block length along the input/feature axis; required iff the granularity takes one ("group").
    symmetric:   zero point fixed at 0 (range ±absmax) or an affine range [min, max] with zero point.
    dynamic:     activations only — range computed from each input at run time instead of calibrated.
    per_step:    static activations only — one calibrated range per sampling step.
    scale_dtype: scale format the scales are rounded to and stored in: "float32", "float16",
                 "bfloat16", "e4m3" (two-level, with a float32 global scale) or "e8m0" (powers of
                 two, OCP MX); formats/scales.py.
    step_interpolation: with per_step, a run with another number of steps than calibrated reads its
                 ranges "linear"ly interpolated between the two nearest calibrated steps, or from the
                 "nearest" one (calib/steps.py: step_rows); no effect without per_step. Left out of
                 to_dict while "linear", so specs that predate it serialise (and hash) as before.
    split_shortcut: input specs only — Q-Diffusion's shortcut splitting: a layer whose input is a UNet
                 decoder's skip concatenation cat([hidden, skip], dim=1) (arch/skips.py finds them)
                 gets two static ranges, one per channel half. Applies to static per-tensor specs;
                 no effect on other layers, on per-channel ranges (already one per channel) or on
                 dynamic specs (nn/quantizers.py: ActivationQuantizer). Left out of to_dict while
                 false, so specs that predate it serialise (and hash) as before.
    """

    format: str = "int8"
    granularity: str = "channel"
    group_size: int | None = None
    symmetric: bool = True
    dynamic: bool = False
    per_step: bool = False
    scale_dtype: str = "float32"
    step_interpolation: str = "linear"
    split_shortcut: bool = False

    def __post_init__(self) -> None:
        check_instance_types(self, "quantization spec", SpecError)  # `symmetric: "no"` is not False
        fmt = get_format(self.format)  # raises for unknown formats / bit widths
        if get_granularity(self.granularity).takes_group_size != (self.group_size is not None):
            raise SpecError("group_size is required with granularity 'group' and only then")
        if self.group_size is not None and self.group_size < 1:
            raise SpecError(f"group_size must be positive, got {self.group_size}")
        if self.dynamic and self.per_step:
            raise SpecError("per_step applies to static (calibrated) ranges; a dynamic range has no steps")
        get_scale_format(self.scale_dtype)  # raises for unknown scale formats
        if not isinstance(self.split_shortcut, bool):
            raise SpecError(f"split_shortcut must be true or false, got {self.split_shortcut!r}")
        if self.step_interpolation not in STEP_INTERPOLATIONS:
            raise SpecError(f"unknown step_interpolation {self.step_interpolation!r}; "
                            f"choose one of {STEP_INTERPOLATIONS}")
        self._check_format_fields(fmt)

    def _check_format_fields(self, fmt: QFormat) -> None:
        for key, value in fmt.spec_defaults:
            if getattr(self, key) != value:
                fixed = ", ".join(f"{k}: {v}" for k, v in fmt.spec_defaults)
                raise SpecError(f"format {self.format!r} fixes {fixed}; got {key}: {getattr(self, key)} "
                                f"(leave the field out of the spec, or use another format)")
        if not (self.symmetric or fmt.has_zero_point):
            raise SpecError(f"format {self.format!r} has a sign bit and no zero point: set symmetric: true")

    @property
    def qformat(self) -> QFormat:
        return get_format(self.format)

    @property
    def grain(self) -> Granularity:
        """The granularity as an object (formats/granularity.py): what code dispatches on."""
        return GRANULARITIES[self.granularity]

    @property
    def bits(self) -> int:
        return self.qformat.bits

    @property
    def scale_format(self) -> ScaleFormat:
        return get_scale_format(self.scale_dtype)

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        """dtype in which the scales the maths uses are exact (float32 for two-level e4m3 scales)."""
        return self.scale_format.torch_dtype

    def validate_for_weight(self) -> None:
        if not self.grain.for_weights:
            raise SpecError(f"weights take granularity {WEIGHT_GRANULARITIES}, got {self.granularity!r}")
        if self.dynamic or self.per_step:
            raise SpecError("weight ranges come from the weight itself: dynamic/per_step do not apply")
        if self.split_shortcut:
            raise SpecError("split_shortcut splits a layer's input ranges: set it in the input spec, not the weight's")

    def validate_for_activation(self) -> None:
        if not self.qformat.for_activations:
            raise SpecError(f"format {self.format!r} is for weights only, not layer inputs")
        self.grain.check_activation(self.dynamic)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.step_interpolation == "linear":
            del data["step_interpolation"]  # the default, and the behaviour of specs from before it
        if not self.split_shortcut:
            del data["split_shortcut"]  # likewise
        return data

    def with_changes(self, **changes: Any) -> QuantSpec:
        """dataclasses.replace that follows the format: a new format brings the fields it fixes and
        lets go of those the old one fixed (back to their defaults), unless `changes` sets them, so
        an override {format: int8} of an nvfp4 spec does not keep e4m3 scales by accident."""
        data = self.to_dict()
        if changes.get("format", self.format) != self.format:
            defaults = {f.name: f.default for f in fields(self)}
            data.update({key: defaults[key] for key, _ in self.qformat.spec_defaults})
            data.update(get_format(changes["format"]).spec_defaults)
        return QuantSpec(**{**data, **changes})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantSpec:
        """A spec from a recipe entry; fields its format fixes (spec_defaults) may be left out."""
        if not isinstance(data, Mapping):
            raise SpecError(f"a quantization spec is a mapping of its fields (e.g. {{format: int8}}), got {data!r}")
        reject_unknown_keys("quantization spec", data, cls, SpecError)
        check_field_types("quantization spec", data, cls, SpecError)  # before get_format reads `format`
        fmt = get_format(data.get("format", cls.format))
        return cls(**{**dict(fmt.spec_defaults), **data})

    @classmethod
    def for_format(cls, name: str, **fields: Any) -> QuantSpec:
        """QuantSpec.for_format("nvfp4", dynamic=True): from_dict for Python callers."""
        return cls.from_dict({"format": name, **fields})
