"""Malformed recipe files and recipe data (issue 18, item 5): each is one RecipeError whose message names
the file, the field and the value (YAML/JSON values are never coerced: `symmetric: "no"` is not
False), and nothing is written; well-formed variants give the recipe they mean."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pytest

from diffquant.algorithms.smoothquant import SmoothQuant
from diffquant.algorithms.svdquant import SVDQuant
from diffquant.formats.spec import QuantSpec, SpecError
from diffquant.nn.attention import AttentionQuantConfig
from diffquant.recipes import Recipe, RecipeError, list_presets
from diffquant.recipes.config import Override, stage_from_dict

W8 = "name: r\nweight: {format: int8}\n"
W4G = "name: r\nweight: {format: int4, granularity: group, group_size: 64}\n"
A8_TENSOR = W8 + "input: {format: int8, granularity: tensor}\n"


def write(tmp_path: Path, content: str | bytes, suffix: str = ".yaml") -> Path:
    path = tmp_path / f"recipe{suffix}"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def assert_refused(path: Path, *names: str) -> str:
    """Recipe.from_file(path) is one RecipeError naming the file and every one of `names`; no file
    appears or disappears beside it."""
    before = sorted(path.parent.iterdir())
    with pytest.raises(RecipeError) as info:
        Recipe.from_file(path)
    message = str(info.value)
    assert "\n" not in message, message
    assert str(path) in message, message
    for name in names:
        assert name in message, (name, message)
    assert sorted(path.parent.iterdir()) == before
    return message


# -- quantization spec fields (weight / input) ------------------------------------------------------
SPEC_CASES = [
    pytest.param(W8.replace("int8}", "int4, symmetric: 'no'}"), ("symmetric", "'no'", "true or false"),
                 id="symmetric-string-no"),
    pytest.param(W8 + "input: {format: int8, granularity: token, dynamic: 'false'}\n", ("dynamic", "'false'"),
                 id="dynamic-string-false"),
    pytest.param(W8.replace("int8}", "int4, granularity: group, group_size: true}"), ("group_size", "True"),
                 id="group-size-bool"),
    pytest.param(W8.replace("int8}", "int4, granularity: group, group_size: '64'}"), ("group_size", "'64'"),
                 id="group-size-string"),
    pytest.param(W8.replace("int8}", "int4, granularity: group, group_size: 64.0}"), ("group_size", "64.0"),
                 id="group-size-float"),
    pytest.param("name: r\nweight: {format: 8}\n", ("format", "8", "a string"), id="format-number"),
    pytest.param(W8.replace("int8}", "int8, granularity: [channel]}"), ("granularity", "['channel']"),
                 id="granularity-list"),
    pytest.param(W8 + "input: {format: int8, granularity: tensor, per_step: 'yes'}\n", ("per_step", "'yes'"),
                 id="per-step-string"),
    pytest.param(W8 + "input: {format: int8, granularity: tensor, split_shortcut: 'true'}\n",
                 ("split_shortcut", "'true'"), id="split-shortcut-string"),
    pytest.param(W8.replace("int8}", "int8, scale_dtype: 16}"), ("scale_dtype", "16"), id="scale-dtype-number"),
    pytest.param(W8.replace("int8}", "int8, step_interpolation: null}"), ("step_interpolation", "None"),
                 id="step-interpolation-null"),
    pytest.param("name: r\nweight: int8\n", ("weight", "'int8'", "mapping"), id="weight-scalar"),
    pytest.param("name: r\nweight: [int8]\n", ("weight", "['int8']", "mapping"), id="weight-list"),
    pytest.param("name: r\nweight: {format: int8}\ninput: 8\n", ("input", "8", "mapping"), id="input-number"),
    pytest.param(W8.replace("int8}", "int8, bits: 4}"), ("unknown quantization spec keys", "'bits'"),
                 id="spec-unknown-key"),
]


@pytest.mark.parametrize("text, names", SPEC_CASES)
def test_spec_field_of_the_wrong_type(tmp_path, text, names):
    assert_refused(write(tmp_path, text), *names)


# -- the file and the recipe's own fields ------------------------------------------------------------
FILE_CASES = [
    pytest.param("- name\n- r\n", ".yaml", ("a recipe is a mapping", "list"), id="top-level-list"),
    pytest.param("just a string\n", ".yaml", ("a recipe is a mapping", "'just a string'"), id="top-level-scalar"),
    pytest.param("", ".yaml", ("a recipe is a mapping", "empty file"), id="empty-file"),
    pytest.param("name: r\nweight: {format: int8\n", ".yaml", ("not valid YAML", "line 3"), id="yaml-unclosed-flow"),
    pytest.param("name: r\n\tweight: x\n", ".yaml", ("not valid YAML", "line 2"), id="yaml-tab-indent"),
    pytest.param("name: r\nweight: {format: int8}\n  bad: indent\n", ".yaml", ("not valid YAML",),
                 id="yaml-bad-indent"),
    pytest.param('{"name": "r",', ".json", ("not valid JSON", "line 1"), id="json-truncated"),
    pytest.param("[1, 2]", ".json", ("a recipe is a mapping", "[1, 2]"), id="json-list"),
    pytest.param(b"name: r\xff\nweight: {format: int8}\n", ".yaml", ("not UTF-8",), id="not-utf8"),
    pytest.param("name: 123\nweight: {format: int8}\n", ".yaml", ("name", "123", "a string"), id="name-number"),
    pytest.param("name: null\nweight: {format: int8}\n", ".yaml", ("name", "None"), id="name-null"),
    pytest.param(W8 + "description: [a]\n", ".yaml", ("description", "['a']"), id="description-list"),
    pytest.param(W8 + "version: '1'\n", ".yaml", ("version", "'1'", "an integer"), id="version-string"),
    pytest.param(W8 + "version: true\n", ".yaml", ("version", "True"), id="version-bool"),
    pytest.param(W8 + "1: x\n", ".yaml", ("unknown recipe keys", "1"), id="non-string-key"),
    pytest.param("weight: {format: int8}\n", ".yaml", ("needs a `name`",), id="no-name"),
    pytest.param(W8 + "stages: smoothquant\n", ".yaml", ("stages", "'smoothquant'", "list"), id="stages-string"),
    pytest.param(W8 + "stages: [smoothquant]\n", ".yaml", ("stage", "'smoothquant'", "mapping"),
                 id="stages-list-of-strings"),
    pytest.param(W8 + "stages: {type: smoothquant}\n", ".yaml", ("stages", "list"), id="stages-mapping"),
    pytest.param(W8 + "overrides: 'role:ffn.*'\n", ".yaml", ("overrides", "'role:ffn.*'", "list"),
                 id="overrides-string"),
    pytest.param(W8 + "overrides: ['role:ffn.*']\n", ".yaml", ("override", "'role:ffn.*'", "mapping"),
                 id="overrides-list-of-strings"),
]


@pytest.mark.parametrize("content, suffix, names", FILE_CASES)
def test_malformed_file_or_recipe_field(tmp_path, content, suffix, names):
    assert_refused(write(tmp_path, content, suffix), *names)


# -- stage fields ----------------------------------------------------------------------------------------
def stage(fields: str, base: str = W8) -> str:
    return base + f"stages: [{{{fields}}}]\n"


STAGE_CASES = [
    pytest.param(stage("type: smoothquant, alpha: high", A8_TENSOR), ("alpha", "'high'", "a number"),
                 id="smoothquant-alpha-string"),
    pytest.param(stage("type: smoothquant, alpha: true", A8_TENSOR), ("alpha", "True"), id="smoothquant-alpha-bool"),
    pytest.param(stage("type: smoothquant, alpha: null", A8_TENSOR), ("alpha", "None"), id="smoothquant-alpha-null"),
    pytest.param(stage("type: svdquant, rank: '32'", W4G), ("rank", "'32'"), id="svdquant-rank-string"),
    pytest.param(stage("type: svdquant, smooth: 'no'", W4G), ("smooth", "'no'"), id="svdquant-smooth-string"),
    pytest.param(stage("type: svdquant, randomized_svd_from: big", W4G), ("randomized_svd_from", "'big'"),
                 id="svdquant-randomized-string"),
    pytest.param(stage("type: svdquant, gptq: 1", W4G), ("gptq", "1", "true or false"), id="svdquant-gptq-int"),
    pytest.param(stage("type: range_search, p: '2'"), ("p", "'2'"), id="range-search-p-string"),
    pytest.param(stage("type: efficientdm, lora_skip: time_embed"), ("lora_skip", "'time_embed'", "list of strings"),
                 id="efficientdm-lora-skip-string"),
    pytest.param(stage("type: efficientdm, lora_skip: [1, 2]"), ("lora_skip", "[1, 2]"),
                 id="efficientdm-lora-skip-ints"),
    pytest.param(stage("type: qat, checkpoint_dir: 5"), ("checkpoint_dir", "5", "a string or null"),
                 id="qat-checkpoint-dir-number"),
    pytest.param(stage("type: qat, learn_zero_point: 'false'"), ("learn_zero_point", "'false'"),
                 id="qat-learn-zero-point-string"),
    pytest.param(stage("type: block_reconstruction, adaround: 'off'"), ("adaround", "'off'"),
                 id="reconstruction-adaround-string"),
    pytest.param(stage("type: block_reconstruction, eta: x"), ("eta", "'x'"), id="reconstruction-eta-string"),
    pytest.param(stage("type: calibration_selection, method: 1"), ("method", "1"), id="selection-method-number"),
    pytest.param(stage("type: 5"), ("unknown stage type", "5"), id="stage-type-number"),
    pytest.param(stage("alpha: 0.5"), ("unknown stage type", "None"), id="stage-without-type"),
]


@pytest.mark.parametrize("text, names", STAGE_CASES)
def test_stage_field_of_the_wrong_type(tmp_path, text, names):
    assert_refused(write(tmp_path, text), *names)


# -- overrides and attention -------------------------------------------------------------------------
def override(fields: str, base: str = W8) -> str:
    return base + f"overrides: [{{{fields}}}]\n"


NESTED_CASES = [
    pytest.param(override("match: 3"), ("match", "3", "a string"), id="override-match-number"),
    pytest.param(override("match: 'role:ffn.*', skip: 'yes'"), ("skip", "'yes'"), id="override-skip-string"),
    pytest.param(override("match: 'role:ffn.*', include: 1"), ("include", "1"), id="override-include-int"),
    pytest.param(override("match: 'role:ffn.*', weight: 8"), ("weight", "8"), id="override-weight-number"),
    pytest.param(override("match: 'role:ffn.*', weight: {group_size: '32'}", W4G), ("role:ffn.*", "group_size", "'32'"),
                 id="override-spec-group-size-string"),
    pytest.param(override("match: 'role:ffn.*', input: {symmetric: 'no'}",
                          W8 + "input: {format: uint8, granularity: tensor}\n"), ("symmetric", "'no'"),
                 id="override-spec-symmetric-string"),
    pytest.param(W8 + "attention: {query: {format: int8, granularity: token, dynamic: 'yes'}}\n",
                 ("attention", "dynamic", "'yes'"), id="attention-dynamic-string"),
    pytest.param(W8 + "attention: {query: int8}\n", ("attention", "query", "'int8'"), id="attention-operand-scalar"),
    pytest.param(W8 + "attention: [query]\n", ("attention", "['query']"), id="attention-list"),
    pytest.param(W8 + "attention: {queries: {format: int8, granularity: tensor}}\n", ("attention", "'queries'"),
                 id="attention-unknown-operand"),
]


@pytest.mark.parametrize("text, names", NESTED_CASES)
def test_override_or_attention_of_the_wrong_type(tmp_path, text, names):
    assert_refused(write(tmp_path, text), *names)


# -- the same checks for Python callers -------------------------------------------------------------
@pytest.mark.parametrize(
    "make, error, names",
    [
        pytest.param(lambda: QuantSpec(format="int4", symmetric="no"), SpecError, ("symmetric", "'no'"),
                     id="quantspec-symmetric-string"),
        pytest.param(lambda: QuantSpec.from_dict("int8"), SpecError, ("mapping", "'int8'"), id="quantspec-scalar"),
        pytest.param(lambda: QuantSpec.for_format("int8").with_changes(group_size=True, granularity="group"),
                     SpecError, ("group_size", "True"), id="with-changes-group-size-bool"),
        pytest.param(lambda: AttentionQuantConfig.from_dict(["query"]), SpecError, ("['query']",),
                     id="attention-from-list"),
        pytest.param(lambda: stage_from_dict("smoothquant"), RecipeError, ("'smoothquant'", "mapping"),
                     id="stage-from-string"),
        pytest.param(lambda: stage_from_dict({"type": "smoothquant", "alpha": "0.5"}), RecipeError,
                     ("alpha", "'0.5'"), id="stage-alpha-string"),
        pytest.param(lambda: Override("role:ffn.*", skip="true"), RecipeError, ("skip", "'true'"),
                     id="override-skip-string"),
        pytest.param(lambda: Recipe(name="r", weight=QuantSpec(), version="1"), RecipeError, ("version", "'1'"),
                     id="recipe-version-string"),
        pytest.param(lambda: Recipe.from_dict({"name": "r", "weight": {"format": "int8", "dynamic": 0}}),
                     RecipeError, ("dynamic", "0"), id="from-dict-dynamic-zero"),
    ],
)
def test_python_callers_get_the_same_errors(make, error, names):
    with pytest.raises(error) as info:
        make()
    assert all(name in str(info.value) for name in names), str(info.value)


def test_a_folder_named_like_a_recipe_file_is_an_oserror_from_the_api(tmp_path):
    (tmp_path / "r.yaml").mkdir()
    with pytest.raises(IsADirectoryError):
        Recipe.from_file(tmp_path / "r.yaml")


# -- what is well-formed means what it says ---------------------------------------------------------
def test_yaml_booleans_and_numbers_of_the_right_type_are_taken(tmp_path):
    text = ("name: r\nweight: {format: uint4, symmetric: no}\ninput: {format: int8, granularity: tensor}\n"
            "stages: [{type: smoothquant, alpha: 1}]\n")
    recipe = Recipe.from_file(write(tmp_path, text))
    assert recipe.weight.symmetric is False  # YAML's unquoted `no` is a real false
    assert recipe.stages[0].alpha == 1  # an integer where a number is asked for


def test_lists_null_sections_and_json(tmp_path):
    text = W8 + "stages: [{type: efficientdm, lora_skip: [time_embed]}]\noverrides: null\n"
    recipe = Recipe.from_file(write(tmp_path, text))
    assert recipe.stages[0].lora_skip == ("time_embed",) and recipe.overrides == ()
    as_json = Recipe.from_file(write(tmp_path, recipe.to_json(), ".json"))
    assert as_json == recipe


@pytest.mark.parametrize("name", sorted(list_presets()))
def test_every_shipped_preset_parses_and_round_trips(tmp_path, name):
    recipe = list_presets()[name]
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert Recipe.from_file(write(tmp_path, recipe.to_yaml())) == recipe


# -- the generic checker ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "hint, value, admitted",
    [
        (bool, True, True), (bool, "no", False), (bool, 1, False),
        (int, 3, True), (int, True, False), (int, 3.0, False),
        (float, 3, True), (float, 0.5, True), (float, False, False), (float, "0.5", False),
        (str, "x", True), (str, 1, False),
        (int | None, None, True), (int | None, "8", False),
        (str | dict[str, Any] | None, {"format": "int8"}, True), (str | dict[str, Any] | None, 8, False),
        (tuple[str, ...], ["a", "b"], True), (tuple[str, ...], ("a",), True), (tuple[str, ...], "ab", False),
        (tuple[str, ...], ["a", 1], False), (tuple[int, int], [1, 2], True), (tuple[int, int], [1], False),
        (dict[str, int], {"a": 1}, True), (dict[str, int], {"a": "1"}, False), (dict[str, int], [("a", 1)], False),
        (Literal["a", "b"], "a", True), (Literal["a", "b"], "c", False), (Literal[1], True, False),
        (Any, object(), True),
    ],
)
def test_type_admits(hint, value, admitted):
    from diffquant.configs import type_admits

    assert type_admits(hint, value) is admitted


@pytest.mark.parametrize(
    "hint, words",
    [(bool, "true or false"), (int | None, "an integer or null"), (tuple[str, ...], "a list of strings"),
     (str | dict[str, Any] | None, "a string or a mapping or null"), (Literal["a", "b"], "one of 'a', 'b'")],
)
def test_describe_type(hint, words):
    from diffquant.configs import describe_type

    assert describe_type(hint) == words


# -- counts: 0 is not "the default" -----------------------------------------------------------------
@pytest.mark.parametrize("value", [0, -5, True, 2.5, "8"], ids=["zero", "negative", "bool", "float", "string"])
def test_a_count_that_is_not_positive_is_an_error(value):
    from diffquant.configs import positive_or_default

    with pytest.raises(ValueError, match=rf"steps must be a positive integer.*got {value!r}"):
        positive_or_default("steps", value, 20)


def test_none_is_the_default_and_a_positive_count_is_kept():
    from diffquant.configs import check_count, positive_or_default

    assert positive_or_default("steps", None, 20) == 20 and positive_or_default("steps", 3, 20) == 3
    check_count("speed_samples", 0, minimum=0)
    with pytest.raises(ValueError, match="speed_samples must be an integer >= 0, got -1"):
        check_count("speed_samples", -1, minimum=0)


@pytest.mark.parametrize(
    "fields, name",
    [({"steps": 0}, "steps"), ({"steps": -5}, "steps"), ({"samples": 0}, "samples"),
     ({"speed_samples": -1}, "speed_samples"), ({"recipes": ()}, "recipe")],
    ids=["steps-zero", "steps-negative", "samples-zero", "speed-samples-negative", "no-recipes"],
)
def test_demo_config_refuses_counts_that_used_to_mean_the_default(tmp_path, fields, name):
    from diffquant.demo import DemoConfig

    with pytest.raises(ValueError, match=name):
        DemoConfig(out=tmp_path / "out", **fields)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("steps", [0, -5])
def test_eval_settings_refuse_zero_or_negative_steps(steps):
    from diffquant.eval.evaluation import EvalSettings

    with pytest.raises(ValueError, match=f"steps must be a positive integer.*got {steps}"):
        EvalSettings(samples=8, steps=steps)


@pytest.mark.parametrize("stage, fields", [
    (SmoothQuant, {"alpha": "high"}), (SVDQuant, {"rank": "8"}), (SVDQuant, {"smooth": "no"}),
])
def test_stages_built_in_python_are_type_checked_too(stage, fields):
    with pytest.raises(RecipeError, match=f"{next(iter(fields))} must be"):
        stage(**fields)
