"""The recipe's `attention` field: parsing, errors, serialisation (absent when unset), labels and
calibration needs."""

from __future__ import annotations

import json

import pytest
import yaml

from diffquant.formats import QuantSpec
from diffquant.nn.attention import AttentionQuantConfig
from diffquant.recipes import Recipe, RecipeError, get_preset, list_presets

INT4_STATIC = {"format": "int4", "granularity": "tensor", "symmetric": False}
UINT8_STATIC = {"format": "uint8", "granularity": "tensor"}
BASE = {"name": "t", "weight": {"format": "int4", "granularity": "channel"}}


def with_attention(attention) -> Recipe:
    return Recipe.from_dict({**BASE, "attention": attention})


def test_attention_mapping_parses_to_a_config():
    r = with_attention({"query": INT4_STATIC, "key": INT4_STATIC, "probs": UINT8_STATIC})
    assert isinstance(r.attention, AttentionQuantConfig)
    assert r.attention.query == QuantSpec("int4", "tensor", symmetric=False) and r.attention.value is None
    assert r.attention.probs == QuantSpec("uint8", "tensor")
    assert r.attention_label == "q,k int4; probs uint8" and r.label == "W4A16"


@pytest.mark.parametrize("fmt", ["yaml", "json", "dict"])
def test_recipe_with_attention_round_trips(fmt):
    r = with_attention({"query": INT4_STATIC, "value": {"format": "int8", "granularity": "token", "dynamic": True},
                        "probs": {**UINT8_STATIC, "per_step": True}})
    data = {"yaml": lambda: yaml.safe_load(r.to_yaml()), "json": lambda: json.loads(r.to_json()),
            "dict": r.to_dict}[fmt]()
    assert Recipe.from_dict(data) == r
    assert list(r.to_dict())[:6] == ["version", "name", "description", "weight", "input", "attention"]


@pytest.mark.parametrize("name", [n for n, p in list_presets().items() if p.attention is None])
def test_recipes_without_attention_serialise_without_the_key(name):
    """Recipes without `attention` serialise exactly as before the field existed (folder hashes unchanged)."""
    preset = get_preset(name)
    assert "attention" not in preset.to_dict()
    assert "attention" not in preset.to_yaml() and "attention" not in json.loads(preset.to_json())


def test_to_dict_without_attention_keeps_the_keys_and_order_it_had_before_the_field():
    """Same keys in the same order as before `attention` existed, so to_json / to_yaml (and the cache keys
    and folder hashes made from them) are byte-identical for recipes that do not use it."""
    keys = ["version", "name", "description", "weight", "input", "stages", "overrides"]
    assert list(get_preset("w8a8-static").to_dict()) == keys
    assert list(get_preset("edadm-w4a8").to_dict()) == keys


@pytest.mark.parametrize("attention,message", [
    ({"scores": UINT8_STATIC}, r"unknown attention operand keys \['scores'\]"),
    ({"query": {"format": "int4", "bogus": 1}}, "bogus"),
    ({"query": "int4"}, "'query' takes a spec mapping or null"),
    ({"query": {"format": "int8", "granularity": "token"}}, "dynamic"),  # per-token ranges must be dynamic
    (["query"], "maps operands"),
    ({}, "quantizes no operand"),
    ({"query": None, "probs": None}, "quantizes no operand"),
], ids=["unknown-operand", "unknown-spec-key", "not-a-mapping-spec", "invalid-spec", "a-list", "empty", "all-null"])
def test_invalid_attention_is_a_recipe_error(attention, message):
    with pytest.raises(RecipeError, match=message):
        with_attention(attention)


def test_null_attention_means_none():
    assert with_attention(None).attention is None
    assert with_attention(None) == Recipe.from_dict(BASE)


def test_static_attention_operands_need_calibration():
    dynamic = {"format": "int8", "granularity": "token", "dynamic": True}
    assert not Recipe.from_dict(BASE).needs_calibration
    assert not with_attention({"query": dynamic, "key": dynamic}).needs_calibration
    assert with_attention({"query": dynamic, "probs": UINT8_STATIC}).needs_calibration


def test_edadm_w4a4_preset():
    preset = get_preset("edadm-w4a4")
    w4a8 = get_preset("edadm-w4a8")
    assert preset.label == "W4A4" and preset.needs_calibration
    assert preset.input == w4a8.input.with_changes(format="int4") and not preset.input.per_step
    assert preset.weight == w4a8.weight
    att = preset.attention
    assert att.query == att.key == att.value
    for field in ("format", "granularity", "symmetric", "dynamic", "per_step", "scale_dtype"):
        assert getattr(att.query, field) == getattr(preset.input, field)  # the layer inputs' static spec
    assert att.probs == QuantSpec("uint8", "tensor", symmetric=True)  # softmax at 8 bits (sm_abit 8), zero at 0
    assert preset.attention_label == "q,k,v int4; probs uint8"
    assert preset.attention_label in preset.description
    assert [s.type for s in preset.stages] == [s.type for s in w4a8.stages]
    assert preset.stages == w4a8.stages  # same TDAC selection and reconstruction settings
