"""Evaluation classifier: architecture, shipped weights, and the shared training helpers."""

import json

import pytest
import torch
from safetensors import safe_open

from diffquant.zoo.classifier import (
    WEIGHTS_DIR,
    ClassifierConfig,
    FashionClassifier,
    accuracy,
    augment,
    load_classifier,
    save_weights,
)
from diffquant.zoo.data import dataset_available, fashion_mnist_tensors
from diffquant.zoo.train_utils import Checkpointer, atomic_dir, cosine_lr, count_params, step_generator

TINY = ClassifierConfig(channels=(8, 16), convs_per_stage=(1, 1), embed_dim=16)


def test_tiny_forward_shapes():
    model = FashionClassifier(TINY).eval()
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    assert model(x).shape == (3, 10)
    feats = model.features(x)
    assert feats.shape == (3, 16) and torch.all(feats >= 0)


def test_config_validation():
    with pytest.raises(ValueError, match="same length"):
        FashionClassifier(ClassifierConfig(channels=(8, 16), convs_per_stage=(1,)))


def test_shipped_weights_files():
    weights = WEIGHTS_DIR / "model.safetensors"
    assert weights.stat().st_size < 2_000_000
    with safe_open(str(weights), "pt") as f:
        names = f.keys()  # safe_open handles are not iterable
        float_dtypes = {f.get_slice(k).get_dtype() for k in names} - {"I64"}
    assert float_dtypes == {"F16"}
    config = json.loads((WEIGHTS_DIR / "config.json").read_text())
    assert config["architecture"] == "FashionClassifier"
    assert config["training"]["test_accuracy"] >= 0.92
    assert (WEIGHTS_DIR / "README.md").is_file()


def test_load_shipped_classifier():
    model = load_classifier()
    assert not model.training
    assert count_params(model) < 1_000_000
    assert all(p.dtype == torch.float32 for p in model.parameters())
    x = torch.rand(4, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        assert model(x).shape == (4, 10)
        assert model.features(x).shape == (4, model.config.embed_dim)


@pytest.mark.skipif(
    not dataset_available(),
    reason="Fashion-MNIST not installed (apt-get update && apt-get install -y dataset-fashion-mnist)",
)
def test_shipped_classifier_accuracy():
    images, labels = fashion_mnist_tensors("test")
    assert accuracy(load_classifier(), images[:500], labels[:500]) >= 0.90


def test_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = FashionClassifier(TINY).eval()
    out = tmp_path / "clf"
    save_weights(model, out, "# card\n", {"steps": 0})
    loaded = load_classifier(weights_dir=out)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x), atol=1e-2)  # fp16 on disk
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["clf"]  # no temporary folder left behind


def test_augment_keeps_shape_and_range():
    x = torch.rand(6, 1, 32, 32) * 2 - 1
    a = augment(x, torch.Generator().manual_seed(0), max_shift=2)
    b = augment(x, torch.Generator().manual_seed(0), max_shift=2)
    assert a.shape == x.shape and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    flipped_only = augment(x, torch.Generator().manual_seed(0), max_shift=0)
    assert torch.equal(flipped_only.flatten(1).sort(1).values, x.flatten(1).sort(1).values)


def test_atomic_dir_keeps_target_on_failure(tmp_path):
    target = tmp_path / "w"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("2")
        raise RuntimeError("interrupted")
    assert (target / "a.txt").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["w"]


def test_checkpointer_roundtrip_and_meta(tmp_path):
    model = FashionClassifier(TINY)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.rand(2, 1, 32, 32)).sum().backward()
    opt.step()
    Checkpointer(tmp_path, meta={"run": 1}).save(7, model, opt, elapsed=3.0)

    fresh = FashionClassifier(TINY)
    fresh_opt = torch.optim.AdamW(fresh.parameters())
    assert Checkpointer(tmp_path, meta={"run": 1}).load(fresh, fresh_opt) == (7, 3.0)
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True)
    )
    assert fresh_opt.state_dict()["state"]  # Adam moments restored
    assert Checkpointer(tmp_path, meta={"run": 2}).load(fresh, fresh_opt) == (0, 0.0)


def test_schedule_and_seeding():
    assert cosine_lr(0, 100, 1.0, warmup=10) == pytest.approx(0.1)
    assert cosine_lr(10, 100, 1.0, warmup=10) == pytest.approx(1.0)
    assert cosine_lr(100, 100, 1.0, warmup=10) == pytest.approx(0.02)
    a = torch.randint(0, 100, (5,), generator=step_generator(0, 3))
    b = torch.randint(0, 100, (5,), generator=step_generator(0, 3))
    assert torch.equal(a, b)
