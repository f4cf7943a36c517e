"""Malformed and adversarial checkpoint folders: each gets one clear CheckpointError (or loads correctly)
and nothing of them runs as code.

Two kinds of manifest edits: plain ones (the seal catches them) and resealed ones (a tamperer who also
recomputes the seal: the schema and the consistency checks must catch them).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import diffquant
from diffquant.checkpoint import (
    MANIFEST,
    MODEL_CONFIG,
    PIPELINE_INDEX,
    PIPELINE_MANIFEST,
    TENSORS,
    CheckpointError,
    load_quantized,
    save_quantized,
)
from diffquant.folders import SEAL, sha256_of
from diffquant.integrations.diffusers_io import load_model_folder, load_pipeline_folder
from tests.io.conftest import TINY_DIT, dit_calibration, dit_output, dit_pipeline_folder, quantized_dit  # noqa: F401
from tests.manifest_edits import edit_manifest


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory) -> Path:
    model = diffquant.quantize(TINY_DIT.build(), "svdquant-w4a4", calibration=dit_calibration, progress=False)
    return save_quantized(model, tmp_path_factory.mktemp("ckpt") / "q")


@pytest.fixture
def saved(saved_folder, tmp_path) -> Path:
    """A fresh copy of a saved W4A4 + low-rank-branch checkpoint to tamper with."""
    return Path(shutil.copytree(saved_folder, tmp_path / "q"))


def first_layer(manifest: dict[str, Any]) -> dict[str, Any]:
    return next(iter(manifest["layers"].values()))


def quantized_layer(manifest: dict[str, Any]) -> dict[str, Any]:
    return next(e for e in manifest["layers"].values() if e["weight"] is not None)


# -- edits the seal catches (every one of the silent loads) ------------------------------

UNSEALED_EDITS: dict[str, Callable[[dict[str, Any]], None]] = {
    "int8 codes read as uint8": lambda m: quantized_layer(m)["weight"].update(format="uint4"),
    "weight spec narrowed to int2": lambda m: quantized_layer(m)["weight"].update(format="int2"),
    "input spec removed (W8A16)": lambda m: quantized_layer(m).update(input=None),
    "sha256 block removed": lambda m: m.pop("sha256"),
    "sha256 of the tensors replaced": lambda m: m["sha256"].update({TENSORS: "0" * 64}),
    "model class swapped": lambda m: m.update(model_class="UNet2DModel"),
    "model_module naming a local package": lambda m: m.update(model_module="evil_pkg"),
    "recipe renamed": lambda m: m["recipe"].update(name="other"),
    "layer dropped": lambda m: m["layers"].pop(next(iter(m["layers"]))),
    "role changed": lambda m: first_layer(m).update(role="time_embed"),
    "low-rank rank changed": lambda m: next(e for e in m["layers"].values() if e["low_rank"])["low_rank"].update(rank=1),
    "group size changed": lambda m: quantized_layer(m)["weight"].update(group_size=32),
}


@pytest.mark.parametrize("edit", UNSEALED_EDITS.values(), ids=UNSEALED_EDITS.keys())
def test_an_edited_manifest_is_refused_by_its_seal(saved, edit):
    edit_manifest(saved / MANIFEST, edit, reseal=False)
    with pytest.raises(CheckpointError, match="was edited after it was saved"):
        load_quantized(saved)


def test_a_manifest_without_its_seal_is_refused(saved):
    data = json.loads((saved / MANIFEST).read_text())
    data.pop(SEAL)
    (saved / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=f"no {SEAL}"):
        load_quantized(saved)


def test_a_version_1_folder_is_refused_with_what_to_do(saved):
    edit_manifest(saved / MANIFEST, lambda m: m.update(format_version=1), reseal=False)
    with pytest.raises(CheckpointError, match="quantize the model again"):
        load_quantized(saved)


# -- edits with a recomputed seal: the schema and consistency checks -----------------------------

RESEALED_EDITS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "codes spec int4 -> uint8": (lambda m: quantized_layer(m)["weight"].update(format="uint8"), "packing"),
    "codes spec int4 -> int8": (lambda m: quantized_layer(m)["weight"].update(format="int8"), "packing"),
    "packing changed": (lambda m: quantized_layer(m).update(packing="bytes"), "packing"),
    "codes_shape not the weight's": (lambda m: quantized_layer(m).update(codes_shape=[1, 1]), "does not hold"),
    "negative weight_shape": (lambda m: first_layer(m).update(weight_shape=[-1, 64]), "positive integers"),
    "weight_shape a string": (lambda m: first_layer(m).update(weight_shape="64x64"), "wrong type"),
    "layer type swapped": (lambda m: first_layer(m).update(type="QuantizedConv2d"), "saved as a QuantizedConv2d"),
    "layer for a missing module": (lambda m: m["layers"].update(ghost=first_layer(m)), "does not exist"),
    "unknown layer key": (lambda m: first_layer(m).update(exec="import os"), "unknown keys"),
    "missing layer key": (lambda m: first_layer(m).pop("role"), "missing keys"),
    "role not a string": (lambda m: first_layer(m).update(role=3), "wrong type"),
    "low_rank dtype bogus": (lambda m: next(e for e in m["layers"].values() if e["low_rank"])["low_rank"].update(
        dtype="complex64"), "low_rank"),
    "low_rank rank zero": (lambda m: next(e for e in m["layers"].values() if e["low_rank"])["low_rank"].update(
        rank=0), "low_rank"),
    "weight spec with unknown format": (lambda m: quantized_layer(m)["weight"].update(format="int99"), "int99"),
    "input spec group without size": (lambda m: quantized_layer(m).update(input={"format": "int8",
                                      "granularity": "group"}), "input"),
    "sha256 lists another file": (lambda m: m["sha256"].update({"extra.bin": "0" * 64}), "sha256 must list"),
    "sha256 block empty": (lambda m: m.update(sha256={}), "sha256 must list"),
    "format_version a bool": (lambda m: m.update(format_version=True), "is not"),
    "layers a list": (lambda m: m.update(layers=[]), "wrong type"),
    "unknown top-level key": (lambda m: m.update(model_module="evil_pkg"), "unknown keys"),
    "recipe invalid": (lambda m: m["recipe"].update(weight={"format": "int8", "granularity": "diagonal"}), "recipe"),
    "model class not allow-listed": (lambda m: m.update(model_class="Path"), "neither a diffusers model class"),
    "model class a dunder": (lambda m: m.update(model_class="__loader__"), "neither a diffusers model class"),
    "model class a pipeline": (lambda m: m.update(model_class="DiTPipeline"), "neither a diffusers model class"),
    "model class another model": (lambda m: m.update(model_class="UNet2DModel"), "not the config of a UNet2DModel"),
}


@pytest.mark.parametrize("edit, message", RESEALED_EDITS.values(), ids=RESEALED_EDITS.keys())
def test_a_resealed_bad_manifest_is_refused_by_its_schema(saved, edit, message):
    edit_manifest(saved / MANIFEST, edit)
    with pytest.raises(CheckpointError, match=message):
        load_quantized(saved)


def test_manifest_not_json_or_not_an_object(saved):
    for text, message in (("{not json", "cannot be read as JSON"), ("[1, 2]", "is not"), ('{"format": "diffquant-quantized"}', "is not"),
                          ("\udcff".encode("utf-8", "surrogateescape").decode("latin-1"), "JSON")):
        (saved / MANIFEST).write_text(text)
        with pytest.raises(CheckpointError, match=message):
            load_quantized(saved)


# -- code execution ------------------------------------------------------------------------------

def plant_package(folder: Path, sentinel: Path) -> None:
    """A Python package beside the checkpoint whose import would write `sentinel`."""
    package = folder.parent / "evil_pkg"
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text(f"open({str(sentinel)!r}, 'w').write('ran')\n"
                                         "class DiTTransformer2DModel: pass\n")


@pytest.mark.parametrize("reseal", [False, True], ids=["plain edit", "resealed edit"])
def test_a_manifest_naming_a_local_package_never_imports_it(saved, tmp_path, monkeypatch, reseal):
    sentinel = tmp_path / "ran"
    plant_package(saved, sentinel)
    monkeypatch.syspath_prepend(str(saved.parent))
    monkeypatch.chdir(saved.parent)
    edit_manifest(saved / MANIFEST, lambda m: m.update(model_module="evil_pkg"), reseal=reseal)
    with pytest.raises(CheckpointError):
        load_quantized(saved)
    assert not sentinel.exists()


def test_a_model_class_spelled_as_a_module_path_is_refused(saved, tmp_path, monkeypatch):
    sentinel = tmp_path / "ran"
    plant_package(saved, sentinel)
    monkeypatch.syspath_prepend(str(saved.parent))
    edit_manifest(saved / MANIFEST, lambda m: m.update(model_class="evil_pkg.DiTTransformer2DModel"))
    with pytest.raises(CheckpointError, match="neither a diffusers model class"):
        load_quantized(saved)
    assert not sentinel.exists()


@pytest.mark.parametrize("name", ["evil.py", "sub/__init__.py", "weights.bin", "optimizer.pt", "extra.ckpt",
                                  "state.pkl", "lib.so"])
def test_code_or_pickles_in_a_checkpoint_folder_are_refused(saved, name):
    (saved / name).parent.mkdir(exist_ok=True)
    (saved / name).write_bytes(b"not to be loaded")
    with pytest.raises(CheckpointError, match="never"):
        load_quantized(saved)


def test_a_symlink_in_a_checkpoint_folder_is_refused(saved, tmp_path):
    (tmp_path / "elsewhere").write_text("{}")
    os.symlink(tmp_path / "elsewhere", saved / "linked.json")
    with pytest.raises(CheckpointError, match="symbolic link"):
        load_quantized(saved)


# -- files that do not match their hashes ---------------------------------------------------------

def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("change", [
    lambda f: flip_last_byte(f / TENSORS),
    lambda f: (f / TENSORS).write_bytes((f / TENSORS).read_bytes()[:1000]),
    lambda f: (f / MODEL_CONFIG).write_text((f / MODEL_CONFIG).read_text().replace("2", "3", 1)),
    lambda f: (f / TENSORS).unlink(),
    lambda f: (f / MODEL_CONFIG).write_text("{}"),
], ids=["tensors bit flip", "tensors truncated", "config edited", "tensors missing", "config emptied"])
def test_files_changed_after_saving_are_refused(saved, change):
    change(saved)
    with pytest.raises(CheckpointError, match="sha256|missing"):
        load_quantized(saved)


def test_an_untouched_checkpoint_loads_bitwise(saved):
    model = load_quantized(saved)
    reloaded = load_quantized(save_quantized(model, saved.parent / "again"))
    assert torch.equal(dit_output(model), dit_output(reloaded))


# -- pipelines ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_pipeline_folder(dit_pipeline_folder, tmp_path_factory) -> Path:  # noqa: F811
    pipe = load_pipeline_folder(dit_pipeline_folder)
    diffquant.quantize(pipe.transformer, "w4a16", progress=False)
    return save_quantized(pipe, tmp_path_factory.mktemp("pipe") / "q", source=dit_pipeline_folder)


@pytest.fixture
def saved_pipeline(saved_pipeline_folder, tmp_path) -> Path:
    return Path(shutil.copytree(saved_pipeline_folder, tmp_path / "qp"))


def test_a_saved_pipeline_lists_every_file_with_its_sha256(saved_pipeline):
    listed = set(json.loads((saved_pipeline / PIPELINE_MANIFEST).read_text())["sha256"])
    present = {p.relative_to(saved_pipeline).as_posix() for p in saved_pipeline.rglob("*") if p.is_file()}
    assert listed == present - {PIPELINE_MANIFEST} and "vae/diffusion_pytorch_model.safetensors" in listed
    assert load_quantized(saved_pipeline).transformer is not None


PIPELINE_TAMPERS: dict[str, tuple[Callable[[Path], None], str]] = {
    "vae weights modified": (lambda f: flip_last_byte(f / "vae" / "diffusion_pytorch_model.safetensors"), "sha256"),
    "scheduler config edited": (lambda f: (f / "scheduler" / "scheduler_config.json").write_text("{}"), "sha256"),
    "vae stored as a pickle": (lambda f: (f / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"x"), "pickled"),
    "a component module beside": (lambda f: (f / "vae" / "evil_lib.py").write_text("x = 1"), "code"),
    "a file added": (lambda f: (f / "notes.txt").write_text("hi"), "not saved with it"),
    "a file removed": (lambda f: (f / "scheduler" / "scheduler_config.json").unlink(), "incomplete"),
    "pipeline manifest removed": (lambda f: (f / PIPELINE_MANIFEST).unlink(), f"no {PIPELINE_MANIFEST}"),
    "pipeline manifest edited": (lambda f: edit_manifest(f / PIPELINE_MANIFEST, lambda m: m["sha256"].pop(
        "vae/config.json"), reseal=False), "was edited"),
    "model_index names a local library": (lambda f: _retarget_vae(f, ["evil_lib", "AutoencoderKL"]), "only diffusers"),
    "model_index names another pipeline class": (lambda f: _edit_index(f, _class_name="os"), "not a diffusers pipeline"),
}


def _edit_index(folder: Path, **changes: Any) -> None:
    index = json.loads((folder / PIPELINE_INDEX).read_text())
    index.update(changes)
    (folder / PIPELINE_INDEX).write_text(json.dumps(index))
    # hide the edit from the hashes: what must refuse the folder is the allow-list
    edit_manifest(folder / PIPELINE_MANIFEST, lambda m: m["sha256"].update(
        {PIPELINE_INDEX: sha256_of(folder / PIPELINE_INDEX)}))


def _retarget_vae(folder: Path, target: list[str]) -> None:
    _edit_index(folder, vae=target)


@pytest.mark.parametrize("tamper, message", PIPELINE_TAMPERS.values(), ids=PIPELINE_TAMPERS.keys())
def test_a_tampered_pipeline_folder_is_refused(saved_pipeline, tamper, message):
    tamper(saved_pipeline)
    with pytest.raises(CheckpointError, match=message):
        load_quantized(saved_pipeline)


# -- full-precision folders a user gives to quantize -----------------------------------------------

def test_a_source_pipeline_with_pickled_weights_is_refused_with_how_to_convert(dit_pipeline_folder, tmp_path):  # noqa: F811
    folder = Path(shutil.copytree(dit_pipeline_folder, tmp_path / "src"))
    (folder / "vae" / "diffusion_pytorch_model.safetensors").rename(folder / "vae" / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match="safe_serialization=True"):
        load_pipeline_folder(folder)


def test_a_source_model_folder_naming_no_diffusers_class_is_refused(dit_pipeline_folder, tmp_path):  # noqa: F811
    folder = Path(shutil.copytree(dit_pipeline_folder / "transformer", tmp_path / "m"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_class_name": "evil_pkg.Model"}))
    with pytest.raises(ValueError, match="neither a diffusers model class"):
        load_model_folder(folder)


def test_resealed_int8_codes_relabelled_uint8_are_refused_by_their_dtype(quantized_dit, tmp_path):  # noqa: F811
    folder = save_quantized(quantized_dit, tmp_path / "w8")
    edit_manifest(folder / MANIFEST, lambda m: quantized_layer(m)["weight"].update(format="uint8", symmetric=False))
    with pytest.raises(CheckpointError, match="stored codes are torch.int8"):
        load_quantized(folder)


def as_version_1(folder: Path) -> None:
    """Rewrite a manifest the way diffquant wrote it before manifests were sealed."""
    edit_manifest(folder / MANIFEST, lambda m: m.update(format_version=1, model_module="diffusers"), reseal=False)
    data = json.loads((folder / MANIFEST).read_text())
    data.pop(SEAL)
    (folder / MANIFEST).write_text(json.dumps(data))


def test_an_unsealed_v1_folder_loads_only_when_vouched_for_and_resaves_sealed(saved, tmp_path, caplog):
    expected = dit_output(load_quantized(saved))
    as_version_1(saved)
    with pytest.raises(CheckpointError, match="allow_unsealed=True"):
        load_quantized(saved)
    model = load_quantized(saved, allow_unsealed=True)
    assert "unsealed" in caplog.text and torch.equal(dit_output(model), expected)
    assert torch.equal(dit_output(load_quantized(save_quantized(model, tmp_path / "sealed"))), expected)


def test_an_unsealed_v1_folder_still_never_imports_its_model_module(saved, tmp_path, monkeypatch):
    sentinel = tmp_path / "ran"
    plant_package(saved, sentinel)
    monkeypatch.syspath_prepend(str(saved.parent))
    as_version_1(saved)
    edit_manifest(saved / MANIFEST, lambda m: m.update(model_module="evil_pkg"), reseal=False)
    data = json.loads((saved / MANIFEST).read_text())
    data.pop(SEAL)
    (saved / MANIFEST).write_text(json.dumps(data))
    load_quantized(saved, allow_unsealed=True)
    assert not sentinel.exists()


def test_a_v1_folder_with_edited_tensors_is_still_refused(saved):
    as_version_1(saved)
    flip_last_byte(saved / TENSORS)
    with pytest.raises(CheckpointError, match="sha256"):
        load_quantized(saved, allow_unsealed=True)


def test_an_unsealed_v1_pipeline_loads_when_vouched_for_with_its_files_still_checked(saved_pipeline):
    (saved_pipeline / PIPELINE_MANIFEST).unlink()
    as_version_1(saved_pipeline / "transformer")
    with pytest.raises(CheckpointError, match=f"no {PIPELINE_MANIFEST}"):
        load_quantized(saved_pipeline)
    assert load_quantized(saved_pipeline, allow_unsealed=True).transformer is not None
    (saved_pipeline / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="pickled"):
        load_quantized(saved_pipeline, allow_unsealed=True)
