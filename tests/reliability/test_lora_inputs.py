"""quantize on models carrying a LoRA: a diffquant LoRA attached (diffquant.lora) or PEFT-wrapped layers.

Both are refused before anything changes (quantizing dropped an attached LoRA and left it impossible to
detach; PEFT's factors were quantized as layers of their own into a checkpoint that could not be
reloaded). The documented way, detach -> quantize -> attach, works.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import diffquant
import diffquant.lora as lora
from diffquant.api import UnsupportedModelError
from diffquant.lora import LoraAttachedError
from tests.reliability.intact import Snapshot, bitwise_equal, left_intact, run_dit, run_unet
from tests.tiny_models import TINY_MODELS

pytestmark = pytest.mark.usefixtures("single_thread")

DIT, UNET = TINY_MODELS["dit"], TINY_MODELS["unet2d"]
RANK = 4


def make_lora(model: nn.Module, paths: list[str], prefix: str = "transformer.", seed: int = 0) -> dict:
    """Random LoRA factors (diffusers layout) for the Linear / Conv2d layers at `paths`."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for path in paths:
        layer = model.get_submodule(path)
        if isinstance(layer, nn.Conv2d):
            down = (RANK, layer.in_channels, *layer.kernel_size)
            up = (layer.out_channels, RANK, 1, 1)
        else:
            down, up = (RANK, layer.in_features), (layer.out_features, RANK)
        state[f"{prefix}{path}.lora_A.weight"] = torch.randn(*down, generator=g) * 0.1
        state[f"{prefix}{path}.lora_B.weight"] = torch.randn(*up, generator=g) * 0.1
    return state


DIT_PATHS = ["transformer_blocks.0.attn1.to_q", "transformer_blocks.1.ff.net.2"]


# -- diffquant's own LoRA ------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["w8a8", "w8a8-static", "svdquant-w4a4"])
def test_attached_lora_is_refused_and_stays_attached(preset):
    model = DIT.build()
    fp = run_dit(model)
    handle = lora.attach(model, make_lora(model, DIT_PATHS), scale=0.8, name="style")
    before = Snapshot.of(model, run_dit)
    assert not bitwise_equal(before.output, fp)
    with pytest.raises(LoraAttachedError, match=r"cannot quantize while LoRA 'style' is attached: detach it"):
        diffquant.quantize(model, preset, calibration=run_dit, progress=False)
    before.assert_intact(model, run_dit)  # the LoRA still runs
    handle.detach()  # and detaches: the model is not stuck
    assert bitwise_equal(run_dit(model), fp)


def test_two_attached_loras_are_both_named():
    model = DIT.build()
    lora.attach(model, make_lora(model, DIT_PATHS[:1]), name="style")
    lora.attach(model, make_lora(model, DIT_PATHS[1:], seed=1), name="detail")
    with left_intact(model, run_dit), pytest.raises(LoraAttachedError, match=r"LoRA 'detail', 'style' is attached"):
        diffquant.quantize(model, "w8a8", progress=False)


def test_lora_at_strength_zero_is_still_refused():
    """Strength 0 computes the base model, but the LoRA is attached: quantizing would still lose it."""
    model = DIT.build()
    lora.attach(model, make_lora(model, DIT_PATHS), scale=0.0)
    with left_intact(model, run_dit), pytest.raises(LoraAttachedError, match="'default' is attached"):
        diffquant.quantize(model, "w8a8", progress=False)


