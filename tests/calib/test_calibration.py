"""Calibration: streamed statistics equal the batch statistics, steps come from the sampler."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import diffquant
from diffquant.api import CalibrationRequiredError
from diffquant.calib.stats import ActivationStats, collect_activation_stats
from diffquant.calib.steps import (
    StepContextError,
    current_step,
    current_total_steps,
    sampling_step,
    track_pipeline_steps,
)
from diffquant.formats import QuantSpec
from diffquant.recipes import Recipe


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(8, 64)
        self.middle = nn.Linear(64, 64)
        self.last = nn.Linear(64, 8)

    def forward(self, x):
        return self.last(torch.relu(self.middle(torch.relu(self.first(x)))))


def test_streamed_ranges_equal_the_ranges_of_all_data():
    model, conv = TwoLayer(), nn.Conv2d(4, 16, 3, padding=1)
    chunks = [torch.randn(3, 5, 8) * (i + 1) for i in range(4)]
    images = [torch.randn(2, 4, 6, 6) + i for i in range(3)]
    stats = collect_activation_stats({"first": model.first, "conv": conv},
                                     lambda: ([model(c) for c in chunks], [conv(x) for x in images]))
    everything = torch.cat([c.reshape(-1, 8) for c in chunks])
    assert torch.equal(stats["first"].overall.lo, everything.amin(0))
    assert torch.equal(stats["first"].overall.hi, everything.amax(0))
    assert stats["first"].overall.count == 4
    pixels = torch.cat([x.movedim(1, -1).reshape(-1, 4) for x in images])  # conv channels are dim 1
    assert torch.equal(stats["conv"].overall.absmax, pixels.abs().amax(0))


def test_per_step_statistics_follow_the_step_context():
    model = TwoLayer()
    stats = ActivationStats()

    def run():
        for step in range(3):
            with sampling_step(step):
                model(torch.full((2, 8), float(step + 1)))

    collect_activation_stats({"first": model.first}, run, stats)
    per_step = stats["first"].per_step
    assert sorted(per_step) == [0, 1, 2] and stats["first"].num_steps == 3
    for step in range(3):
        assert torch.all(per_step[step].hi == step + 1)


def test_sampling_step_context_nests_and_restores():
    assert current_step() is None
    with sampling_step(4):
        with sampling_step(7):
            assert current_step() == 7
        assert current_step() == 4
    assert current_step() is None
    with pytest.raises(ValueError, match=">= 0"), sampling_step(-1):
        pass


class FakeScheduler:
    timesteps = torch.tensor([900, 600, 300, 0])


class FakePipe:
    """A sampler that calls its denoiser with the scheduler's timesteps, twice per step (as CFG might)."""

    def __init__(self) -> None:
        self.scheduler = FakeScheduler()
        self.transformer = Recorder()

    def __call__(self):
        for t in self.scheduler.timesteps:
            self.transformer(torch.zeros(1), t)
            self.transformer(torch.zeros(1), timestep=t)


class Recorder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int | None] = []
        self.totals: list[int | None] = []

    def forward(self, x, timestep=None):
        self.seen.append(current_step())
        self.totals.append(current_total_steps())
        return x


def test_track_pipeline_steps_maps_timesteps_to_indices():
    pipe = FakePipe()
    with track_pipeline_steps(pipe):
        pipe()
    assert pipe.transformer.seen == [0, 0, 1, 1, 2, 2, 3, 3]
    assert pipe.transformer.totals == [4] * 8  # the run's length: the schedule's
    pipe.transformer(torch.zeros(1), 600)
    assert pipe.transformer.seen[-1] is None and pipe.transformer.totals[-1] is None  # hooks removed


PER_STEP = Recipe(
    name="per-step-test",
    weight=QuantSpec(format="int8"),
    input=QuantSpec(format="int8", granularity="tensor", symmetric=False, per_step=True),
)


def test_per_step_static_ranges():
    torch.manual_seed(0)
    model = TwoLayer().eval()
    inputs = [torch.randn(4, 8) * (1 + 3 * step) for step in range(3)]

    def sample(m):
        outs = []
        for step, x in enumerate(inputs):
            with sampling_step(step):
                outs.append(m(x))
        return outs

    q = diffquant.quantize(copy.deepcopy(model), PER_STEP, calibration=sample, progress=False)
    scales = q.middle.input_quantizer.scale
    assert scales.shape[0] == 3 and scales[2] > scales[0]  # larger inputs at step 2, larger range
    with torch.no_grad():
        reference, out = sample(model), sample(q)
    for r, o in zip(reference, out, strict=True):
        assert diffquant.formats.sqnr_db(r, o) > 25
    with pytest.raises(StepContextError, match="sampling_step"):
        q(inputs[0])
    with sampling_step(3), pytest.raises(IndexError, match="calibrated for 3 steps"):
        q(inputs[0])


def test_static_recipe_without_calibration_is_a_clear_error():
    with pytest.raises(CalibrationRequiredError, match="needs calibration"):
        diffquant.quantize(TwoLayer(), "w8a8-static")


def test_layers_that_never_ran_during_calibration_are_named():
    model = TwoLayer()
    with pytest.raises(ValueError, match="never ran during calibration"):
        diffquant.quantize(model, "smoothquant-w8a8", calibration=lambda m: m.first(torch.randn(2, 8)))


def test_quantizing_twice_is_refused():
    model = diffquant.quantize(TwoLayer(), "w8a8", progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        diffquant.quantize(model, "w8a8")
