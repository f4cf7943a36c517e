"""Recipes: serialisation round trips of every preset, error messages, and planning with overrides."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from diffquant.arch import DEFAULT_SKIP_ROLES, GenericAdapter, adapter_for
from diffquant.formats import QuantSpec
from diffquant.plan import LayerPlan, plan_layers
from diffquant.recipes import Override, Recipe, RecipeError, get_preset, list_presets, resolve_recipe

PRESETS = list_presets()
PRESET_NAMES = list(PRESETS)

W8A8 = {
    "name": "test-w8a8",
    "weight": {"format": "int8", "granularity": "channel"},
    "input": {"format": "int8", "granularity": "token", "dynamic": True},
}


def recipe(**changes) -> Recipe:
    """The test W8A8 recipe with top-level keys changed (None values drop a key)."""
    data = {**W8A8, **changes}
    return Recipe.from_dict({k: v for k, v in data.items() if v is not None})


# -- presets and serialisation ----------------------------------------------------------------------


def test_presets_are_shipped():
    assert {"w8a8", "w8a8-static", "w4a8", "w4a16", "w4a4", "smoothquant-w8a8", "smoothquant-w4a4"} <= set(PRESETS)
    for name, preset in PRESETS.items():
        assert preset.name == name  # the file stem is the recipe's name
        assert get_preset(name) == preset


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_preset_round_trips_through_dict_json_yaml(name):
    preset = PRESETS[name]
    assert Recipe.from_dict(preset.to_dict()) == preset
    assert Recipe.from_dict(json.loads(preset.to_json())) == preset
    assert Recipe.from_dict(yaml.safe_load(preset.to_yaml())) == preset


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
@pytest.mark.parametrize("name", PRESET_NAMES)
def test_preset_round_trips_through_a_file(tmp_path, name, suffix):
    preset = PRESETS[name]
    path = tmp_path / f"recipe{suffix}"
    path.write_text(preset.to_json() if suffix == ".json" else preset.to_yaml())
    assert Recipe.from_file(path) == preset
    assert resolve_recipe(path) == preset
    assert resolve_recipe(str(path)) == preset


def test_recipe_with_overrides_and_stages_round_trips():
    r = recipe(
        stages=[{"type": "smoothquant", "alpha": 0.75}],
        overrides=[
            {"match": "role:ffn.*", "weight": {"format": "int4", "granularity": "group", "group_size": 32}},
            {"match": "role:head", "include": True, "input": "fp"},
            {"match": "blocks.0.*", "skip": True},
        ],
    )
    assert len(r.stages) == 1 and r.stages[0].alpha == 0.75
    assert Recipe.from_dict(r.to_dict()) == r
    assert Recipe.from_dict(json.loads(r.to_json())) == r
    assert Recipe.from_dict(yaml.safe_load(r.to_yaml())) == r


def test_resolve_recipe_accepts_preset_name_recipe_and_file(tmp_path):
    assert resolve_recipe("w4a8") == get_preset("w4a8")
    r = recipe()
    assert resolve_recipe(r) is r
    path = tmp_path / "mine.yml"
    path.write_text(r.to_yaml())
    assert resolve_recipe(path) == r


def test_labels_and_calibration_needs():
    assert PRESETS["w8a8"].label == "W8A8"
    assert PRESETS["w4a16"].label == "W4A16"
    assert not PRESETS["w8a8"].needs_calibration  # dynamic inputs
    assert PRESETS["w8a8-static"].needs_calibration  # static inputs
    assert PRESETS["smoothquant-w8a8"].needs_calibration  # data-driven stage
    assert recipe(overrides=[{"match": "x", "input": {"granularity": "tensor", "dynamic": False}}]).needs_calibration


# sha256 of to_json() of presets that do not split shortcuts, as serialised before QuantSpec had
# split_shortcut: a spec leaves the switch out while it is off, so these recipes (and the cached results
# keyed by their hash) are unchanged. A deliberate change to one of these presets updates its hash here.
UNCHANGED_TO_JSON_SHA256 = {
    "w8a8": "38222fa57288754816224f32de5bdea55f82c76fb83354a6176e2af2a40a78ab",
    "w8a8-static": "83cc3b2ac79a3c9e5d2ae4df8d5561939db6148a767b6af2ed446cf3372ed3e4",
    "w4a8-static": "13fa3d38ab88c7aa54d307b1d54d2110d0cabbc07f57fb4a30ddad51c0c8646c",
    "w4a4-static": "81c6cc2fbdb1d52aaf992c372ceb22ce30acc3257d9d51a2273c95274ce4a8eb",
    # the preset with the switch turned off again
    "qdiffusion-w4a8": "8e660daa3d85fc793333bf8b8eeb0c29cfa56fefe1acb60183985f0bd6259774",
}
SPLIT_PRESETS = ("qdiffusion-w8a8", "qdiffusion-w4a8", "edadm-w8a8", "edadm-w4a8", "edadm-w4a4", "quest-w4a8")


@pytest.mark.parametrize("name", list(UNCHANGED_TO_JSON_SHA256))
def test_recipes_without_shortcut_splitting_serialise_as_before(name):
    preset = PRESETS[name]
    if preset.input.split_shortcut:
        preset = dataclasses.replace(preset, input=preset.input.with_changes(split_shortcut=False))
    assert hashlib.sha256(preset.to_json().encode()).hexdigest() == UNCHANGED_TO_JSON_SHA256[name]


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_only_the_block_reconstruction_presets_split_shortcuts(name):
    preset = PRESETS[name]
    on = name in SPLIT_PRESETS
    assert (preset.input is not None and preset.input.split_shortcut) == on
    assert ("split_shortcut" in preset.to_json()) == on
    assert all("split_shortcut" not in json.dumps(o.input) for o in preset.overrides if isinstance(o.input, dict))


def test_split_shortcut_round_trips_and_can_be_switched_off_by_an_override():
    r = recipe(input={"format": "int8", "granularity": "tensor", "split_shortcut": True},
               overrides=[{"match": "role:ffn.*", "input": {"split_shortcut": False}}])
    assert r.input.split_shortcut and Recipe.from_dict(yaml.safe_load(r.to_yaml())) == r
    assert not r.input.with_changes(split_shortcut=False).to_dict().get("split_shortcut", False)


# -- errors -----------------------------------------------------------------------------------------


def test_unknown_preset_lists_available_presets():
    with pytest.raises(RecipeError, match="unknown recipe preset 'w3a3'") as info:
        resolve_recipe("w3a3")
    for name in PRESET_NAMES:
        assert name in str(info.value)


def test_missing_recipe_file():
    with pytest.raises(RecipeError, match=r"recipe file .*nothere\.yaml.* does not exist"):
        resolve_recipe("nothere.yaml")


@pytest.mark.parametrize(
    "changes, message",
    [
        pytest.param({"wieght": {"format": "int4"}}, r"unknown recipe keys \['wieght'\]", id="unknown-recipe-key"),
        pytest.param({"stages": [{"type": "gptq"}]}, r"unknown stage type 'gptq'", id="unknown-stage-type"),
        pytest.param({"stages": [{"alpha": 0.5}]}, r"unknown stage type None", id="stage-without-type"),
        pytest.param({"stages": [{"type": "smoothquant", "beta": 0.5}]}, r"unknown stage 'smoothquant' keys \['beta'\]",
                     id="unknown-stage-key"),
        pytest.param({"stages": [{"type": "smoothquant", "alpha": 1.5}]}, r"alpha must lie in \[0, 1\], got 1\.5",
                     id="alpha-above-1"),
        pytest.param({"stages": [{"type": "smoothquant", "alpha": -0.1}]}, r"alpha must lie in \[0, 1\], got -0\.1",
                     id="alpha-below-0"),
        pytest.param({"overrides": [{"match": "role:ffn.*", "weight": "int8"}]},
                     r"override 'role:ffn\.\*': weight must be 'fp' or a dict, got 'int8'", id="override-weight-string"),
        pytest.param({"overrides": [{"match": "role:ffn.*", "input": "none"}]},
                     r"input must be 'fp' or a dict, got 'none'", id="override-input-string"),
        pytest.param({"overrides": [{"match": "role:ffn.*", "bits": 4}]}, r"unknown override keys \['bits'\]",
                     id="unknown-override-key"),
        pytest.param({"overrides": [{"match": "role:ffn.*", "weight": {"bits": 4}}]},
                     r"unknown override weight keys \['bits'\]", id="unknown-override-spec-key"),
        pytest.param({"overrides": [{"match": "role:ffn.*", "include": True, "skip": True}]},
                     r"include and skip exclude each other", id="include-and-skip"),
        pytest.param({"weight": None, "input": None}, r"quantizes neither weights nor inputs", id="quantizes-nothing"),
        pytest.param({"version": 2}, r"recipe version 2 is not supported", id="unsupported-version"),
        pytest.param({"name": None}, r"needs a `name`", id="missing-name"),
        pytest.param({"weight": {"format": "int4", "granularity": "token"}}, r"weights take granularity",
                     id="weight-token-granularity"),
        pytest.param({"input": {"granularity": "token"}}, r"per-token .* set dynamic=true", id="static-token-input"),
        pytest.param({"weight": {"fromat": "int4"}}, r"unknown quantization spec keys \['fromat'\]",
                     id="unknown-spec-key"),
    ],
)
def test_invalid_recipe_raises_recipe_error(changes, message):
    with pytest.raises(RecipeError, match=message):
        recipe(**changes)


def test_recipe_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- w8a8\n")
    with pytest.raises(RecipeError, match="a recipe is a mapping, got list"):
        Recipe.from_file(path)


def test_unknown_format_in_recipe_names_the_format():
    # NB: surfaces as formats.UnknownFormatError (a ValueError), not RecipeError, unlike other bad values.
    with pytest.raises(ValueError, match="unsupported bit width 9"):
        recipe(weight={"format": "int9"})


# -- planning on a tiny DiT -------------------------------------------------------------------------

DIT_CONFIG = dict(
    num_attention_heads=2,
    attention_head_dim=32,
    in_channels=4,
    out_channels=8,
    num_layers=2,
    sample_size=8,
    patch_size=2,
    num_embeds_ada_norm=10,
    norm_num_groups=32,
)
BLOCKS = (0, 1)
ATTN = {f"transformer_blocks.{i}.attn1.{p}" for i in BLOCKS for p in ("to_q", "to_k", "to_v", "to_out.0")}
FFN = {f"transformer_blocks.{i}.ff.net.{p}" for i in BLOCKS for p in ("0.proj", "2")}
ADALN = {f"transformer_blocks.{i}.norm1.linear" for i in BLOCKS} | {"proj_out_1"}
TIME_EMBED = {f"transformer_blocks.{i}.norm1.emb.timestep_embedder.linear_{j}" for i in BLOCKS for j in (1, 2)}
DEFAULT_QUANTIZED = ATTN | FFN


@pytest.fixture(scope="module")
def dit() -> nn.Module:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(**DIT_CONFIG)
    assert adapter_for(model).name == "dit", "the DiT role adapter is missing"
    return model


def plans_where(plans: dict[str, LayerPlan], names: set[str]) -> dict[str, LayerPlan]:
    return {n: p for n, p in plans.items() if n in names}


def test_default_plan_covers_attention_and_ffn_only(dit):
    r = get_preset("w8a8")
    plans = plan_layers(dit, r)
    assert set(plans) == DEFAULT_QUANTIZED
    assert all(p.weight == r.weight and p.input == r.input and p.quantized for p in plans.values())
    assert {p.role for p in plans_where(plans, FFN).values()} == {"ffn.up", "ffn.down"}
    assert {p.role for p in plans_where(plans, ATTN).values()} == {"attn.q", "attn.k", "attn.v", "attn.out"}


@pytest.mark.parametrize(
    "match, selected",
    [
        pytest.param("transformer_blocks.0.attn1.*", {n for n in ATTN if ".0." in n}, id="path-glob"),
        pytest.param("transformer_blocks.?.ff.net.2", {n for n in FFN if n.endswith("net.2")}, id="path-glob-?"),
        pytest.param("role:ffn.*", FFN, id="role-glob"),
        pytest.param("role:attn.[qk]", {n for n in ATTN if n.endswith(("to_q", "to_k"))}, id="role-glob-class"),
        pytest.param("role:ffn.up", {n for n in FFN if n.endswith("0.proj")}, id="role-exact"),
    ],
)
def test_override_changes_only_selected_layers(dit, match, selected):
    base = get_preset("w4a8")
    r = dataclasses.replace(base, overrides=(Override(match=match, weight={"format": "int8"}),))
    plans = plan_layers(dit, r)
    assert set(plans) == DEFAULT_QUANTIZED
    for name, plan in plans.items():
        expected_weight = dataclasses.replace(base.weight, format="int8") if name in selected else base.weight
        assert plan.weight == expected_weight, name
        assert plan.input == base.input, name


@pytest.mark.parametrize("match", ["role:cross_attn.*", "nonexistent.*", "transformer_blocks.5.*"])
def test_override_matching_nothing_names_the_pattern(dit, match):
    r = recipe(overrides=[{"match": match, "weight": {"format": "int4"}}])
    with pytest.raises(RecipeError, match=rf"override '{match.replace('.', '[.]').replace('*', '[*]')}' matches no"):
        plan_layers(dit, r)


def test_skip_leaves_layers_out_of_the_plan(dit):
    plans = plan_layers(dit, recipe(overrides=[{"match": "role:attn.*", "skip": True}]))
    assert set(plans) == FFN


def test_include_brings_a_default_skipped_role_in(dit):
    r = recipe(overrides=[{"match": "role:adaln", "include": True}])
    plans = plan_layers(dit, r)
    assert set(plans) == DEFAULT_QUANTIZED | ADALN
    for plan in plans_where(plans, ADALN).values():
        assert (plan.role, plan.weight, plan.input) == ("adaln", r.weight, r.input)


def test_include_with_a_patch(dit):
    r = recipe(overrides=[{"match": "proj_out_2", "include": True, "weight": {"format": "int4"}, "input": "fp"}])
    plans = plan_layers(dit, r)
    assert set(plans) == DEFAULT_QUANTIZED | {"proj_out_2"}
    head = plans["proj_out_2"]
    assert head.role == "head"
    assert head.weight == dataclasses.replace(r.weight, format="int4")
    assert head.input is None


@pytest.mark.parametrize("match", ["role:time_embed", "role:adaln", "proj_out_2"])
def test_patching_a_default_skipped_role_without_include_asks_for_include(dit, match):
    r = recipe(overrides=[{"match": match, "weight": {"format": "int4"}}])
    with pytest.raises(RecipeError, match=r"stay in full precision by default .*add `include: true`"):
        plan_layers(dit, r)


def test_weight_fp_keeps_input_quantization(dit):
    r = recipe(overrides=[{"match": "role:attn.*", "weight": "fp"}])
    plans = plan_layers(dit, r)
    assert set(plans) == DEFAULT_QUANTIZED
    for name, plan in plans.items():
        assert plan.weight == (None if name in ATTN else r.weight), name
        assert plan.input == r.input, name


def test_input_fp_keeps_weight_quantization(dit):
    r = recipe(overrides=[{"match": "role:ffn.down", "input": "fp"}])
    plans = plan_layers(dit, r)
    for name, plan in plans_where(plans, FFN).items():
        assert plan.weight == r.weight
        assert plan.input == (None if name.endswith("net.2") else r.input)


def test_weight_and_input_fp_drop_the_layer(dit):
    plans = plan_layers(dit, recipe(overrides=[{"match": "role:ffn.*", "weight": "fp", "input": "fp"}]))
    assert set(plans) == ATTN


def test_later_overrides_win(dit):
    r = recipe(overrides=[
        {"match": "role:ffn.*", "weight": {"format": "int4"}},
        {"match": "transformer_blocks.1.ff.*", "weight": {"format": "int6"}},
        {"match": "role:attn.v", "skip": True},
        {"match": "transformer_blocks.0.attn1.to_v", "include": True},
    ])
    plans = plan_layers(dit, r)
    assert set(plans) == DEFAULT_QUANTIZED - {"transformer_blocks.1.attn1.to_v"}
    for name in FFN:
        assert plans[name].weight.format == ("int6" if ".1." in name else "int4")
    assert plans["transformer_blocks.0.attn1.to_v"].weight == r.weight


def test_input_patch_on_a_weight_only_recipe_is_an_error(dit):
    r = dataclasses.replace(get_preset("w4a16"), overrides=(Override("role:ffn.*", input={"format": "int8"}),))
    with pytest.raises(RecipeError, match="recipe quantizes no inputs"):
        plan_layers(dit, r)


def test_invalid_patch_value_is_a_recipe_error(dit):
    r = recipe(overrides=[{"match": "role:ffn.*", "weight": {"format": "int4", "granularity": "group"}}])
    with pytest.raises(RecipeError, match="override of weight spec: group_size is required"):
        plan_layers(dit, r)


@pytest.mark.parametrize(
    "override",
    [
        pytest.param({"match": "role:ffn.*", "weight": {"granularity": "token"}}, id="weight-token"),
        pytest.param({"match": "role:ffn.*", "weight": {"dynamic": True}}, id="weight-dynamic"),
        pytest.param({"match": "role:ffn.*", "input": {"dynamic": False}}, id="input-static-token"),
    ],
)
def test_override_producing_an_invalid_side_spec_is_a_recipe_error(dit, override):
    with pytest.raises(RecipeError):
        plan_layers(dit, recipe(overrides=[override]))


def test_fp_override_over_default_skipped_layers_is_allowed(dit):
    plans = plan_layers(dit, recipe(overrides=[{"match": "*", "weight": "fp"}]))
    assert set(plans) == DEFAULT_QUANTIZED
    assert all(p.weight is None for p in plans.values())


# -- planning with the generic adapter --------------------------------------------------------------


class PlainNet(nn.Module):
    """No adapter knows this class: the generic one gives first layer embed, last layer head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3)
        self.token_embedding = nn.Linear(16, 16)  # named 'embed*': skipped by the generic adapter
        self.body = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.out = nn.Linear(16, 4)


