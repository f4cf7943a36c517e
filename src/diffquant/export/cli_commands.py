"""`diffquant export`: registered with diffquant.cli's @command decorator when diffquant.cli imports
this module. Formats come from diffquant.export.EXPORTERS."""

from __future__ import annotations

import argparse
from pathlib import Path

from diffquant.commands import command


def _export_args(parser: argparse.ArgumentParser) -> None:
    from diffquant.export import EXPORTERS

    parser.add_argument("folder", help="a quantized model folder (from `diffquant quantize` / save_quantized)")
    parser.add_argument("--format", default="nunchaku", choices=sorted(EXPORTERS),
                        help="runtime layout to write (default nunchaku)")
    parser.add_argument("--out", type=Path, required=True, metavar="FILE", help="output file (.safetensors)")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"),
                        help="dtype of the 16-bit tensors: smoothing, low-rank factors, bias (default float16)")
    parser.add_argument("--layout", default="logical", choices=("logical", "tiled"),
                        help="nunchaku: logical (row-major, unpadded; default) or tiled (the runtime's MMA "
                             "tile order, padded to its tile sizes)")


@command("export", "write a quantized model in an inference runtime's layout (nunchaku: SVDQuant W4A4)",
         _export_args)
def _export(args: argparse.Namespace) -> int:
    from diffquant.export import export

    path = export(args.folder, args.out, format=args.format, dtype=args.dtype, layout=args.layout)
    print(f"wrote {path} ({args.format}, {args.layout} layout)")
    return 0
