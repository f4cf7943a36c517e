"""The main job (`diffquant demo`) and the random-model self-check, at toy sizes."""

from __future__ import annotations

import json

import pytest

from diffquant.checkpoint import is_quantized_folder
from diffquant.cli import main
from diffquant.demo import DemoConfig, demo_paths, format_demo, run_demo
from diffquant.selfcheck import run_selfcheck


def test_demo_quantizes_and_evaluates_the_zoo_model(tmp_path, monkeypatch, single_thread):
    monkeypatch.setenv("DIFFQUANT_CACHE_DIR", str(tmp_path / "cache"))
    config = DemoConfig(recipes=("w8a8",), samples=20, steps=3, out=tmp_path / "demo", progress=False)
    (result,) = run_demo(config)
    folder, metrics, grid = demo_paths(config, "w8a8")
    assert is_quantized_folder(folder) and grid.stat().st_size > 0
    assert json.loads(metrics.read_text())["psnr_vs_fp"] == pytest.approx(result["psnr_vs_fp"])
    # W8A8 on the shipped DiT is close to FP: well above the ~26 dB of W4A4.
    assert result["psnr_vs_fp"] > 35 and result["eps_sqnr_db"] > 30
    table = format_demo([result])
    assert "| `fp` |" in table and "| `w8a8` |" in table


def test_demo_cli_rejects_unknown_recipe(tmp_path, capsys):
    assert main(["demo", "--recipes", "no-such-recipe", "--out", str(tmp_path), "--quiet"]) == 2
    assert "no-such-recipe" in capsys.readouterr().err


def test_selfcheck_reloads_bitwise_and_orders_bits():
    rows = {r.recipe: r for r in run_selfcheck(["w8a8", "w4a4"])}
    assert all(r.reload_bitwise for r in rows.values())
    assert rows["w8a8"].sqnr_db > rows["w4a4"].sqnr_db + 10
    assert rows["w4a4"].weight_bytes_ratio < rows["w8a8"].weight_bytes_ratio < 0.6
