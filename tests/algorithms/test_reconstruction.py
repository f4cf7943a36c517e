"""Block reconstruction (BRECQ / Q-Diffusion, EDA-DM's fine-grained loss): AdaRound starts at the
weight and hardens onto floor / ceil, the regulariser binarises, LSQ has LSQ's gradient; on a tiny DiT
reconstruction beats round-to-nearest on held-out data, eta > 0 lowers the inner layers' error, and
the result is an ordinary RTN-format model (scales kept, learned step sizes written back) that
saves, reloads bitwise and freezes; a tiny UNet runs through the stage block by block."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import yaml
from torch import nn

import diffquant
from diffquant.algorithms.block_data import DenoiserCall, Rows, execution_order, find_blocks, group_records
from diffquant.algorithms.reconstruction import BlockReconstruction, Reconstructor
from diffquant.api import CalibrationRequiredError, gather_stats, quantized_layers
from diffquant.calib import replay, sampling_step
from diffquant.checkpoint import load_quantized, save_quantized
from diffquant.formats import QuantSpec
from diffquant.formats.ops import block_view, sqnr_db, unblock_view
from diffquant.freeze import freeze
from diffquant.nn import ActivationQuantizer, QLinear, WeightQuantizer
from diffquant.nn.attention import AttentionQuantConfig, attention_quantizers
from diffquant.nn.learnable import (
    AdaRoundWeight,
    LSQActivation,
    commit_weight,
    harden,
    install_adaround,
    rectified_sigmoid,
)
from diffquant.plan import plan_layers
from diffquant.recipes import Recipe, RecipeError, get_preset
from diffquant.recipes.config import stage_from_dict
from tests.tiny_models import TINY_MODELS, dit_set

pytestmark = pytest.mark.usefixtures("single_thread")

DIT = TINY_MODELS["dit"]
BLOCKS = ("transformer_blocks.0", "transformer_blocks.1")
INNER = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj")  # all but ff.net.2
W4A8_STATIC = dict(weight=QuantSpec("int4", "channel", scale_dtype="float16"),
                   input=QuantSpec("int8", "tensor", symmetric=False, per_step=True, scale_dtype="float16"))
FAST = dict(iterations=30, batch_size=32, lr_weight=1e-2, lr_act=1e-4)


def recipe(*stages: BlockReconstruction, **specs) -> Recipe:
    return Recipe(name="test", stages=stages, **(specs or W4A8_STATIC))


# -- AdaRound and LSQ on their own -----------------------------------------------------------------

SPECS = {
    "int4-channel-symmetric": QuantSpec("int4", "channel", scale_dtype="float16"),
    "uint4-group32-affine": QuantSpec("uint4", "group", 32, symmetric=False),
    "int8-tensor": QuantSpec("int8", "tensor"),
}


def calibrated(spec: QuantSpec, seed: int = 0) -> tuple[WeightQuantizer, torch.Tensor]:
    weight = torch.randn(24, 80, generator=torch.Generator().manual_seed(seed)) * 0.05
    quantizer = WeightQuantizer(spec)
    quantizer.calibrate(weight)
    return quantizer, weight


def grid_position(quantizer: WeightQuantizer, weight: torch.Tensor) -> torch.Tensor:
    """W/s + z in the quantizer's block view: where the weight sits on the code grid."""
    spec = quantizer.spec
    zero = 0 if quantizer.zero_point is None else quantizer.zero_point
    return block_view(weight, spec.granularity, spec.group_size) / quantizer.scale + zero


@pytest.mark.parametrize("name", SPECS)
def test_adaround_starts_at_the_unquantized_weight(name):
    quantizer, weight = calibrated(SPECS[name])
    ada = AdaRoundWeight(quantizer, weight)
    fmt = quantizer.spec.qformat
    position = grid_position(quantizer, weight)
    inside = (torch.floor(position) >= fmt.qmin) & (torch.floor(position) + 1 <= fmt.qmax)
    assert inside.float().mean() > 0.95
    soft = block_view(ada(weight), quantizer.spec.granularity, quantizer.spec.group_size)
    expected = block_view(weight, quantizer.spec.granularity, quantizer.spec.group_size)
    err = (soft - expected).abs() / quantizer.scale  # in grid steps
    assert float(err[inside].detach().max()) < 1e-5
    assert not torch.equal(soft, block_view(quantizer(weight), quantizer.spec.granularity, quantizer.spec.group_size))


