"""Export to nunchaku's SVDQuant layout: export → import round trip, metadata, the layout's
arithmetic, the CLI, refusals; and the svdquant-nvfp4 preset on a tiny DiT."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch
from safetensors import safe_open

import diffquant
from diffquant.algorithms.svdquant import SVDQuant
from diffquant.api import quantized_layers
from diffquant.checkpoint import CheckpointError, save_quantized
from diffquant.cli import main
from diffquant.export import EXPORTERS, export, export_nunchaku, import_nunchaku
from diffquant.formats.ops import sqnr_db
from diffquant.nn import QConv2d
from diffquant.recipes import get_preset
from tests.io.conftest import TINY_DIT, dit_calibration, dit_output
from tests.tiny_models import TINY_MODELS

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def svdquant_dit():
    return diffquant.quantize(TINY_DIT.build(), "svdquant-w4a4", calibration=dit_calibration, progress=False)


@pytest.fixture(scope="module")
def nvfp4_dit():
    return diffquant.quantize(TINY_DIT.build(), "svdquant-nvfp4", calibration=dit_calibration, progress=False)


def branch_layers(model):
    return {n: q for n, q in quantized_layers(model).items() if q.low_rank is not None}


def codes_of(layer):
    if layer.weight_codes is not None:
        return layer.weight_codes
    return layer.weight_quantizer.codes(layer.weight_matrix(layer.weight.detach()))


def assert_round_trip(model, path, smooth_dtype=torch.float32):
    imported = import_nunchaku(path)
    layers = branch_layers(model)
    assert layers and set(layers) <= set(imported.layers)
    for name, layer in layers.items():
        got = imported.decoded(name)
        wq = layer.weight_quantizer
        assert torch.equal(got["codes"], codes_of(layer)), name
        assert torch.equal(got["scale"], wq.scale.float()), name
        if wq.global_scale is not None:
            assert torch.equal(got["global_scale"], wq.global_scale.float()), name
        assert torch.equal(got["smooth"], layer.smooth.to(smooth_dtype)), name
        assert torch.equal(got["low_rank_down"].float(), layer.low_rank_down.detach()), name
        assert torch.equal(got["low_rank_up"].float(), layer.low_rank_up.detach()), name
        if layer.bias is not None:
            assert torch.equal(got["bias"], layer.bias.detach().to(smooth_dtype)), name
    return imported


def test_round_trip_is_exact_in_float32(svdquant_dit, tmp_path):
    path = export_nunchaku(svdquant_dit, tmp_path / "m.safetensors", dtype="float32")
    assert_round_trip(svdquant_dit, path)


def test_default_float16_keeps_codes_scales_and_factors_exact(svdquant_dit, tmp_path):
    path = export_nunchaku(svdquant_dit, tmp_path / "m.safetensors")
    imported = assert_round_trip(svdquant_dit, path, smooth_dtype=torch.float16)
    name, layer = next(iter(branch_layers(svdquant_dit).items()))
    t, (out_f, in_f) = imported.layers[name], layer.weight_shape
    rank = layer.low_rank_down.shape[1]
    assert t["qweight"].dtype == torch.int8 and t["qweight"].shape == (out_f, in_f // 2)
    assert t["wscales"].dtype == torch.float16 and t["wscales"].shape == (in_f // 64, out_f)
    assert t["smooth_factor"].shape == t["smooth_factor_orig"].shape == (in_f,)
    assert t["proj_down"].shape == (in_f, rank) and t["proj_up"].shape == (out_f, rank)
    assert t["proj_down"].dtype == torch.float16
    # the model's other tensors travel too
    assert any(k.startswith("pos_embed") for k in imported.other)


def test_metadata_parses(svdquant_dit, tmp_path):
    path = export_nunchaku(svdquant_dit, tmp_path / "m.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "nunchaku-svdquant" and meta["layout"] == "logical-v1"
    config = json.loads(meta["quantization_config"])
    assert config["precision"] == "int4" and config["group_size"] == 64
    assert config["source_recipe"] == "svdquant-w4a4"
    assert config["diffquant_version"] == diffquant.__version__ == meta["diffquant_version"]
    ranks = {c["rank"] for c in config["layers"].values()}
    assert config["rank"] == max(ranks) > 0
    assert set(branch_layers(svdquant_dit)) <= set(config["layers"])
    # what is not exported says why
    for name in set(quantized_layers(svdquant_dit)) - set(config["layers"]):
        assert config["skipped"][name]


@pytest.mark.parametrize("fixture", ["svdquant_dit", "nvfp4_dit"])
def test_tiled_layout_holds_the_logical_tensors_in_nunchakus_order(fixture, request, tmp_path, caplog):
    """layout="tiled": every layer tensor is nunchaku_tiles' tiling of the logical one (padded sizes in
    the config), and importing it gives back exactly what the logical file holds."""
    from diffquant.export.nunchaku_tiles import pad_dims, tile_layer

    model = request.getfixturevalue(fixture)
    logical = export_nunchaku(model, tmp_path / "logical.safetensors", dtype="float32")
    with caplog.at_level(logging.WARNING, logger="diffquant.export"):
        tiled = export_nunchaku(model, tmp_path / "tiled.safetensors", dtype="float32", layout="tiled")
    with safe_open(str(tiled), framework="pt") as f:
        meta, raw = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert meta["layout"] == "nunchaku-tiled-v1"
    config = json.loads(meta["quantization_config"])
    plain = import_nunchaku(logical)
    for name, cfg in config["layers"].items():
        assert cfg["padded"] == list(pad_dims(cfg["out_features"], cfg["in_features"], cfg["rank"]))
        expected = tile_layer(plain.layers[name])
        for key, value in expected.items():
            assert torch.equal(raw[f"{name}.{key}"].view(torch.uint8), value.view(torch.uint8)), (name, key)
    assert "padded" in caplog.text  # the tiny model's layers are narrower than nunchaku's 128-wide tiles
    back = import_nunchaku(tiled)
    for name in config["layers"]:
        for key, value in plain.layers[name].items():
            assert torch.equal(back.layers[name][key].view(torch.uint8), value.view(torch.uint8)), (name, key)
    assert_round_trip(model, tiled)


def test_cli_writes_the_tiled_layout(svdquant_dit, tmp_path, capsys):
    folder = save_quantized(svdquant_dit, tmp_path / "q")
    out = tmp_path / "tiled.safetensors"
    assert main(["export", str(folder), "--layout", "tiled", "--out", str(out)]) == 0
    assert "tiled layout" in capsys.readouterr().out
    assert_round_trip(svdquant_dit, out, smooth_dtype=torch.float16)
    with pytest.raises(ValueError, match="layout"):
        export_nunchaku(svdquant_dit, tmp_path / "x.safetensors", layout="blocked")


def test_exported_tensors_compute_the_layer(svdquant_dit, tmp_path):
    """Y = Q(x/λ)·dequant(qweight, wscales)ᵀ + (x/λ)·proj_down·proj_upᵀ + bias, as documented."""
    path = export_nunchaku(svdquant_dit, tmp_path / "m.safetensors", dtype="float32")
    imported = import_nunchaku(path)
    name, layer = next(iter(branch_layers(svdquant_dit).items()))
    t, cfg = imported.layers[name], imported.config["layers"][name]
    g = cfg["group_size"]
    codes = imported.decoded(name)["codes"].float()
    weight = (codes.reshape(codes.shape[0], -1, g) * t["wscales"].float().t().unsqueeze(-1)).reshape(codes.shape)
    x = torch.randn(5, cfg["in_features"], generator=torch.Generator().manual_seed(0))
    xs = x / t["smooth_factor"]
    y = layer.input_quantizer(xs) @ weight.t() + xs @ t["proj_down"] @ t["proj_up"].t() + t["bias"]
    with torch.no_grad():
        torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-5)


def test_cli_exports_a_saved_folder(svdquant_dit, tmp_path, capsys):
    folder = save_quantized(svdquant_dit, tmp_path / "q")
    out = tmp_path / "out" / "model.safetensors"
    assert main(["export", str(folder), "--format", "nunchaku", "--out", str(out)]) == 0
    assert out.is_file() and "wrote" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == ["model.safetensors"]  # no temporary left behind
    assert_round_trip(svdquant_dit, out, smooth_dtype=torch.float16)


def test_a_pipeline_folder_exports_its_quantized_denoiser_alone(svdquant_dit, tmp_path):
    """A pipeline folder whose pipeline class would not load (a zoo SD pipeline ships no text encoder):
    export reads only the quantized denoiser's folder."""
    pipeline = tmp_path / "pipe"
    save_quantized(svdquant_dit, pipeline / "transformer")
    (pipeline / "model_index.json").write_text(json.dumps({
        "_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDIMScheduler"]}))  # vae: absent
    path = export_nunchaku(pipeline, tmp_path / "m.safetensors", dtype="float32")
    assert_round_trip(svdquant_dit, path)


