"""Recipes, stage configs and quantization specs serialise (and hash) as they did before the typed
dispatch of issue 19 (granularity objects, kernel-path objects, sentinels made None): cache keys of
report folders and training checkpoints, and the specs in saved manifests, stay byte-identical.

tests/data/serialised_forms.json was written from the code at the commit before that change
(every shipped preset's and benchmark recipe's Recipe.cache_key(), every stage's default cache key,
QuantSpec.to_dict() over formats x granularities x symmetric x dynamic)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import diffquant.algorithms  # noqa: F401  (fills the stage registry)
from diffquant.formats.spec import QuantSpec
from diffquant.recipes.config import Recipe, registered_stages
from diffquant.recipes.presets import get_preset

ROOT = Path(__file__).resolve().parents[2]
RECORDED = json.loads((ROOT / "tests/data/serialised_forms.json").read_text())


@pytest.mark.parametrize("name", sorted(RECORDED["presets"]))
def test_preset_cache_key_is_unchanged(name):
    preset = get_preset(name)
    assert preset.cache_key() == RECORDED["presets"][name]
    assert Recipe.from_dict(preset.to_dict()).cache_key() == RECORDED["presets"][name]


@pytest.mark.parametrize("path", sorted(RECORDED["benchmark_recipes"]))
def test_benchmark_recipe_cache_key_is_unchanged(path):
    assert Recipe.from_file(ROOT / path).cache_key() == RECORDED["benchmark_recipes"][path]


@pytest.mark.parametrize("stage", sorted(RECORDED["stage_defaults"]))
def test_default_stage_cache_key_is_unchanged(stage):
    assert json.dumps(registered_stages()[stage]().cache_key(), sort_keys=True) == RECORDED["stage_defaults"][stage]


@pytest.mark.parametrize("fields", sorted(RECORDED["specs"]))
def test_spec_to_dict_is_unchanged(fields):
    spec = QuantSpec.from_dict(json.loads(fields))
    assert spec.to_dict() == RECORDED["specs"][fields]
    assert QuantSpec.from_dict(spec.to_dict()) == spec
