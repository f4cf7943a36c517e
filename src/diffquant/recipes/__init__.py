"""Recipes: typed configs, stage registry and the shipped presets."""

from diffquant.recipes.config import (
    Override,
    Recipe,
    RecipeError,
    StageConfig,
    register_stage,
    registered_stages,
)
from diffquant.recipes.presets import get_preset, list_presets, resolve_recipe

__all__ = [
    "Override",
    "Recipe",
    "RecipeError",
    "StageConfig",
    "get_preset",
    "list_presets",
    "register_stage",
    "registered_stages",
    "resolve_recipe",
]
