"""The calibration_selection stage: it captures the job's calibration run in full precision, keeps N
samples per the uniform or TDAC counts (capped at what each step holds), replaces the job's
calibration function and statistics by the selection's, and later stages see only the selection.

Model: tests/calib/test_sets.py's tiny class-conditional DiT (guidance 3, 3 steps), calibrated on 6
trajectories in sampler batches of 4 + 2.
"""

from __future__ import annotations

import logging

import pytest
import torch

import diffquant
from diffquant.algorithms import reconstruction
from diffquant.algorithms.calibration_selection import CalibrationSelection
from diffquant.algorithms.range_search import RangeSearch
from diffquant.algorithms.reconstruction import BlockReconstruction
from diffquant.api import CalibrationRequiredError, QuantizationJob, gather_stats
from diffquant.calib import (
    CalibrationSet,
    StepFeatures,
    capped_counts,
    capture,
    counts_from_weights,
    median_step_distance,
    replay,
    select,
    tdac_weights,
    uniform_counts,
)
from diffquant.formats import QuantSpec
from diffquant.plan import plan_layers
from diffquant.recipes import Recipe, RecipeError, get_preset
from diffquant.recipes.config import stage_from_dict
from tests.calib.test_sets import STEPS, five_step_features, tiny_dit

pytestmark = pytest.mark.usefixtures("single_thread")

SAMPLES, BATCH = 6, 4
SPECS = dict(weight=QuantSpec("int8", "channel"), input=QuantSpec("int8", "tensor", symmetric=False))
PER_STEP = dict(weight=QuantSpec("int8", "channel"),
                input=QuantSpec("int8", "tensor", symmetric=False, per_step=True))


def recipe(*stages, **specs) -> Recipe:
    return Recipe(name="selection-test", stages=stages, **(specs or SPECS))


def calibration(model):
    return model.calibration(SAMPLES, batch_size=BATCH, progress=False)


def job_after(stage: CalibrationSelection, **specs) -> QuantizationJob:
    """A fresh tiny DiT's job as quantize() has it when the stage runs, after the stage ran."""
    model = tiny_dit()
    r = recipe(stage, **specs)
    plan = plan_layers(model.denoiser, r)
    job = QuantizationJob(model.denoiser, r, plan, progress=False, calibration=calibration(model))
    stage.prepare(job)
    job.stats = gather_stats(model.denoiser, plan, job.calibration, r.calibration_rows)
    job.wrap()
    stage.apply(job)
    return job


def per_step_counts(cal: CalibrationSet, steps: int = STEPS) -> list[int]:
    return [int(torch.unique(cal.sample_id[cal.step == s]).numel()) for s in range(steps)]


def assert_same_rows(a: CalibrationSet, b: CalibrationSet) -> None:
    ta, tb = a._row_tensors(), b._row_tensors()
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.fixture(scope="module")
def direct():
    """The FP capture of the same run by hand (diffquant.calib.capture)."""
    return capture(tiny_dit(), SAMPLES, batch_size=BATCH, progress=False)


# -- selection ------------------------------------------------------------------------------------


def test_uniform_keeps_n_samples_with_uniform_counts(direct):
    job = job_after(CalibrationSelection(method="uniform", samples=7, seed=3))
    chosen = job.calibration.calibration_set
    assert per_step_counts(chosen) == uniform_counts(STEPS, 7) == [3, 2, 2]
    assert len(chosen) == 2 * 7  # guided: each sample's cond and null rows
    assert_same_rows(chosen, select(direct[0], [3, 2, 2], seed=3))
    selection = chosen.meta["selection"]
    assert selection["method"] == "uniform" and selection["counts"] == [3, 2, 2] and selection["seed"] == 3
    assert selection["available"] == [SAMPLES] * STEPS and selection["samples"] == 7


def test_tdac_counts_are_capped_at_what_each_step_holds(direct):
    cal, feats = direct
    weights = tdac_weights(feats)
    assert max(counts_from_weights(weights, 15)) > SAMPLES  # uncapped, TDAC would ask for too many
    expected = capped_counts(weights, 15, [SAMPLES] * STEPS)
    job = job_after(CalibrationSelection(method="tdac", samples=15))
    chosen = job.calibration.calibration_set
    assert per_step_counts(chosen) == expected and sum(expected) == 15 and max(expected) <= SAMPLES
    # the features came from the full-precision model, though its layers were already wrapped
    assert_same_rows(chosen, select(cal, expected, seed=0))
    selection = chosen.meta["selection"]
    assert selection["method"] == "tdac" and selection["feature_module"] == "transformer_blocks.1"
    assert selection["weights"] == pytest.approx(weights.tolist(), abs=1e-6)