@pytest.mark.parametrize("name", SPECS)
def test_hardened_codes_are_floor_or_ceil_and_commit_as_rtn_codes(name):
    spec = SPECS[name]
    layer = QLinear(nn.Linear(80, 24), spec, None)
    with torch.no_grad():
        layer.weight.copy_(calibrated(spec)[1])
    layer.calibrate_weight()
    scale, original = layer.weight_quantizer.scale.clone(), layer.weight.detach().clone()
    ada = install_adaround(layer)
    with torch.no_grad():
        ada.v.copy_(torch.randn(ada.v.shape, generator=torch.Generator().manual_seed(1)) * 3)
    position = grid_position(ada.base, original)
    fmt = spec.qformat
    rounded_up = torch.where(ada.v >= 0, torch.floor(position) + 1, torch.floor(position)).clamp(fmt.qmin, fmt.qmax)
    floor, ceil, rounded_up = (unblock_view(p, original.shape, spec.granularity) for p in (
        torch.floor(position).clamp(fmt.qmin, fmt.qmax), torch.ceil(position).clamp(fmt.qmin, fmt.qmax), rounded_up))
    codes = ada.hard_codes().float()
    assert torch.all((codes == floor) | (codes == ceil))
    assert torch.equal(codes, rounded_up)
    up = (codes == ceil) & (ceil != floor)
    assert 0.2 < float(up.float().mean()) < 0.8  # both directions occur: not round-to-nearest
    hardened = ada.hard_codes()
    harden(layer)
    commit_weight(layer)
    assert type(layer.weight_quantizer) is WeightQuantizer and torch.equal(layer.weight_quantizer.scale, scale)
    assert torch.equal(layer.weight_quantizer.codes(layer.weight), hardened)


@pytest.mark.parametrize("spec", [SPECS["int4-channel-symmetric"], QuantSpec("fp4_e2m1", "channel", scale_dtype="float16")],
                         ids=["int4", "fp4_e2m1"])
def test_rounding_regulariser_alone_drives_every_h_to_zero_or_one(spec):
    quantizer, weight = calibrated(spec)
    ada = AdaRoundWeight(quantizer, weight)
    assert float(((ada.soft_rounding() > 0) & (ada.soft_rounding() < 1)).float().mean()) > 0.9
    config = BlockReconstruction(iterations=100, warmup=0.0)
    opt = torch.optim.Adam([ada.v], lr=0.2)
    for i in range(config.iterations):
        opt.zero_grad()
        ada.regularizer(config.beta_at(i)).backward()
        opt.step()
    h = ada.soft_rounding()
    assert torch.all((h == 0) | (h == 1))
    assert float(ada.regularizer(2.0).detach()) == 0.0


def test_beta_is_off_in_warmup_then_anneals_from_start_to_end():
    config = BlockReconstruction(iterations=100, warmup=0.2, beta_start=20.0, beta_end=2.0)
    assert [config.beta_at(i) for i in (0, 19)] == [None, None]
    betas = [config.beta_at(i) for i in range(20, 101)]
    assert betas[0] == 20.0 and betas[-1] == 2.0
    assert all(a > b for a, b in zip(betas, betas[1:], strict=False))