def test_unquantized_folder_is_a_clear_error(tmp_path, capsys):
    TINY_DIT.build().save_pretrained(tmp_path / "fp")
    assert main(["export", str(tmp_path / "fp"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "not a quantized model folder" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="does not exist"):
        export_nunchaku(tmp_path / "missing", tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="not quantized"):
        export_nunchaku(TINY_DIT.build(), tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("preset", ["w4a4", "svdquant-w8a8"])
def test_model_without_svdquant_layers_is_refused(preset, tmp_path):
    """RTN W4A4 has no branch; SVDQuant W8A8 has one but no 4-bit layer nunchaku runs (all skipped)."""
    model = diffquant.quantize(TINY_DIT.build(), preset, calibration=dit_calibration, progress=False)
    with pytest.raises(ValueError, match="no SVDQuant layer") as info:
        export_nunchaku(model, tmp_path / "x.safetensors")
    if preset == "svdquant-w8a8":
        assert "weight format int8" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_format_registry(svdquant_dit, tmp_path):
    assert "nunchaku" in EXPORTERS
    with pytest.raises(ValueError, match="unknown export format"):
        export(svdquant_dit, tmp_path / "x", format="gguf")
    assert export(svdquant_dit, tmp_path / "m.safetensors", format="nunchaku").is_file()


def test_svdquant_nvfp4_preset_quantizes_and_exports(nvfp4_dit, tmp_path):
    layers = branch_layers(nvfp4_dit)
    assert layers
    for layer in layers.values():
        assert layer.weight_quantizer.spec.format == "nvfp4" and layer.weight_quantizer.spec.group_size == 16
        assert layer.input_quantizer.spec.format == "nvfp4" and layer.input_quantizer.spec.dynamic
    reference = dit_output(TINY_DIT.build())
    assert sqnr_db(reference, dit_output(nvfp4_dit)) >= 5.0
    path = export_nunchaku(nvfp4_dit, tmp_path / "m.safetensors", dtype="float32")
    imported = assert_round_trip(nvfp4_dit, path)
    assert imported.config["precision"] == "nvfp4" and imported.config["group_size"] == 16
    name, layer = next(iter(layers.items()))
    t = imported.layers[name]
    out_f, in_f = layer.weight_shape
    assert t["wscales"].dtype == torch.float8_e4m3fn and t["wscales"].shape == (in_f // 16, out_f)
    assert t["wtscale"].shape == (1,) and torch.equal(t["wcscales"], torch.ones(out_f))
    # the E4M3 bit patterns are the OCP float8_e4m3fn values: torch reads the same scales
    scale = (t["wscales"].float() * t["wtscale"]).t().reshape(-1, 1)
    assert torch.equal(scale, layer.weight_quantizer.scale.float())


def test_svdquant_convolutions_are_skipped_with_a_warning_not_written(tmp_path, caplog):
    """nunchaku has no conv layer: a UNet's SVDQuant convs (with their branch) are listed in `skipped`,
    named in a warning and absent from the file; its Linear SVDQuant layers are exported as usual."""
    unet = TINY_MODELS["unet2d-condition"]
    inputs = unet.inputs(2)
    preset = get_preset("svdquant-w4a4")
    recipe = dataclasses.replace(preset, stages=(SVDQuant(rank=8, grid_step=0.25, iterations=2, sample_rows=64),))
    model = diffquant.quantize(unet.build(), recipe, calibration=lambda m: unet.run(m, inputs), progress=False)
    convs = [n for n, layer in quantized_layers(model).items() if isinstance(layer, QConv2d)]
    assert convs and all(model.get_submodule(n).low_rank is not None for n in convs)
    with caplog.at_level(logging.WARNING, logger="diffquant.export"):
        path = export_nunchaku(model, tmp_path / "m.safetensors")
    imported = import_nunchaku(path)
    skipped = imported.config["skipped"]
    assert all("QConv2d" in skipped[n] and "rank-8 SVDQuant branch is not exported" in skipped[n] for n in convs)
    assert not set(convs) & set(imported.layers)
    assert not [k for k in imported.other if k.startswith(tuple(f"{n}." for n in convs))]
    assert f"{len(convs)} SVDQuant layers with a low-rank branch are skipped" in caplog.text and convs[0] in caplog.text
    assert any(c["rank"] == 8 for c in imported.config["layers"].values())
