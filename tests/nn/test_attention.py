"""Attention-matmul quantization: QuantAttnProcessor, AttentionQuantizers, install / observe / calibrate."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffquant.calib.steps import sampling_step
from diffquant.formats.ops import sqnr_db
from diffquant.formats.spec import QuantSpec, SpecError
from diffquant.nn.attention import (
    MATMUL_QUANTIZERS,
    AttentionQuantConfig,
    AttentionQuantizers,
    QuantAttnProcessor,
    calibrate_attention_quantizers,
    install_attention_quantizers,
    make_operand_quantizer,
    observe_attention_operands,
    register_operand_quantizer,
    remove_attention_quantizers,
)
from diffquant.nn.attention import quantizers as operand_quantizers
from diffquant.nn.layers import wrap_layer
from diffquant.nn.quantizers import ActivationQuantizer

diffusers_attention = pytest.importorskip("diffusers.models.attention")
attention_processor = pytest.importorskip("diffusers.models.attention_processor")
Attention = attention_processor.Attention
AttnProcessor2_0 = attention_processor.AttnProcessor2_0

QUERY_DIM, HEADS, DIM_HEAD, CONTEXT_DIM = 64, 2, 32, 48


def token_spec(bits: int) -> QuantSpec:
    return QuantSpec(f"int{bits}", "token", dynamic=True)


def qkv_probs_config(bits: int, **probs_kwargs) -> AttentionQuantConfig:
    tok = token_spec(bits)
    return AttentionQuantConfig(query=tok, key=tok, value=tok, probs=QuantSpec(f"uint{bits}", "tensor", **probs_kwargs))


def make_attention(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return Attention(query_dim=QUERY_DIM, heads=HEADS, dim_head=DIM_HEAD, **kwargs).eval()


def make_block() -> nn.Module:
    torch.manual_seed(0)
    block = diffusers_attention.BasicTransformerBlock(
        QUERY_DIM, HEADS, DIM_HEAD, cross_attention_dim=CONTEXT_DIM
    ).eval()
    with torch.no_grad():  # larger q/k weights: peakier softmax, so the probs quantizer matters
        for attn in (block.attn1, block.attn2):
            attn.to_q.weight.mul_(4)
            attn.to_k.weight.mul_(4)
    return block


def block_inputs(batch: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(batch, 16, QUERY_DIM, generator=g),
        "encoder_hidden_states": torch.randn(batch, 8, CONTEXT_DIM, generator=g),
    }


def run_block(block: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return block(**inputs)


def attention_output(block: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """attn1 + attn2 outputs of the block (the block output itself is dominated by its residual)."""
    outs = []
    hooks = [a.register_forward_hook(lambda m, i, o: outs.append(o)) for a in (block.attn1, block.attn2)]
    try:
        run_block(block, inputs)
    finally:
        for h in hooks:
            h.remove()
    return torch.cat([o.flatten() for o in outs])


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    assert (actual - expected).norm() <= 1e-5 * expected.norm()


# -- (a) no quantizers: same output as the default processor -----------------------------------------
ATTENTION_VARIANTS = {
    "self": ({}, False, False),
    "cross": ({"cross_attention_dim": CONTEXT_DIM, "cross_attention_norm": "layer_norm"}, True, False),
    "qk_norm": ({"qk_norm": "layer_norm", "bias": True}, False, False),
    "masked_cross": ({"cross_attention_dim": CONTEXT_DIM}, True, True),
    "spatial_4d": ({"norm_num_groups": 8, "residual_connection": True, "rescale_output_factor": 2.0}, False, False),
}


@pytest.mark.parametrize("variant", list(ATTENTION_VARIANTS))
def test_no_quantizers_matches_default_processor(variant):
    kwargs, cross, masked = ATTENTION_VARIANTS[variant]
    attn = make_attention(**kwargs)
    g = torch.Generator().manual_seed(2)
    if variant == "spatial_4d":
        x = torch.randn(2, QUERY_DIM, 4, 4, generator=g)
    else:
        x = torch.randn(2, 16, QUERY_DIM, generator=g)
    call = {"encoder_hidden_states": torch.randn(2, 8, CONTEXT_DIM, generator=g)} if cross else {}
    if masked:  # additive bias: batch element 1 ignores its last 3 context tokens
        mask = torch.zeros(2, 1, 8)
        mask[1, :, 5:] = -10000.0
        call["attention_mask"] = mask
    assert isinstance(attn.processor, AttnProcessor2_0)
    with torch.no_grad():
        expected = attn(x, **call)
        install_attention_quantizers(attn, AttentionQuantConfig())
        assert isinstance(attn.processor, QuantAttnProcessor)
        actual = attn(x, **call)
    assert_matches(actual, expected)


def test_bool_mask_and_qlinear_projections_match_default():
    attn = make_attention(cross_attention_dim=CONTEXT_DIM)
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(2, 16, QUERY_DIM, generator=g), torch.randn(2, 8, CONTEXT_DIM, generator=g)
    mask = torch.ones(2, 1, 8, dtype=torch.bool)
    mask[0, :, 6:] = False
    with torch.no_grad():
        expected = attn(x, ctx, attention_mask=mask)
        for proj in ("to_q", "to_k", "to_v"):  # full-precision QLinear wrappers are just called
            setattr(attn, proj, wrap_layer(getattr(attn, proj), None, None))
        install_attention_quantizers(attn, AttentionQuantConfig())
        actual = attn(x, ctx, attention_mask=mask)
    assert_matches(actual, expected)


def test_block_with_no_quantizers_matches_default():
    block, inputs = make_block(), block_inputs()
    expected = run_block(block, inputs)
    installed = install_attention_quantizers(block, AttentionQuantConfig())
    assert sorted(installed) == ["attn1", "attn2"]
    assert_matches(run_block(block, inputs), expected)


# -- (b) quantized operands: accuracy, monotone in bits ---------------------------------------------
def quantized_sqnr(bits: int) -> float:
    block, inputs = make_block(), block_inputs()
    reference = attention_output(block, inputs)
    install_attention_quantizers(block, qkv_probs_config(bits))
    with observe_attention_operands(block) as stats:
        run_block(block, block_inputs(seed=7))  # calibration inputs differ from the evaluation ones
    calibrate_attention_quantizers(block, stats)
    return sqnr_db(reference, attention_output(block, inputs))


def test_int8_attention_sqnr_and_int4_is_worse():
    sqnr8, sqnr4 = quantized_sqnr(8), quantized_sqnr(4)
    assert sqnr8 >= 25.0
    assert sqnr4 < sqnr8


def test_quantizers_change_the_output_and_observe_runs_full_precision():
    block, inputs = make_block(), block_inputs()
    expected = run_block(block, inputs)
    install_attention_quantizers(block, qkv_probs_config(4))
    with observe_attention_operands(block) as stats:  # static probs not calibrated yet: bypassed
        observed = run_block(block, inputs)
    assert_matches(observed, expected)
    assert isinstance(block.attn1.processor, QuantAttnProcessor) and block.attn1.processor.observer is None
    assert set(stats) == {f"attn{i}.{op}" for i in (1, 2) for op in ("query", "key", "value", "probs")}
    assert stats["attn1.query"].overall.lo.shape == (DIM_HEAD,)
    assert stats["attn2.probs"].overall.hi.shape == (8,)  # key length of the cross attention
    with pytest.raises(RuntimeError, match="before calibration"):
        run_block(block, inputs)
    calibrate_attention_quantizers(block, stats)
    assert not torch.equal(run_block(block, inputs), expected)


def test_per_step_static_probs():
    block, inputs = make_block(), block_inputs()
    install_attention_quantizers(block, AttentionQuantConfig(probs=QuantSpec("uint8", "tensor", per_step=True)))
    with observe_attention_operands(block, operands=("probs",)) as stats:
        for step in range(3):
            with sampling_step(step):
                run_block(block, block_inputs(seed=10 + step))
    assert set(stats) == {"attn1.probs", "attn2.probs"}
    calibrate_attention_quantizers(block, stats)
    assert block.attn1.matmul_quantizers.probs.scale.shape == (3, 1)
    with sampling_step(2):
        run_block(block, inputs)


def test_calibration_without_stats_names_the_operand():
    block = make_block()
    install_attention_quantizers(block, qkv_probs_config(8))
    with pytest.raises(KeyError, match="attn1.*probs"):
        calibrate_attention_quantizers(block, {})


# -- (c) install / remove, state_dict ---------------------------------------------------------------
def test_install_remove_round_trip_is_bitwise():
    block, inputs = make_block(), block_inputs()
    expected = run_block(block, inputs)
    install_attention_quantizers(block, qkv_probs_config(8))
    with observe_attention_operands(block) as stats:
        run_block(block, inputs)
    calibrate_attention_quantizers(block, stats)
    state = block.state_dict()
    for name in ("attn1", "attn2"):
        assert f"{name}.{MATMUL_QUANTIZERS}.probs.scale" in state
    assert not any(".query." in k or ".key." in k for k in state if MATMUL_QUANTIZERS in k)  # dynamic: no state
    assert sorted(remove_attention_quantizers(block)) == ["attn1", "attn2"]
    assert type(block.attn1.processor) is AttnProcessor2_0
    assert not any(MATMUL_QUANTIZERS in k for k in block.state_dict())
    assert torch.equal(run_block(block, inputs), expected)


def test_quantizer_buffers_move_with_the_model():
    attn = make_attention()
    install_attention_quantizers(attn, qkv_probs_config(8))
    with torch.no_grad(), observe_attention_operands(attn) as stats:
        attn(torch.randn(1, 16, QUERY_DIM))
    calibrate_attention_quantizers(attn, stats)  # root module: keys are the operand names
    assert set(stats) == {"query", "key", "value", "probs"}
    attn.double()
    assert attn.matmul_quantizers.probs.scale.dtype == torch.float64
    with torch.no_grad():
        assert attn(torch.randn(1, 16, QUERY_DIM, dtype=torch.float64)).dtype == torch.float64


def test_select_picks_modules():
    block = make_block()
    installed = install_attention_quantizers(block, qkv_probs_config(8), select=lambda name, _: name == "attn2")
    assert list(installed) == ["attn2"]
    assert isinstance(block.attn1.processor, AttnProcessor2_0)
    assert isinstance(block.attn2.matmul_quantizers, AttentionQuantizers)


# -- (d) unsupported attention ---------------------------------------------------------------------
class LookalikeAttention(nn.Module):
    """Attention with its own processor convention, as the Flux / Wan attention classes have."""

    def __init__(self) -> None:
        super().__init__()
        self.to_q, self.to_k, self.to_v = (nn.Linear(8, 8) for _ in range(3))
        self.processor = object()

    def set_processor(self, processor) -> None:
        self.processor = processor


def test_unsupported_attention_class_raises():
    model = nn.ModuleDict({"ok": make_attention(), "odd": LookalikeAttention()})
    with pytest.raises(NotImplementedError, match="LookalikeAttention"):
        install_attention_quantizers(model, AttentionQuantConfig())
    assert not hasattr(model["ok"], MATMUL_QUANTIZERS)  # nothing half-installed
    with pytest.raises(NotImplementedError, match="LookalikeAttention"), observe_attention_operands(model):
        pass
    installed = install_attention_quantizers(model, AttentionQuantConfig(), select=lambda name, _: name != "odd")
    assert list(installed) == ["ok"]


def test_unsupported_processor_raises():
    attn = make_attention()
    attn.set_processor(attention_processor.AttnAddedKVProcessor())
    with pytest.raises(NotImplementedError, match="AttnAddedKVProcessor"):
        install_attention_quantizers(attn, AttentionQuantConfig())


# -- (e) config, operand quantizer registry --------------------------------------------------------
def test_config_round_trip():
    config = qkv_probs_config(8, symmetric=False)
    data = config.to_dict()
    assert data["probs"]["format"] == "uint8" and AttentionQuantConfig().to_dict()["query"] is None
    assert AttentionQuantConfig.from_dict(data) == config
    assert AttentionQuantConfig.from_dict({"probs": {"format": "uint4", "granularity": "tensor"}}).query is None
    with pytest.raises(SpecError, match="scores"):
        AttentionQuantConfig.from_dict({"scores": None})
    with pytest.raises(SpecError, match="dynamic"):
        AttentionQuantConfig(query=QuantSpec("int8", "token"))


def test_registered_operand_quantizer(monkeypatch):
    monkeypatch.setattr(operand_quantizers, "_OPERAND_QUANTIZERS", [])

    @register_operand_quantizer(r"uint\d", operands=("probs",))
    class MarkedQuantizer(ActivationQuantizer):
        pass

    quantizers = AttentionQuantizers(qkv_probs_config(8))
    assert type(quantizers.probs) is MarkedQuantizer
    assert type(quantizers.query) is ActivationQuantizer
    assert type(make_operand_quantizer("value", QuantSpec("uint8", "tensor"))) is ActivationQuantizer
    with pytest.raises(ValueError, match="operands"):
        register_operand_quantizer("int8", ActivationQuantizer, operands=("scores",))
