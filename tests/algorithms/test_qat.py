"""Training on data: the zoo's diffusion objective is deterministic per batch index and drops the
condition as the models were trained; plain QAT (LSQ weights + activations, all weights trained) lowers
the quantized model's denoising loss and leaves an ordinary model; EfficientDM's ablation without
distillation trains its adapters on the same objective; recipes that train on data demand it; progress
callbacks see the model QAT leaves (round-to-nearest before the first step, the written-back model after
the last) and do not change the result."""

from __future__ import annotations

import contextlib

import pytest
import torch

import diffquant
from diffquant.algorithms.efficientdm import EfficientDM
from diffquant.algorithms.qat import QAT
from diffquant.algorithms.training import progress_callback
from diffquant.api import TrainingDataRequiredError, quantized_layers
from diffquant.checkpoint import load_quantized, save_quantized
from diffquant.formats import QuantSpec
from diffquant.nn import ActivationQuantizer, WeightQuantizer
from diffquant.recipes import Recipe, RecipeError
from diffquant.recipes.config import stage_from_dict
from diffquant.zoo.training import diffusion_objective
from tests.calib.test_sets import tiny_dit

pytestmark = pytest.mark.usefixtures("single_thread")

W4A8 = dict(weight=QuantSpec("int4", "channel", scale_dtype="float16"),
            input=QuantSpec("int8", "tensor", symmetric=False))
DATA = (torch.randn(256, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.8,
        torch.randint(0, 10, (256,), generator=torch.Generator().manual_seed(1)))
HELD_OUT_BATCHES = range(10_000, 10_008)


def objective(model, **kwargs):
    return diffusion_objective(model, batch_size=32, data=DATA, **kwargs)


def held_out_loss(denoiser, training) -> float:
    with torch.no_grad():
        return sum(float(training(denoiser, i)) for i in HELD_OUT_BATCHES) / len(HELD_OUT_BATCHES)


def test_objective_is_a_function_of_the_batch_index():
    model = tiny_dit()
    training = objective(model)
    with torch.no_grad():
        assert float(training(model.denoiser, 3)) == float(training(model.denoiser, 3))
        assert float(training(model.denoiser, 3)) != float(training(model.denoiser, 4))


@pytest.mark.parametrize("dropout", [0.0, 1.0])
def test_objective_drops_the_condition_once_per_sample(dropout):
    model = tiny_dit()
    seen = []
    handle = model.denoiser.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw["class_labels"].clone()), with_kwargs=True)
    with torch.no_grad():
        objective(model, label_dropout=dropout)(model.denoiser, 0)
    handle.remove()
    null = model.conditioning.null_kwargs(1)["class_labels"][0]
    assert bool((seen[0] == null).all()) == (dropout == 1.0)
    assert bool((seen[0] == null).any()) == (dropout == 1.0)


def rtn_loss(training) -> float:
    rtn = tiny_dit()
    diffquant.quantize(rtn.denoiser, Recipe(name="rtn", **W4A8), calibration=rtn.calibration(8, progress=False),
                       progress=False)
    return held_out_loss(rtn.denoiser, training)


def qat_model(stage):
    model = tiny_dit()
    training = objective(model)
    calibration = model.calibration(8, progress=False)
    before = rtn_loss(training)
    recipe = Recipe(name="t", stages=(stage,), **W4A8)
    diffquant.quantize(model.denoiser, recipe, calibration=calibration, training=training, progress=False)
    return model.denoiser, before, held_out_loss(model.denoiser, training)


def test_qat_lowers_the_quantized_denoising_loss_and_leaves_an_ordinary_model(tmp_path):
    denoiser, before, after = qat_model(QAT(iterations=40, lr_weight=1e-3, lr_act=1e-3, checkpoint_dir=""))
    assert after < 0.95 * before, (before, after)
    for layer in quantized_layers(denoiser).values():
        assert type(layer.weight_quantizer) is WeightQuantizer and type(layer.input_quantizer) is ActivationQuantizer
    save_quantized(denoiser, tmp_path / "q")
    x = torch.randn(2, 4, 8, 8)
    kwargs = dict(timestep=torch.tensor([10, 500]), class_labels=torch.tensor([1, 2]), return_dict=False)
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "q")(x, **kwargs)[0], denoiser(x, **kwargs)[0])


