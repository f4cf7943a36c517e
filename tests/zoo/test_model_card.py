"""The zoo model cards come from one template (diffquant.zoo.model_card) and per-model text: the
rendered README of each model is byte-identical to what the per-model f-strings wrote before."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffquant.zoo.models import fmnist_dit as fd
from diffquant.zoo.models import fmnist_sd as fs
from diffquant.zoo.text_encoder import PromptSpec

EXPECTED = Path(__file__).parent / "model_cards"

TRAINING = {
    "steps": 6000, "batch_size": 128, "lr": 5e-4, "warmup": 200, "weight_decay": 0.0, "grad_clip": 1.0,
    "ema_decay": 0.999, "num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "beta_end": 0.012, "bf16": True, "seed": 0, "label_dropout": 0.1, "prompt_dropout": 0.1,
    "wall_time_s": 7384.2, "latent_encode_s": 41.7, "threads": 2, "hardware": "Test CPU @ 2.1GHz",
    "params": 13_123_456, "vae_params": 837_123, "command": "python -m diffquant.zoo.models.x --steps 6000",
}
RESULTS = {
    "samples": {"class_accuracy": 0.8765, "fid": 3.14159, "generate_s": 123.4},
    "floors": {"real_train_10k_vs_test": 0.123, "real_train_1k_vs_test": 1.234, "vae_recon_test_vs_test": 0.567},
    "sampler": {"guidance_scale": 2.0, "default_steps": 25},
    "sweep": [{"guidance": 1.0, "class_accuracy": 0.712, "fid": 2.5}, {"guidance": 2.5, "class_accuracy": 0.9, "fid": 4.25}],
}
SPEC = PromptSpec(package_version="1.2.3", weights_sha256="ab" * 32)


def cards() -> dict[str, str]:
    stopped = {**TRAINING, "steps_trained": 3000}
    return {
        "fmnist-dit": fd.model_card(fd.DiTConfig(), TRAINING, RESULTS),
        "fmnist-sd": fs.model_card(fs.SDConfig(), SPEC, TRAINING, RESULTS),
        "fmnist-sd-stopped": fs.model_card(fs.SDConfig(), SPEC, stopped, {**RESULTS, "sweep": []}),
    }


@pytest.mark.parametrize("name", ["fmnist-dit", "fmnist-sd", "fmnist-sd-stopped"])
def test_model_card_is_byte_identical_to_the_per_model_f_strings(name):
    assert cards()[name] == (EXPECTED / f"{name}.md").read_text(encoding="utf-8")
