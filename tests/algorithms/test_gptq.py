"""GPTQ: less output error than round-to-nearest on correlated inputs, round-to-nearest exactly when the
Hessian is diagonal, and results that lie on the quantizer's grid bit for bit."""

from __future__ import annotations

import pytest
import torch

from diffquant.algorithms.gptq import gptq, hessian, inverse_cholesky
from diffquant.formats import QuantSpec
from diffquant.nn.quantizers import WeightQuantizer

pytestmark = pytest.mark.usefixtures("single_thread")

OUT, IN, ROWS = 48, 192, 768

SPECS = [
    pytest.param(QuantSpec("int4", "group", 64, scale_dtype="float16"), id="int4-g64-fp16"),
    pytest.param(QuantSpec.for_format("nvfp4"), id="nvfp4"),
    pytest.param(QuantSpec("uint4", "group", 32, symmetric=False), id="uint4-g32-asym"),
    pytest.param(QuantSpec("int4", "channel"), id="int4-channel"),
    pytest.param(QuantSpec("int8", "tensor"), id="int8-tensor"),
]


def weight(seed: int = 0) -> torch.Tensor:
    return torch.randn(OUT, IN, generator=torch.Generator().manual_seed(seed)) * 0.05


def correlated_inputs(rows: int, seed: int) -> torch.Tensor:
    """Inputs with a few high-variance directions, mixed across all channels (a rotated low-rank-ish
    covariance): the case where rounding errors can be traded between columns."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(IN, IN, generator=torch.Generator().manual_seed(99)))[0]
    variances = torch.full((IN,), 0.05)
    variances[:8] = torch.tensor([30.0, 20, 15, 10, 8, 6, 4, 2])
    return (torch.randn(rows, IN, generator=g) * variances.sqrt()) @ basis.t()


def rtn(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    quantizer = WeightQuantizer(spec)
    quantizer.calibrate(w)
    return quantizer(w)


def output_error(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> float:
    return float((x @ w.t() - x @ q.t()).double().pow(2).sum())


@pytest.mark.parametrize("spec", SPECS)
def test_gptq_beats_round_to_nearest_on_held_out_correlated_inputs(spec):
    w = weight()
    result = gptq(w, hessian(correlated_inputs(ROWS, seed=1)), WeightQuantizer(spec))
    x = correlated_inputs(512, seed=2)  # not the rows the Hessian came from
    assert output_error(x, w, result.weight) < 0.3 * output_error(x, w, rtn(w, spec))


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("kind", ["identity", "diagonal"])
def test_a_diagonal_hessian_gives_round_to_nearest_exactly(spec, kind):
    w = weight()
    h = torch.eye(IN) if kind == "identity" else torch.diag(torch.rand(IN, generator=torch.Generator().manual_seed(3)) + 0.1)
    quantizer, reference = WeightQuantizer(spec), WeightQuantizer(spec)
    reference.calibrate(w)
    result = gptq(w, h, quantizer)
    assert torch.equal(result.weight, reference(w))
    assert torch.equal(quantizer.scale, reference.scale)
    for name in ("zero_point", "global_scale"):
        ours, theirs = getattr(quantizer, name), getattr(reference, name)
        assert (ours is None and theirs is None) or torch.equal(ours, theirs)


@pytest.mark.parametrize("spec", SPECS)
def test_result_lies_on_the_quantizer_s_grid(spec):
    w = weight()
    quantizer = WeightQuantizer(spec)
    result = gptq(w, hessian(correlated_inputs(ROWS, seed=1)), quantizer)
    fmt = spec.qformat
    assert quantizer.scale.shape == WeightQuantizer(spec)._blocks(w).shape[:1] + (1,)
    assert quantizer.scale.dtype == torch.float32 and bool((quantizer.scale > 0).all())
    assert torch.equal(fmt.round(result.codes), result.codes)  # grid values of the format
    assert float(result.codes.min()) >= fmt.qmin and float(result.codes.max()) <= fmt.qmax
    assert torch.equal(quantizer(result.weight), result.weight)  # a fixed point of the stored qparams
    assert torch.equal(quantizer.codes(result.weight), fmt.encode(result.codes))
    assert torch.equal(quantizer.decode(quantizer.codes(result.weight)), result.weight)
    stored = spec.scale_format.encode(quantizer.scale, quantizer.global_scale)  # scales as a checkpoint holds them
    assert torch.equal(spec.scale_format.decode(stored, quantizer.global_scale), quantizer.scale)


def test_the_block_size_does_not_change_the_result():
    """Lazy batching is an exact rewrite of the column-by-column update: any block size gives (up to
    float64 rounding, which may flip a tie) the same codes."""
    w, h = weight(), hessian(correlated_inputs(ROWS, seed=1))
    spec = QuantSpec("int4", "group", 64, scale_dtype="float16")
    by_128 = gptq(w, h, WeightQuantizer(spec), block_size=128)
    by_64 = gptq(w, h, WeightQuantizer(spec), block_size=64)
    assert (by_128.codes != by_64.codes).float().mean() < 1e-3


def test_dead_inputs_get_zero_weight_and_do_not_break_the_cholesky():
    x = correlated_inputs(ROWS, seed=1)
    x[:, [5, 70]] = 0
    h = hessian(x)
    spec = QuantSpec("int4", "group", 64, scale_dtype="float16")
    result = gptq(weight(), h, WeightQuantizer(spec))
    assert torch.isfinite(result.weight).all()
    assert bool((result.weight[:, [5, 70]] == 0).all())


def test_inverse_cholesky_is_the_upper_factor_of_the_damped_inverse():
    h = hessian(correlated_inputs(64, seed=4))  # rank 64 < 192: only the damping makes it invertible
    u = inverse_cholesky(h, 0.01)
    damped = h + 0.01 * h.diagonal().mean() * torch.eye(IN, dtype=torch.float64)
    assert torch.equal(u, u.triu())
    torch.testing.assert_close(u.t() @ u @ damped, torch.eye(IN, dtype=torch.float64), rtol=0, atol=1e-8)


def test_the_inputs_are_left_unchanged():
    w, h = weight().double(), hessian(correlated_inputs(ROWS, seed=1))
    w0, h0 = w.clone(), h.clone()
    gptq(w, h, WeightQuantizer(QuantSpec("int4", "group", 64)))
    assert torch.equal(w, w0) and torch.equal(h, h0)


def test_a_hessian_of_the_wrong_size_is_refused():
    with pytest.raises(ValueError, match="does not fit"):
        gptq(weight(), torch.eye(IN - 1), WeightQuantizer(QuantSpec("int4", "channel")))
