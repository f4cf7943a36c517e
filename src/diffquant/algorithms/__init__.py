"""One module per quantization method; each registers its recipe stages on import."""

from diffquant.algorithms import reconstruction, smoothquant, svdquant  # noqa: F401
