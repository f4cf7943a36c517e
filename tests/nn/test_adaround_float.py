"""Learned rounding on floating-point grids (nn/learnable.py, METHODS.md §9): AdaRound's floor + h(V)
generalised to lo + h(V)·(hi − lo) between the neighbouring representable values of W/s; reduces to
today's AdaRound on integer grids; block reconstruction learns it for fp weights as for int ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import diffquant
from diffquant.algorithms.reconstruction import BlockReconstruction
from diffquant.api import quantized_layers
from diffquant.calib import replay, sampling_step
from diffquant.checkpoint import load_quantized, save_quantized
from diffquant.formats import QuantSpec, get_format
from diffquant.formats.ops import block_view, dequantize, sqnr_db, unblock_view
from diffquant.nn import QLinear, WeightQuantizer
from diffquant.nn.learnable import (
    AdaRoundWeight,
    adaround_supports,
    commit_weight,
    harden,
    install_adaround,
    inverse_rectified_sigmoid,
    rectified_sigmoid,
)
from diffquant.recipes import Recipe
from tests.algorithms.test_reconstruction import grid_position  # W/s (+ z) in block view
from tests.tiny_models import TINY_MODELS, dit_set

pytestmark = pytest.mark.usefixtures("single_thread")

FLOAT_SPECS = {
    "fp4_e2m1-channel": QuantSpec("fp4_e2m1", "channel", scale_dtype="float16"),
    "fp8_e4m3-channel": QuantSpec("fp8_e4m3", "channel", scale_dtype="float16"),
    "nvfp4": QuantSpec.for_format("nvfp4"),
    "mxfp4": QuantSpec.for_format("mxfp4"),
}
INT_SPECS = {
    "int4-channel-symmetric": QuantSpec("int4", "channel", scale_dtype="float16"),
    "uint4-group32-affine": QuantSpec("uint4", "group", 32, symmetric=False),
    "int8-tensor": QuantSpec("int8", "tensor"),
}


def heavy_tailed_weight(seed: int = 0) -> torch.Tensor:
    """[24, 128] Student-t weights (3 degrees of freedom): values in every binade, a few large ones."""
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(24, 128, generator=g)
    chi2 = torch.randn(3, 24, 128, generator=g).pow(2).sum(0)
    return normal / (chi2 / 3).sqrt() * 0.05


def calibrated(spec: QuantSpec, seed: int = 0) -> tuple[WeightQuantizer, torch.Tensor]:
    weight = heavy_tailed_weight(seed)
    quantizer = WeightQuantizer(spec)
    quantizer.calibrate(weight)
    return quantizer, weight


def grid_index(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Index of each x in the ascending grid `values` (every x must be on it)."""
    index = torch.searchsorted(values, x.contiguous())
    assert torch.equal(values[index.clamp(max=values.numel() - 1)], x), "value off the grid"
    return index


# -- the neighbours ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("x", "lo", "hi"), [
    pytest.param(2.5, 2.0, 3.0, id="tie-2.5"),
    pytest.param(5.0, 4.0, 6.0, id="widest-step"),
    pytest.param(0.2, 0.0, 0.5, id="subnormal"),
    pytest.param(-0.2, -0.5, 0.0, id="negative-subnormal"),
    pytest.param(1.5, 1.5, 2.0, id="on-grid"),
    pytest.param(-4.0, -4.0, -3.0, id="negative-on-grid"),
    pytest.param(-6.0, -6.0, -6.0, id="minus-max-saturates"),
    pytest.param(6.0, 6.0, 6.0, id="max-saturates"),
    pytest.param(7.5, 6.0, 6.0, id="above-max"),
    pytest.param(-9.0, -6.0, -6.0, id="below-minus-max"),
])
def test_e2m1_neighbours_by_hand(x, lo, hi):
    got = get_format("fp4_e2m1").neighbours(torch.tensor([x]))
    assert (float(got[0]), float(got[1])) == (lo, hi)


