"""One module per quantization method; each registers its recipe stages on import."""

from diffquant.algorithms import (  # noqa: F401
    calibration_selection,
    efficientdm,
    format_search,
    qat,
    quest,
    range_search,
    reconstruction,
    smoothquant,
    svdquant,
)
