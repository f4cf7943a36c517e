"""diffquant.quantize with a recipe's `attention`: which attention modules get operand quantizers,
statistics from the same calibration run, static (and per-step) ranges, accuracy, the full-precision
switch, unsupported attention classes."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

import diffquant
from diffquant.api import gather_stats
from diffquant.formats import QuantSpec
from diffquant.formats.ops import sqnr_db
from diffquant.nn.attention import (
    AttentionQuantConfig,
    AttentionQuantizers,
    QuantAttnProcessor,
    attention_quantizers,
    calibrate_attention_quantizers,
    install_attention_quantizers,
    observe_attention_operands,
)
from diffquant.nn.quantizers import ActivationQuantizer
from diffquant.plan import plan_layers
from diffquant.recipes import Override, Recipe
from tests.tiny_models import TINY_MODELS

pytestmark = pytest.mark.usefixtures("single_thread")

DIT = TINY_MODELS["dit"]
STATIC8 = QuantSpec("int8", "tensor", symmetric=False)
ATTENTION8 = AttentionQuantConfig(query=STATIC8, key=STATIC8, value=STATIC8, probs=QuantSpec("uint8", "tensor"))
DIT_ATTENTION = ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]


def recipe(attention: AttentionQuantConfig | None = ATTENTION8, **changes) -> Recipe:
    return Recipe(name="t", weight=QuantSpec("int8", "channel"), input=QuantSpec("int8", "token", dynamic=True),
                  attention=attention, **changes)


class Calibration:
    """Runs the tiny model on `steps` sampling steps (different inputs each) and counts its runs."""

    def __init__(self, tiny=DIT, steps: int | None = None) -> None:
        self.tiny, self.steps, self.runs = tiny, steps, 0

    def __call__(self, model) -> None:
        self.runs += 1
        for step in range(self.steps or 1):
            inputs = self.tiny.inputs(2)
            inputs[next(iter(inputs))] = inputs[next(iter(inputs))] * (1 + 0.5 * step)
            with diffquant.sampling_step(step if self.steps else 0):
                self.tiny.run(model, inputs)


def output(model, tiny=DIT, step: int = 0) -> torch.Tensor:
    with torch.no_grad(), diffquant.sampling_step(step):
        return tiny.run(model, tiny.inputs(2))


def test_operands_are_observed_in_the_one_calibration_run_and_calibrated():
    calibration = Calibration()
    model = diffquant.quantize(DIT.build(), recipe(), calibration=calibration, progress=False)
    assert calibration.runs == 1  # layer statistics and operand statistics from the same sampler run
    installed = attention_quantizers(model)
    assert sorted(installed) == DIT_ATTENTION
    for name in DIT_ATTENTION:
        assert isinstance(model.get_submodule(name).processor, QuantAttnProcessor)
    # the ranges are those of the full-precision operands, as an independent calibration finds them
    reference = DIT.build()
    install_attention_quantizers(reference, ATTENTION8)
    with torch.no_grad(), observe_attention_operands(reference) as stats:
        Calibration()(reference)
    calibrate_attention_quantizers(reference, stats)
    for name, quantizers in attention_quantizers(reference).items():
        for operand, expected in quantizers.quantizers().items():
            assert torch.equal(getattr(installed[name], operand).scale, expected.scale), (name, operand)


def test_quantized_attention_is_close_to_full_precision_and_changes_the_output():
    fp = output(DIT.build())
    with_attention = output(diffquant.quantize(DIT.build(), recipe(), calibration=Calibration(), progress=False))
    without = output(diffquant.quantize(DIT.build(), recipe(None), calibration=None, progress=False))
    assert 25.0 < sqnr_db(fp, with_attention) < float("inf")
    assert not torch.equal(with_attention, without)
    low = AttentionQuantConfig(query=STATIC8.with_changes(format="int4"), key=STATIC8.with_changes(format="int4"))
    int4 = output(diffquant.quantize(DIT.build(), recipe(low), calibration=Calibration(), progress=False))
    assert sqnr_db(fp, int4) < sqnr_db(fp, with_attention)


def test_per_step_operand_ranges():
    per_step = AttentionQuantConfig(**{op: dataclasses.replace(spec, per_step=True)
                                       for op, spec in ATTENTION8.specs().items()})
    model = diffquant.quantize(DIT.build(), recipe(per_step), calibration=Calibration(steps=3), progress=False)
    for quantizers in attention_quantizers(model).values():
        assert quantizers.query.scale.shape == (3, 1)
        assert not torch.equal(quantizers.query.scale[0], quantizers.query.scale[2])  # step 2's inputs are wider
    fp = DIT.build()
    for step in range(3):
        assert 25.0 < sqnr_db(output(fp, step=step), output(model, step=step)) < float("inf")


def test_attention_follows_the_recipes_layer_selection(caplog):
    skip_block = recipe(overrides=(Override("transformer_blocks.1.*", skip=True),))
    model = diffquant.quantize(DIT.build(), skip_block, calibration=Calibration(), progress=False)
    assert list(attention_quantizers(model)) == ["transformer_blocks.0.attn1"]
    no_attention_layers = recipe(overrides=(Override("role:attn.*", skip=True),))
    with caplog.at_level(logging.WARNING, logger="diffquant.attention"):
        model = diffquant.quantize(DIT.build(), no_attention_layers, calibration=Calibration(), progress=False)
    assert attention_quantizers(model) == {}
    assert "no attention module of DiTTransformer2DModel" in caplog.text


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_unsupported_attention_is_left_in_full_precision_with_a_warning(family, caplog):
    tiny = TINY_MODELS[family]
    with caplog.at_level(logging.WARNING, logger="diffquant.attention"):
        model = diffquant.quantize(tiny.build(), recipe(), calibration=Calibration(tiny), progress=False)
    assert attention_quantizers(model) == {}
    assert "are not supported and stay in full precision" in caplog.text
    assert not any(isinstance(getattr(m, "processor", None), QuantAttnProcessor) for m in model.modules())
    plain = diffquant.quantize(tiny.build(), recipe(None), calibration=None, progress=False)
    assert torch.equal(output(model, tiny), output(plain, tiny))


def test_collected_statistics_must_hold_the_operands():
    model = DIT.build()
    plan = plan_layers(model, recipe())
    layers_only = gather_stats(model, plan, Calibration())
    with pytest.raises(ValueError, match="planned layers or attention operands.*attn1.query"):
        diffquant.quantize(model, recipe(), calibration=layers_only, progress=False)
    stats = gather_stats(model, plan, Calibration(), attention=DIT_ATTENTION, operands=("query", "key", "value", "probs"))
    assert {f"{a}.{op}" for a in DIT_ATTENTION for op in ("query", "probs")} <= set(stats)
    direct = diffquant.quantize(DIT.build(), recipe(), calibration=Calibration(), progress=False)
    from_stats = diffquant.quantize(model, recipe(), calibration=stats, progress=False)
    assert torch.equal(output(from_stats), output(direct))


def test_dynamic_operands_need_no_calibration():
    dynamic = QuantSpec("int8", "token", dynamic=True)
    config = AttentionQuantConfig(query=dynamic, key=dynamic, value=dynamic)
    model = diffquant.quantize(DIT.build(), recipe(config), progress=False)
    assert all(type(q.query) is ActivationQuantizer and q.calibrated for q in attention_quantizers(model).values())
    assert 25.0 < sqnr_db(output(DIT.build()), output(model)) < float("inf")


def test_quantizers_disabled_switches_the_operands_off_too():
    model = diffquant.quantize(DIT.build(), recipe(), calibration=Calibration(), progress=False)
    quantized = output(model)
    with diffquant.quantizers_disabled(model):
        fp = output(model)
        assert all(not q.quant_enabled for q in attention_quantizers(model).values())
    torch.testing.assert_close(fp, output(DIT.build()), rtol=1e-5, atol=1e-5)  # explicit attention vs SDPA
    assert all(isinstance(q, AttentionQuantizers) and q.quant_enabled for q in attention_quantizers(model).values())
    assert torch.equal(output(model), quantized)
