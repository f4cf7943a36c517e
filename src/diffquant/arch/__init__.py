"""Role adapters for diffusers models (registered on import) and the generic fallback."""

from diffquant.arch import diffusers_models as _diffusers_models  # noqa: F401  (registers adapters)
from diffquant.arch.base import (
    DEFAULT_SKIP_ROLES,
    ROLES,
    GenericAdapter,
    RoleAdapter,
    adapter_for,
    quantizable_layers,
    register_adapter,
    registered_adapters,
)
from diffquant.arch.skips import observe_skip_concats, skip_concat_splits, up_blocks

__all__ = [
    "DEFAULT_SKIP_ROLES",
    "ROLES",
    "GenericAdapter",
    "RoleAdapter",
    "adapter_for",
    "quantizable_layers",
    "register_adapter",
    "registered_adapters",
    "observe_skip_concats",
    "skip_concat_splits",
    "up_blocks",
]