def test_median_radius_scales_r_by_the_features_median_step_distance(direct):
    _, feats = direct
    median = median_step_distance(feats)
    assert median > 0
    job = job_after(CalibrationSelection(method="tdac", samples=9, r=0.5, radius="median"))
    selection = job.calibration.calibration_set.meta["selection"]
    assert selection["radius"] == "median" and selection["absolute_r"] == pytest.approx(0.5 * median)
    expected = tdac_weights(feats, r=0.5 * median)
    assert selection["weights"] == pytest.approx(expected.tolist(), abs=1e-6)
    assert per_step_counts(job.calibration.calibration_set) == capped_counts(expected, 9, [SAMPLES] * STEPS)


def test_stats_are_those_of_the_replayed_selection():
    job = job_after(CalibrationSelection(samples=5))
    chosen = job.calibration.calibration_set
    model = tiny_dit()  # the same weights, unwrapped
    expected = gather_stats(model.denoiser, job.plan, replay(chosen, 64))
    assert job.stats.keys() == expected.keys() and job.stats
    for name, stats in expected.items():
        got = job.stats[name]
        assert torch.equal(got.overall.lo, stats.overall.lo) and torch.equal(got.overall.hi, stats.overall.hi)
        assert got.overall.count == STEPS  # one replayed call per step, not the sampler's 2 batches x 3 steps
        assert got.per_step.keys() == stats.per_step.keys()
        assert all(torch.equal(got.per_step[s].hi, stats.per_step[s].hi) for s in stats.per_step)


def test_more_samples_than_captured_keeps_everything_and_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="diffquant.calibration_selection"):
        job = job_after(CalibrationSelection(method="tdac", samples=256))
    chosen = job.calibration.calibration_set
    assert per_step_counts(chosen) == [SAMPLES] * STEPS and len(chosen) == 2 * SAMPLES * STEPS
    assert "256 samples asked" in caplog.text and "keeping all" in caplog.text


def synthetic_set(steps: int = 5, samples: int = 4) -> CalibrationSet:
    rows = steps * samples
    return CalibrationSet({"x": torch.randn(rows, 2, generator=torch.Generator().manual_seed(0))},
                          torch.arange(steps).repeat_interleave(samples), torch.arange(samples).repeat(steps),
                          torch.ones(rows, dtype=torch.bool))


def test_per_step_ranges_keep_a_sample_at_every_step():
    cal, feats = synthetic_set(), StepFeatures("m", list(range(5)), five_step_features())
    stage = CalibrationSelection(method="tdac", samples=6, r=0.3, lam=1.2)  # weights ~[1.07] x 3, 0, 1.2
    assert per_step_counts(stage.choose(cal, feats), 5) == [2, 1, 1, 0, 2]
    chosen = stage.choose(cal, feats, per_step=True)
    assert per_step_counts(chosen, 5) == [1, 1, 1, 1, 2] and chosen.meta["selection"]["minimum"] == 1
    with pytest.raises(RecipeError, match="a sample at every step"):
        CalibrationSelection(method="tdac", samples=4).choose(cal, feats, per_step=True)


# -- in a recipe ----------------------------------------------------------------------------------


def test_later_stages_see_only_the_selection(monkeypatch):
    """Selection, range search and block reconstruction on per-step ranges: reconstruction records
    the N selected samples' rows, and the model quantizes end to end."""
    recorded: list = []

    def spy(model, calibration, layers):
        calls = record_calls(model, calibration, layers)
        recorded.extend(calls)
        return calls

    record_calls = reconstruction.record_calls
    monkeypatch.setattr(reconstruction, "record_calls", spy)
    model = tiny_dit()
    stages = (CalibrationSelection(method="tdac", samples=5), RangeSearch(candidates=4, step=0.1),
              BlockReconstruction(iterations=2, batch_size=4))
    diffquant.quantize(model.denoiser, recipe(*stages, **PER_STEP), calibration=calibration(model), progress=False)
    rows = sum(call.kwargs["hidden_states"].shape[0] for call in recorded)
    assert rows == 2 * 5 and {call.step for call in recorded} == set(range(STEPS))  # >= 1 sample per step
    layers = diffquant.quantized_layers(model.denoiser)
    assert layers and all(layer.input_quantizer.scale.shape[0] == STEPS for layer in layers.values())
    with torch.no_grad(), diffquant.sampling_step(0, STEPS):
        out = model.denoiser(torch.randn(2, 4, 8, 8), timestep=torch.tensor([999, 999]),
                             class_labels=torch.tensor([1, 2]), return_dict=False)[0]
    assert torch.isfinite(out).all()


def test_the_sampler_runs_once():
    model, runs = tiny_dit(), []
    sampler = calibration(model)

    def counted(denoiser):
        runs.append(1)
        sampler(denoiser)

    diffquant.quantize(model.denoiser, recipe(CalibrationSelection(samples=5)), calibration=counted, progress=False)
    assert len(runs) == 1  # captured once; statistics and calibration replay the selection


