"""Scaling sites: found on every covered family, function-preserving, and really putting the outliers
into the readers' inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffquant import quantize
from diffquant.outliers import SiteError, apply_profile, find_sites
from diffquant.outliers.sites import SITE_KINDS
from tests.tiny_models import TINY_MODELS

pytestmark = pytest.mark.usefixtures("single_thread")

# The site kinds each family's building blocks offer (ada_norm_single / MM-DiT norms have none; every
# attention has its values).
EXPECTED_KINDS = {
    "unet2d": {"attention_values"},
    "unet2d-condition": {"norm", "attention_values", "gated_ffn"},
    "dit": {"adaln", "attention_values"},
    **{name: {"attention_values"} for name in ("pixart", "sd3", "flux", "sana", "cogvideox", "wan", "ltx-video")},
}


def _run(name: str, model: nn.Module) -> torch.Tensor:
    tiny = TINY_MODELS[name]
    with torch.no_grad():
        return tiny.run(model, tiny.inputs(2))


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_realistic_profile_preserves_every_family(name: str) -> None:
    model = TINY_MODELS[name].build()
    before = _run(name, model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    record = apply_profile(model, "realistic", seed=0)
    after = _run(name, model)
    assert {c.kind for c in record.changes} == EXPECTED_KINDS[name]
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, weights[k])]
    assert len(changed) >= 2 * len(record.changes)  # a producer and a reader per site at least
    # Power-of-two factors: exact except adaLN-Zero's 1 + scale rounding.
    assert torch.allclose(after, before, rtol=0, atol=1e-6 * before.abs().max().item())


def _reader_input_absmax(model: nn.Module, name: str, reader: str) -> torch.Tensor:
    seen = []
    layer = dict(model.named_modules())[reader]
    handle = layer.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    _run(name, model)
    handle.remove()
    x = seen[0]
    channels = x.transpose(0, 1).flatten(1) if isinstance(layer, nn.Conv2d) else x.flatten(0, -2).T
    return channels.abs().amax(dim=1)


@pytest.mark.parametrize("name", ["dit", "unet2d-condition", "flux"])
def test_outlier_channels_grow_by_their_factor(name: str) -> None:
    model = TINY_MODELS[name].build()
    sites = find_sites(model)
    before = {r: _reader_input_absmax(model, name, r) for s in sites for r in s.readers}
    record = apply_profile(model, "activation-outliers", seed=3)
    by_path = {s.path: s for s in sites}
    for change in record.changes:
        for reader in by_path[change.site].readers:
            after = _reader_input_absmax(model, name, reader)
            for channel, factor in zip(change.channels, change.factors, strict=True):
                assert float(after[channel]) == pytest.approx(float(before[reader][channel]) * factor, rel=1e-4)


def test_adaln_zero_scale_rows_take_the_one() -> None:
    """f * (norm * (1 + s) + t) = norm * (1 + s') + t' with s' = f*s + f - 1, t' = f*t."""
    model = TINY_MODELS["dit"].build()
    site = next(s for s in find_sites(model) if s.kind == "adaln")
    linear = model.transformer_blocks[0].norm1.linear
    width = linear.out_features // 6
    weight, bias = linear.weight.clone(), linear.bias.clone()
    site.apply(dict(model.named_modules()), torch.tensor([5]), torch.tensor([8.0]))
    assert torch.equal(linear.weight[width + 5], 8 * weight[width + 5])
    assert linear.bias[width + 5].item() == pytest.approx(8 * bias[width + 5].item() + 7)
    assert torch.equal(linear.weight[5], 8 * weight[5]) and torch.equal(linear.bias[5], 8 * bias[5])
    assert torch.equal(linear.weight[2 * width + 5], weight[2 * width + 5])  # the gate is untouched


def test_no_site_reads_through_a_nonlinearity() -> None:
    """ResBlock convs (after SiLU), FFN down after GELU (DiT) and time projections have no site."""
    for name in ("dit", "unet2d-condition"):
        readers = {r for s in find_sites(TINY_MODELS[name].build()) for r in s.readers}
        assert not any(".resnets." in r or r.endswith("ff.net.2") and name == "dit" for r in readers)
        assert all(r.rsplit(".", 1)[-1] in {"to_q", "to_k", "to_v", "proj", "proj_in", "0", "2", "to_add_out"}
                   for r in readers)


def test_a_quantized_model_is_refused() -> None:
    model = TINY_MODELS["dit"].build()
    quantize(model, "w8a8")
    with pytest.raises(SiteError, match="before quantization"):
        apply_profile(model, "realistic")


def test_site_kinds_are_the_documented_ones() -> None:
    assert set(SITE_KINDS) == {"norm", "adaln", "attention_values", "gated_ffn"}
