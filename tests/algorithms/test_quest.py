"""QuEST: layer groups by role (time-embedding layers of a UNet, attention / FFN layers of every family),
the first and last layers a call runs at 8-bit inputs, the sampler following the full-precision teacher
even after block reconstruction changed the weights, only the selected layers' weights trained (the
time-embedding group first when progressive), a W4A4 per-step model brought closer to full precision than
its start on held-out inputs, no training data read, saving / reloading / freezing, resuming an
interrupted run to the same result, and the stage's validation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import diffquant
from diffquant.algorithms.block_data import DenoiserCall, execution_order
from diffquant.algorithms.calibration_selection import CalibrationSelection
from diffquant.algorithms.quest import ATTENTION_ROLES, TIME_ROLES, QuEST, layer_groups
from diffquant.algorithms.reconstruction import BlockReconstruction
from diffquant.algorithms.training import progress_callback
from diffquant.api import CalibrationRequiredError, gather_stats, quantized_layers
from diffquant.calib import replay, sampling_step
from diffquant.checkpoint import load_quantized, save_quantized
from diffquant.formats import QuantSpec
from diffquant.formats.ops import sqnr_db
from diffquant.freeze import freeze, packed_layers
from diffquant.info import checkpoint_info, format_info
from diffquant.nn.learnable import LSQActivation
from diffquant.plan import plan_layers
from diffquant.recipes import Recipe, RecipeError, get_preset
from tests.algorithms.sampler_calls import counted, interrupted_at, refuse_training_images, reseedable
from tests.algorithms.test_reconstruction import DIT, dit_set
from tests.tiny_models import TINY_MODELS

pytestmark = pytest.mark.usefixtures("single_thread")

UNET = TINY_MODELS["unet2d"]
W4A4_STEPS = dict(weight=QuantSpec("int4", "channel", scale_dtype="float16"),
                  input=QuantSpec("int4", "tensor", symmetric=False, per_step=True))
CALIBRATION = dit_set(16, 2, seed=1)
HELD_OUT = dit_set(16, 2, seed=2)
FAST = dict(rounds=8, lr_weight=1e-3, lr_act=1e-3, checkpoint_dir="")


def recipe(*earlier, **stage) -> Recipe:
    return Recipe(name="test-quest", stages=(*earlier, QuEST(**{**FAST, **stage})), **W4A4_STEPS)


def quantized(*earlier, model: nn.Module | None = None, **stage) -> nn.Module:
    return diffquant.quantize(model or DIT.build(), recipe(*earlier, **stage), calibration=replay(CALIBRATION, 32),
                              progress=False)


def unet_calibration(model: nn.Module) -> None:
    """Two sampling steps of the tiny UNet on seeded inputs."""
    for step in range(2):
        with torch.no_grad(), sampling_step(step):
            UNET.run(model, UNET.inputs(4))


def quantized_unet(**stage) -> nn.Module:
    return diffquant.quantize(UNET.build(), recipe(**stage), calibration=unet_calibration, progress=False)


@torch.no_grad()
def outputs(model: nn.Module, cal_set) -> torch.Tensor:
    outs = []
    for step, kwargs in cal_set.batches(64):
        with sampling_step(step):
            outs.append(model(**kwargs)[0])
    return torch.cat(outs)


def wrapped(model: nn.Module, r: Recipe):
    """(layers, roles) of `model` planned and wrapped for `r`, uncalibrated."""
    plan = plan_layers(model, r)
    job = diffquant.api.QuantizationJob(model, r, plan, progress=False)
    job.wrap()
    return job.layers, {n: p.role for n, p in plan.items()}


# -- layer groups and ends --------------------------------------------------------------------------


def test_unet_groups_are_its_time_projections_and_its_attention_layers():
    layers, roles = wrapped(UNET.build(), recipe())
    groups = layer_groups("selected", layers, roles)
    assert groups["time"] and all(n.endswith("time_emb_proj") for n in groups["time"])
    assert groups["attention"] and all(roles[n] in ATTENTION_ROLES for n in groups["attention"])
    convs = [n for n, role in roles.items() if role == "resblock.conv"]
    assert convs and not set(convs) & {*groups["time"], *groups["attention"]}
    every = layer_groups("all", layers, roles)
    assert every["time"] == groups["time"]
    assert set(every["attention"]) == set(layers) - set(groups["time"])


def test_a_dit_has_no_quantized_time_layer_so_every_layer_is_attention_related():
    layers, roles = wrapped(DIT.build(), recipe())
    groups = layer_groups("selected", layers, roles)
    assert groups["time"] == [] and not TIME_ROLES & set(roles.values())
    assert groups["attention"] == list(layers)


def test_first_and_last_layers_a_call_runs_read_8_bit_inputs():
    model = quantized_unet(rounds=1)
    plan = model._diffquant_state.plan
    widened = sorted(n for n, p in plan.items() if p.input is not None and p.input.format == "int8")
    call = DenoiserCall(0, (), UNET.inputs(1))
    order = execution_order(UNET.build(), [n for n, p in plan.items() if p.input is not None], call, torch.device("cpu"))
    assert widened == sorted({order[0], order[-1]})
    assert all(p.input.format == "int4" for n, p in plan.items() if p.input is not None and n not in widened)
    (report,) = model._diffquant_state.stage_reports
    assert report["end_layers"] == widened
    assert "int8" not in {p.input.format for p in quantized_unet(rounds=1, end_format="")._diffquant_state.plan.values()}


# -- training ---------------------------------------------------------------------------------------


def test_the_reference_is_a_frozen_copy_without_the_callers_hooks():
    model = DIT.build()
    model.register_forward_pre_hook(lambda *_: None)
    job = diffquant.api.QuantizationJob(model, recipe(), plan_layers(model, recipe()), progress=False)
    reference = job.keep_reference()
    assert reference is not model and job.keep_reference() is reference and model._forward_pre_hooks
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in reference.modules())
    assert not any(p.requires_grad for p in reference.parameters()) and not reference.training


def test_the_sampler_follows_the_full_precision_model_after_block_reconstruction_changed_the_weights():
    fp = DIT.build()
    seen = []

    def calibration(model):
        for step, kwargs in CALIBRATION.batches(32):
            with torch.no_grad(), sampling_step(step):
                seen.append((step, kwargs, model(**kwargs)[0].clone()))

    reconstruction = BlockReconstruction(iterations=5, batch_size=16, lr_weight=1e-2, lr_act=1e-4)
    diffquant.quantize(copy.deepcopy(fp), recipe(reconstruction, rounds=1), calibration=calibration, progress=False)
    last_round = seen[-len(list(CALIBRATION.batches(32))):]
    for step, kwargs, received in last_round:
        with torch.no_grad(), sampling_step(step):
            torch.testing.assert_close(received, fp(**kwargs)[0], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def fp_dit():
    return DIT.build()


def test_fine_tuning_beats_its_round_to_nearest_start_on_held_out_inputs(fp_dit):
    reference = outputs(fp_dit, HELD_OUT)
    frozen_start = quantized(rounds=1, lr_weight=1e-12, lr_act=1e-12, end_format="")
    fine_tuned = quantized(end_format="")
    start, tuned = (sqnr_db(reference, outputs(m, HELD_OUT)) for m in (frozen_start, fine_tuned))
    assert tuned > start + 0.5, (start, tuned)
    moved = [m._diffquant_state.stage_reports[-1]["codes_changed"] for m in (frozen_start, fine_tuned)]
    assert moved[0] == 0 and 0.01 < moved[1] < 0.5, moved  # latent weights cross half a step only when they train


def test_per_input_channel_step_sizes_are_learned_per_step_and_freeze_on_the_float_path(fp_dit):
    """quest-w4a4's input format (the paper's A4: static, per input channel, one range per step)."""
    channel = dict(W4A4_STEPS, input=QuantSpec("int4", "channel", symmetric=False, per_step=True))

    def tuned(**stage) -> nn.Module:
        r = Recipe(name="test-quest-channel", stages=(QuEST(**{**FAST, "end_format": "", **stage}),), **channel)
        return diffquant.quantize(DIT.build(), r, calibration=replay(CALIBRATION, 32), progress=False)

    models = [tuned(rounds=1, lr_weight=1e-12, lr_act=1e-12), tuned()]  # the start, then the fine-tuned
    layer_pairs = zip(*(quantized_layers(m).values() for m in models), strict=True)
    for before, after in layer_pairs:
        scale = after.input_quantizer.scale
        assert scale.shape[0] == 2 and scale.shape[-1] == after.weight.shape[1]  # [steps, C_in]
        assert not torch.equal(scale, before.input_quantizer.scale)
    reference = outputs(fp_dit, HELD_OUT)
    assert sqnr_db(reference, outputs(models[1], HELD_OUT)) > sqnr_db(reference, outputs(models[0], HELD_OUT)) + 0.5
    expected = outputs(models[1], HELD_OUT)
    frozen = freeze(models[1])
    assert sqnr_db(expected, outputs(frozen, HELD_OUT)) > 30
    assert {layer.path for layer in packed_layers(frozen).values()} == {"float"}  # a scale per k: no integer GEMM


def test_only_the_selected_weights_train_time_layers_first():
    fp = UNET.build()
    original = {n: p.detach().clone() for n, p in fp.named_parameters()}
    snapshots = []

    def snapshot(progress):
        snapshots.append({n: layer.weight.detach().clone() for n, layer in quantized_layers(progress.model).items()})

    with progress_callback(snapshot):
        model = diffquant.quantize(copy.deepcopy(fp), recipe(rounds=2), calibration=unet_calibration, progress=False)
    layers = quantized_layers(model)
    _, roles = wrapped(UNET.build(), recipe())
    groups = layer_groups("selected", layers, roles)
    changed = lambda weights, names: [n for n in names if not torch.equal(weights[n], original[f"{n}.weight"])]  # noqa: E731
    start, after_first, end = snapshots
    assert changed(start, layers) == []
    assert changed(after_first, groups["time"]) == groups["time"] and changed(after_first, groups["attention"]) == []
    final = {n: layer.weight.detach() for n, layer in layers.items()}
    assert changed(final, groups["attention"]) == groups["attention"]
    untouched = set(layers) - {*groups["time"], *groups["attention"]}
    assert untouched and changed(final, untouched) == []
    (report,) = model._diffquant_state.stage_reports
    trained = sum(original[f"{n}.weight"].numel() for n in [*groups["time"], *groups["attention"]])
    assert report["trained_parameters"] == trained
    assert report["trained_share"] == round(trained / sum(p.numel() for p in original.values()), 6)
    assert report["layers"] == {"time": len(groups["time"]), "attention": len(groups["attention"])}


def test_reads_no_training_data(monkeypatch):
    refuse_training_images(monkeypatch)
    quantized(rounds=1)


def test_fresh_noise_every_round_when_the_sampler_can_be_reseeded():
    calibration, seeds = reseedable(replay(CALIBRATION, 32))
    diffquant.quantize(DIT.build(), recipe(rounds=3, seed=7), calibration=calibration, progress=False)
    assert seeds == [7, 8, 9]


def test_composes_with_a_calibration_selection():
    """After EDA-DM's / Q-Diffusion's selection the rounds replay the selected samples (8 of 32 rows here)."""
    rows = []
    model = DIT.build()
    model.register_forward_pre_hook(lambda _m, _args, kwargs: rows.append(len(kwargs["hidden_states"])), with_kwargs=True)
    selection = CalibrationSelection(method="uniform", samples=8)
    diffquant.quantize(model, recipe(selection, rounds=2), calibration=replay(CALIBRATION, 32), progress=False)
    assert [r["type"] for r in model._diffquant_state.stage_reports] == ["calibration_selection", "quest"]
    assert rows[-2:] == [4, 4]  # the last round's calls: the selection's 4 rows per step (of 16)


def test_result_is_an_ordinary_model_that_saves_reloads_and_freezes(tmp_path):
    model = quantized(rounds=2)
    assert not any(isinstance(m, LSQActivation) for m in model.modules())
    assert "forward" not in vars(model)  # the training forward is gone
    expected = outputs(model, HELD_OUT)
    folder = save_quantized(model, tmp_path / "q")
    (stage,) = checkpoint_info(folder)["stages"]  # scalars of the report, for `diffquant info` and report rows
    trained = sum(layer.weight.numel() for layer in quantized_layers(model).values())  # a DiT's: all of them
    assert stage["type"] == "quest" and "round_losses" not in stage
    assert stage["trained_share"] == round(trained / sum(p.numel() for p in DIT.build().parameters()), 6)
    assert f"stage quest: seconds {stage['seconds']}" in format_info(checkpoint_info(folder))
    reloaded = load_quantized(folder)
    assert torch.equal(outputs(reloaded, HELD_OUT), expected)
    (report,) = reloaded._diffquant_state.stage_reports
    assert report["type"] == "quest" and len(report["round_losses"]) == 2
    frozen = freeze(reloaded)
    assert sqnr_db(expected, outputs(frozen, HELD_OUT)) > 30
    assert {layer.path for layer in packed_layers(frozen).values()} == {"int"}  # per-step static inputs: integer GEMM


def test_one_range_per_tensor_becomes_one_per_step_that_computes_the_same_then_trains_apart(tmp_path):
    """per_step_inputs (quest-w4a8): a PTQ start with one range for all steps is expanded to a copy per step,
    exactly (outputs equal), saved in the plan (the checkpoint reloads it), and training moves the steps apart."""
    one_range = dict(W4A4_STEPS, input=QuantSpec("int8", "tensor", symmetric=False))

    def tuned(per_step: bool, **stage) -> nn.Module:
        quest = QuEST(**{**FAST, "end_format": "", "per_step_inputs": per_step, **stage})
        r = Recipe(name="test-quest-expand", stages=(quest,), **one_range)
        return diffquant.quantize(DIT.build(), r, calibration=replay(CALIBRATION, 32), progress=False)

    frozen = dict(rounds=1, lr_weight=1e-30, lr_act=1e-30)
    single, expanded, trained = tuned(False, **frozen), tuned(True, **frozen), tuned(True)
    assert torch.equal(outputs(single, HELD_OUT), outputs(expanded, HELD_OUT))
    for before, after in zip(quantized_layers(single).values(), quantized_layers(trained).values(), strict=True):
        assert not before.input_quantizer.spec.per_step and after.input_quantizer.spec.per_step
        assert before.input_quantizer.scale.shape == (1,) and after.input_quantizer.scale.shape == (2, 1)
    steps = torch.stack([layer.input_quantizer.scale for layer in quantized_layers(trained).values()])
    assert not torch.equal(steps[:, 0], steps[:, 1])  # each step's range learned on its own
    assert trained._diffquant_state.stage_reports[-1]["expanded_per_step"] == len(quantized_layers(trained))
    expected = outputs(trained, HELD_OUT)
    assert torch.equal(outputs(load_quantized(save_quantized(trained, tmp_path / "q")), HELD_OUT), expected)


def test_an_interrupted_run_resumes_to_the_same_result(tmp_path):
    stage = dict(rounds=4, checkpoint_dir=str(tmp_path / "ckpt"))
    uninterrupted = outputs(quantized(**{**stage, "checkpoint_dir": ""}), HELD_OUT)
    base = replay(CALIBRATION, 32)
    failing = interrupted_at(base, 5)  # the end layers, statistics, two rounds, then the interruption
    model = DIT.build()
    weights = copy.deepcopy(model.state_dict())
    with pytest.raises(KeyboardInterrupt):
        diffquant.quantize(model, recipe(**stage), calibration=failing, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())  # weights put back
    assert "forward" not in vars(model) and not any(isinstance(m, LSQActivation) for m in model.modules())
    assert (tmp_path / "ckpt" / "latest" / "state.json").is_file()

    counting, calls = counted(base)
    resumed = diffquant.quantize(DIT.build(), recipe(**stage), calibration=counting, progress=False)
    assert len(calls) == 2 + 2  # end layers and statistics, then the two rounds left
    torch.testing.assert_close(outputs(resumed, HELD_OUT), uninterrupted, rtol=0, atol=1e-5)
    assert not (tmp_path / "ckpt").exists()


# -- configuration ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, message", [
    (dict(layers="some"), "layers must be one of"),
    (dict(end_format="int77"), "end_format"),
    (dict(tla=0.0, cma=0.0, lambda_g=0.0), "needs a loss"),
    (dict(rounds=0), "rounds"),
    (dict(lr_weight=-1.0), "lr_weight"),
])
def test_stage_validation(fields, message):
    with pytest.raises(RecipeError, match=message):
        QuEST(**fields)


def test_needs_a_calibration_function_not_statistics():
    model = DIT.build()
    stats = gather_stats(model, plan_layers(model, recipe()), replay(CALIBRATION, 32))
    with pytest.raises(CalibrationRequiredError, match="calibration function"):
        diffquant.quantize(model, recipe(), calibration=stats, progress=False)


def test_loss_terms_switch_off_their_layers():
    layers, roles = wrapped(UNET.build(), recipe())
    from diffquant.algorithms.quest import SelectiveTrainer

    no_tla = SelectiveTrainer(QuEST(tla=0.0), UNET.build(), UNET.build(), layers, roles, progress=False)
    groups = layer_groups("selected", layers, roles)
    assert set(no_tla.matched) == set(groups["attention"])
    no_cma = SelectiveTrainer(QuEST(cma=0.0), UNET.build(), UNET.build(), layers, roles, progress=False)
    assert set(no_cma.matched) == set(groups["time"])
    flat = SelectiveTrainer(QuEST(progressive=False), UNET.build(), UNET.build(), layers, roles, progress=False)
    assert flat.phases == [[*groups["time"], *groups["attention"]]]


def test_w4a4_preset_starts_from_block_reconstruction_with_per_step_per_channel_inputs():
    preset = get_preset("quest-w4a4")
    assert [s.type for s in preset.stages] == ["block_reconstruction", "quest"]
    assert preset.input.bits == 4 and preset.input.per_step and not preset.input.dynamic
    assert preset.input.granularity == "channel"  # the paper's A4
    assert preset.stages[-1].lr_weight == 1e-5 and preset.stages[-1].lambda_g == 2.0


def test_w4a8_preset_is_edadm_w4a8_then_quest_with_per_step_ranges():
    preset, edadm = get_preset("quest-w4a8"), get_preset("edadm-w4a8")
    assert preset.stages[:-1] == edadm.stages and preset.input == edadm.input and preset.weight == edadm.weight
    quest = preset.stages[-1]
    assert quest.type == "quest" and quest.per_step_inputs and not preset.input.per_step
    assert quest.lr_weight == 1e-4 and quest.lr_act == 1e-5 and quest.lambda_g == 2.0
