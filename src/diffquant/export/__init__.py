"""Export of quantized models to the file layouts of other inference runtimes.

`EXPORTERS` maps a format name to its exporter, a callable ``(model_or_folder, out_file, **options)
-> Path``; a new runtime format is one new entry (see `register_exporter`). `export()` dispatches on
the name; `diffquant export DIR --format NAME --out FILE` is the command-line face (cli_commands.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

Exporter = Callable[..., Path]

EXPORTERS: dict[str, Exporter] = {}


def register_exporter(name: str, exporter: Exporter) -> Exporter:
    if name in EXPORTERS:
        raise ValueError(f"an exporter named {name!r} is already registered")
    EXPORTERS[name] = exporter
    return exporter


def export(model_or_folder: Any, out_file: str | Path, format: str = "nunchaku", **options: Any) -> Path:
    """Write a quantized model (a model from diffquant.quantize, or a saved folder) in `format`."""
    if format not in EXPORTERS:
        raise ValueError(f"unknown export format {format!r}; choose one of {sorted(EXPORTERS)}")
    return EXPORTERS[format](model_or_folder, out_file, **options)


from diffquant.export.nunchaku import export_nunchaku, import_nunchaku  # noqa: E402

register_exporter("nunchaku", export_nunchaku)

__all__ = ["EXPORTERS", "export", "export_nunchaku", "import_nunchaku", "register_exporter"]
