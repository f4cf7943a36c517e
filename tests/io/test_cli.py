"""The command line, run as a user would: subprocesses, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from diffquant.cli import main


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "diffquant", *args], capture_output=True, text=True, timeout=300)


def test_recipes_lists_every_preset(capsys):
    from diffquant.recipes import list_presets

    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name, recipe in list_presets().items():
        assert f"{name:<20}{recipe.label:<8}{recipe.description}" in out


def test_recipes_yaml_is_a_loadable_recipe(capsys, tmp_path):
    from diffquant.recipes import Recipe, get_preset

    assert main(["recipes", "--yaml", "smoothquant-w4a4"]) == 0
    (tmp_path / "r.yaml").write_text(capsys.readouterr().out)
    assert Recipe.from_file(tmp_path / "r.yaml") == get_preset("smoothquant-w4a4")


@pytest.mark.parametrize(
    "args, message",
    [
        (["recipes", "--yaml", "w3a3"], "unknown recipe preset 'w3a3'"),
        (["quantize", "MISSING", "--recipe", "w9a9", "--out", "OUT"], "unknown recipe preset 'w9a9'"),
        (["quantize", "MISSING", "--recipe", "w8a8", "--out", "OUT"], "model folder MISSING does not exist"),
        (["info", "MISSING"], "MISSING does not exist"),
    ],
    ids=["bad-preset", "quantize-bad-preset", "quantize-missing-model", "info-missing"],
)
def test_bad_input_gives_one_line_error(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "OUT").exists()


def test_recipe_file_with_unknown_keys(tmp_path, capsys):
    (tmp_path / "r.yaml").write_text("name: r\nweight: {format: int8}\nbits: 4\n")
    assert main(["quantize", str(tmp_path), "--recipe", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "unknown recipe keys ['bits']" in capsys.readouterr().err


def test_static_recipe_on_a_bare_model_folder_asks_for_a_pipeline(tmp_path, capsys):
    from tests.tiny_models import TINY_MODELS

    TINY_MODELS["dit"].build().save_pretrained(tmp_path / "model")
    assert main(["quantize", str(tmp_path / "model"), "--recipe", "w8a8-static", "--out", str(tmp_path / "o")]) == 2
    assert "needs calibration" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_quantize_model_folder_then_info(tmp_path):
    from tests.tiny_models import TINY_MODELS

    TINY_MODELS["dit"].build().save_pretrained(tmp_path / "model")
    done = cli("quantize", str(tmp_path / "model"), "--recipe", "w4a16", "--out", str(tmp_path / "q"))
    assert done.returncode == 0, done.stderr
    again = cli("quantize", str(tmp_path / "model"), "--recipe", "w4a16", "--out", str(tmp_path / "q"))
    assert again.returncode == 2 and "already exists" in again.stderr
    info = json.loads(cli("info", str(tmp_path / "q"), "--json").stdout)
    assert info["recipe"] == "w4a16" and info["model_class"] == "DiTTransformer2DModel"
    assert set(info["roles"]) == {"attn.q", "attn.k", "attn.v", "attn.out", "ffn.up", "ffn.down"}
    assert all(row["weight_bits"] == [4] and row["input_bits"] == [16] for row in info["roles"].values())
    assert info["quantized_bytes"] < 0.3 * info["quantized_bytes_16bit"]


def test_quantize_pipeline_folder_with_calibration(dit_pipeline_folder, tmp_path):
    out = tmp_path / "qpipe"
    done = cli("quantize", str(dit_pipeline_folder), "--recipe", "smoothquant-w8a8", "--out", str(out),
               "--calib-samples", "2", "--calib-steps", "2")
    assert done.returncode == 0, done.stderr
    assert (out / "model_index.json").is_file()
    for part in ("scheduler/scheduler_config.json", "vae/config.json", "vae/diffusion_pytorch_model.safetensors"):
        assert (out / part).read_bytes() == (dit_pipeline_folder / part).read_bytes(), f"{part} was not copied"
    table = cli("info", str(out)).stdout
    assert "smoothquant-w8a8" in table and "attn.q" in table
    assert "stage smoothquant: seconds " in table  # what each stage reported, scalars only


def test_outliers_of_a_pipeline_folder_before_and_after_a_profile(dit_pipeline_folder):
    done = cli("outliers", str(dit_pipeline_folder), "--profile", "realistic", "--samples", "2", "--steps", "2",
               "--layers")
    assert done.returncode == 0, done.stderr
    rows = {line.split(" | ")[0].strip("| "): line for line in done.stdout.splitlines() if "| transformer_blocks" in line}
    q = rows["transformer_blocks.0.attn1.to_q"].strip(" |").split(" | ")
    assert float(q[-1]) > 4 * float(q[-2])  # the profile's outlier channels, in the reader's input
