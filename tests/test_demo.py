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


def test_demo_times_frozen_models_against_fp_side_by_side(tmp_path, monkeypatch, single_thread):
    from diffquant.demo import run_speed
    from diffquant.eval.speed import SpeedReport, SpeedRow, format_speed, verdict

    monkeypatch.setenv("DIFFQUANT_CACHE_DIR", str(tmp_path / "cache"))
    config = DemoConfig(recipes=("w8a8", "w4a16"), samples=4, steps=2, out=tmp_path / "demo", progress=False,
                        speed_samples=3)
    run_demo(config)
    report = run_speed(config)
    rows = {row.recipe: row for row in report.rows}
    assert report.steps == 2 and report.samples == 3 and report.backend
    assert rows["w8a8"].paths == {"int": 36} and rows["w4a16"].paths.get("int", 0) == 0  # weight-only: dequantized
    assert all(row.fp_s > 0 and row.frozen_s > 0 and row.fp_s == rows["w8a8"].fp_s for row in rows.values())
    assert rows["w4a16"].bytes_vs_fp < rows["w8a8"].bytes_vs_fp < 1
    saved = json.loads((config.out / "fmnist-dit-speed.json").read_text())
    assert [r["recipe"] for r in saved["rows"]] == ["w8a8", "w4a16"]
    text = format_speed(report)
    assert "| `w8a8` | W8A8 |" in text and "36 of 36" in text
    slow = SpeedRow("w4a16", "W4A16", frozen_s=2.0, fp_s=1.0, bytes_vs_fp=0.4, paths={"float": 36})
    fast = SpeedRow("w8a8", "W8A8", frozen_s=1.0, fp_s=1.5, bytes_vs_fp=0.7, paths={"int": 36})
    assert "smaller and faster" in verdict(report, fast) and "1.50x" in verdict(report, fast)
    assert "2.00x slower" in verdict(report, slow) and "none of its layers" in verdict(report, slow)
    on_float = SpeedReport([fast], 3, 2, 1, "float", "machine", "note")
    assert "no integer kernel" in verdict(on_float, SpeedRow("w8a8", "W8A8", 2.0, 1.0, 0.7, {"int": 36}))


def test_demo_cli_rejects_unknown_recipe(tmp_path, capsys):
    assert main(["demo", "--recipes", "no-such-recipe", "--out", str(tmp_path), "--quiet"]) == 2
    assert "no-such-recipe" in capsys.readouterr().err


def test_selfcheck_reloads_bitwise_and_orders_bits():
    rows = {r.recipe: r for r in run_selfcheck(["w8a8", "w4a4"])}
    assert all(r.reload_bitwise for r in rows.values())
    assert rows["w8a8"].sqnr_db > rows["w4a4"].sqnr_db + 10
    assert rows["w4a4"].weight_bytes_ratio < rows["w8a8"].weight_bytes_ratio < 0.6


def test_selfcheck_defaults_to_the_post_training_presets_and_all_adds_the_rest():
    from diffquant.recipes import list_presets
    from diffquant.selfcheck import selected_presets

    fast, every = selected_presets(None), selected_presets(None, everything=True)
    assert set(every) == set(list_presets()) and set(fast) < set(every)
    assert not any(r.optimizes for r in fast.values())
    assert {"qdiffusion-w8a8", "edadm-w4a4", "efficientdm-w4a4"} <= set(every) - set(fast)
    assert set(selected_presets(["edadm-w4a4"])) == {"edadm-w4a4"}  # named presets run whatever they are