def test_generic_adapter_roles_and_default_skip():
    model = PlainNet()
    assert isinstance(adapter_for(model), GenericAdapter)
    roles = adapter_for(model).assign(model)
    assert roles == {"stem": "embed", "token_embedding": "embed", "body.0": "other", "body.2": "other", "out": "head"}
    assert {"embed", "head"} <= DEFAULT_SKIP_ROLES
    plans = plan_layers(model, recipe())
    assert set(plans) == {"body.0", "body.2"}
    assert all(p.role == "other" for p in plans.values())


def test_generic_adapter_overrides():
    model = PlainNet()
    r = recipe(overrides=[
        {"match": "role:head", "include": True, "weight": {"format": "int4", "symmetric": False}},
        {"match": "body.2", "weight": "fp"},
    ])
    plans = plan_layers(model, r)
    assert set(plans) == {"body.0", "body.2", "out"}
    assert plans["out"].weight == QuantSpec(format="int4", granularity="channel", symmetric=False)
    assert plans["body.2"].weight is None and plans["body.2"].input == r.input
    with pytest.raises(RecipeError, match="'role:attn.\\*' matches no quantizable layer of PlainNet"):
        plan_layers(model, recipe(overrides=[{"match": "role:attn.*", "skip": True}]))


def test_path_glob_over_a_block_patches_only_its_quantized_layers(dit):
    """A glob over a whole block also selects its default-FP adaLN linear; the patch leaves that alone."""
    plans = plan_layers(dit, recipe(overrides=[{"match": "transformer_blocks.0.*", "weight": {"format": "int4"}}]))
    assert set(plans) == DEFAULT_QUANTIZED
    changed = {p for p, plan in plans.items() if plan.weight.format == "int4"}
    assert changed and all(p.startswith("transformer_blocks.0.") for p in changed)


