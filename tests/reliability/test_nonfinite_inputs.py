"""Non-finite values where they enter quantize: weights, calibration data, given statistics.

Each gets one NonFiniteError naming the tensor (and for calibration the layer and the sampling step),
and the refused model is left exactly as it was (tests/reliability/intact.py).
"""

from __future__ import annotations

import re

import pytest
import torch

import diffquant
from diffquant.calib.stats import collect_activation_stats, modules_by_name
from diffquant.finite import NonFiniteError, check_finite
from diffquant.plan import plan_layers
from diffquant.recipes import get_preset
from tests.reliability.intact import Snapshot, left_intact
from tests.tiny_models import TINY_MODELS

pytestmark = pytest.mark.usefixtures("single_thread")

DIT, UNET = TINY_MODELS["dit"], TINY_MODELS["unet2d"]
VALUES = {"nan": (float("nan"), "NaN: 1"), "+inf": (float("inf"), "+Inf: 1"), "-inf": (float("-inf"), "-Inf: 1")}


def run_dit(model, inputs=None):
    with torch.no_grad(), diffquant.sampling_step(0):
        return DIT.run(model, DIT.inputs(2) if inputs is None else inputs)


def run_unet(model):
    with torch.no_grad(), diffquant.sampling_step(0):
        return UNET.run(model, UNET.inputs(2))


def poison(model, param: str, value: float) -> None:
    with torch.no_grad():
        model.get_parameter(param).view(-1)[3] = value


def named_layer(message: str) -> str:
    return re.search(r"layer '([^']+)'", message)[1]


# -- weights ------------------------------------------------------------------------------------------------

DIT_PARAMS = {
    "linear-weight": "transformer_blocks.0.attn1.to_q.weight",
    "ffn-weight": "transformer_blocks.1.ff.net.2.weight",
    "linear-bias": "transformer_blocks.0.attn1.to_k.bias",
    "conv-patch-embed": "pos_embed.proj.weight",  # a Conv2d the recipe keeps in full precision
    "embedding-table": "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight",
}


@pytest.mark.parametrize("value", list(VALUES))
@pytest.mark.parametrize("where", list(DIT_PARAMS))
def test_non_finite_dit_parameter_is_refused(where, value):
    model = DIT.build()
    poison(model, DIT_PARAMS[where], VALUES[value][0])
    before = Snapshot.of(model, run_dit)
    with pytest.raises(NonFiniteError) as err:
        diffquant.quantize(model, "w8a8", progress=False)
    message = str(err.value)
    assert f"parameter {DIT_PARAMS[where]!r}" in message and VALUES[value][1] in message
    assert "reload or repair its weights" in message
    before.assert_intact(model, run_dit)


@pytest.mark.parametrize("value", list(VALUES))
def test_non_finite_unet_conv_weight_is_refused(value):
    model = UNET.build()
    poison(model, "down_blocks.0.resnets.0.conv1.weight", VALUES[value][0])
    with left_intact(model, run_unet), pytest.raises(NonFiniteError, match=re.escape("parameter 'down_blocks.0.resnets.0.conv1.weight'")):
        diffquant.quantize(model, "w8a8-static", calibration=run_unet, progress=False)


# -- calibration data -----------------------------------------------------------------------------------------


def latents_with(value: float, whole_row: bool):
    inputs = DIT.inputs(2)
    if whole_row:
        inputs["hidden_states"][1] = value
    else:
        inputs["hidden_states"][0, 2, 3, 4] = value
    return inputs


def nan_timestep():
    inputs = DIT.inputs(2)
    inputs["timestep"] = inputs["timestep"].float()
    inputs["timestep"][1] = float("nan")
    return inputs


BAD_CALIBRATION = {
    "nan-row": lambda: latents_with(float("nan"), whole_row=True),
    "+inf-element": lambda: latents_with(float("inf"), whole_row=False),
    "-inf-element": lambda: latents_with(float("-inf"), whole_row=False),
    "nan-timestep": nan_timestep,
}


def assert_names_first_bad_layer(message: str, model, preset: str, step: int) -> None:
    assert f"at sampling step {step}" in message and "calibration" in message
    assert named_layer(message) in plan_layers(model, get_preset(preset))


