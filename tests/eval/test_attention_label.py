"""Reporting attention-matmul quantization: the eval row names the quantized operands beside the bits
label (which counts layers only), the report table shows the column only where some row has it."""

from __future__ import annotations

import copy

import pytest

import diffquant
from diffquant.eval.output import format_result
from diffquant.eval.report import COLUMNS, markdown_table
from diffquant.formats import QuantSpec
from diffquant.nn.attention import AttentionQuantConfig, attention_summary
from diffquant.recipes import Recipe
from tests.eval.test_runner import SAMPLES, build_tiny_model, run

pytestmark = pytest.mark.usefixtures("single_thread")

DYNAMIC8 = QuantSpec("int8", "token", dynamic=True)
RECIPE = Recipe(name="w8a8-attn", weight=QuantSpec("int8", "channel"), input=DYNAMIC8,
                attention=AttentionQuantConfig(query=DYNAMIC8, key=DYNAMIC8, value=DYNAMIC8))


def _row(recipe: str, bits: str, attention: str | None = None) -> dict:
    row = {"model": "m", "recipe": recipe, "bits": bits, "fid": 7.0, "psnr_vs_fp": 30.0, "weight_bytes": 2048,
           "class_accuracy": 0.9, "samples": 10, "steps": 2}
    return row if attention is None else {**row, "attention_quantized": attention}


def test_evaluation_row_names_the_attention_operands(tmp_path):
    fp = build_tiny_model()
    q = copy.deepcopy(fp)
    diffquant.quantize(q.denoiser, RECIPE, progress=False)
    assert attention_summary(q.denoiser) == "q,k,v int8 dynamic" and attention_summary(fp.denoiser) is None
    result = run(q, fp, None, tmp_path, samples=SAMPLES)
    assert result["bits"] == "W8A8" and result["attention_quantized"] == "q,k,v int8 dynamic"
    assert "(W8A8; attention q,k,v int8 dynamic)" in format_result(result).splitlines()[0]


def test_attention_column_only_where_a_row_has_it():
    plain = markdown_table([_row("fp", "W16A16"), _row("w4a4", "W4A4")])
    assert "attention matmuls" not in plain
    assert "| " + " | ".join(c[0] for c in COLUMNS) + " |" in plain.splitlines()
    table = markdown_table([_row("fp", "W16A16"), _row("edadm-w4a4", "W4A4", "q,k,v int4; probs uint8")])
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| recipe"))
    header, _, fp_row, q_row = lines[start:start + 4]
    assert header.startswith("| recipe | bits | attention matmuls | weights KiB |")
    assert fp_row.startswith("| `fp` | W16A16 | – |") and q_row.startswith("| `edadm-w4a4` | W4A4 | q,k,v int4; probs uint8 |")
