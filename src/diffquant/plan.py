"""Planning: which layer of a model gets which weight and input spec under a recipe."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

from diffquant.arch import adapter_for
from diffquant.formats.spec import QuantSpec, SpecError
from diffquant.recipes.config import Override, Recipe, RecipeError, patch_spec


@dataclass(frozen=True)
class LayerPlan:
    name: str
    role: str
    weight: QuantSpec | None
    input: QuantSpec | None

    @property
    def quantized(self) -> bool:
        return self.weight is not None or self.input is not None


def override_selects(override: Override, path: str, role: str) -> bool:
    if override.match.startswith("role:"):
        return fnmatch.fnmatchcase(role, override.match[len("role:"):])
    return fnmatch.fnmatchcase(path, override.match)


def plan_layers(model: nn.Module, recipe: Recipe) -> dict[str, LayerPlan]:
    """Plans for every quantized layer (layers left in full precision are omitted)."""
    adapter = adapter_for(model)
    roles = adapter.assign(model)
    specs = {
        path: (None, None) if role in adapter.default_skip else (recipe.weight, recipe.input)
        for path, role in roles.items()
    }
    for override in recipe.overrides:
        selected = [p for p, r in roles.items() if override_selects(override, p, r)]
        if not selected:
            raise RecipeError(
                f"override {override.match!r} matches no quantizable layer of {type(model).__name__} "
                f"(roles present: {sorted(set(roles.values()))})"
            )
        _check_patch_reaches_a_layer(override, selected, roles, specs, adapter.default_skip)
        for path in selected:
            specs[path] = _apply_override(override, recipe, roles[path], specs[path], adapter.default_skip)
    plans = {p: LayerPlan(p, roles[p], *specs[p]) for p in roles}
    return {p: plan for p, plan in plans.items() if plan.quantized}


def _is_patch(value) -> bool:
    return isinstance(value, dict)


def _check_patch_reaches_a_layer(override, selected, roles, specs, default_skip) -> None:
    """A spec patch on layers that all stay in full precision by default would do nothing."""
    patches = _is_patch(override.weight) or _is_patch(override.input)
    if not patches or override.include or override.skip:
        return
    if all(roles[p] in default_skip and specs[p] == (None, None) for p in selected):
        raise RecipeError(
            f"override {override.match!r} changes only layers that stay in full precision by default "
            f"(roles {sorted({roles[p] for p in selected})}): add `include: true` to quantize them"
        )


def _apply_override(override, recipe, role, current, default_skip):
    if override.skip:
        return None, None
    weight, inp = current
    if override.include:
        weight, inp = recipe.weight, recipe.input
    elif role in default_skip and current == (None, None):
        return current  # kept in full precision unless included
    weight = _patched(weight, recipe.weight, override.weight, "weight", override.match)
    inp = _patched(inp, recipe.input, override.input, "input", override.match)
    return weight, inp


def _patched(current, base, patch, side, match):
    if patch is None:
        return current
    spec = patch_spec(current if current is not None else base, patch, side)
    if spec is not None:
        try:
            spec.validate_for_weight() if side == "weight" else spec.validate_for_activation()
        except SpecError as exc:
            raise RecipeError(f"override {match!r} makes an invalid {side} spec: {exc}") from exc
    return spec
