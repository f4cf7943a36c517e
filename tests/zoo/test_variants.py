"""Zoo outlier variants: the same FP images as their base models, outliers in the layer inputs, accepted
wherever a zoo name is, and quantized folders that record the profile and do not apply it twice."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from diffquant import zoo
from diffquant.eval.metrics import psnr_per_image
from diffquant.recipes import resolve_recipe
from diffquant.workflows import ZOO_MARKER, quantize_zoo_model
from diffquant.zoo.classifier import load_classifier, predict
from diffquant.zoo.model import PROVENANCE, generate
from diffquant.zoo.variants import VARIANTS

pytestmark = pytest.mark.usefixtures("single_thread")

LABELS = torch.arange(10)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_variant_generates_what_its_base_generates(variant) -> None:
    base, model = zoo.load(variant.base), zoo.load(variant.name)
    assert model.name == variant.name
    assert model.extra[PROVENANCE]["outlier_profile"]["profile"] == variant.profile
    differs = [k for k, v in model.denoiser.state_dict().items() if not torch.equal(v, base.denoiser.state_dict()[k])]
    assert len(differs) > 10  # the profile changed weights ...
    a = generate(base, LABELS, seed=3, steps=4, progress=False)
    b = generate(model, LABELS, seed=3, steps=4, progress=False)
    assert psnr_per_image(b, a).min() >= 60  # ... and not the images
    classifier = load_classifier()
    assert torch.equal(predict(classifier, a), predict(classifier, b))


def test_quantized_variant_records_the_profile_and_reloads_without_reapplying(tmp_path) -> None:
    name = "fmnist-dit-outliers"
    model = zoo.load(name)
    folder = quantize_zoo_model(name, resolve_recipe("w8a8"), tmp_path / "q")
    marker = json.loads((folder / ZOO_MARKER).read_text())
    assert marker["zoo"] == name and marker["outlier_profile"] == model.extra[PROVENANCE]["outlier_profile"]
    reloaded = zoo.load(name, folder)
    assert PROVENANCE not in reloaded.extra
    adaln = "transformer_blocks.0.norm1.linear.weight"  # full precision in w8a8, changed by the profile
    assert torch.equal(reloaded.denoiser.state_dict()[adaln], model.denoiser.state_dict()[adaln])


def test_outliers_command_shows_the_variant_beside_its_base(tmp_path) -> None:
    out = tmp_path / "stats.json"
    run = subprocess.run([sys.executable, "-m", "diffquant", "outliers", "fmnist-dit-outliers", "--samples", "2",
                          "--steps", "2", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "fmnist-dit + realistic" in run.stdout and "SmoothQuant" in run.stdout
    report = json.loads(out.read_text())
    before, after = ({r["role"]: r for r in c["roles"]} for c in report["columns"])
    for role in ("attn.q", "ffn.up", "attn.out"):
        assert after[role]["max_ratio"] >= 4 * before[role]["max_ratio"], role
    assert before["ffn.down"]["max_ratio"] == pytest.approx(after["ffn.down"]["max_ratio"], rel=1e-3)  # after GELU
    assert report["profile"]["profile"] == "realistic"


def test_outliers_command_errors_are_one_line(tmp_path) -> None:
    for args, message in ((["fmnist-dit", "--profile", "huge"], "unknown outlier profile"),
                          ([str(tmp_path)], "neither a zoo model name nor a diffusers pipeline folder")):
        run = subprocess.run([sys.executable, "-m", "diffquant", "outliers", *args], capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr


def test_report_says_which_models_are_easy_and_which_realistic() -> None:
    from diffquant.eval.report import available_models, markdown_table

    assert {"fmnist-dit-outliers", "fmnist-sd-outliers"} <= set(available_models())
    rows = [{"model": m, "recipe": "fp", "bits": "W16A16", "fid": 3.0, "class_accuracy": 0.9}
            for m in ("fmnist-dit", "fmnist-dit-outliers")]
    easy, realistic = markdown_table(rows).split("### ")[1:]
    assert "Easy:" in easy and "Realistic:" in realistic and "'realistic' outlier profile" in realistic


def test_demo_and_eval_take_a_variant(tmp_path, monkeypatch) -> None:
    """The demo (quantize + eval) on the realistic DiT: W4A4 RTN collapses below 22 dB PSNR vs FP where W8A8
    holds (20 samples, 4 steps)."""
    from diffquant.demo import DemoConfig, run_demo

    monkeypatch.setenv("DIFFQUANT_CACHE_DIR", str(tmp_path / "cache"))
    config = DemoConfig(model="fmnist-dit-outliers", recipes=("w4a4", "w8a8"), samples=20, steps=4,
                        out=tmp_path / "demo", progress=False, speed_samples=0)
    w4a4, w8a8 = run_demo(config)
    assert w4a4["model"] == "fmnist-dit-outliers"
    assert w4a4["psnr_vs_fp"] < 22 < w8a8["psnr_vs_fp"]


def test_variant_card_cites_the_published_figures_and_shows_the_measured_table() -> None:
    from diffquant.outliers.statistics import PUBLISHED
    from diffquant.zoo.outlier_report import outlier_report
    from diffquant.zoo.variant_cards import render_card

    variant = VARIANTS[0]
    card = render_card(variant, outlier_report(variant.name, samples=1, steps=1))
    assert card.startswith(f"# {variant.name}") and "| attn.q | 6 |" in card
    assert all(p.url in card for p in PUBLISHED) and "adaln 12, attention_values 6" in card
