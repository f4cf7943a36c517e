"""Shipping a zoo model: write its pipeline folder atomically, evaluate what ships (the float16 files,
loaded back), and add the sample grid and the README card."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from diffquant.atomic import atomic_directory
from diffquant.zoo.classifier import load_classifier
from diffquant.zoo.data import fashion_mnist_tensors
from diffquant.zoo.model import LatentDiffusionModel
from diffquant.zoo.training import (
    balanced_labels,
    classifier_features,
    fid_floors,
    guidance_sweep,
    sample_grid,
    sample_metrics,
)

Loader = Callable[[Path], LatentDiffusionModel]


def evaluate_folder(folder: Path, load: Loader, sampler: dict, sweep: bool = True
                    ) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """FP figures of the model card for the pipeline in `folder`: (results, images, labels).
    sampler: the zoo model's sampler defaults, as the card shows them."""
    classifier = load_classifier()
    test_x, _ = fashion_mnist_tensors("test")
    test_features = classifier_features(classifier, test_x)
    model = load(folder)
    metrics, images = sample_metrics(model, classifier, test_features)
    results = {
        "samples": metrics,
        "sweep": guidance_sweep(model, classifier, test_features) if sweep else [],
        "floors": fid_floors(classifier, model.vae, test_x),
        "sampler": sampler,
    }
    return results, images, balanced_labels(len(images))


def ship_folder(out_dir: Path, write: Callable[[Path], None], load: Loader, sampler: dict,
                card: Callable[[dict], str], sweep: bool = True) -> dict:
    """`write(folder)` the pipeline, evaluate it, add samples.png and README.md (`card(results)`), all in
    a temporary folder moved to `out_dir` (replacing it) only when everything succeeded."""
    with atomic_directory(out_dir, overwrite=True) as tmp:
        write(tmp)
        results, images, labels = evaluate_folder(tmp, load, sampler, sweep)
        sample_grid(images, labels).save(tmp / "samples.png", optimize=True)
        (tmp / "README.md").write_text(card(results))
    return results