def test_lsq_step_size_gradient_is_lsqs():
    spec = QuantSpec("int8", "tensor")
    base = ActivationQuantizer(spec)
    base.scale = torch.tensor([0.02])
    lsq = LSQActivation(base)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    x[0, :4] = 5.0  # clipped at qmax
    upstream = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    (lsq(x) * upstream).sum().backward()
    s, q = 0.02, spec.qformat
    v = x / s
    r = torch.round(v)
    local = torch.where(r > q.qmax, torch.tensor(q.qmax), torch.where(r < q.qmin, torch.tensor(q.qmin), r - v))
    expected = float((local * upstream).sum()) / math.sqrt(x.numel() * q.qmax)
    assert float(lsq.scale.grad) == pytest.approx(expected, rel=1e-4)
    assert torch.allclose(lsq(x).detach(), base(x), rtol=0, atol=1e-6)  # the forward it replaces


def test_a_learned_step_stays_above_its_floor_and_writes_back_finite():
    """Adam's absolute steps can carry a small step size through 0 (a time-embedding channel's, per
    channel); the step in force stays at >= 2^-10 of its calibrated value, its gradient finite."""
    base = ActivationQuantizer(QuantSpec("int4", "channel", symmetric=False))
    base.scale, base.zero_point = torch.tensor([1e-4, 0.05]), torch.tensor([-8.0, -8.0])
    lsq = LSQActivation(base)
    with torch.no_grad():
        lsq.scale.copy_(torch.tensor([-3e-4, 0.05]))  # where one Adam step of lr 4e-4 can leave it
    x = torch.tensor([[2e-4, 0.1], [2e-4, -0.2]], requires_grad=True)
    out = lsq(x)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all() and torch.isfinite(lsq.scale.grad).all()
    lsq.write_back()
    assert base.scale[0] == pytest.approx(1e-4 * 2**-10, rel=1e-3) and base.scale[1] == pytest.approx(0.05)


# -- caching, batches and blocks -------------------------------------------------------------------


def test_rows_merge_batched_tensors_and_keep_shared_values():
    calls = [((torch.full((2, 3), float(i)),), {"t": torch.tensor([i, i]), "rope": torch.ones(5), "flag": True})
             for i in range(3)]
    rows = Rows.merge(calls)
    assert rows.count == 6 and rows.batched == [True, True, False, False]
    args, kwargs = rows.build(rows.take(torch.tensor([5, 0])))
    assert torch.equal(args[0][:, 0], torch.tensor([2.0, 0.0])) and torch.equal(kwargs["t"], torch.tensor([2, 0]))
    assert kwargs["flag"] is True and torch.equal(kwargs["rope"], torch.ones(5))
    calls[1][1]["rope"] = torch.zeros(5)
    with pytest.raises(ValueError, match="without a batch axis changed"):
        Rows.merge(calls)


@pytest.mark.parametrize("per_step", [True, False], ids=["per-step", "shared"])
def test_batches_stay_within_one_sampling_step_when_ranges_are_per_step(per_step):
    records = [(step, ((torch.full((2, 4), float(step)),), {}), torch.full((2, 4), float(step)))
               for step in (0, 1, 0, 2)]
    groups = group_records(records, records, per_step)
    if per_step:
        assert [g.step for g in groups] == [0, 1, 2] and [g.fp_in.count for g in groups] == [4, 2, 2]
        for group in groups:
            assert torch.all(group.fp_in.leaves[0] == group.step)
    else:
        assert [(g.step, g.fp_in.count) for g in groups] == [(None, 8)]


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_qdrop_takes_each_input_element_from_full_precision_with_probability_p(p):
    fp = [(0, ((torch.zeros(64, 32),), {"t": torch.arange(64)}), torch.zeros(64, 32))]
    quantized = [(0, ((torch.ones(64, 32),), {"t": torch.arange(64)}), None)]
    (group,) = group_records(fp, quantized, per_step=False)
    rec = Reconstructor(BlockReconstruction(qdrop_p=p, batch_size=64), nn.Linear(1, 1), {})
    (mixed, kwargs), (reference, _) = rec.mixed_inputs(group, torch.arange(64))
    assert torch.equal(reference[0], torch.zeros(64, 32)) and torch.equal(kwargs["t"], torch.arange(64))
    from_fp = float((mixed[0] == 0).float().mean())
    assert from_fp == pytest.approx(p, abs=0.03)