def test_the_selection_is_reported_and_saved_with_the_model(tmp_path):
    import json

    from diffquant.api import STATE_ATTR
    from diffquant.checkpoint import MANIFEST, load_quantized, save_quantized

    model = tiny_dit()
    stage = CalibrationSelection(method="tdac", samples=5, seed=2)
    diffquant.quantize(model.denoiser, recipe(stage), calibration=calibration(model), progress=False)
    reports = getattr(model.denoiser, STATE_ATTR).stage_reports
    assert len(reports) == 1 and reports[0]["type"] == "calibration_selection" and reports[0]["seconds"] > 0
    assert reports[0]["cpu_seconds"] > 0  # the work, beside the wall time other jobs stretch
    assert reports[0]["method"] == "tdac" and sum(reports[0]["counts"]) == 5 and reports[0]["seed"] == 2
    assert len(reports[0]["weights"]) == STEPS
    folder = save_quantized(model.denoiser, tmp_path / "q")
    assert json.loads((folder / MANIFEST).read_text())["stage_reports"] == reports
    assert getattr(load_quantized(folder), STATE_ATTR).stage_reports == reports


def test_must_be_the_first_stage():
    model = tiny_dit()
    r = recipe(CalibrationSelection(), CalibrationSelection(samples=3))
    with pytest.raises(RecipeError, match="first stage"):
        diffquant.quantize(model.denoiser, r, calibration=calibration(model), progress=False)


def test_needs_a_calibration_function():
    model = tiny_dit()
    r = recipe(CalibrationSelection())
    stats = gather_stats(model.denoiser, plan_layers(model.denoiser, r), calibration(model))
    with pytest.raises(CalibrationRequiredError, match="calibration function"):
        diffquant.quantize(model.denoiser, r, calibration=stats, progress=False)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"method": "random"}, "method"),
        ({"samples": 0}, "samples"),
        ({"samples": True}, "samples"),
        ({"samples": 2.5}, "samples"),
        ({"batch_size": 0}, "batch_size"),
        ({"seed": -1}, "seed"),
        ({"r": -1.0}, "r must"),
        ({"radius": "relative"}, "radius"),
        ({"lam": "high"}, "lam must"),
        ({"lam": float("nan")}, "lam must"),
        ({"feature_module": ""}, "feature_module"),
        ({"feature_module": 3}, "feature_module"),
        ({"rows": 3}, "rows"),  # unknown key
    ],
)
def test_bad_fields_are_recipe_errors(fields, match):
    with pytest.raises(RecipeError, match=match):
        stage_from_dict({"type": "calibration_selection", **fields})


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"r": 0.5}, ["r: 0.5"]),
        ({"lam": 2.0}, ["lam: 2.0"]),
        ({"radius": "median"}, ["radius: 'median'"]),
        ({"feature_module": "blocks.1"}, ["feature_module: 'blocks.1'"]),
        ({"r": 0.5, "radius": "median"}, ["r: 0.5", "radius: 'median'"]),
    ],
    ids=["r", "lam", "radius", "feature_module", "two"],
)
def test_tdac_fields_under_uniform_are_one_recipe_error_naming_them(fields, named):
    with pytest.raises(RecipeError, match="not apply to calibration_selection method 'uniform'") as error:
        stage_from_dict({"type": "calibration_selection", "method": "uniform", **fields})
    assert all(name in str(error.value) for name in named)
    stage = stage_from_dict({"type": "calibration_selection", "method": "tdac", **fields})  # TDAC reads them
    assert all(getattr(stage, key) == value for key, value in fields.items())


def test_tdac_fields_left_at_their_defaults_are_accepted_under_uniform():
    default = CalibrationSelection()
    stage = stage_from_dict({"type": "calibration_selection", "method": "uniform", "r": default.r,
                             "lam": default.lam, "radius": default.radius, "feature_module": None})
    assert stage == CalibrationSelection(method="uniform")


def test_presets_and_ablations_select_first():
    from pathlib import Path

    uniform = CalibrationSelection(method="uniform", samples=256)
    tdac = CalibrationSelection(method="tdac", samples=256, r=0.5, radius="median")
    for name, first in (("qdiffusion-w8a8", uniform), ("qdiffusion-w4a8", uniform),
                        ("edadm-w8a8", tdac), ("edadm-w4a8", tdac)):
        assert get_preset(name).stages[0] == first, name
    folder = Path(__file__).parents[2] / "benchmarks" / "reconstruction" / "recipes"
    for ablation, preset, first in (("edadm-w4a8-uniform", "edadm-w4a8", uniform),
                                    ("qdiffusion-w4a8-tdac", "qdiffusion-w4a8", tdac)):
        r, base = Recipe.from_file(folder / f"{ablation}.yaml"), get_preset(preset)
        assert r.name == ablation and r.stages[0] == first
        assert r.stages[1:] == base.stages[1:] and (r.weight, r.input) == (base.weight, base.input)
