"""Checkpoints: bitwise round trips, atomic writes, and one clear error per kind of bad file."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import diffquant
from diffquant.algorithms.svdquant import SVDQuant
from diffquant.checkpoint import (
    MANIFEST,
    MODEL_CONFIG,
    TENSORS,
    CheckpointError,
    load_quantized,
    save_quantized,
)
from diffquant.recipes import Recipe, get_preset
from tests.io.conftest import dit_output
from tests.tiny_models import TINY_MODELS


def test_round_trip_restores_recipe_and_plan(quantized_dit, tmp_path):
    folder = save_quantized(quantized_dit, tmp_path / "q")
    loaded = load_quantized(folder)
    assert type(loaded) is type(quantized_dit)
    original, restored = quantized_dit._diffquant_state, loaded._diffquant_state
    assert restored.recipe == original.recipe
    assert restored.plan == original.plan
    assert torch.equal(dit_output(loaded), dit_output(quantized_dit))
    # a recipe without stages reports nothing, and its manifest keeps the keys it always had
    assert restored.stage_reports == original.stage_reports == []
    assert "stage_reports" not in json.loads((folder / MANIFEST).read_text())


def test_saving_twice_from_a_reloaded_model_gives_identical_tensors(quantized_dit, tmp_path):
    first = save_quantized(quantized_dit, tmp_path / "a")
    second = save_quantized(load_quantized(first), tmp_path / "b")
    assert (first / TENSORS).read_bytes() == (second / TENSORS).read_bytes()


def test_unquantized_model_cannot_be_saved(tmp_path):
    from tests.tiny_models import TINY_MODELS

    with pytest.raises(ValueError, match="not quantized"):
        save_quantized(TINY_MODELS["dit"].build(), tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_existing_folder_is_kept_unless_overwrite(quantized_dit, tmp_path):
    target = save_quantized(quantized_dit, tmp_path / "q")
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        save_quantized(quantized_dit, target)
    assert (target / "keep.txt").read_text() == "mine"
    save_quantized(quantized_dit, target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / MANIFEST).is_file()


def test_overwrite_never_replaces_a_folder_diffquant_did_not_write(quantized_dit, tmp_path):
    target = tmp_path / "q"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a diffquant folder"):
        save_quantized(quantized_dit, target, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["q"] and (target / "keep.txt").read_text() == "mine"


def test_failed_write_leaves_nothing_behind(quantized_dit, tmp_path, monkeypatch):
    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("diffquant.checkpoint.save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(quantized_dit, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_checkpoint(quantized_dit, tmp_path, monkeypatch):
    folder = save_quantized(quantized_dit, tmp_path / "q")
    before = (folder / TENSORS).read_bytes()
    monkeypatch.setattr("diffquant.checkpoint.save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("boom")))
    with pytest.raises(OSError):
        save_quantized(quantized_dit, folder, overwrite=True)
    assert (folder / TENSORS).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


@pytest.fixture
def saved(quantized_dit, tmp_path):
    return save_quantized(quantized_dit, tmp_path / "q")


@pytest.mark.parametrize("missing", [MANIFEST, MODEL_CONFIG, TENSORS])
def test_missing_file(saved, missing):
    (saved / missing).unlink()
    with pytest.raises(CheckpointError, match=f"{missing} is missing"):
        load_quantized(saved)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_quantized(tmp_path / "nothing")


def test_truncated_tensor_file(saved):
    data = (saved / TENSORS).read_bytes()
    (saved / TENSORS).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated, modified or replaced"):
        load_quantized(saved)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_quantized(saved, verify=False)


def test_tampered_tensor_bytes(saved):
    data = bytearray((saved / TENSORS).read_bytes())
    data[-5] ^= 0xFF
    (saved / TENSORS).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_quantized(saved)


def test_config_of_another_model(saved):
    config = json.loads((saved / MODEL_CONFIG).read_text())
    config["attention_head_dim"] = 16
    (saved / MODEL_CONFIG).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="sha256"):
        load_quantized(saved)
    with pytest.raises(CheckpointError, match="config.json"):
        load_quantized(saved, verify=False)


def test_manifest_of_another_format(saved):
    manifest = json.loads((saved / MANIFEST).read_text())
    manifest["format_version"] = 99
    (saved / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="99"):
        load_quantized(saved)


def test_corrupt_manifest_json(saved):
    (saved / MANIFEST).write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot be read as JSON"):
        load_quantized(saved)


def test_loading_never_unpickles(saved, monkeypatch):
    import pickle

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used while loading a checkpoint")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    load_quantized(saved)


def test_loaded_model_holds_integer_codes_only(saved):
    loaded = load_quantized(saved)
    for layer in diffquant.quantized_layers(loaded).values():
        assert layer.weight is None
        assert layer.weight_codes.dtype == torch.int8
    with pytest.raises(RuntimeError, match="no full-precision weights"), diffquant.quantizers_disabled(loaded):
        pass


def test_pipeline_folder_round_trip(dit_pipeline_folder, tmp_path):
    from diffusers import DiTPipeline

    pipe = DiTPipeline.from_pretrained(dit_pipeline_folder)
    calib = diffquant.calib.pipeline_calibration(pipe, num_samples=2, num_inference_steps=3, progress=False)
    diffquant.quantize(pipe.transformer, "w8a8-static", calibration=calib, progress=False)
    folder = save_quantized(pipe, tmp_path / "qpipe")
    assert (folder / "model_index.json").is_file() and (folder / "vae" / "config.json").is_file()
    loaded = load_quantized(folder)
    assert diffquant.quantized_layers(loaded.transformer)

    def sample(p):
        with diffquant.track_pipeline_steps(p):
            return p(class_labels=[3], num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                     output_type="np").images

    assert (sample(loaded) == sample(pipe)).all()


def cheap_svdquant() -> Recipe:
    """svdquant-w4a4 with a short grid and few refits: the machinery, quickly."""
    preset = get_preset("svdquant-w4a4")
    return dataclasses.replace(preset, stages=(SVDQuant(rank=4, grid_step=0.25, iterations=3, sample_rows=32),))


def test_pipeline_with_low_rank_branches_round_trip(dit_pipeline_folder, tmp_path):
    from diffusers import DiTPipeline

    pipe = DiTPipeline.from_pretrained(dit_pipeline_folder)
    calib = diffquant.calib.pipeline_calibration(pipe, num_samples=2, num_inference_steps=3, progress=False)
    diffquant.quantize(pipe.transformer, cheap_svdquant(), calibration=calib, progress=False)
    assert any(layer.low_rank is not None for layer in diffquant.quantized_layers(pipe.transformer).values())
    loaded = load_quantized(save_quantized(pipe, tmp_path / "qpipe"))

    def sample(p):
        with diffquant.track_pipeline_steps(p):
            return p(class_labels=[3], num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                     output_type="np").images

    assert (sample(loaded) == sample(pipe)).all()


def test_missing_low_rank_tensors_are_named(tmp_path):
    from tests.io.conftest import dit_calibration

    model = diffquant.quantize(TINY_MODELS["dit"].build(), cheap_svdquant(), calibration=dit_calibration,
                               progress=False)
    folder = save_quantized(model, tmp_path / "q")
    tensors = load_file(folder / TENSORS)
    name = next(k for k in tensors if k.endswith(".low_rank_up"))
    del tensors[name]
    save_file(tensors, folder / TENSORS)
    with pytest.raises(CheckpointError, match=r"low-rank branch but \['.*low_rank_up'\] are missing"):
        load_quantized(folder, verify=False)


def test_activation_only_recipe_round_trips_with_float_weights(tmp_path):
    """A recipe without a weight format keeps each layer's float weight in the checkpoint (bitwise)."""
    from tests.io.conftest import dit_calibration

    recipe = Recipe.from_dict({"name": "a8-only", "weight": None,
                               "input": {"format": "int8", "granularity": "token", "dynamic": True}})
    model = diffquant.quantize(TINY_MODELS["dit"].build(), recipe, calibration=dit_calibration, progress=False)
    folder = save_quantized(model, tmp_path / "q")
    loaded = load_quantized(folder)
    tensors = load_file(folder / TENSORS)
    assert not any(k.endswith(".weight_codes") for k in tensors)
    for name, layer in diffquant.quantized_layers(model).items():
        assert torch.equal(tensors[f"{name}.weight"], layer.weight.detach())
    assert torch.equal(dit_output(loaded), dit_output(model))