@pytest.mark.parametrize("case", list(BAD_CALIBRATION))
def test_non_finite_calibration_data_is_refused(case):
    model, bad = DIT.build(), BAD_CALIBRATION[case]()
    before = Snapshot.of(model, run_dit)
    with pytest.raises(NonFiniteError) as err:
        diffquant.quantize(model, "w8a8-static", calibration=lambda m: run_dit(m, bad), progress=False)
    assert_names_first_bad_layer(str(err.value), model, "w8a8-static", step=0)
    before.assert_intact(model, run_dit)


# calibrating presets of every kind: smoothing, SVDQuant's row sample, a selection stage, per-step ranges
@pytest.mark.parametrize("preset", ["smoothquant-w8a8", "svdquant-w4a4", "qdiffusion-w8a8", "efficientdm-w8a8"])
def test_one_nan_sample_at_a_late_step_is_refused(preset):
    model, bad = DIT.build(), BAD_CALIBRATION["nan-row"]()

    def calibrate(m):
        for step in range(4):
            with torch.no_grad(), diffquant.sampling_step(step, 4):
                DIT.run(m, bad if step == 3 else DIT.inputs(2))

    before = Snapshot.of(model, run_dit)
    with pytest.raises(NonFiniteError) as err:
        diffquant.quantize(model, preset, calibration=calibrate, progress=False)
    assert_names_first_bad_layer(str(err.value), model, preset, step=3)
    before.assert_intact(model, run_dit)


# -- statistics collected elsewhere -----------------------------------------------------------------------------

LAYER = "transformer_blocks.1.attn1.to_v"


def collected_stats(model, sample_rows: int = 0):
    plan = plan_layers(model, get_preset("svdquant-w4a4"))
    return collect_activation_stats(modules_by_name(model, plan), lambda: run_dit(model), sample_rows=sample_rows)


def poison_overall(stats):
    stats[LAYER].overall.hi[5] = float("nan")
    return "outside any sampling step"


def poison_step(stats):
    stats[LAYER].per_step[0].lo[0] = float("-inf")
    return "at sampling step 0"


def poison_sample(stats):
    stats[LAYER].sample.rows[7, 1] = float("inf")
    return "row sample"


@pytest.mark.parametrize(("poison_stats", "preset"), [
    (poison_overall, "w8a8-static"), (poison_step, "w8a8-static"), (poison_sample, "svdquant-w4a4"),
], ids=lambda v: getattr(v, "__name__", v))
def test_non_finite_given_statistics_are_refused(poison_stats, preset):
    model = DIT.build()
    stats = collected_stats(model, sample_rows=16)
    where = poison_stats(stats)
    before = Snapshot.of(model, run_dit)
    with pytest.raises(NonFiniteError) as err:
        diffquant.quantize(model, preset, calibration=stats, progress=False)
    assert f"layer {LAYER!r}" in str(err.value) and where in str(err.value)
    before.assert_intact(model, run_dit)


def test_clean_statistics_still_quantize_as_before():
    """The guards change nothing for finite inputs: given statistics give the model a calibration run gives."""
    model_a, model_b = DIT.build(), DIT.build()
    diffquant.quantize(model_a, "w8a8-static", calibration=collected_stats(model_a), progress=False)
    diffquant.quantize(model_b, "w8a8-static", calibration=run_dit, progress=False)
    assert torch.equal(run_dit(model_a), run_dit(model_b))
    assert torch.isfinite(run_dit(model_a)).all()


# -- the helper other code calls before using or saving qparams ---------------------------------------------


@pytest.mark.parametrize("value", list(VALUES))
def test_check_finite_names_the_tensor_and_counts(value):
    scale = torch.ones(4, 1, dtype=torch.float16)
    scale[2, 0] = VALUES[value][0]
    with pytest.raises(NonFiniteError) as err:
        check_finite("blocks.0.to_q.weight_quantizer.scale", scale, hint="re-quantize the model")
    message = str(err.value)
    assert message.startswith("blocks.0.to_q.weight_quantizer.scale: 1 of 4 values are not finite")
    assert VALUES[value][1] in message and "first at index (2, 0)" in message
    assert message.endswith("; re-quantize the model")
    assert isinstance(err.value, ValueError)


def test_check_finite_passes_finite_and_integer_tensors():
    check_finite("scale", torch.tensor([1e-30, 65504.0, -3.0]))
    check_finite("codes", torch.tensor([-128, 127], dtype=torch.int8))
