"""Malformed command lines (issue 18, items 6 and 7), run in-process: each user error is exit code 2 and
one stderr line `diffquant <command>: error: ...` naming what was wrong, no traceback, and nothing
written where --out pointed. Counts are checked when parsed: 0 is an error, not "the default"."""

from __future__ import annotations

import json

import pytest
import yaml

import diffquant.workflows  # noqa: F401  (imports diffusers here: its import-time warnings are not CLI output)
from diffquant import zoo
from diffquant.cli import main

zoo.entries()  # registers the zoo models (imports their pipelines) before any test captures stderr


def assert_one_line_error(capsys, args: list[str], *names: str) -> str:
    code = main(args)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    command = next(a for a in args if not a.startswith("-"))
    assert lines[0].startswith(f"diffquant {command}: error: "), err
    assert "Traceback" not in err
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


# -- counts, checked when parsed ---------------------------------------------------------------------
QUANTIZE = ["quantize", "fmnist-dit", "--recipe", "w8a8-static", "--out", "{out}"]
DEMO = ["demo", "--quiet", "--out", "{out}"]
EVAL = ["eval", "fmnist-dit", "--json", "{out}"]
REPORT = ["report", "--models", "fmnist-dit", "--out", "{out}", "--work", "{out}"]


@pytest.mark.parametrize(
    "base, option, value",
    [
        pytest.param(QUANTIZE, "--calib-samples", "0", id="quantize-calib-samples-zero"),
        pytest.param(QUANTIZE, "--calib-samples", "-3", id="quantize-calib-samples-negative"),
        pytest.param(QUANTIZE, "--calib-samples", "abc", id="quantize-calib-samples-word"),
        pytest.param(QUANTIZE, "--calib-steps", "0", id="quantize-calib-steps-zero"),
        pytest.param(QUANTIZE, "--calib-steps", "-1", id="quantize-calib-steps-negative"),
        pytest.param(DEMO, "--steps", "0", id="demo-steps-zero"),
        pytest.param(DEMO, "--steps", "-5", id="demo-steps-negative"),
        pytest.param(DEMO, "--samples", "0", id="demo-samples-zero"),
        pytest.param(DEMO, "--samples", "1.5", id="demo-samples-fraction"),
        pytest.param(DEMO, "--speed-samples", "-1", id="demo-speed-samples-negative"),
        pytest.param(EVAL, "--steps", "0", id="eval-steps-zero"),
        pytest.param(EVAL, "--steps", "-5", id="eval-steps-negative"),
        pytest.param(EVAL, "--samples", "0", id="eval-samples-zero"),
        pytest.param(EVAL, "--batch-size", "0", id="eval-batch-size-zero"),
        pytest.param(EVAL, "--sqnr-samples", "0", id="eval-sqnr-samples-zero"),
        pytest.param(REPORT, "--samples", "0", id="report-samples-zero"),
        pytest.param(REPORT, "--steps", "0", id="report-steps-zero"),
        pytest.param(REPORT, "--sqnr-samples", "-1", id="report-sqnr-samples-negative"),
    ],
)
def test_counts_must_be_positive(capsys, tmp_path, base, option, value):
    out = tmp_path / "out"
    args = [a.replace("{out}", str(out)) for a in base] + [f"{option}={value}"]
    line = assert_one_line_error(capsys, args, option, repr(value))
    assert ">= 0" in line if option == "--speed-samples" else "positive integer" in line
    assert not out.exists()


def test_zero_speed_samples_still_means_skip():
    from diffquant.cli import build_parser

    args = build_parser().parse_args(["demo", "--speed-samples", "0"])
    assert args.speed_samples == 0


def test_unknown_option_is_one_line(capsys, tmp_path):
    assert_one_line_error(capsys, ["quantize", "m", "--recipe", "w8a8", "--out", str(tmp_path / "o"), "--bogus"],
                          "--bogus")
    assert not (tmp_path / "o").exists()


def test_help_is_not_an_error(capsys):
    assert main(["quantize", "--help"]) == 0
    assert "--calib-samples" in capsys.readouterr().out


# -- selfcheck ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("names", [["bogus"], ["w8a8", "bogus"], ["W8A8"]], ids=["unknown", "one-unknown", "case"])
def test_selfcheck_names_unknown_presets(capsys, names):
    unknown = [n for n in names if n != "w8a8"]
    assert_one_line_error(capsys, ["selfcheck", "--recipes", *names], *map(repr, unknown), "w8a8", "w4a16")


