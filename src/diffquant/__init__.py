"""diffquant: low-bit quantization of diffusion models.

The core imports neither diffusers nor transformers; integrations load them lazily.
"""

# registration: every algorithm module registers its recipe stages before any recipe is read
# (recipes.config cannot import them: they import it)
from diffquant import algorithms as _algorithms  # noqa: F401
from diffquant import lora
from diffquant.api import (
    CalibrationRequiredError,
    UnsupportedModelError,
    quantize,
    quantized_layers,
    quantizers_disabled,
)
from diffquant.calib.steps import current_step, sampling_step, track_pipeline_steps
from diffquant.checkpoint import CheckpointError, load_quantized, save_quantized
from diffquant.finite import NonFiniteError, check_finite
from diffquant.formats import QuantSpec
from diffquant.freeze import freeze
from diffquant.recipes import Recipe, get_preset, list_presets
from diffquant.version import __version__

__all__ = [
    "CalibrationRequiredError",
    "CheckpointError",
    "NonFiniteError",
    "QuantSpec",
    "Recipe",
    "UnsupportedModelError",
    "check_finite",
    "current_step",
    "freeze",
    "get_preset",
    "list_presets",
    "load_quantized",
    "lora",
    "quantize",
    "quantized_layers",
    "quantizers_disabled",
    "sampling_step",
    "save_quantized",
    "track_pipeline_steps",
    "__version__",
]
