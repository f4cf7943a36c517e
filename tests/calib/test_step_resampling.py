"""Per-step state trained / calibrated for S steps, sampled with another number of steps.

Step i of a `total`-step run reads position p = i * (S - 1) / (total - 1) on the S rows: linear
interpolation (default) or the nearest row; with total == S or total unknown, row i itself.
"""

from __future__ import annotations

import pytest
import torch

import diffquant
from diffquant.calib import CalibrationSet, replay
from diffquant.calib.steps import current_step, current_total_steps, sampling_step, step_rows
from diffquant.formats import QuantSpec
from diffquant.formats.base import SpecError
from diffquant.nn.learnable import LSQActivation
from diffquant.nn.quantizers import ActivationQuantizer, step_qparams
from diffquant.recipes import Recipe
from diffquant.zoo.model import sample_latents
from tests.calib.test_sets import tiny_dit

pytestmark = pytest.mark.usefixtures("single_thread")


def per_step_rows(s: int) -> torch.Tensor:
    """[s, 3] per-step values with distinct, non-trivially-rounded rows."""
    return torch.randn(s, 3, generator=torch.Generator().manual_seed(s)).exp()


def read(values: torch.Tensor, total: int | None, mode: str = "linear") -> list[torch.Tensor]:
    steps = total if total is not None else values.shape[0]
    out = []
    for i in range(steps):
        with sampling_step(i, total):
            out.append(step_rows(values, mode))
    return out


@pytest.mark.parametrize("total", [None, 4])
def test_same_number_of_steps_is_plain_indexing(total):
    values = per_step_rows(4)
    for mode in ("linear", "nearest"):
        for i, row in enumerate(read(values, total, mode)):
            assert torch.equal(row, values[i])


def test_fewer_steps_interpolate_linearly():
    five = per_step_rows(5)
    for got, want in zip(read(five, 3), [five[0], five[2], five[4]], strict=True):
        assert torch.equal(got, want)  # positions 0, 2, 4: exact rows
    four = per_step_rows(4)
    got = read(four, 3)  # positions 0, 1.5, 3
    assert torch.equal(got[0], four[0]) and torch.equal(got[2], four[3])
    torch.testing.assert_close(got[1], (four[1] + four[2]) / 2, rtol=1e-6, atol=0)


