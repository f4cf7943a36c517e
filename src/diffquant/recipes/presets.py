"""Named presets: recipe files shipped in the package (presets/*.yaml)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from diffquant.recipes.config import Recipe, RecipeError


def _preset_files() -> dict[str, Path]:
    folder = resources.files("diffquant.recipes") / "presets"
    return {Path(str(f)).stem: Path(str(f)) for f in folder.iterdir() if str(f).endswith(".yaml")}


def list_presets() -> dict[str, Recipe]:
    """All presets by name, sorted."""
    return {name: Recipe.from_file(path) for name, path in sorted(_preset_files().items())}


def get_preset(name: str) -> Recipe:
    files = _preset_files()
    if name not in files:
        raise RecipeError(f"unknown recipe preset {name!r}; available: {', '.join(sorted(files))}")
    return Recipe.from_file(files[name])


def resolve_recipe(recipe: str | Path | Recipe) -> Recipe:
    """A Recipe from a recipe object, a preset name, or a path to a .yaml/.json recipe file."""
    if isinstance(recipe, Recipe):
        return recipe
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml", ".json"):
        if path.is_dir():
            raise RecipeError(f"recipe file {str(path)!r} is a folder, not a file")
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} does not exist")
        return Recipe.from_file(path)
    return get_preset(str(recipe))
