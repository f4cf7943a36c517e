"""The training loop's clock and progress callbacks: callbacks run at the points they ask for, with the
clock paused (neither wall nor CPU time counts them) and the RNG state put back (training draws the
same numbers with or without them), inside the stage's `finished()` view; and `written_back` shows an
LSQ quantizer exactly as write_back leaves it, then puts the LSQ quantizer back untouched."""

from __future__ import annotations

import contextlib
import time

import pytest
import torch
from torch import nn

from diffquant.algorithms.training import (
    Observed,
    ProgressCallback,
    TrainingClock,
    progress_callback,
    train_steps,
    written_back,
)
from diffquant.formats import QuantSpec
from diffquant.nn import QLinear
from diffquant.nn.learnable import LSQActivation, LSQWeight, install_lsq, install_lsq_weight

pytestmark = pytest.mark.usefixtures("single_thread")


def burn(seconds: float) -> None:
    """Spend CPU time in this thread (sleeping would advance the wall clock only)."""
    start = time.thread_time()
    while time.thread_time() - start < seconds:
        pass


@pytest.mark.parametrize(("points", "total", "expected"), [
    (None, 3, [0, 1, 2, 3]), (2, 4, [0, 2, 4]), (4, 10, [0, 2, 5, 8, 10]), (8, 3, [0, 1, 2, 3]),
], ids=["every", "halves", "uneven", "more-points-than-steps"])
def test_callbacks_run_at_evenly_spaced_points(points, total, expected):
    callback = ProgressCallback(lambda p: None, points)
    assert [d for d in range(total + 1) if callback.wants(d, total)] == expected
    with pytest.raises(ValueError, match="points"):
        ProgressCallback(lambda p: None, 0)


def run(callback=None, finished=contextlib.nullcontext):
    """Four steps that each burn 20 ms of CPU and draw a random number; returns (clock, draws)."""
    draws, model = [], nn.Linear(2, 2)

    def step(i: int) -> dict[str, float]:
        burn(0.02)
        draws.append(float(torch.rand(())))
        return {}

    with progress_callback(callback) if callback else contextlib.nullcontext():
        clock = train_steps(step, 4, model, torch.optim.Adam(model.parameters()), None,
                            Observed("test", model, finished))
    return clock, draws


def test_callbacks_pause_the_clock_and_leave_the_random_state_alone():
    seen = []

    def slow(progress):
        seen.append((progress.stage, progress.done, progress.total, progress.cpu_s))
        torch.rand(100)  # the callback's draws must not shift training's
        burn(0.25)
        time.sleep(0.05)

    torch.manual_seed(0)
    clock, draws = run(slow)
    torch.manual_seed(0)
    _, plain = run()
    assert draws == plain
    assert [s[:3] for s in seen] == [("test", d, 4) for d in range(5)]
    # five callbacks took 1.5 s (1.25 s CPU): neither clock counts them; the wall bound leaves room for a
    # loaded machine stretching the four 20 ms steps
    assert 0.08 <= clock.cpu_s < 0.25 and clock.wall_s < 1.0, clock.__dict__
    gaps = [b[3] - a[3] for a, b in zip(seen, seen[1:], strict=False)]
    assert all(0.02 <= g < 0.25 for g in gaps), gaps  # each step's CPU, never a callback's


def test_callbacks_run_inside_the_stages_finished_view():
    state = {"inside": False}

    @contextlib.contextmanager
    def finished():
        state["inside"] = True
        yield
        state["inside"] = False

    inside = []
    run(lambda p: inside.append(state["inside"]), finished)
    assert inside == [True] * 5 and not state["inside"]


def test_the_clock_pauses():
    clock = TrainingClock(wall_s=10.0)
    with clock.paused():
        burn(0.1)
    assert 10.0 <= clock.wall_s < 10.05 and clock.cpu_s < 0.05


def lsq_layer() -> tuple[QLinear, LSQWeight, LSQActivation]:
    """A W4A4 layer with LSQ weight and input quantizers whose learned values moved off their grids."""
    torch.manual_seed(0)
    layer = QLinear(nn.Linear(16, 8), QuantSpec("int4", "channel", scale_dtype="float16"),
                    QuantSpec("int4", "tensor", symmetric=False))
    layer.calibrate_weight()
    layer.input_quantizer.scale, layer.input_quantizer.zero_point = torch.tensor([0.3]), torch.tensor([7.0])
    weight, act = install_lsq_weight(layer), install_lsq(layer, learn_zero_point=True)
    with torch.no_grad():
        weight.scale.mul_(1.0 + 1e-3 * torch.randn_like(weight.scale))  # not float16-representable
        act.scale.fill_(0.31234567)
        act.zero_point.fill_(6.6)  # a float zero point, rounded on write-back
    return layer, weight, act


def test_a_learned_weight_step_pushed_below_zero_stays_at_its_floor_and_writes_back_positive():
    """As for input steps (test_reconstruction): an Adam step past 0 leaves the weight step in force at
    2^-10 of its calibrated value, the output and gradients finite, and never writes a negative scale."""
    layer, weight, _ = lsq_layer()
    calibrated = weight.base.scale.detach().float().clone()
    with torch.no_grad():
        weight.scale[0] = -1e-3
    out = weight(layer.weight.reshape(8, 16))
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(weight.scale.grad).all()
    weight.write_back()
    floor = weight.spec.scale_format.round(calibrated[:1] * 2**-10)  # in the scale format (float16 here)
    assert torch.equal(weight.base.scale.float()[:1], floor.float()) and (weight.base.scale > 0).all()


def test_written_back_is_the_finished_layer_bit_for_bit_and_restores_the_lsq_quantizers():
    x = torch.randn(32, 16) * 2
    layer, weight, act = lsq_layer()
    bases = {k: v.clone() for k, v in [*weight.base.state_dict().items(), *act.base.state_dict().items()]}
    with torch.no_grad(), written_back([layer]):
        inside = layer(x)
        assert layer.weight_quantizer is weight.base and layer.input_quantizer is act.base
    assert layer.weight_quantizer is weight and layer.input_quantizer is act
    restored = {k: v for k, v in [*weight.base.state_dict().items(), *act.base.state_dict().items()]}
    assert all(torch.equal(v, restored[k]) for k, v in bases.items())
    with torch.no_grad():
        lsq_output = layer(x)
        weight.write_back()
        act.write_back()
        layer.weight_quantizer, layer.input_quantizer = weight.base, act.base
        finished = layer(x)
    assert torch.equal(inside, finished)
    assert not torch.equal(lsq_output, finished)  # why the swap: LSQ's own forward is not the finished layer