def test_unet_blocks_are_resnets_attentions_and_lone_samplers_in_run_order():
    model = TINY_MODELS["unet2d"].build()
    blocks = find_blocks(list(plan_layers(model, get_preset("w8a8-static"))))
    assert blocks["down_blocks.0.downsamplers.0.conv"] == ["down_blocks.0.downsamplers.0.conv"]
    assert blocks["mid_block.attentions.0"] == [f"mid_block.attentions.0.{p}" for p in
                                                ("to_q", "to_k", "to_v", "to_out.0")]
    call = DenoiserCall(None, (), TINY_MODELS["unet2d"].inputs(1))
    order = execution_order(model, list(blocks), call, torch.device("cpu"))
    assert order[:3] == ["down_blocks.0.resnets.0", "down_blocks.0.downsamplers.0.conv", "down_blocks.1.resnets.0"]
    assert order.index("mid_block.resnets.1") < order.index("up_blocks.0.resnets.0")
    assert sorted(order) == sorted(blocks) and len(order) == 14


# -- the tiny DiT ----------------------------------------------------------------------------------


CALIBRATION = dit_set(32, 2, seed=1)
HELD_OUT = dit_set(16, 2, seed=2)


def quantized_dit(*stages: BlockReconstruction) -> nn.Module:
    return diffquant.quantize(DIT.build(), recipe(*stages), calibration=replay(CALIBRATION, 32), progress=False)


@pytest.fixture(scope="module")
def fp_dit():
    return DIT.build()


@pytest.fixture(scope="module")
def rtn_dit():
    return quantized_dit()


@pytest.fixture(scope="module")
def brecq_dit():
    return quantized_dit(BlockReconstruction(eta=0.0, **FAST))


@pytest.fixture(scope="module")
def edadm_dit():
    return quantized_dit(BlockReconstruction(eta=0.8, **FAST))


