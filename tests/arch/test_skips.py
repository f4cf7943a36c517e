"""Skip-concatenation detection (arch/skips.py): which layers of a UNet decoder read cat([hidden, skip])
and where the skip begins; nothing on models without such blocks, nothing for blocks that combine
their skip tensors in another way."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from diffquant.arch import skip_concat_splits, up_blocks
from tests.tiny_models import TINY_MODELS

pytestmark = pytest.mark.usefixtures("single_thread")

UNETS = ("unet2d", "unet2d-condition")
# block_out_channels (64, 128), layers_per_block 1: each up block has two resnets reading
# [decoder | skip] = [128 | 128], [128 | 64] (up_blocks.0) and [128 | 64], [64 | 64] (up_blocks.1).
EXPECTED_SPLITS = {"up_blocks.0.resnets.0": 128, "up_blocks.0.resnets.1": 128,
                   "up_blocks.1.resnets.0": 128, "up_blocks.1.resnets.1": 64}


def detect(family: str) -> tuple[nn.Module, dict[str, int]]:
    tiny = TINY_MODELS[family]
    model, inputs = tiny.build(), tiny.inputs(2)
    return model, skip_concat_splits(model, lambda: tiny.run(model, inputs))


@pytest.mark.parametrize("family", UNETS)
def test_tiny_unets_split_conv1_and_conv_shortcut_of_every_decoder_resnet(family):
    model, splits = detect(family)
    expected = {f"{resnet}.{layer}": split for resnet, split in EXPECTED_SPLITS.items()
                for layer in ("conv1", "conv_shortcut")}
    assert splits == expected
    for resnet_path, split in EXPECTED_SPLITS.items():
        resnet = model.get_submodule(resnet_path)
        assert split < resnet.in_channels  # the rest is the skip, from the encoder


@pytest.mark.parametrize("family", [f for f in TINY_MODELS if f not in UNETS])
def test_models_without_up_blocks_have_no_splits(family):
    model, splits = detect(family)
    assert up_blocks(model) == {} and splits == {}


def test_zoo_fmnist_sd_splits_match_its_decoder_channels():
    from diffquant.zoo import load

    zoo = load("fmnist-sd")
    unet = zoo.denoiser
    with torch.no_grad():
        splits = skip_concat_splits(unet, lambda: zoo.predict_noise(torch.randn(2, *zoo.latent_shape),
                                                                    torch.tensor(500), torch.tensor([1, 2])))
    resnets = {n: m for n, m in unet.named_modules() if re.fullmatch(r"up_blocks\.\d+\.resnets\.\d+", n)}
    assert len(resnets) == 6 and set(splits) == {f"{n}.{layer}" for n in resnets for layer in ("conv1", "conv_shortcut")}
    # a resnet's hidden part is the previous resnet's output (or what the block was given)
    for name, resnet in resnets.items():
        index = int(name.rsplit(".", 1)[1])
        if index > 0:
            previous = resnets[f"{name.rsplit('.', 1)[0]}.{index - 1}"]
            assert splits[f"{name}.conv1"] == previous.out_channels
        assert 0 < splits[f"{name}.conv_shortcut"] < resnet.in_channels


class _Resnet(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 8, 3, padding=1)

    def forward(self, input_tensor: torch.Tensor, temb=None) -> torch.Tensor:
        return self.conv1(torch.nn.functional.silu(input_tensor))


class _UpBlock(nn.Module):
    """A decoder block taking skip tensors like diffusers' up blocks, combining them by `mode`."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.resnets = nn.ModuleList([_Resnet(8 if mode == "add" else 12)])

    def forward(self, hidden_states, res_hidden_states_tuple, temb=None):
        skip = res_hidden_states_tuple[-1]
        if self.mode == "add":
            return self.resnets[0](hidden_states + skip)
        if self.mode == "skip-first":
            return self.resnets[0](torch.cat([skip, hidden_states], dim=1))
        return self.resnets[0](torch.cat([hidden_states, skip], dim=1))


@pytest.mark.parametrize(("mode", "expected"), [
    ("concat", {"up.resnets.0.conv1": 8}), ("add", {}), ("skip-first", {}),
])
def test_only_a_concatenation_ending_with_the_skip_is_split(mode, expected):
    model = nn.Module()
    model.up = _UpBlock(mode)
    hidden = torch.randn(2, 8, 4, 4)
    skip = torch.randn(2, 8 if mode == "add" else 4, 4, 4)
    assert skip_concat_splits(model, lambda: model.up(hidden, (skip,))) == expected