def test_objective_trains_per_step_quantizers_on_their_own_sampling_step():
    model = tiny_dit()
    steps = []
    handle = model.denoiser.register_forward_pre_hook(
        lambda _m, _a, kw: steps.append((diffquant.calib.current_step(), int(kw["timestep"][0]))), with_kwargs=True)
    with torch.no_grad():
        for i in range(6):
            objective(model)(model.denoiser, i)
    handle.remove()
    model.scheduler.set_timesteps(model.default_steps)
    assert all(t == int(model.scheduler.timesteps[s]) for s, t in steps) and len({s for s, _ in steps}) > 1
    per_step = dict(W4A8, input=QuantSpec("int8", "tensor", symmetric=False, per_step=True))
    qat = tiny_dit()
    diffquant.quantize(qat.denoiser, Recipe(name="t", stages=(QAT(iterations=3, checkpoint_dir=""),), **per_step),
                       calibration=qat.calibration(8, progress=False), training=objective(qat), progress=False)


def test_efficientdm_without_distillation_trains_on_the_objective():
    calls = []
    model = tiny_dit()
    training = objective(model)

    def counted(denoiser, i):
        calls.append(i)
        return training(denoiser, i)

    stage = EfficientDM(objective="data", data_steps=30, lr_lora=1e-3, lr_act=1e-3, checkpoint_dir="")
    before = rtn_loss(training)
    diffquant.quantize(model.denoiser, Recipe(name="t", stages=(stage,), **W4A8),
                       calibration=model.calibration(8, progress=False), training=counted, progress=False)
    assert calls == list(range(30))
    assert held_out_loss(model.denoiser, training) < before


def test_recipes_that_train_on_data_demand_it():
    model = tiny_dit()
    recipe = Recipe(name="t", stages=(QAT(),), **W4A8)
    assert recipe.needs_training_data
    assert not Recipe(name="d", stages=(EfficientDM(),), **W4A8).needs_training_data
    assert Recipe(name="d", stages=(EfficientDM(objective="data"),), **W4A8).needs_training_data
    with pytest.raises(TrainingDataRequiredError, match="trains on data"):
        diffquant.quantize(model.denoiser, recipe, calibration=model.calibration(4, progress=False))
    with pytest.raises(RecipeError, match="iterations"):
        stage_from_dict({"type": "qat", "iterations": 0})
    with pytest.raises(RecipeError, match="objective"):
        stage_from_dict({"type": "efficientdm", "objective": "magic"})


def test_progress_callbacks_see_the_model_qat_leaves():
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    kwargs = dict(timestep=torch.tensor([10, 300, 600, 900]), class_labels=torch.tensor([1, 2, 3, 10]),
                  return_dict=False)
    stage = QAT(iterations=6, lr_weight=1e-3, lr_weight_scale=1e-3, lr_act=1e-3, checkpoint_dir="")

    def run(callback=None):
        model = tiny_dit()
        recipe = Recipe(name="t", stages=(stage,), **W4A8)
        with progress_callback(callback, points=3) if callback else contextlib.nullcontext():
            diffquant.quantize(model.denoiser, recipe, calibration=model.calibration(8, progress=False),
                               training=objective(model), progress=False)
        return model.denoiser

    seen = {}

    def look(progress):
        with torch.no_grad():
            seen[progress.done] = progress.model(x, **kwargs)[0]
        torch.randn(100)  # the callback's random draws must not move training's

    denoiser = run(look)
    rtn = tiny_dit()
    diffquant.quantize(rtn.denoiser, Recipe(name="rtn", **W4A8), calibration=rtn.calibration(8, progress=False),
                       progress=False)
    with torch.no_grad():
        final, start = denoiser(x, **kwargs)[0], rtn.denoiser(x, **kwargs)[0]
        plain = run()(x, **kwargs)[0]
    assert sorted(seen) == [0, 2, 4, 6]
    assert torch.equal(seen[6], final) and torch.equal(seen[0], start) and torch.equal(final, plain)
    report = denoiser._diffquant_state.stage_reports[0]
    assert report["training_cpu_seconds"] > 0 and 0 < report["training_seconds"] <= report["seconds"]
