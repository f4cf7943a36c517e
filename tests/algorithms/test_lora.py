"""LoRA on quantized models: concatenated onto SVDQuant's low-rank branch (down factor times the smoothing
λ), a side branch elsewhere; exact detach, run-time strength, diffusers/PEFT key handling."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import diffquant
import diffquant.lora as lora
from diffquant.algorithms.svdquant import SVDQuant
from diffquant.api import quantized_layers
from diffquant.formats.ops import sqnr_db
from diffquant.freeze import freeze, packed_layers
from diffquant.recipes import get_preset
from tests.layer_outputs import layer_io, worst_layer_rel
from tests.tiny_models import TINY_MODELS, run_dit_at_step0

pytestmark = pytest.mark.usefixtures("single_thread")

DIT = TINY_MODELS["dit"]
TARGETS = [f"transformer_blocks.{b}.{p}" for b in (0, 1)
           for p in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")]
RANK = 4


dit_calibration = dit_output = run_dit_at_step0


def cheap_svdquant():
    preset = get_preset("svdquant-w4a4")
    return dataclasses.replace(preset, stages=(SVDQuant(rank=16, grid_step=0.25, iterations=3, sample_rows=64),))


@pytest.fixture(scope="module")
def fp_dit():
    return DIT.build().eval()


@pytest.fixture(scope="module")
def svd_dit():
    return diffquant.quantize(DIT.build(), cheap_svdquant(), calibration=dit_calibration, progress=False)


@pytest.fixture(scope="module")
def w8a8_dit():
    return diffquant.quantize(DIT.build(), "smoothquant-w8a8", calibration=dit_calibration, progress=False)


def make_lora(model: nn.Module, prefix: str = "transformer.", strength: float = 0.3, seed: int = 0,
              naming: tuple[str, str] = ("lora_A", "lora_B")) -> dict[str, torch.Tensor]:
    """A random LoRA whose update B·A·alpha/r is `strength` times each weight's norm; alpha = r/2 on
    the attention layers, none (alpha/r = 1) on the MLP."""
    g = torch.Generator().manual_seed(seed)
    fp = dict(DIT.build().named_modules())
    state = {}
    for path in TARGETS:
        weight = fp[path].weight
        a = torch.randn(RANK, weight.shape[1], generator=g)
        b = torch.randn(weight.shape[0], RANK, generator=g)
        factor = 0.5 if "attn1" in path else 1.0
        b *= strength * weight.norm() / ((b @ a).norm() * factor)
        state[f"{prefix}{path}.{naming[0]}.weight"] = a
        state[f"{prefix}{path}.{naming[1]}.weight"] = b
        if "attn1" in path:
            state[f"{prefix}{path}.alpha"] = torch.tensor(RANK * factor)
    return state


def merged(model: nn.Module, state: dict[str, torch.Tensor], scale: float = 1.0) -> nn.Module:
    """A float copy of `model` with the LoRA merged into its weights: the full-precision reference."""
    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for path, factors in lora.parse_lora(state).items():
            module = modules[path.removeprefix("transformer.")]
            module.weight += scale * factors.factor * factors.up @ factors.down
    return model


def test_attach_then_detach_restores_outputs_bitwise(svd_dit):
    base = dit_output(svd_dit)
    before = {n: (m.low_rank_down, m.low_rank_up) for n, m in quantized_layers(svd_dit).items()}
    handle = lora.attach(svd_dit, make_lora(svd_dit), scale=1.0, name="style")
    assert set(handle.layers) == set(TARGETS) and set(handle.layers.values()) == {"branch"}
    layer = quantized_layers(svd_dit)[TARGETS[0]]
    assert layer.low_rank_down.shape[1] == before[TARGETS[0]][0].shape[1] + RANK  # concatenated
    assert not torch.equal(dit_output(svd_dit), base)
    lora.detach(svd_dit, "style")
    assert torch.equal(dit_output(svd_dit), base)
    for name, m in quantized_layers(svd_dit).items():  # the very same factor tensors are back
        assert m.low_rank_down is before[name][0] and m.low_rank_up is before[name][1]
    assert lora.attached(svd_dit) == {}


def test_full_precision_transform_is_exactly_fp_plus_lora(svd_dit, fp_dit):
    """With quantizers off, branch + λ-scaled LoRA equals the merged float model: the λ scaling is right."""
    state = make_lora(svd_dit)
    handle = lora.attach(svd_dit, state)
    try:
        with diffquant.quantizers_disabled(svd_dit):
            got = dit_output(svd_dit)
        torch.testing.assert_close(got, dit_output(merged(fp_dit, state)), rtol=1e-4, atol=1e-4)
    finally:
        handle.detach()


def test_quantized_plus_lora_is_within_the_base_quantization_error(svd_dit, fp_dit):
    state = make_lora(svd_dit)
    base_sqnr = sqnr_db(dit_output(fp_dit), dit_output(svd_dit))
    reference = dit_output(merged(fp_dit, state))
    assert not torch.allclose(reference, dit_output(fp_dit), atol=1e-2)  # the LoRA matters
    handle = lora.attach(svd_dit, state)
    try:
        lora_sqnr = sqnr_db(reference, dit_output(svd_dit))
    finally:
        handle.detach()
    assert lora_sqnr >= base_sqnr - 2.0, (base_sqnr, lora_sqnr)


def test_scale_zero_is_the_base_and_scale_changes_apply_at_run_time(svd_dit, fp_dit):
    base = dit_output(svd_dit)
    state = make_lora(svd_dit)
    handle = lora.attach(svd_dit, state, scale=0.0, name="s")
    try:
        assert torch.equal(dit_output(svd_dit), base)
        lora.set_scale("s", 0.5)
        with diffquant.quantizers_disabled(svd_dit):
            half = dit_output(svd_dit)
        torch.testing.assert_close(half, dit_output(merged(fp_dit, state, 0.5)), rtol=1e-4, atol=1e-4)
        handle.set_scale(1.0)
        with diffquant.quantizers_disabled(svd_dit):
            full = dit_output(svd_dit)
        torch.testing.assert_close(full, dit_output(merged(fp_dit, state, 1.0)), rtol=1e-4, atol=1e-4)
        lora.set_scale("s", 0.0, model=svd_dit)
        assert torch.equal(dit_output(svd_dit), base)
    finally:
        lora.detach(svd_dit, "s")
    assert torch.equal(dit_output(svd_dit), base)


@pytest.mark.parametrize(("prefix", "naming"), [
    ("", ("lora_A", "lora_B")),
    ("transformer.", ("lora_A", "lora_B")),
    ("unet.", ("lora_down", "lora_up")),
    ("base_model.model.", ("lora_A.default", "lora_B.default")),  # PEFT with an adapter name
])
def test_key_prefixes_and_namings_are_accepted(fp_dit, prefix, naming):
    model = copy.deepcopy(fp_dit)
    state = make_lora(model, prefix=prefix, naming=naming)
    handle = lora.attach(model, state)
    assert set(handle.layers) == set(TARGETS)
    reference = merged(fp_dit, {k.removeprefix(prefix): v for k, v in make_lora(model, prefix="").items()})
    torch.testing.assert_close(dit_output(model), dit_output(reference), rtol=1e-4, atol=1e-4)


def test_unmatched_keys_and_bad_state_dicts_are_clear_errors(svd_dit):
    state = make_lora(svd_dit)
    state["transformer.blocks.7.attn.to_q.lora_A.weight"] = torch.zeros(RANK, 64)
    state["transformer.blocks.7.attn.to_q.lora_B.weight"] = torch.zeros(64, RANK)
    with pytest.raises(lora.LoraError, match=r"match no module.*blocks\.7\.attn\.to_q"):
        lora.attach(svd_dit, state)
    assert lora.attached(svd_dit) == {}  # nothing half-attached
    with pytest.raises(lora.LoraError, match="needs both"):
        lora.attach(svd_dit, {"x.lora_A.weight": torch.zeros(2, 4)})
    with pytest.raises(lora.LoraError, match="not LoRA factors"):
        lora.attach(svd_dit, {"x.weight": torch.zeros(2, 4)})
    bad = {f"{TARGETS[0]}.lora_A.weight": torch.zeros(RANK, 3), f"{TARGETS[0]}.lora_B.weight": torch.zeros(64, RANK)}
    with pytest.raises(lora.LoraError, match="do not fit"):
        lora.attach(svd_dit, bad)
    conv = {f"{TARGETS[0]}.lora_A.weight": torch.zeros(2, 64, 1, 1), f"{TARGETS[0]}.lora_B.weight": torch.zeros(64, 2, 1, 1)}
    with pytest.raises(lora.LoraError, match="do not fit"):  # a convolution's factors on a Linear layer
        lora.attach(svd_dit, conv)
    with pytest.raises(lora.LoraError, match="neither"):
        lora.attach(svd_dit, {"x.lora_A.weight": torch.zeros(2, 4, 1), "x.lora_B.weight": torch.zeros(4, 2, 1)})
    handle = lora.attach(svd_dit, make_lora(svd_dit), name="twice")
    try:
        with pytest.raises(ValueError, match="already attached"):
            lora.attach(svd_dit, make_lora(svd_dit), name="twice")
    finally:
        handle.detach()


def test_plain_w8a8_model_gets_a_side_branch(w8a8_dit, fp_dit):
    base = dit_output(w8a8_dit)
    state = make_lora(w8a8_dit)
    handle = lora.attach(w8a8_dit, state)
    try:
        assert set(handle.layers.values()) == {"side"}
        with diffquant.quantizers_disabled(w8a8_dit):
            torch.testing.assert_close(dit_output(w8a8_dit), dit_output(merged(fp_dit, state)), rtol=1e-4, atol=1e-4)
        base_sqnr = sqnr_db(dit_output(fp_dit), base)
        assert sqnr_db(dit_output(merged(fp_dit, state)), dit_output(w8a8_dit)) >= base_sqnr - 2.0
        handle.set_scale(0.0)
        assert torch.equal(dit_output(w8a8_dit), base)
    finally:
        lora.detach(w8a8_dit, handle)
    assert torch.equal(dit_output(w8a8_dit), base)


def test_two_loras_stack_and_detach_independently(svd_dit, fp_dit):
    base = dit_output(svd_dit)
    first, second = make_lora(svd_dit, seed=1), make_lora(svd_dit, seed=2)
    lora.attach(svd_dit, first, name="a")
    only_a = dit_output(svd_dit)
    lora.attach(svd_dit, second, scale=0.5, name="b")
    with diffquant.quantizers_disabled(svd_dit):
        both = dit_output(svd_dit)
    reference = merged(merged(fp_dit, first), second, 0.5)
    torch.testing.assert_close(both, dit_output(reference), rtol=1e-4, atol=1e-4)
    lora.detach(svd_dit, "b")
    assert torch.equal(dit_output(svd_dit), only_a)
    lora.detach(svd_dit, "a")
    assert torch.equal(dit_output(svd_dit), base)


@pytest.mark.parametrize("recipe", ["svd", "w8a8"])
def test_frozen_packed_layers_take_a_lora(svd_dit, w8a8_dit, recipe):
    model = freeze(copy.deepcopy(svd_dit if recipe == "svd" else w8a8_dit), float_dtype=torch.float32)
    packed = packed_layers(model)
    assert set(TARGETS) <= set(packed)
    base = dit_output(model)
    fake = svd_dit if recipe == "svd" else w8a8_dit
    state = make_lora(model)
    handle = lora.attach(model, state)
    lora.attach(fake, state, name="fake")
    try:
        assert set(handle.layers.values()) == {"branch" if recipe == "svd" else "side"}
        # layer by layer (tests/layer_outputs.py: whole outputs at 4-bit activations depend on the CPU)
        with torch.no_grad():
            _, captured = layer_io(fake, TARGETS, lambda: dit_output(fake))
        assert worst_layer_rel(model, captured) <= 1e-4
    finally:
        lora.detach(fake, "fake")
    handle.detach()
    assert torch.equal(dit_output(model), base)


def test_saving_or_freezing_with_a_lora_attached_is_refused_and_leaves_nothing(w8a8_dit, tmp_path):
    model = copy.deepcopy(w8a8_dit)
    base = dit_output(model)
    lora.attach(model, make_lora(model), name="style")
    target = tmp_path / "saved"
    with pytest.raises(lora.LoraAttachedError, match="'style' is attached"):
        diffquant.save_quantized(model, target)
    assert not target.exists() and not any(tmp_path.iterdir())
    with pytest.raises(lora.LoraAttachedError, match="freeze"):
        freeze(model)
    assert not packed_layers(model)  # nothing was converted before the refusal
    lora.detach(model, "style")
    assert torch.equal(dit_output(model), base)
    diffquant.save_quantized(model, target)
    assert (target / "diffquant_config.json").is_file()
    assert packed_layers(freeze(model))


UNET = TINY_MODELS["unet2d"]


def conv_lora(model: nn.Module, seed: int = 0, strength: float = 0.3) -> dict[str, torch.Tensor]:
    """A LoRA on two 3x3 convolutions and one 1x1 of the tiny UNet: A [r, in, kh, kw], B [out, r, 1, 1]."""
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1}
    wide = [n for n, m in convs.items() if m.kernel_size == (3, 3) and m.in_channels == 64][:2]
    point = [n for n, m in convs.items() if m.kernel_size == (1, 1)][:1]
    assert len(wide) == 2 and len(point) == 1
    g = torch.Generator().manual_seed(seed)
    state = {}
    for path in wide + point:
        conv = convs[path]
        a = torch.randn(RANK, conv.in_channels, *conv.kernel_size, generator=g)
        b = torch.randn(conv.out_channels, RANK, 1, 1, generator=g)
        delta = (b.flatten(1) @ a.flatten(1)).norm()
        state[f"unet.{path}.lora_down.weight"] = a
        state[f"unet.{path}.lora_up.weight"] = b * strength * conv.weight.norm() / delta
        state[f"unet.{path}.alpha"] = torch.tensor(RANK / 2)
    return state


def merged_conv(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """The float model with each conv LoRA merged: dW[o, i] = alpha/r * sum_r B[o, r] A[r, i] (B is 1x1)."""
    model = copy.deepcopy(model)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for path, f in lora.parse_lora(state).items():
            conv = modules[path.removeprefix("unet.")]
            conv.weight += f.factor * torch.einsum("or,rikl->oikl", f.up.flatten(1), f.down)
    return model


def unet_output(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return UNET.run(model, UNET.inputs(2))


def test_a_convolution_lora_runs_as_a_side_branch_exactly(tmp_path):
    fp = UNET.build()
    state = conv_lora(fp)
    expected = unet_output(merged_conv(fp, state))
    model = copy.deepcopy(fp)
    base = unet_output(model)
    handle = lora.attach(model, state)
    assert set(handle.layers.values()) == {"side"} and len(handle.layers) == 3
    got = unet_output(model)
    assert float((got - base).abs().max()) > 1e-2  # the LoRA changes the output
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    handle.detach()
    assert torch.equal(unet_output(model), base)


def test_quantized_and_frozen_convolutions_take_a_lora():
    """Quantized + LoRA tracks FP + LoRA within the base's quantization error, and a LoRA that was not
    applied could not pass: it moves the output far more than quantization does."""
    fp = UNET.build()
    state = conv_lora(fp)
    fp_out, fp_lora_out = unet_output(fp), unet_output(merged_conv(fp, state))
    quantized = diffquant.quantize(copy.deepcopy(fp), "w8a8", progress=False)
    frozen = freeze(copy.deepcopy(quantized), float_dtype=torch.float32)
    for model in (quantized, frozen):
        base = unet_output(model)
        base_error_db = sqnr_db(fp_out, base)
        assert sqnr_db(fp_lora_out, fp_out) < base_error_db - 10
        lora.attach(model, state, name="conv")
        assert sqnr_db(fp_lora_out, unet_output(model)) > base_error_db - 3
        lora.detach(model, "conv")
        assert torch.equal(unet_output(model), base)


def test_svdquant_convolutions_take_a_lora_as_a_side_branch_and_keep_their_own():
    """A conv with SVDQuant's branch takes the LoRA beside it, on the raw input, with its own branch factors
    untouched: each adapted layer's output moves by exactly s·B(A(x)), quantized and frozen; detach is exact."""
    fp = UNET.build()
    state = conv_lora(fp)
    quantized = diffquant.quantize(copy.deepcopy(fp), cheap_svdquant(), progress=False,
                                   calibration=lambda m: UNET.run(m, UNET.inputs(2)))
    factors = {p.removeprefix("unet."): f for p, f in lora.parse_lora(state).items()}
    assert all(quantized.get_submodule(p).low_rank is not None for p in factors)
    frozen = freeze(copy.deepcopy(quantized), float_dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    for model in (quantized, frozen):
        branches = {p: model.get_submodule(p).low_rank_down for p in factors}
        inputs = {p: torch.randn(2, fp.get_submodule(p).in_channels, 8, 8, generator=g) for p in factors}
        with torch.no_grad():
            before = {p: model.get_submodule(p)(x) for p, x in inputs.items()}
            base = unet_output(model)
            handle = lora.attach(model, state, name="conv", scale=0.7)
            assert set(handle.layers.values()) == {"side"} and set(handle.layers) == set(factors)
            for path, f in factors.items():
                layer, conv, x = model.get_submodule(path), fp.get_submodule(path), inputs[path]
                assert layer.low_rank_down is branches[path]
                side = F.conv2d(F.conv2d(x, f.down, None, conv.stride, conv.padding, conv.dilation), f.up)
                expected = before[path] + 0.7 * f.factor * side
                torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
            lora.detach(model, "conv")
            assert torch.equal(unet_output(model), base)