def test_more_steps_interpolate_and_end_on_the_last_row():
    four = per_step_rows(4)
    got = read(four, 7)  # positions 0, 0.5, 1, ..., 3
    for i, row in enumerate(got):
        lo, hi = four[i // 2], four[min(i // 2 + 1, 3)]
        torch.testing.assert_close(row, lo if i % 2 == 0 else (lo + hi) / 2, rtol=1e-6, atol=0)
    got = read(four, 5)  # positions 0, 0.75, 1.5, 2.25, 3
    torch.testing.assert_close(got[1], 0.25 * four[0] + 0.75 * four[1], rtol=1e-6, atol=0)
    torch.testing.assert_close(got[3], 0.75 * four[2] + 0.25 * four[3], rtol=1e-6, atol=0)


def test_one_step_run_uses_the_first_trained_step():
    values = per_step_rows(4)
    with sampling_step(0, 1):
        assert torch.equal(step_rows(values), values[0])
        assert torch.equal(step_rows(values, "nearest"), values[0])


def test_nearest_rounds_half_up():
    four = per_step_rows(4)
    picked = read(four, 5, "nearest")  # positions 0, 0.75, 1.5, 2.25, 3
    for got, want in zip(picked, [0, 1, 2, 2, 3], strict=True):
        assert torch.equal(got, four[want])
    picked = read(per_step_rows(6), 3, "nearest")  # positions 0, 2.5, 5
    assert torch.equal(picked[1], per_step_rows(6)[3])


def test_unknown_total_past_the_trained_steps_is_an_error():
    with sampling_step(4), pytest.raises(IndexError, match="sampling step 4 but ranges were calibrated for 4 steps"):
        step_rows(per_step_rows(4))
    with sampling_step(0), pytest.raises(ValueError, match="unknown step interpolation 'cubic'"):
        step_rows(per_step_rows(4), "cubic")


def test_step_outside_its_run_is_an_error():
    with pytest.raises(ValueError, match="not a step of a 3-step run"), sampling_step(3, 3):
        pass
    with pytest.raises(ValueError, match="not a step of a 0-step run"), sampling_step(0, 0):
        pass


def test_total_is_part_of_the_context():
    assert current_total_steps() is None
    with sampling_step(1, 5):
        assert current_total_steps() == 5
        with sampling_step(2):
            assert current_total_steps() is None
        assert current_total_steps() == 5
    assert current_total_steps() is None


# -- quantizers ------------------------------------------------------------------------------------


def per_step_quantizer(steps: int, mode: str = "linear") -> ActivationQuantizer:
    q = ActivationQuantizer(QuantSpec("uint8", "tensor", symmetric=False, per_step=True, step_interpolation=mode))
    q.scale = torch.arange(1.0, steps + 1).reshape(steps, 1) / 64
    q.zero_point = torch.tensor([[0.0], [3.0], [6.0], [20.0], [30.0]])[:steps]
    return q


def test_static_qparams_interpolate_and_keep_an_integer_zero_point():
    q = per_step_quantizer(4)
    with sampling_step(1, 3):  # position 1.5
        scale, zero = q.static_qparams()
    torch.testing.assert_close(scale, torch.tensor([2.5 / 64]))
    assert zero.tolist() == [4.0]  # (3 + 6) / 2 = 4.5, rounded half to even
    with sampling_step(2, 5):  # position 2 * 3 / 4 = 1.5 again
        assert q.static_qparams()[1].tolist() == [4.0]
    with sampling_step(1, 5):  # position 0.75: zero 0.25 * 0 + 0.75 * 3 = 2.25 -> 2
        assert q.static_qparams()[1].tolist() == [2.0]
    nearest = per_step_quantizer(4, "nearest")
    with sampling_step(1, 3):
        scale, zero = nearest.static_qparams()
    assert torch.equal(scale, nearest.scale[2]) and torch.equal(zero, nearest.zero_point[2])
    x = torch.linspace(-1, 4, 50)
    with sampling_step(2, 4):
        assert torch.equal(q(x), ActivationQuantizer.forward(q, x))
        assert torch.equal(q.static_qparams()[0], q.scale[2])


def test_interpolated_zero_point_is_rounded_straight_through():
    zero = torch.tensor([[0.0], [3.0], [6.0], [21.0]], requires_grad=True)
    with sampling_step(1, 5):  # position 0.75: 2.25 -> 2, gradient weights 0.25 and 0.75
        _, rounded = step_qparams(torch.ones(4, 1), zero, "linear")
    assert rounded.tolist() == [2.0]
    rounded.sum().backward()
    assert zero.grad.flatten().tolist() == [0.25, 0.75, 0.0, 0.0]


def test_lsq_gradient_reaches_the_two_neighbour_rows():
    base = per_step_quantizer(5)
    lsq = LSQActivation(base)
    x = torch.linspace(-2, 5, 97)
    with sampling_step(1, 4):  # position 4/3: rows 1 and 2 with weights 2/3 and 1/3
        lsq(x).pow(2).sum().backward()
    grad = lsq.scale.grad.flatten()
    assert grad[[0, 3, 4]].eq(0).all() and grad[1] != 0
    torch.testing.assert_close(grad[1], 2 * grad[2], rtol=1e-5, atol=0)


# -- specs -----------------------------------------------------------------------------------------


def test_spec_step_interpolation_round_trips_and_defaults():
    spec = QuantSpec("int8", "tensor", per_step=True, step_interpolation="nearest")
    assert spec.to_dict()["step_interpolation"] == "nearest"
    assert QuantSpec.from_dict(spec.to_dict()) == spec
    default = QuantSpec("int8", "tensor", per_step=True)
    assert "step_interpolation" not in default.to_dict()  # dicts (and recipe hashes) as before the field
    assert QuantSpec.from_dict(default.to_dict()).step_interpolation == "linear"
    assert default.with_changes(step_interpolation="nearest").step_interpolation == "nearest"
    recipe = Recipe.from_dict({"name": "r", "input": {"format": "int8", "granularity": "tensor", "per_step": True,
                                                      "step_interpolation": "nearest"}})
    assert recipe.input.step_interpolation == "nearest"


def test_spec_rejects_an_unknown_step_interpolation():
    with pytest.raises(SpecError, match=r"unknown step_interpolation 'cubic'.*linear.*nearest"):
        QuantSpec.from_dict({"format": "int8", "per_step": True, "step_interpolation": "cubic"})


# -- the zoo sampler -------------------------------------------------------------------------------

CALIBRATION_STEPS = 4
PER_STEP = Recipe(name="per-step-resampling", weight=QuantSpec(format="int8"),
                  input=QuantSpec(format="int8", granularity="tensor", symmetric=False, per_step=True))


@pytest.fixture(scope="module")
def quantized_dit():
    model = tiny_dit()
    diffquant.quantize(model.denoiser, PER_STEP, progress=False,
                       calibration=model.calibration(2, steps=CALIBRATION_STEPS, batch_size=2, progress=False))
    return model


def old_sampler(model, labels, noise, steps):
    """sample_latents as it was: every call inside sampling_step(i), no total."""
    scheduler = model.scheduler
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        with sampling_step(i):
            eps = model.predict_noise(scheduler.scale_model_input(x, t), t, labels)
        x = scheduler.step(eps, t, x, return_dict=False)[0]
    return x


def test_zoo_sampler_runs_other_step_counts(quantized_dit):
    model = quantized_dit
    labels, noise = torch.tensor([1, 2]), model.initial_noise(2, seed=0)
    totals: list = []
    handle = model.denoiser.register_forward_pre_hook(lambda *_: totals.append(current_total_steps()))
    try:
        same = sample_latents(model, labels, noise, CALIBRATION_STEPS)
        assert torch.equal(same, old_sampler(model, labels, noise, CALIBRATION_STEPS))
        for steps in (3, 6):
            assert torch.isfinite(sample_latents(model, labels, noise, steps)).all()
        # 3 steps read positions 0, 1.5, 3 of the 4 calibrated ranges, not ranges 0, 1, 2
        assert not torch.equal(sample_latents(model, labels, noise, 3), old_sampler(model, labels, noise, 3))
        with pytest.raises(IndexError, match="calibrated for 4 steps"):
            old_sampler(model, labels, noise, 6)
    finally:
        handle.remove()
    assert totals[:17] == [4] * 4 + [None] * 4 + [3] * 3 + [6] * 6  # the old sampler sets no total


class TotalRecorder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int | None, int | None]] = []

    def forward(self, x):
        self.seen.append((current_step(), current_total_steps()))
        return x


@pytest.mark.parametrize(("meta", "total"), [({"steps": 3}, 3), ({}, None)])
def test_replay_runs_the_captured_runs_length(meta, total):
    steps = torch.tensor([0, 0, 1, 2])
    cal = CalibrationSet({"x": torch.zeros(4, 2)}, steps, torch.tensor([0, 1, 0, 0]), torch.ones(4, dtype=torch.bool),
                         meta=meta)
    recorder = TotalRecorder()
    replay(cal, batch_size=8)(recorder)
    assert recorder.seen == [(0, total), (1, total), (2, total)]