def outputs(model: nn.Module, names: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Held-out outputs of the model ("out") and of the named modules, over every batch."""
    caught = {n: [] for n in names}
    handles = [model.get_submodule(n).register_forward_hook(lambda _m, _a, o, n=n: caught[n].append(o))
               for n in names]
    out = []
    try:
        for step, kwargs in HELD_OUT.batches(16):
            with torch.no_grad(), sampling_step(step):
                out.append(model(**kwargs)[0])
    finally:
        for handle in handles:
            handle.remove()
    return {"out": torch.cat(out), **{n: torch.cat(v) for n, v in caught.items()}}


def errors(fp: nn.Module, model: nn.Module, names: tuple[str, ...] = ()) -> dict[str, float]:
    ref, got = outputs(fp, names), outputs(model, names)
    return {k: float((ref[k] - got[k]).pow(2).mean()) for k in ref}


def test_reconstruction_beats_rtn_on_every_block_and_the_output(fp_dit, rtn_dit, brecq_dit):
    rtn, rec = errors(fp_dit, rtn_dit, BLOCKS), errors(fp_dit, brecq_dit, BLOCKS)
    for name in BLOCKS:
        assert rec[name] < rtn[name], name
    assert rec["out"] < 0.8 * rtn["out"]


def test_eta_lowers_the_inner_layers_error(fp_dit, rtn_dit, brecq_dit, edadm_dit):
    names = tuple(f"{b}.{layer}" for b in BLOCKS for layer in INNER)
    rtn, brecq, edadm = (errors(fp_dit, m, names) for m in (rtn_dit, brecq_dit, edadm_dit))
    for block in BLOCKS:
        inner = [n for n in names if n.startswith(block)]
        total = {k: sum(e[n] for n in inner) for k, e in (("rtn", rtn), ("brecq", brecq), ("edadm", edadm))}
        assert total["edadm"] < total["rtn"] and total["edadm"] < total["brecq"], (block, total)
    assert edadm["out"] < rtn["out"]


def test_weights_end_as_rtn_codes_on_floor_or_ceil_with_the_rtn_scales(fp_dit, rtn_dit, brecq_dit):
    rtn_layers, moved = quantized_layers(rtn_dit), 0
    for name, layer in quantized_layers(brecq_dit).items():
        wq = layer.weight_quantizer
        assert type(wq) is WeightQuantizer and type(layer.input_quantizer) is ActivationQuantizer
        assert torch.equal(wq.scale, rtn_layers[name].weight_quantizer.scale)
        position = fp_dit.get_submodule(name).weight.detach() / wq.scale
        codes = wq.codes(layer.weight).float()
        assert torch.all((codes == torch.floor(position).clamp(-8, 7)) | (codes == torch.ceil(position).clamp(-8, 7)))
        moved += int((codes != rtn_layers[name].weight_quantizer.codes(rtn_layers[name].weight)).sum())
    assert moved > 0


def test_learned_input_step_sizes_are_written_back_and_used(rtn_dit, brecq_dit):
    rtn_layers = quantized_layers(rtn_dit)
    reverted, moved = copy.deepcopy(brecq_dit), []
    for name, layer in quantized_layers(brecq_dit).items():
        learned, calibrated_scale = layer.input_quantizer.scale, rtn_layers[name].input_quantizer.scale
        assert learned.shape == calibrated_scale.shape == (2, 1)  # one step size per sampling step
        assert torch.equal(learned.half().float(), learned)  # rounded to the spec's float16 scales
        moved.append(learned != calibrated_scale)
        reverted.get_submodule(name).input_quantizer.scale.copy_(calibrated_scale)
    moved = torch.stack(moved)
    assert moved.any(dim=1).all() and float(moved.float().mean()) > 0.75  # (a move under one float16 step rounds away)
    assert not torch.equal(outputs(reverted)["out"], outputs(brecq_dit)["out"])


def test_reconstructed_model_saves_reloads_bitwise_and_freezes(brecq_dit, tmp_path):
    expected = outputs(brecq_dit)["out"]
    loaded = load_quantized(save_quantized(brecq_dit, tmp_path / "q"))
    assert torch.equal(outputs(loaded)["out"], expected)
    frozen = outputs(freeze(loaded, float_dtype=torch.float32))["out"]
    assert sqnr_db(expected, frozen) > 40


def interrupt_the_second_block(monkeypatch) -> None:
    """Make reconstruction raise RuntimeError("interrupted") when it starts its second block."""
    real_train, calls = Reconstructor.train, []

    def train_then_fail(self, name, *args):
        calls.append(name)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return real_train(self, name, *args)

    monkeypatch.setattr(Reconstructor, "train", train_then_fail)


def test_failure_leaves_the_model_at_round_to_nearest(monkeypatch, fp_dit, rtn_dit):
    interrupt_the_second_block(monkeypatch)
    model = DIT.build()
    with pytest.raises(RuntimeError, match="interrupted"):
        diffquant.quantize(model, recipe(BlockReconstruction(eta=0.0, **FAST)), calibration=replay(CALIBRATION, 32),
                           progress=False)
    rtn_layers = quantized_layers(rtn_dit)
    for name, layer in quantized_layers(model).items():
        assert type(layer.weight_quantizer) is WeightQuantizer and type(layer.input_quantizer) is ActivationQuantizer
        assert torch.equal(layer.weight, fp_dit.get_submodule(name).weight)
        assert torch.equal(layer.input_quantizer.scale, rtn_layers[name].input_quantizer.scale)


def test_stage_needs_a_calibration_function_to_replay():
    model = DIT.build()
    stats = gather_stats(model, plan_layers(model, recipe()), replay(CALIBRATION, 32))
    with pytest.raises(CalibrationRequiredError, match="replays the calibration data"):
        diffquant.quantize(model, recipe(BlockReconstruction(**FAST)), calibration=stats, progress=False)


# -- attention operands (EDA-DM learns the Q/K/V and softmax step sizes too) ----------------------

OPERAND4 = QuantSpec("int4", "tensor", symmetric=False)
ATTENTION4 = AttentionQuantConfig(query=OPERAND4, key=OPERAND4, value=OPERAND4, probs=QuantSpec("uint4", "tensor"))
# Weights RTN (adaround off) and no input quantizers: the operand step sizes are all that is learned.
OPERANDS_ONLY = dict(iterations=30, batch_size=32, adaround=False, lr_act=1e-2)


def attention_dit(*stages: BlockReconstruction, attention: AttentionQuantConfig = ATTENTION4) -> nn.Module:
    r = Recipe(name="attention", weight=QuantSpec("int8", "channel", scale_dtype="float16"), attention=attention,
               stages=stages)
    return diffquant.quantize(DIT.build(), r, calibration=replay(CALIBRATION, 32), progress=False)


def operand_scales(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.{op}": q.scale for name, quantizers in attention_quantizers(model).items()
            for op, q in quantizers.quantizers().items()}


@pytest.fixture(scope="module")
def rtn_attention_dit():
    return attention_dit()


@pytest.fixture(scope="module")
def reconstructed_attention_dit():
    return attention_dit(BlockReconstruction(**OPERANDS_ONLY))


def test_attention_operand_step_sizes_are_learned_and_lower_the_block_error(
        fp_dit, rtn_attention_dit, reconstructed_attention_dit):
    rtn, learned = operand_scales(rtn_attention_dit), operand_scales(reconstructed_attention_dit)
    assert len(learned) == 8  # q, k, v, probs of both blocks' attention
    for key, scale in learned.items():
        assert scale.shape == rtn[key].shape == (1,) and not torch.equal(scale, rtn[key]), key
    assert all(type(q) is ActivationQuantizer for quantizers in attention_quantizers(reconstructed_attention_dit).values()
               for q in quantizers.quantizers().values())  # written back, LSQ removed
    before, after = errors(fp_dit, rtn_attention_dit, BLOCKS), errors(fp_dit, reconstructed_attention_dit, BLOCKS)
    for name in (*BLOCKS, "out"):  # held-out data
        assert after[name] < 0.8 * before[name], (name, before[name], after[name])


def test_reconstructed_attention_saves_and_reloads_bitwise(reconstructed_attention_dit, tmp_path):
    expected = outputs(reconstructed_attention_dit)["out"]
    loaded = load_quantized(save_quantized(reconstructed_attention_dit, tmp_path / "q"))
    assert all(torch.equal(a, b) for a, b in zip(operand_scales(loaded).values(),
                                                 operand_scales(reconstructed_attention_dit).values(), strict=True))
    assert torch.equal(outputs(loaded)["out"], expected)


def test_per_step_operands_learn_each_steps_step_size(rtn_attention_dit):
    per_step = AttentionQuantConfig(**{op: dataclasses.replace(spec, per_step=True)
                                       for op, spec in ATTENTION4.specs().items()})
    rtn = attention_dit(attention=per_step)
    learned = attention_dit(BlockReconstruction(**{**OPERANDS_ONLY, "lr_act": 1e-3}), attention=per_step)
    for key, scale in operand_scales(learned).items():
        assert scale.shape == (2, 1)  # batches stay within a step: each step's row is trained
        assert (scale != operand_scales(rtn)[key]).all(), key


def test_failure_restores_the_attention_operands(monkeypatch, rtn_attention_dit):
    interrupt_the_second_block(monkeypatch)
    model = DIT.build()
    r = Recipe(name="attention", weight=QuantSpec("int8", "channel", scale_dtype="float16"), attention=ATTENTION4,
               stages=(BlockReconstruction(**OPERANDS_ONLY),))
    with pytest.raises(RuntimeError, match="interrupted"):
        diffquant.quantize(model, r, calibration=replay(CALIBRATION, 32), progress=False)
    rtn = operand_scales(rtn_attention_dit)
    for name, quantizers in attention_quantizers(model).items():
        for op, quantizer in quantizers.quantizers().items():
            assert type(quantizer) is ActivationQuantizer
            assert torch.equal(quantizer.scale, rtn[f"{name}.{op}"])


# -- the tiny UNet ---------------------------------------------------------------------------------


# fp8: learned rounding on a float grid; min SQNR: RTN measures 30.5 dB (int8), 22.5 dB (fp8_e4m3)
@pytest.mark.parametrize(("weight_format", "min_sqnr"), [("int8", 25), ("fp8_e4m3", 20)])
def test_unet_runs_through_the_stage(weight_format, min_sqnr):
    tiny = TINY_MODELS["unet2d"]
    specs = dict(weight=QuantSpec(weight_format, "channel", scale_dtype="float16"),
                 input=QuantSpec("int8", "tensor", symmetric=False))

    def calibrate(model):
        for seed in range(2):
            g = torch.Generator().manual_seed(seed)
            model(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 1000, (8,), generator=g).float())

    fp = tiny.build()
    model = diffquant.quantize(tiny.build(), recipe(BlockReconstruction(iterations=3, batch_size=8), **specs),
                               calibration=calibrate, progress=False)
    rtn = diffquant.quantize(tiny.build(), recipe(**specs), calibration=calibrate, progress=False)
    changed = 0
    for name, layer in quantized_layers(model).items():
        assert type(layer.weight_quantizer) is WeightQuantizer and type(layer.input_quantizer) is ActivationQuantizer
        rtn_layer = quantized_layers(rtn)[name]
        changed += not torch.equal(layer.weight, rtn_layer.effective_weight())
        changed += not torch.equal(layer.input_quantizer.scale, rtn_layer.input_quantizer.scale)
    assert changed >= len(quantized_layers(model))  # every block learned something (samplers included)
    inputs = tiny.inputs(4)
    with torch.no_grad():
        assert sqnr_db(tiny.run(fp, inputs), tiny.run(model, inputs)) > min_sqnr


# -- config and presets ----------------------------------------------------------------------------


def test_stage_config_round_trips_through_a_recipe():
    r = recipe(BlockReconstruction(iterations=7, eta=0.5, qdrop_p=0.25, lsq=False, seed=3))
    assert Recipe.from_dict(yaml.safe_load(r.to_yaml())) == r


@pytest.mark.parametrize("bad", [
    {"iterations": 0}, {"batch_size": True}, {"eta": -0.1}, {"qdrop_p": 1.5}, {"warmup": 1.0},
    {"beta_start": 2.0, "beta_end": 20.0}, {"lr_weight": 0}, {"adaround": False, "lsq": False}, {"seed": -1},
], ids=lambda d: ",".join(d))
def test_invalid_stage_configs_are_rejected(bad):
    with pytest.raises(RecipeError):
        stage_from_dict({"type": "block_reconstruction", **bad})


@pytest.mark.parametrize("name,bits,eta,qdrop_p,selection", [
    ("qdiffusion-w8a8", 8, 0.0, 0.0, "uniform"), ("qdiffusion-w4a8", 4, 0.0, 0.0, "uniform"),
    ("edadm-w8a8", 8, 0.8, 0.5, "TDAC"), ("edadm-w4a8", 4, 0.8, 0.5, "TDAC"),
])
def test_presets(name, bits, eta, qdrop_p, selection):
    preset = get_preset(name)
    chooser, stage = preset.stages
    assert chooser.type == "calibration_selection" and chooser.method == selection.lower()
    assert preset.label == f"W{bits}A8" and not preset.input.dynamic and preset.needs_calibration
    assert isinstance(stage, BlockReconstruction) and (stage.eta, stage.qdrop_p) == (eta, qdrop_p)
    assert stage.iterations == 1000 and stage.batch_size == 32


def test_rectified_sigmoid_reaches_both_ends():
    h = rectified_sigmoid(torch.tensor([-10.0, 0.0, 10.0]))
    assert h.tolist() == [0.0, pytest.approx(0.5), 1.0]