class Holder(nn.Module):
    """A pipeline-like parent: the LoRA is attached to it, the denoiser is what gets quantized."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer


def test_lora_attached_through_an_enclosing_model_is_refused():
    holder = Holder(DIT.build())
    lora.attach(holder, make_lora(holder.transformer, DIT_PATHS, prefix="transformer."))
    before = Snapshot.of(holder.transformer, run_dit)
    with pytest.raises(LoraAttachedError, match=r"attached to layer 'transformer_blocks.0.attn1.to_q' \(through an "
                                                r"enclosing model\)"):
        diffquant.quantize(holder.transformer, "w8a8", progress=False)
    before.assert_intact(holder.transformer, run_dit)


def test_conv_lora_on_a_unet_is_refused():
    model = UNET.build()
    lora.attach(model, make_lora(model, ["down_blocks.0.resnets.0.conv1"], prefix="unet."))
    with left_intact(model, run_unet), pytest.raises(LoraAttachedError, match="cannot quantize"):
        diffquant.quantize(model, "w8a8", progress=False)


def test_detach_quantize_attach_again_is_the_documented_way():
    model = DIT.build()
    state = make_lora(model, DIT_PATHS)
    lora.attach(model, state).detach()
    diffquant.quantize(model, "w8a8", progress=False)
    base = run_dit(model)
    handle = lora.attach(model, state, scale=0.8)
    adapted = run_dit(model)
    assert torch.isfinite(adapted).all() and not torch.equal(adapted, base)
    handle.detach()
    assert torch.equal(run_dit(model), base)


# -- PEFT-wrapped layers -------------------------------------------------------------------------------------


class LoraLinear(nn.Module):
    """The layout of a PEFT LoRA layer: the wrapped layer as `base_layer`, factors in ModuleDicts."""

    def __init__(self, base: nn.Module, down: nn.Module, up: nn.Module) -> None:
        super().__init__()
        self.base_layer = base
        self.lora_A = nn.ModuleDict({"default": down})
        self.lora_B = nn.ModuleDict({"default": up})

    def forward(self, x):
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x))


class PeftLinear(LoraLinear):
    """Named as peft names its Linear LoRA layer (peft.tuners.lora.layer.Linear)."""


class PeftConv2d(LoraLinear):
    """Named as peft names its Conv2d LoRA layer."""


PeftLinear.__module__ = PeftConv2d.__module__ = "peft.tuners.lora.layer"


def wrap_linear(model: nn.Module, path: str, cls: type) -> nn.Module:
    parent, attr = path.rsplit(".", 1)
    base = model.get_submodule(path)
    down, up = nn.Linear(base.in_features, RANK, bias=False), nn.Linear(RANK, base.out_features, bias=False)
    setattr(model.get_submodule(parent), attr, cls(base, down, up))
    return model


def wrap_conv(model: nn.Module, path: str) -> nn.Module:
    parent, attr = path.rsplit(".", 1)
    base = model.get_submodule(path)
    down = nn.Conv2d(base.in_channels, RANK, base.kernel_size, base.stride, base.padding, bias=False)
    up = nn.Conv2d(RANK, base.out_channels, 1, bias=False)
    setattr(model.get_submodule(parent), attr, PeftConv2d(base, down, up))
    return model


PEFT_CASES = {
    "peft-linear-attention": (lambda: wrap_linear(DIT.build(), "transformer_blocks.0.attn1.to_q", PeftLinear),
                              run_dit, "transformer_blocks.0.attn1.to_q"),
    "peft-linear-ffn": (lambda: wrap_linear(DIT.build(), "transformer_blocks.1.ff.net.2", PeftLinear),
                        run_dit, "transformer_blocks.1.ff.net.2"),
    "lora-layout-without-peft-name": (lambda: wrap_linear(DIT.build(), "transformer_blocks.0.attn1.to_v",
                                                          LoraLinear), run_dit, "transformer_blocks.0.attn1.to_v"),
    "peft-conv": (lambda: wrap_conv(UNET.build(), "down_blocks.0.resnets.0.conv1"), run_unet,
                  "down_blocks.0.resnets.0.conv1"),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_wrapped_layers_are_refused(case):
    build, run, path = PEFT_CASES[case]
    model = build()
    before = Snapshot.of(model, run)
    with pytest.raises(UnsupportedModelError) as err:
        diffquant.quantize(model, "w8a8-static", calibration=run, progress=False)
    message = str(err.value)
    assert f"layer {path!r} is a PEFT LoRA layer" in message
    assert "merge_and_unload()" in message and "diffquant.lora.attach" in message
    before.assert_intact(model, run)


def test_real_peft_injected_model_is_refused():
    peft = pytest.importorskip("peft")
    model = peft.inject_adapter_in_model(peft.LoraConfig(r=RANK, target_modules=["to_q", "to_v"]), DIT.build())
    with left_intact(model, run_dit), pytest.raises(UnsupportedModelError, match="is a PEFT LoRA layer"):
        diffquant.quantize(model, "w8a8", progress=False)
