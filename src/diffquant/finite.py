"""Finite-value guards: one clear error where NaN or ±Inf would otherwise pass silently.

A NaN weight gives NaN scales, one NaN calibration row gives NaN static ranges everywhere downstream,
and both save and reload without a word. The guards sit where values enter (weights at quantize,
calibration statistics, qparams before use or save) and name the tensor and what to do:

    check_finite("blocks.0.attn.to_q.weight_quantizer.scale", scale, hint="re-quantize from ...")
"""

from __future__ import annotations

import torch

__all__ = ["NonFiniteError", "check_finite", "non_finite_summary"]


class NonFiniteError(ValueError):
    """A tensor that must be finite holds NaN or ±Inf."""


def non_finite_summary(tensor: torch.Tensor) -> str | None:
    """None when every value is finite (or the tensor is not floating point), else e.g.
    "3 of 4096 values are not finite (NaN: 2, +Inf: 1, -Inf: 0; first at index (0, 5))"."""
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return None
    t = tensor.detach()
    bad = ~torch.isfinite(t)
    if not bool(bad.any()):
        return None
    nan, pos = int(torch.isnan(t).sum()), int((t == float("inf")).sum())
    neg = int(bad.sum()) - nan - pos
    first = tuple(int(i) for i in bad.nonzero()[0]) if t.dim() else ()
    return (f"{int(bad.sum())} of {t.numel()} values are not finite (NaN: {nan}, +Inf: {pos}, -Inf: {neg}; "
            f"first at index {first})")


def check_finite(name: str, tensor: torch.Tensor, hint: str = "") -> None:
    """Raise NonFiniteError naming `name` if `tensor` holds NaN or ±Inf; `hint` says what to do."""
    summary = non_finite_summary(tensor)
    if summary is not None:
        raise NonFiniteError(f"{name}: {summary}" + (f"; {hint}" if hint else ""))
