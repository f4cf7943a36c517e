"""Checkpoints and freezing of models with attention-matmul quantization: operand quantizers and their
configs round-trip bitwise; frozen models keep quantizing the operands (fake quantization in float)."""

from __future__ import annotations

import json

import pytest
import torch

import diffquant
from diffquant.checkpoint import MANIFEST, CheckpointError, load_quantized, save_quantized
from diffquant.formats import QuantSpec
from diffquant.formats.ops import sqnr_db
from diffquant.freeze import freeze, save_frozen
from diffquant.info import checkpoint_info, format_info
from diffquant.nn.attention import AttentionQuantConfig, QuantAttnProcessor, attention_quantizers
from diffquant.nn.packed import PackedLayer
from diffquant.recipes import Recipe
from tests.io.conftest import TINY_DIT, dit_calibration, dit_output
from tests.manifest_edits import edit_manifest

pytestmark = pytest.mark.usefixtures("single_thread")

STATIC4 = QuantSpec("int4", "tensor", symmetric=False)
ATTENTION = AttentionQuantConfig(query=STATIC4, key=STATIC4, value=QuantSpec("int8", "token", dynamic=True),
                                 probs=QuantSpec("uint8", "tensor", per_step=True))
RECIPE = Recipe(name="w8a8-attention", weight=QuantSpec("int8", "channel", scale_dtype="float16"),
                input=QuantSpec("int8", "tensor", symmetric=False), attention=ATTENTION)


@pytest.fixture
def model():
    return diffquant.quantize(TINY_DIT.build(), RECIPE, calibration=dit_calibration, progress=False)


def test_round_trip_is_bitwise_with_quantizers_and_configs(model, tmp_path):
    expected = dit_output(model)
    folder = save_quantized(model, tmp_path / "q")
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["attention"] == {name: ATTENTION.to_dict() for name in attention_quantizers(model)}
    loaded = load_quantized(folder)
    assert loaded._diffquant_state.recipe == RECIPE and loaded._diffquant_state.recipe.attention == ATTENTION
    before, after = attention_quantizers(model), attention_quantizers(loaded)
    assert sorted(after) == sorted(before) == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    for name, quantizers in after.items():
        assert quantizers.config == ATTENTION
        assert isinstance(loaded.get_submodule(name).processor, QuantAttnProcessor)
        for operand in ("query", "key", "probs"):
            assert torch.equal(getattr(quantizers, operand).scale, getattr(before[name], operand).scale)
        assert quantizers.probs.scale.shape == (1, 1)  # per step: one calibrated step
    assert torch.equal(dit_output(loaded), expected)
    assert 0 < sqnr_db(dit_output(TINY_DIT.build()), expected) < float("inf")


def test_info_names_the_quantized_attention_operands(model, tmp_path):
    info = checkpoint_info(save_quantized(model, tmp_path / "q"))
    assert info["attention_quantized"] == "q,k int4; v int8 dynamic; probs uint8" and info["attention_modules"] == 2
    assert "attention matmuls: operands q,k int4; v int8 dynamic; probs uint8 in 2 attention modules" in format_info(info)


def test_checkpoint_without_attention_has_no_attention_entry(quantized_dit, tmp_path):
    folder = save_quantized(quantized_dit, tmp_path / "q")
    assert "attention" not in json.loads((folder / MANIFEST).read_text())
    info = checkpoint_info(folder)
    assert info["attention_quantized"] is None and "attention matmuls" not in format_info(info)


def test_attention_entry_for_a_missing_module_is_a_checkpoint_error(model, tmp_path):
    folder = save_quantized(model, tmp_path / "q")
    edit_manifest(folder / MANIFEST, lambda m: m["attention"].update({"transformer_blocks.7.attn1": ATTENTION.to_dict()}))
    with pytest.raises(CheckpointError, match="transformer_blocks.7.attn1"):
        load_quantized(folder)


def test_freeze_keeps_the_operand_quantizers_working(model, tmp_path):
    expected = dit_output(model)
    frozen = freeze(load_quantized(save_quantized(model, tmp_path / "q")), float_dtype=torch.float32)
    assert any(isinstance(m, PackedLayer) for m in frozen.modules())
    assert sorted(attention_quantizers(frozen)) == sorted(attention_quantizers(model))
    out = dit_output(frozen)
    assert sqnr_db(expected, out) > 40  # the packed layers' integer GEMMs differ only in float rounding
    for quantizers in attention_quantizers(frozen).values():
        quantizers.quant_enabled = False
    without = dit_output(frozen)
    assert sqnr_db(expected, without) < sqnr_db(expected, out) - 3  # the operand quantizers do act
    for quantizers in attention_quantizers(frozen).values():
        quantizers.quant_enabled = True
    reloaded = load_quantized(save_frozen(frozen, tmp_path / "again"))
    assert torch.equal(dit_output(reloaded), dit_output(load_quantized(tmp_path / "q")))