@pytest.mark.parametrize("name", ["fp4_e2m1", "fp6_e3m2", "fp8_e4m3", "fp8_e5m2"])
def test_neighbours_match_a_brute_force_search_of_the_grid(name):
    fmt = get_format(name)
    values = fmt.values
    assert torch.all(values[1:] > values[:-1]) and float(values[-1]) == fmt.qmax
    g = torch.Generator().manual_seed(3)
    # every binade: |x| log-uniform from below the smallest subnormal to past the maximum, both signs
    magnitude = torch.exp(torch.empty(4000).uniform_(
        torch.log(torch.tensor(fmt.min_positive / 4)), torch.log(torch.tensor(fmt.qmax * 1.5)), generator=g))
    x = torch.cat([magnitude * torch.where(torch.rand(4000, generator=g) < 0.5, -1.0, 1.0), values])
    lo, hi = fmt.neighbours(x)
    clamped = x.clamp(fmt.qmin, fmt.qmax)
    below = torch.where(values[None, :] <= clamped[:, None], values, -torch.inf).amax(1)
    above = torch.where(values[None, :] > clamped[:, None], values, torch.inf).amin(1)
    saturated = x.abs() >= fmt.qmax
    assert torch.equal(lo, torch.where(saturated, clamped, below))
    assert torch.equal(hi, torch.where(saturated, clamped, above))


@pytest.mark.parametrize("name", FLOAT_SPECS)
def test_float_neighbours_bracket_w_over_s_adjacent_on_the_grid(name):
    quantizer, weight = calibrated(FLOAT_SPECS[name])
    fmt = quantizer.spec.qformat
    ada = AdaRoundWeight(quantizer, weight)
    scaled, lo, hi = grid_position(quantizer, weight), ada.lo, ada.lo + ada.step
    saturated = scaled.abs() >= fmt.qmax
    assert torch.all(lo <= hi)
    inside = ~saturated
    assert torch.all(lo[inside] <= scaled[inside]) and torch.all(scaled[inside] <= hi[inside])
    assert torch.all(lo[saturated] == scaled[saturated].clamp(fmt.qmin, fmt.qmax))
    assert torch.equal(lo[saturated], hi[saturated])
    # both on the grid, adjacent: no representable value strictly between them
    lo_index, hi_index = grid_index(fmt.values, lo), grid_index(fmt.values, hi)
    assert torch.equal(hi_index[inside], lo_index[inside] + 1)
    assert torch.all(ada.step[inside] > 0)
    assert float(inside.float().mean()) > 0.95
    # the steps are not uniform (a float grid): several distinct widths occur
    assert torch.unique(ada.step[inside] / ada.step[inside].min()).numel() >= 3


# -- initialisation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FLOAT_SPECS)
def test_soft_value_starts_at_w_over_s_and_hard_rounding_is_round_to_nearest(name):
    quantizer, weight = calibrated(FLOAT_SPECS[name])
    spec, fmt = quantizer.spec, quantizer.spec.qformat
    ada = AdaRoundWeight(quantizer, weight)
    scaled = grid_position(quantizer, weight)
    soft = ada.lo + ada.soft_rounding() * ada.step
    inside = scaled.abs() < fmt.qmax
    assert float((soft - scaled)[inside].abs().max().detach()) < 1e-5 * fmt.qmax
    assert torch.equal(soft[~inside].detach(), scaled[~inside].clamp(fmt.qmin, fmt.qmax))
    # the forward pass: the soft weight is the unquantized weight (saturated elements aside)
    forward = block_view(ada(weight).detach(), spec.granularity, spec.group_size)
    assert float((forward - block_view(weight, spec.granularity, spec.group_size)).abs()[inside].max()) \
        < 1e-5 * float(quantizer.scale.max()) * fmt.qmax
    # h thresholded at 1/2: round to nearest, but for (near-)ties
    fraction = torch.where(ada.step > 0, (scaled - ada.lo) / ada.step, torch.zeros_like(scaled))
    not_tie = (fraction - 0.5).abs() > 1e-4
    hard = spec.grain.view(fmt.decode(ada.hard_codes()), spec.group_size)
    nearest = spec.grain.view(fmt.decode(quantizer.codes(weight)), spec.group_size)
    assert torch.equal(hard[not_tie], nearest[not_tie])  # -0 and +0 compare equal
    assert float(not_tie.float().mean()) > 0.99


