"""Shared behaviour suite: every preset on a tiny model of every covered diffusers family."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math

import pytest
import torch
from safetensors import safe_open

import diffquant
from diffquant.checkpoint import load_quantized, save_quantized
from diffquant.formats.ops import sqnr_db
from diffquant.info import checkpoint_info
from diffquant.nn.attention import attention_quantizers
from diffquant.recipes import get_preset, list_presets
from tests.tiny_models import TINY_MODELS

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny models: threads only add OpenMP barrier stalls

PRESETS = list(list_presets())
FAMILIES = list(TINY_MODELS)

# Minimum output SQNR vs full precision on the tiny random models, by recipe. W8A8 must keep 25 dB
# (the bar); 4-bit recipes on random weights only have to stay clearly informative.
MIN_SQNR_DB = {
    "w8a8": 25.0, "w8a8-static": 25.0, "smoothquant-w8a8": 25.0,
    "w4a8": 8.0, "w4a16": 8.0, "w4a4": 5.0, "smoothquant-w4a4": 5.0, "nvfp4-w4a4": 5.0,
    "svdquant-w8a8": 25.0, "svdquant-w4a4": 5.0, "svdquant-nvfp4": 5.0,
    "qdiffusion-w8a8": 25.0, "qdiffusion-w4a8": 8.0, "edadm-w8a8": 25.0, "edadm-w4a8": 8.0, "edadm-w4a4": 3.0,
    "w4a8-static": 8.0, "w4a4-static": 3.0,
    "efficientdm-w8a8": 25.0, "efficientdm-w4a8": 8.0, "efficientdm-w4a4": 3.0,
    "quest-w4a8": 8.0, "quest-w4a4": 3.0,
    # FP8 E4M3 keeps 3 mantissa bits: ~12-15 dB under INT8's per-channel / per-token grid on these random
    # Gaussian weights in every family (measured: fp8-w8a8 19.7 dB on the UNets, 29-54 dB on the
    # transformers; MX's power-of-two block scales 0-7 dB less again), so the FP W8A8 floors are lower.
    "fp8-w8a8": 15.0, "mxfp8-w8a8": 14.0, "mxfp4-w4a4": 5.0, "fp-w4a8": 8.0, "int-w4a8": 8.0,
}
# Training stages at their defaults are for real models (their effect is tested in tests/algorithms):
# here a few iterations / rounds, and no checkpoints written.
AFFORDABLE = {"block_reconstruction": dict(iterations=20, batch_size=2),
              "efficientdm": dict(rounds=2, checkpoint_dir=""), "quest": dict(rounds=2, checkpoint_dir="")}


def affordable(preset: str):
    """The preset, with its training stages cut short."""
    recipe = get_preset(preset)
    stages = tuple(dataclasses.replace(s, **AFFORDABLE.get(s.type, {})) for s in recipe.stages)
    return dataclasses.replace(recipe, stages=stages)


@pytest.fixture(scope="module")
def references():
    """Per family: (model, inputs, full-precision output), built once."""
    cache = {}

    def get(family: str):
        if family not in cache:
            tiny = TINY_MODELS[family]
            model, inputs = tiny.build(), tiny.inputs(2)
            with torch.no_grad():
                cache[family] = (model, inputs, tiny.run(model, inputs))
        return cache[family]

    return get


def quantized(family: str, preset: str, references):
    tiny = TINY_MODELS[family]
    model, inputs, _ = references(family)

    def calibrate(m):
        with diffquant.sampling_step(0):
            tiny.run(m, inputs)

    return diffquant.quantize(copy.deepcopy(model), affordable(preset), calibration=calibrate, progress=False)


def run(family: str, model, references) -> torch.Tensor:
    _, inputs, _ = references(family)
    with torch.no_grad(), diffquant.sampling_step(0):
        return TINY_MODELS[family].run(model, inputs)


def test_sqnr_table_covers_every_preset():
    assert set(MIN_SQNR_DB) == set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("family", FAMILIES)
def test_preset_output_close_to_full_precision(family, preset, references):
    reference = references(family)[2]
    out = run(family, quantized(family, preset, references), references)
    assert torch.isfinite(out).all()
    assert sqnr_db(reference, out) >= MIN_SQNR_DB[preset]


@pytest.mark.parametrize("family", FAMILIES)
def test_w8a8_beats_w4a4(family, references):
    reference = references(family)[2]
    high = sqnr_db(reference, run(family, quantized(family, "w8a8", references), references))
    low = sqnr_db(reference, run(family, quantized(family, "w4a4", references), references))
    assert high > low + 6.0


@pytest.mark.parametrize("family", FAMILIES)
def test_smoothquant_transform_preserves_function(family, references):
    reference = references(family)[2]
    model = quantized(family, "smoothquant-w8a8", references)
    assert any(layer.smooth is not None for layer in diffquant.quantized_layers(model).values())
    with diffquant.quantizers_disabled(model):
        out = run(family, model, references)
    assert (out - reference).abs().max() <= 1e-4 * reference.abs().max()


@pytest.mark.parametrize("preset", ["w4a4", "w8a8-static", "smoothquant-w4a4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_is_bitwise_identical(family, preset, references, tmp_path):
    model = quantized(family, preset, references)
    expected = run(family, model, references)
    loaded = load_quantized(save_quantized(model, tmp_path / "q"))
    assert all(layer.weight is None for layer in diffquant.quantized_layers(loaded).values()
               if layer.weight_quantizer is not None), "a reloaded layer kept a float weight"
    assert torch.equal(run(family, loaded, references), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_4bit_checkpoint_is_about_a_quarter_of_16bit(family, references, tmp_path):
    """w4a16: codes take 4 bits (two per byte) plus one float16 scale per group of 64 inputs."""
    model = quantized(family, "w4a16", references)
    folder = save_quantized(model, tmp_path / "q")
    stored, full = 0, 0
    with safe_open(folder / "diffquant_model.safetensors", framework="pt") as f:
        for name, layer in diffquant.quantized_layers(model).items():
            codes, scale = f.get_tensor(f"{name}.weight_codes"), f.get_tensor(f"{name}.weight_quantizer.scale")
            out, k = layer.weight_matrix(layer.weight).shape
            assert codes.dtype == torch.uint8 and tuple(codes.shape) == (out, math.ceil(k / 2))
            assert scale.dtype == torch.float16 and scale.numel() == out * math.ceil(k / 64)
            if k % 64 == 0:
                stored += codes.numel() + 2 * scale.numel()
                full += 2 * out * k
    assert full > 0
    assert stored / full == pytest.approx(4.25 / 16)
    info = checkpoint_info(folder)
    assert info["quantized_bytes"] < 0.4 * info["quantized_bytes_16bit"]  # biases and short rows included


# Families whose attention modules run the classic diffusers Attention with AttnProcessor2_0: the only
# ones attention-matmul quantization instruments (the others' own processors raise NotImplementedError).
ATTENTION_SUPPORTED = {"unet2d": 4, "unet2d-condition": 8, "dit": 2, "pixart": 4}


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_presets_quantize_supported_attention_and_skip_the_rest_with_a_warning(family, references, caplog):
    """edadm-w4a4 quantizes the attention matmuls where it can; elsewhere it warns and leaves them in FP
    rather than failing (test_preset_output_close_to_full_precision covers the accuracy)."""
    preset = dataclasses.replace(get_preset("edadm-w4a4"), stages=())  # what is instrumented, not the training
    model, inputs, _ = references(family)
    tiny = TINY_MODELS[family]

    def calibrate(m):
        with diffquant.sampling_step(0):
            tiny.run(m, inputs)

    with caplog.at_level(logging.WARNING, logger="diffquant.attention"):
        q = diffquant.quantize(copy.deepcopy(model), preset, calibration=calibrate, progress=False)
    installed = attention_quantizers(q)
    assert len(installed) == ATTENTION_SUPPORTED.get(family, 0)
    assert all(quantizers.calibrated for quantizers in installed.values())
    assert ("stay in full precision" in caplog.text) == (family not in ATTENTION_SUPPORTED)