# -- cache keys ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_cache_key_of_revision_1_stages_is_the_serialised_recipe(name):
    """Report folders made before stages had revisions stay valid: their key is to_dict() as before."""
    preset = PRESETS[name]
    assert preset.cache_key() == json.dumps(preset.to_dict(), sort_keys=True)


def test_a_stage_revision_changes_the_cache_key_but_not_the_recipe():
    preset = PRESETS["svdquant-w4a4"]
    stage = preset.stages[0]
    revised_type = type("RevisedSVDQuant", (type(stage),), {"revision": 2})
    revised = dataclasses.replace(preset, stages=(revised_type(**dataclasses.asdict(stage)),))
    assert revised.to_dict() == preset.to_dict()
    assert revised.cache_key() != preset.cache_key()
    assert json.loads(revised.cache_key())["stages"][0]["revision"] == 2


# -- the benchmarks' recipe files ------------------------------------------------------------------------

BENCHMARK_RECIPES = sorted((Path(__file__).parents[2] / "benchmarks").glob("*/recipes/*.yaml"))


@pytest.mark.parametrize("path", BENCHMARK_RECIPES, ids=lambda p: f"{p.parent.parent.name}/{p.stem}")
def test_benchmark_recipe_files_load_under_their_file_name(path):
    """The scoreboard rows they make are named by the recipe: a file that stopped parsing (a renamed stage
    option) or names another recipe would only show up hours into a report."""
    loaded = Recipe.from_file(path)
    assert loaded.name == path.stem
    assert Recipe.from_dict(loaded.to_dict()) == loaded


def test_the_composed_recipe_is_svdquant_w4a4_then_efficientdm_w4a4s_training():
    composed = Recipe.from_file(Path(__file__).parents[2] / "benchmarks/efficientdm/recipes/svdquant-efficientdm-w4a4.yaml")
    svd, edm = get_preset("svdquant-w4a4"), get_preset("efficientdm-w4a4")
    assert (composed.weight, composed.input) == (svd.weight, svd.input)
    assert composed.stages == (*svd.stages, edm.stages[-1])
