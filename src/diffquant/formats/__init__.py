"""Number formats, quantization specs and the plain-torch reference maths."""

from diffquant.formats.base import (
    IntFormat,
    QFormat,
    SpecError,
    UnknownFormatError,
    get_format,
    known_format_patterns,
    register_format,
)
from diffquant.formats.binary import BinaryFormat
from diffquant.formats.floating import FloatFormat
from diffquant.formats.granularity import GRANULARITIES, Granularity, get_granularity
from diffquant.formats.ops import (
    block_view,
    dequantize,
    fake_quantize,
    fake_quantize_dynamic,
    qparams_from_range,
    quantize,
    quantize_blocks,
    round_scale,
    sqnr_db,
    unblock_view,
)
from diffquant.formats.spec import QuantSpec

__all__ = [
    "BinaryFormat",
    "GRANULARITIES",
    "FloatFormat",
    "Granularity",
    "IntFormat",
    "QFormat",
    "QuantSpec",
    "SpecError",
    "UnknownFormatError",
    "block_view",
    "dequantize",
    "fake_quantize",
    "fake_quantize_dynamic",
    "get_format",
    "get_granularity",
    "known_format_patterns",
    "qparams_from_range",
    "quantize",
    "quantize_blocks",
    "register_format",
    "round_scale",
    "sqnr_db",
    "unblock_view",
]
