"""The evaluation harness end to end on a tiny random latent DiT, and the report's bookkeeping.

The model: a 2-block DiTTransformer2DModel (width 64, 10 classes + the CFG null class) on 8x8x4
latents, a tiny AutoencoderKL (32x32x1 <-> 8x8x4, scaling factor 1) and DDIM — random weights, so the
numbers mean nothing, but every path of the protocol runs in well under a second.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import diffquant
from diffquant.eval import EvalSettings, Judge, evaluate, resolve_target, runner
from diffquant.eval.fp_cache import FPImageCache
from diffquant.eval.report import bits_of, markdown_table, merge_rows, plot_quality, row_order
from diffquant.zoo.model import ClassConditioning, LatentDiffusionModel
from tests.tiny_models import fill_zero_params

SAMPLES, STEPS, SQNR_SAMPLES = 20, 3, 8
TIME_KEYS = ("wall_time_s", "fp_wall_time_s")
EVAL_KEYS = (
    "fid", "fp_fid", "class_accuracy", "fp_class_accuracy", "psnr_vs_fp", "ssim_vs_fp", "feature_distance_vs_fp",
    "eps_sqnr_db", "eps_sqnr_db_per_step", "wall_time_s", "fp_wall_time_s", "bits", "recipe", "model",
    "weight_bytes", "samples", "steps", "seed",
)


def build_tiny_model() -> LatentDiffusionModel:
    from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=4, num_layers=2,
        sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 8), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=32, scaling_factor=1.0,
    )
    # adaLN-Zero starts at zero: without this the DiT would predict eps = 0 whatever its layers do.
    fill_zero_params(transformer, std=0.2)
    pipe = SimpleNamespace(transformer=transformer.eval(), vae=vae.eval(), scheduler=DDIMScheduler())
    return LatentDiffusionModel("tiny-dit", pipe, ClassConditioning(null_class=10), latent_shape=(4, 8, 8),
                                num_classes=10, guidance_scale=1.5, default_steps=STEPS)


def quantized_copy(model: LatentDiffusionModel, recipe: str) -> LatentDiffusionModel:
    q = copy.deepcopy(model)
    diffquant.quantize(q.denoiser, recipe, progress=False)
    return q


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def fp_model() -> LatentDiffusionModel:
    return build_tiny_model()


@pytest.fixture(scope="module")
def judge() -> Judge:
    return Judge()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval-cache")


def run(model, reference, judge, cache_dir, **kwargs):
    options = dict(samples=SAMPLES, steps=STEPS, seed=0, reference=reference, sqnr_samples=SQNR_SAMPLES,
                   batch_size=SAMPLES, cache_dir=cache_dir, judge=judge)
    return evaluate(model, **{**options, **kwargs})


@pytest.fixture(scope="module")
def w8a8_result(fp_model, judge, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("w8a8")
    result = run(quantized_copy(fp_model, "w8a8"), fp_model, judge, cache_dir,
                 json_path=out / "eval.json", grid_path=out / "grid.png")
    return result, out


def _without_times(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in TIME_KEYS}


def test_evaluation_is_deterministic_with_and_without_the_cache(w8a8_result, fp_model, judge, cache_dir):
    first, _ = w8a8_result
    q = quantized_copy(fp_model, "w8a8")
    cached = run(q, fp_model, judge, cache_dir)  # FP images now come from the cache
    fresh = run(q, fp_model, judge, cache_dir, cache=False)
    assert _without_times(cached) == _without_times(first) == _without_times(fresh)
    assert cached["fp_wall_time_s"] == first["fp_wall_time_s"]  # the recorded FP time travels with the cache
    assert len(list(cache_dir.glob("tiny-dit-*.safetensors"))) == 1


def test_json_has_every_key_and_the_grid_is_a_png(w8a8_result):
    result, out = w8a8_result
    written = json.loads((out / "eval.json").read_text())
    assert set(EVAL_KEYS) <= set(written)
    assert written == json.loads(json.dumps(result))
    assert written["recipe"] == "w8a8" and written["bits"] == "W8A8" and written["model"] == "tiny-dit"
    assert (written["samples"], written["steps"], written["seed"]) == (SAMPLES, STEPS, 0)
    assert (out / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temporary files


def test_eps_sqnr_has_one_value_per_step(w8a8_result):
    result, _ = w8a8_result
    per_step = result["eps_sqnr_db_per_step"]
    assert len(per_step) == STEPS and all(0 < v < 100 for v in per_step)
    assert result["eps_sqnr_db"] == pytest.approx(sum(per_step) / STEPS)


def test_fewer_bits_are_further_from_fp(w8a8_result, fp_model, judge, cache_dir):
    w8, _ = w8a8_result
    w4 = run(quantized_copy(fp_model, "w4a4"), fp_model, judge, cache_dir)
    assert w8["psnr_vs_fp"] > w4["psnr_vs_fp"]
    assert w8["eps_sqnr_db"] > w4["eps_sqnr_db"]
    assert w8["fp_fid"] == w4["fp_fid"]  # same FP reference
    assert w4["weight_bytes"] < w8["weight_bytes"]


def test_frozen_evaluation_matches_fake_quant(w8a8_result, fp_model, judge, cache_dir):
    fake, _ = w8a8_result
    frozen = run(quantized_copy(fp_model, "w8a8"), fp_model, judge, cache_dir, frozen=True)
    assert frozen["frozen"] and frozen["kernel_backend"] and not fake["frozen"]
    n_layers = len(diffquant.quantized_layers(quantized_copy(fp_model, "w8a8").denoiser))
    assert frozen["kernel_paths"] == {"int": n_layers}  # every W8A8 layer on the integer kernels
    assert frozen["weight_bytes"] == fake["weight_bytes"]  # counted before the layers are repacked
    # Integer kernels and fake quantization agree up to float rounding: far above W8A8's own error.
    assert frozen["psnr_vs_fp"] == pytest.approx(fake["psnr_vs_fp"], abs=1.0)
    assert frozen["eps_sqnr_db"] == pytest.approx(fake["eps_sqnr_db"], abs=1.0)
    with pytest.raises(ValueError, match="quantized target"):
        run(fp_model, None, judge, cache_dir, frozen=True)


def test_fp_against_itself(fp_model, judge, cache_dir, w8a8_result):
    result = run(fp_model, None, judge, cache_dir)
    assert (result["recipe"], result["bits"]) == ("fp", "W16A16")
    assert result["psnr_vs_fp"] == 100.0 and result["ssim_vs_fp"] == pytest.approx(1.0)
    assert result["feature_distance_vs_fp"] == 0.0 and result["eps_sqnr_db_per_step"] == [100.0] * STEPS
    assert result["fid"] == result["fp_fid"] == w8a8_result[0]["fp_fid"]
    params = sum(p.numel() for p in fp_model.denoiser.parameters())
    assert result["weight_bytes"] == 2 * params > w8a8_result[0]["weight_bytes"]
    assert result["quantized_layer_bytes"] == 0


def test_a_corrupt_cache_file_is_regenerated(fp_model, tmp_path):
    settings = EvalSettings(samples=4, steps=2, batch_size=4, cache_dir=tmp_path)
    labels = runner.balanced_labels(4, 10)
    images, _ = runner.fp_images(fp_model, "tiny", labels, settings, 2)
    (cached,) = tmp_path.glob("tiny-*.safetensors")
    cached.write_bytes(b"not safetensors")
    again, _ = runner.fp_images(fp_model, "tiny", labels, settings, 2)
    assert torch.equal(images, again)
    cache = FPImageCache(tmp_path)
    assert cache.key(fp_model, settings, 2) != cache.key(fp_model, EvalSettings(samples=4, seed=1), 2)


def test_bad_targets(fp_model, tmp_path):
    with pytest.raises(ValueError, match="reference="):
        resolve_target(quantized_copy(fp_model, "w8a8"))
    with pytest.raises(FileNotFoundError, match="neither a zoo model"):
        resolve_target(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="not made from a zoo model"):
        resolve_target(tmp_path)
    with pytest.raises(ValueError, match="at least 2 samples"):
        EvalSettings(samples=1)


def test_cli_reports_a_bad_target_as_one_line(tmp_path, capsys):
    import diffquant.eval.cli_commands  # noqa: F401  (registers the commands, as diffquant.cli will)
    from diffquant.cli import main

    assert main(["eval", str(tmp_path / "missing"), "--samples", "4"]) == 2
    assert "neither a zoo model name nor an existing folder" in capsys.readouterr().err


# -- report bookkeeping -------------------------------------------------------------------------------


def _row(model: str, recipe: str, bits: str, fid: float) -> dict:
    return {"model": model, "recipe": recipe, "bits": bits, "fid": fid, "psnr_vs_fp": 30.0, "weight_bytes": 2048,
            "class_accuracy": 0.9, "samples": 10, "steps": 2}


def test_report_rows_merge_by_model_and_recipe(tmp_path):
    old = [_row("m", "fp", "W16A16", 5.0), _row("m", "w4a8", "W4A8", 9.0)]
    new = [_row("m", "w4a8", "W4A8", 7.0), _row("m", "w8a8", "W8A8", 6.0), _row("a", "fp", "W16A16", 1.0)]
    merged = merge_rows(old, new)
    assert [(r["model"], r["recipe"], r["fid"]) for r in merged] == [
        ("a", "fp", 1.0), ("m", "fp", 5.0), ("m", "w8a8", 6.0), ("m", "w4a8", 7.0)]
    assert merged == sorted(merged, key=row_order) and bits_of("W4A16") == (4, 16)
    table = markdown_table(merged)
    assert "### m" in table and "| `w4a8` | W4A8 | 2 | 7.00 |" in table and "Full precision: FID 5.00" in table
    assert plot_quality(tmp_path / "plot.png", merged).read_bytes()[:4] == b"\x89PNG"


def test_report_and_cli_on_a_registered_tiny_zoo_model(fp_model, tmp_path, monkeypatch, capsys):
    """Zoo name -> FP row, preset -> quantized zoo folder (with its marker) -> row and grid; the CLI on
    that folder reproduces the report's numbers."""
    from diffusers import DiTPipeline

    import diffquant.eval.cli_commands  # noqa: F401
    from diffquant.checkpoint import load_pipeline_any
    from diffquant.cli import main
    from diffquant.eval.report import ReportConfig, run_report
    from diffquant.zoo import registry

    pipe = DiTPipeline(transformer=fp_model.denoiser, vae=fp_model.vae, scheduler=copy.deepcopy(fp_model.scheduler))
    pipe.save_pretrained(tmp_path / "fp")

    def loader(folder: Path) -> LatentDiffusionModel:
        return LatentDiffusionModel("tiny-zoo", load_pipeline_any(folder), ClassConditioning(10), (4, 8, 8), 10,
                                    default_steps=2)

    monkeypatch.setitem(registry._ZOO, "tiny-zoo", registry.ZooEntry("tiny-zoo", "test", tmp_path / "fp", loader))
    monkeypatch.setenv("DIFFQUANT_CACHE_DIR", str(tmp_path / "cache"))
    config = ReportConfig(out=tmp_path / "out", work=tmp_path / "work", models=("tiny-zoo",), recipes=("fp", "w8a8"),
                          samples=10, progress=False)
    rows = run_report(config)
    assert [(r["model"], r["recipe"]) for r in rows] == [("tiny-zoo", "fp"), ("tiny-zoo", "w8a8")]
    assert json.loads((config.out / "results.json").read_text()) == rows
    assert (config.out / "grids" / "tiny-zoo-w8a8.png").is_file() and (config.out / "quality_vs_bits.png").is_file()
    assert "| `w8a8` | W8A8 |" in (config.out / "README.md").read_text()
    assert rows[1]["quantized_layer_bytes"] > 0 and rows[1]["weight_bytes"] < rows[0]["weight_bytes"]

    (folder,) = (tmp_path / "work" / "tiny-zoo").iterdir()
    assert main(["eval", str(folder), "--samples", "10", "--json", str(tmp_path / "e.json")]) == 0
    assert "tiny-zoo w8a8 (W8A8)" in capsys.readouterr().out
    from_cli = json.loads((tmp_path / "e.json").read_text())
    machine_keys = ("cpu", "threads", "torch", "date")
    assert _without_times(from_cli) == {k: v for k, v in _without_times(rows[1]).items() if k not in machine_keys}
