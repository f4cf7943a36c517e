"""Helpers shared by the typed config dataclasses."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any


def reject_unknown_keys(kind: str, data: Mapping[str, Any], cls: type, error: type[Exception]) -> None:
    """Raise `error` naming every key of `data` that is not an init field of dataclass `cls`."""
    known = {f.name for f in fields(cls) if f.init}
    unknown = set(data) - known
    if unknown:
        raise error(f"unknown {kind} keys {sorted(unknown)}; known: {sorted(known)}")
