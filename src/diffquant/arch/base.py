"""Role adapters: map a model's module paths to roles, so recipes speak of roles, not paths.

A recipe says "4 bits for ffn.*, keep time_embed in full precision" and works on every model an
adapter covers. Adapters are registered per model class name; any other model built from Linear /
Conv2d layers gets the generic adapter (quantize everything except embeddings and the first and
last layer).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)

# The role vocabulary. "attn.*" covers self-attention and the joint (image+context) attention of
# MM-DiTs; "cross_attn.*" attention whose keys/values come from the condition (text) sequence.
ROLES = (
    "embed",  # patch / latent input embedding, conv_in, positional projections
    "time_embed",  # timestep embedding MLP
    "cond_embed",  # class / text / pooled-condition embedding and caption projection
    "adaln",  # adaLN / AdaGroupNorm modulation linears (shift, scale, gate)
    "head",  # final output layer (conv_out, proj_out of the last norm)
    "attn.q", "attn.k", "attn.v", "attn.out",
    "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.out",
    "ffn.up", "ffn.down",
    "resblock.conv", "resblock.shortcut", "resblock.time_proj",
    "proj_in", "proj_out",  # Transformer2DModel entry/exit projections inside a UNet
    "upsample", "downsample",
    "other",
)

# Default coverage of the papers: embeddings, timestep embedding, adaLN modulation and the output
# head stay in full precision unless a recipe includes them.
DEFAULT_SKIP_ROLES = frozenset({"embed", "time_embed", "cond_embed", "adaln", "head"})


class UnknownRoleError(ValueError):
    pass


@dataclass(frozen=True)
class RoleAdapter:
    """Ordered (regex, role) rules; the first rule whose regex fully matches a module path wins."""

    name: str
    rules: tuple[tuple[str, str], ...]
    default_skip: frozenset[str] = DEFAULT_SKIP_ROLES
    _compiled: tuple[tuple[re.Pattern[str], str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for _, role in self.rules:
            if role not in ROLES:
                raise UnknownRoleError(f"adapter {self.name}: unknown role {role!r}")
        object.__setattr__(self, "_compiled", tuple((re.compile(p), r) for p, r in self.rules))

    def role_of(self, path: str) -> str | None:
        for pattern, role in self._compiled:
            if pattern.fullmatch(path):
                return role
        return None

    def assign(self, model: nn.Module) -> dict[str, str]:
        """Role of every Linear/Conv2d of the model; unmatched layers get 'other'."""
        return {path: self.role_of(path) or "other" for path in quantizable_layers(model)}


@dataclass(frozen=True)
class GenericAdapter(RoleAdapter):
    """For models no adapter knows: first layer 'embed', last layer 'head', names with 'embed' skipped."""

    name: str = "generic"
    rules: tuple[tuple[str, str], ...] = ((r".*(embed|embedding).*", "embed"),)

    def assign(self, model: nn.Module) -> dict[str, str]:
        paths = list(quantizable_layers(model))
        roles = {path: self.role_of(path) or "other" for path in paths}
        if paths:
            roles[paths[0]] = "embed"
            roles[paths[-1]] = "head"
        return roles


_ADAPTERS: dict[str, RoleAdapter] = {}


def register_adapter(model_class_name: str, adapter: RoleAdapter) -> RoleAdapter:
    _ADAPTERS[model_class_name] = adapter
    return adapter


def adapter_for(model: nn.Module) -> RoleAdapter:
    """The adapter registered for the model's class (or a base class), else the generic one."""
    for cls in type(model).__mro__:
        if cls.__name__ in _ADAPTERS:
            return _ADAPTERS[cls.__name__]
    return GenericAdapter()


def registered_adapters() -> dict[str, RoleAdapter]:
    return dict(_ADAPTERS)


def quantizable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Linear and Conv2d modules by path, in registration order (exact types: wrappers excluded)."""
    return {name: m for name, m in model.named_modules() if type(m) in QUANTIZABLE_TYPES}