def old_adaround(quantizer: WeightQuantizer, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """AdaRound on an integer grid as it was before the generalisation: V from W/s − floor(W/s),
    codes clamp(floor + h + z, qmin, qmax)."""
    spec, fmt = quantizer.spec, quantizer.spec.qformat
    scaled = block_view(weight.float(), spec.granularity, spec.group_size) / quantizer.scale
    floor = torch.floor(scaled)
    v = inverse_rectified_sigmoid((scaled - floor).clamp(0.0, 1.0))

    def weight_of(rounding: torch.Tensor) -> torch.Tensor:
        codes = floor + rounding
        if quantizer.zero_point is not None:
            codes = codes + quantizer.zero_point
        return unblock_view(dequantize(codes.clamp(fmt.qmin, fmt.qmax), quantizer.scale, quantizer.zero_point),
                            weight.shape, spec.granularity)

    return {"floor": floor, "v": v, "weight_of": weight_of}


@pytest.mark.parametrize("name", INT_SPECS)
def test_integer_grids_reduce_bitwise_to_adaround(name):
    quantizer, weight = calibrated(INT_SPECS[name])
    old = old_adaround(quantizer, weight)
    ada = AdaRoundWeight(quantizer, weight)
    assert torch.equal(ada.lo, old["floor"]) and torch.equal(ada.step, torch.ones_like(ada.step))
    assert torch.equal(ada.v.detach(), old["v"])
    with torch.no_grad():  # trained-looking V: both directions, many h strictly inside (0, 1)
        ada.v.copy_(torch.randn(ada.v.shape, generator=torch.Generator().manual_seed(1)) * 3)
    v_old = ada.v.detach().clone().requires_grad_(True)
    soft_new, soft_old = ada(weight), old["weight_of"](rectified_sigmoid(v_old))
    assert torch.equal(soft_new, soft_old)
    soft_new.pow(2).sum().backward()
    soft_old.pow(2).sum().backward()
    assert torch.equal(ada.v.grad, v_old.grad)
    hard_old = old["weight_of"]((v_old >= 0).float()).detach()
    assert torch.equal(quantizer.decode(ada.hard_codes()), hard_old)


def test_only_grids_with_neighbours_are_learned():
    assert all(adaround_supports(spec) for spec in (*FLOAT_SPECS.values(), *INT_SPECS.values()))


# -- hardening and committing -----------------------------------------------------------------------


@pytest.mark.parametrize("name", FLOAT_SPECS)
def test_hardened_float_codes_are_lo_or_hi_and_commit_as_rtn_codes(name):
    spec = FLOAT_SPECS[name]
    layer = QLinear(nn.Linear(128, 24), spec, None)
    with torch.no_grad():
        layer.weight.copy_(heavy_tailed_weight())
    layer.calibrate_weight()
    scale, original = layer.weight_quantizer.scale.clone(), layer.weight.detach().clone()
    ada = install_adaround(layer)
    with torch.no_grad():
        ada.v.copy_(torch.randn(ada.v.shape, generator=torch.Generator().manual_seed(1)) * 3)
    hardened = ada.hard_codes()
    values = spec.grain.view(spec.qformat.decode(hardened), spec.group_size)
    lo, hi = ada.lo, ada.lo + ada.step
    assert torch.equal(values, torch.where(ada.v >= 0, hi, lo))  # exactly lo or hi: a code of the format
    up = (values == hi) & (ada.step > 0)
    assert 0.2 < float(up.float().mean()) < 0.8  # both directions occur: not round-to-nearest
    rtn = layer.weight_quantizer.base.codes(original)
    assert not torch.equal(spec.qformat.decode(hardened), spec.qformat.decode(rtn))
    harden(layer)
    commit_weight(layer)
    wq = layer.weight_quantizer
    assert type(wq) is WeightQuantizer and torch.equal(wq.scale, scale)
    codes = wq.codes(layer.weight)
    assert torch.equal(spec.qformat.decode(codes), spec.qformat.decode(hardened))
    assert torch.equal(wq.decode(codes), layer.weight.detach())  # the weight is its codes' value
    assert torch.equal(wq(layer.weight), layer.weight)


# -- block reconstruction of the tiny DiT -------------------------------------------------------------

DIT = TINY_MODELS["dit"]
INPUT8 = QuantSpec("int8", "tensor", symmetric=False, per_step=True, scale_dtype="float16")
WEIGHTS = {
    "fp4_e2m1": QuantSpec("fp4_e2m1", "channel", scale_dtype="float16"),
    "nvfp4": QuantSpec.for_format("nvfp4"),
    "mxfp4": QuantSpec.for_format("mxfp4"),
    "int4": QuantSpec("int4", "channel", scale_dtype="float16"),
}
# learned rounding alone (no step sizes), the same settings for every weight format
LEARNED = BlockReconstruction(iterations=50, batch_size=32, lr_weight=1e-2, lsq=False)


CALIBRATION = dit_set(32, 2, seed=1)
HELD_OUT = dit_set(16, 2, seed=2)


def held_out(model: nn.Module) -> torch.Tensor:
    out = []
    for step, kwargs in HELD_OUT.batches(16):
        with torch.no_grad(), sampling_step(step):
            out.append(model(**kwargs)[0])
    return torch.cat(out)


def quantized_dit(weight: QuantSpec, *stages: BlockReconstruction) -> nn.Module:
    recipe = Recipe(name="test", weight=weight, input=INPUT8, stages=stages)
    return diffquant.quantize(DIT.build(), recipe, calibration=replay(CALIBRATION, 32), progress=False)


@pytest.fixture(scope="module")
def fp_dit():
    return DIT.build()


@pytest.fixture(scope="module")
def runs(fp_dit):
    """weight format -> (RTN model, learned-rounding model, SQNR of each vs FP in dB)."""
    reference = held_out(fp_dit)
    result = {}
    for name, spec in WEIGHTS.items():
        rtn, learned = quantized_dit(spec), quantized_dit(spec, LEARNED)
        result[name] = (rtn, learned, sqnr_db(reference, held_out(rtn)), sqnr_db(reference, held_out(learned)))
    return result


@pytest.mark.parametrize("name", ["fp4_e2m1", "nvfp4", "mxfp4"])
def test_learned_fp4_weights_are_codes_next_to_w_over_s(name, fp_dit, runs):
    rtn, learned = runs[name][:2]
    fmt, rtn_layers, moved = WEIGHTS[name].qformat, quantized_layers(rtn), 0
    for path, layer in quantized_layers(learned).items():
        wq = layer.weight_quantizer
        assert type(wq) is WeightQuantizer
        rtn_wq = rtn_layers[path].weight_quantizer
        assert torch.equal(wq.scale, rtn_wq.scale)  # block (and global) scales as calibrated
        if wq.global_scale is not None:
            assert torch.equal(wq.global_scale, rtn_wq.global_scale)
        weight2d = layer.weight_matrix(layer.weight.detach())
        codes = wq.codes(weight2d)
        assert torch.equal(wq.decode(codes), weight2d)  # representable: decodes back exactly
        original = layer.weight_matrix(fp_dit.get_submodule(path).weight.detach())
        lo, hi = fmt.neighbours(grid_position(wq, original))
        value = wq.spec.grain.view(fmt.decode(codes), wq.spec.group_size)
        assert torch.all((value == lo) | (value == hi)), path
        rtn_codes = rtn_wq.codes(rtn_layers[path].weight_matrix(rtn_layers[path].weight.detach()))
        moved += int((fmt.decode(codes) != fmt.decode(rtn_codes)).sum())
    assert moved > 0


def test_learned_rounding_beats_nearest_for_fp4_and_int4_at_equal_effort(runs):
    sqnr = {name: (round(r[2], 2), round(r[3], 2)) for name, r in runs.items()}  # (nearest, learned)
    print("SQNR vs FP, dB (nearest, learned):", sqnr)
    for name, (nearest, learned) in sqnr.items():
        assert learned > nearest + 0.5, (name, sqnr)  # measured: +1.5 (nvfp4) to +5 dB (mxfp4)


@pytest.mark.parametrize("name", ["fp4_e2m1", "nvfp4", "mxfp4"])
def test_learned_fp4_model_saves_and_reloads_bitwise(name, runs, tmp_path):
    learned = runs[name][1]
    loaded = load_quantized(save_quantized(learned, tmp_path / "q"))
    assert torch.equal(held_out(loaded), held_out(learned))