# -- recipe files on the command line --------------------------------------------------------------------
@pytest.mark.parametrize(
    "content, names",
    [
        pytest.param("name: r\nweight: {format: int8\n", ("not valid YAML", "line 3"), id="malformed-yaml"),
        pytest.param("name: r\nweight: int8\n", ("weight", "'int8'", "mapping"), id="weight-scalar"),
        pytest.param("name: r\nweight: {format: int4, symmetric: 'no'}\n", ("symmetric", "'no'"),
                     id="symmetric-string"),
        pytest.param("name: r\nweight: {format: int4, granularity: group, group_size: '64'}\n",
                     ("group_size", "'64'"), id="group-size-string"),
        pytest.param("name: r\nweight: {format: int8}\ninput: {format: int8, granularity: tensor}\n"
                     "stages: [{type: smoothquant, alpha: high}]\n", ("alpha", "'high'"), id="alpha-string"),
        pytest.param("", ("a recipe is a mapping",), id="empty-file"),
        pytest.param(b"name: r\xff\n", ("not UTF-8",), id="not-utf8"),
    ],
)
def test_bad_recipe_file(capsys, tmp_path, content, names):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(content if isinstance(content, bytes) else content.encode())
    args = ["quantize", "fmnist-dit", "--recipe", str(recipe), "--out", str(tmp_path / "o")]
    assert_one_line_error(capsys, args, str(recipe), *names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_a_folder_given_as_recipe_file(capsys, tmp_path):
    (tmp_path / "r.yaml").mkdir()
    args = ["quantize", "fmnist-dit", "--recipe", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o")]
    assert_one_line_error(capsys, args, "r.yaml", "is a folder")
    assert not (tmp_path / "o").exists()


# -- names and paths the library cannot use ---------------------------------------------------------------
def test_demo_with_an_unknown_zoo_model(capsys, tmp_path):
    assert_one_line_error(capsys, ["demo", "--quiet", "--model", "bogus", "--out", str(tmp_path / "o")],
                          "unknown zoo model 'bogus'", "fmnist-dit")
    assert not (tmp_path / "o").exists()


def test_eval_of_a_folder_whose_marker_names_an_unknown_zoo_model(capsys, tmp_path):
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "diffquant_zoo.json").write_text(json.dumps({"zoo": "bogus"}))
    assert_one_line_error(capsys, ["eval", str(tmp_path / "q"), "--json", str(tmp_path / "m.json")],
                          "unknown zoo model 'bogus'")
    assert not (tmp_path / "m.json").exists()


def test_output_below_a_file_is_an_oserror_line(capsys, tmp_path, single_thread):
    from tests.tiny_models import TINY_MODELS

    TINY_MODELS["dit"].build().save_pretrained(tmp_path / "model")
    (tmp_path / "file").write_text("not a folder")
    args = ["quantize", str(tmp_path / "model"), "--recipe", "w4a16", "--out", str(tmp_path / "file" / "q")]
    assert_one_line_error(capsys, args, str(tmp_path / "file"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "model"]
    assert (tmp_path / "file").read_text() == "not a folder"


def test_an_unreadable_checkpoint_is_an_oserror_line(capsys, tmp_path, monkeypatch):
    import diffquant.info

    def unreadable(path):  # what a folder without read permission gives (tests may run as root)
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(diffquant.info, "checkpoint_info", unreadable)
    line = assert_one_line_error(capsys, ["info", str(tmp_path / "q")], f"Permission denied: {tmp_path / 'q'}")
    assert "Errno" not in line


def test_verbose_keeps_the_traceback(capsys):
    from diffquant.recipes import RecipeError

    with pytest.raises(RecipeError, match="bogus"):
        main(["-v", "selfcheck", "--recipes", "bogus"])


# -- which errors main reports as the user's -----------------------------------------------------------
def _yaml_error() -> yaml.YAMLError:
    try:
        yaml.safe_load("a: {b\n")
    except yaml.YAMLError as exc:
        return exc
    raise AssertionError("the YAML parsed")


@pytest.mark.parametrize(
    "exc, message",
    [
        pytest.param(PermissionError(13, "Permission denied", "/x/y"), "Permission denied: /x/y", id="permission"),
        pytest.param(IsADirectoryError(21, "Is a directory", "/x"), "Is a directory: /x", id="is-a-directory"),
        pytest.param(FileNotFoundError("model folder m does not exist"), "model folder m does not exist",
                     id="file-not-found-message"),
        pytest.param(ValueError("first\n  second"), "first second", id="multi-line"),
        pytest.param(NotImplementedError("attention processor X is not supported"),
                     "attention processor X is not supported", id="not-supported"),
        pytest.param(NotImplementedError(), None, id="bare-not-implemented-is-a-bug"),
        pytest.param(TypeError("unsupported operand"), None, id="type-error-is-a-bug"),
        pytest.param(KeyError("x"), None, id="key-error-is-a-bug"),
        pytest.param(RuntimeError("boom"), None, id="runtime-error-is-a-bug"),
    ],
)
def test_user_error_message(exc, message):
    from diffquant.cli import user_error_message

    assert user_error_message(exc) == message


def test_yaml_errors_are_one_line():
    from diffquant.cli import user_error_message

    message = user_error_message(_yaml_error())
    assert message is not None and "\n" not in message and "line 2" in message
