"""Calibration sets: capture from the FP sampler, TDAC / uniform selection, replay, save / load.

Models: a tiny class-conditional latent DiT (fmnist-dit's architecture at width 32, depth 2, random
weights, guidance 3) and a tiny text-style UNet2DConditionModel without guidance; 3 sampling steps.
"""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch

import diffquant
from diffquant.calib import (
    CalibrationSet,
    StepFeatures,
    capped_counts,
    capture,
    capture_calls,
    counts_from_weights,
    median_step_distance,
    replay,
    resolve_feature_module,
    select,
    set_files,
    tdac_scores,
    tdac_weights,
    uniform_counts,
)
from diffquant.calib.steps import current_step
from diffquant.recipes.config import QuantSpec, Recipe
from diffquant.zoo.model import Conditioning, LatentDiffusionModel
from diffquant.zoo.models import fmnist_dit as fd
from tests.tiny_models import fill_zero_params

pytestmark = pytest.mark.usefixtures("single_thread")

SAMPLES, STEPS, BATCH = 3, 3, 2  # two sampler batches (2 + 1 samples): sample ids must carry over
DIT_TOKENS, DIT_WIDTH = 16, 32  # 8x8 latent, patch 2 -> 16 tokens


def tiny_dit(guidance: float = 3.0) -> LatentDiffusionModel:
    torch.manual_seed(0)
    transformer = fill_zero_params(fd.build_transformer(fd.DiTConfig(width=DIT_WIDTH, num_heads=2, depth=2)),
                                   std=0.2).eval()
    pipe = SimpleNamespace(transformer=transformer, vae=None,
                           scheduler=fd.sampling_scheduler(fd.train_scheduler()))
    return fd.as_latent_model(pipe, fd.SamplerConfig(guidance_scale=guidance, default_steps=STEPS))


class TokenConditioning(Conditioning):
    """Text-encoder stand-in: label -> a fixed random [4, 32] token sequence (encoder_hidden_states)."""

    def __init__(self, num_classes: int = 10):
        self.table = torch.randn(num_classes + 1, 4, 32, generator=torch.Generator().manual_seed(1))

    def denoiser_kwargs(self, labels):
        return {"encoder_hidden_states": self.table[labels]}

    def null_kwargs(self, batch, device="cpu"):
        return {"encoder_hidden_states": self.table[-1:].expand(batch, -1, -1).to(device)}


def tiny_unet() -> LatentDiffusionModel:
    from diffusers import DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=2, cross_attention_dim=32, norm_num_groups=8,
    )
    pipe = SimpleNamespace(unet=fill_zero_params(unet).eval(), vae=None, scheduler=DDIMScheduler())
    return LatentDiffusionModel("tiny-unet", pipe, TokenConditioning(), latent_shape=(4, 8, 8), num_classes=10,
                                guidance_scale=1.0, default_steps=STEPS)


def record_outputs(module: torch.nn.Module, into: list) -> torch.utils.hooks.RemovableHandle:
    """Forward hook appending (current step, output tensor) for every call (tuple / diffusers output
    dataclass: its first field)."""
    return module.register_forward_hook(
        lambda _m, _a, out: into.append((current_step(), (out if isinstance(out, torch.Tensor) else out[0]).clone()))
    )


@pytest.fixture(scope="module")
def dit_run():
    """The tiny DiT, its captured set and features, and the denoiser outputs of the sampler's calls."""
    model = tiny_dit()
    outputs: list = []
    handle = record_outputs(model.denoiser, outputs)
    try:
        cal, feats = capture(model, SAMPLES, batch_size=BATCH, progress=False)
    finally:
        handle.remove()
    return SimpleNamespace(model=model, cal=cal, feats=feats, outputs=outputs)


# -- TDAC ------------------------------------------------------------------------------------------

R2 = math.sqrt(2)


def five_step_features() -> list[torch.Tensor]:
    """Steps 0-2 identical, step 3 at 45 degrees, step 4 orthogonal to steps 0-2; two identical rows
    per step, so the flattened vectors are the 2-D directions below repeated."""
    dirs = [(1.0, 0.0)] * 3 + [(1.0, 1.0), (0.0, 1.0)]
    return [torch.tensor([d, d]) for d in dirs]


def test_tdac_scores_hand_computed():
    # mean squared distances: 0 within steps 0-2, 0.5 from them to step 3, 1 to step 4, 0.5 for 3-4
    density, diversity = tdac_scores(five_step_features(), r=0.3)
    assert density.tolist() == [2, 2, 2, 0, 0]
    # cos: 1 within 0-2, 1/sqrt2 between 0-2 and 3, 0 between 0-2 and 4, 1/sqrt2 between 3 and 4
    expected_v = [2 - 1 / R2] * 3 + [4 - 2 * R2, 4 - 1 / R2]
    torch.testing.assert_close(diversity, torch.tensor(expected_v, dtype=torch.float64), rtol=0, atol=1e-12)
    assert int(diversity.argmax()) == 4 and int(diversity.argmin()) == 3
    # a radius over 0.5 makes step 3 the densest (close to all four others)
    assert tdac_scores(five_step_features(), r=0.75)[0].tolist() == [3, 3, 3, 4, 1]


def test_tdac_weights_hand_computed():
    w = tdac_weights(StepFeatures("x", list(range(5)), five_step_features()), r=0.3, lam=1.2)
    v_hat_012 = 1 - 2 * R2 / 3  # (v_0 - v_3) / (v_4 - v_3) = (3/sqrt2 - 2) / (3/sqrt2)
    expected = [1 + 1.2 * v_hat_012] * 3 + [0.0, 1.2]
    torch.testing.assert_close(w, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    assert tdac_weights(five_step_features(), r=0.3, lam=0.0).tolist() == [1, 1, 1, 0, 0]


def test_tdac_cosine_is_over_the_flattened_step_vector():
    # per-row cosines would be 0 and 1 (mean 0.5); the flattened vectors' cosine is 100/101
    a, b = torch.tensor([[1.0, 0.0], [10.0, 0.0]]), torch.tensor([[0.0, 1.0], [10.0, 0.0]])
    _, diversity = tdac_scores([a, b])
    torch.testing.assert_close(diversity, torch.full((2,), 1 / 101, dtype=torch.float64), rtol=0, atol=1e-12)


def test_tdac_constant_scores_normalise_to_zero_and_counts_fall_back_to_uniform():
    same = [torch.ones(2, 3)] * 4
    w = tdac_weights(same)
    assert w.tolist() == [0, 0, 0, 0]
    assert counts_from_weights(w, 10) == uniform_counts(4, 10) == [3, 3, 2, 2]


def test_median_step_distance_hand_computed_and_scale_free():
    # pair distances (test_tdac_scores_hand_computed): six pairs at 0 (ordered), eight at 0.5, six at 1
    assert median_step_distance(five_step_features()) == 0.5
    assert median_step_distance([torch.ones(2, 3)]) == 0.0
    # a radius relative to it gives the same weights whatever the features' scale
    scaled = [10 * f for f in five_step_features()]
    assert median_step_distance(scaled) == pytest.approx(50.0)
    torch.testing.assert_close(tdac_weights(scaled, r=0.6 * median_step_distance(scaled)),
                               tdac_weights(five_step_features(), r=0.6 * 0.5), rtol=0, atol=1e-12)


def test_tdac_rejects_mismatched_features_and_bad_parameters():
    with pytest.raises(ValueError, match="same size"):
        tdac_scores([torch.ones(2, 3), torch.ones(2, 4)])
    with pytest.raises(ValueError, match="r >= 0"):
        tdac_weights(five_step_features(), r=-1.0)


# -- counts ----------------------------------------------------------------------------------------


def test_uniform_counts():
    assert uniform_counts(4, 10) == [3, 3, 2, 2]
    assert uniform_counts(5, 3) == [1, 1, 1, 0, 0]
    assert uniform_counts(3, 0) == [0, 0, 0]
    assert uniform_counts(2, 8) == [4, 4]


@pytest.mark.parametrize(
    ("weights", "n", "expected"),
    [
        pytest.param([1, 1, 1], 2, [1, 1, 0], id="ties-to-earlier"),
        pytest.param([1, 1, 1], 1, [1, 0, 0], id="n-below-steps"),
        pytest.param([0, 0, 5], 3, [0, 0, 3], id="zeros"),
        pytest.param([0, 1, 0, 1], 3, [0, 2, 0, 1], id="zeros-and-tie"),
        pytest.param([0, 0, 0], 4, [2, 1, 1], id="all-zero-uniform"),
        pytest.param([3, 1], 10, [8, 2], id="largest-remainder"),  # quotas 7.5, 2.5 -> tie -> earlier
        pytest.param([2, 1, 1], 5, [3, 1, 1], id="exact-plus-one"),  # quotas 2.5, 1.25, 1.25
        pytest.param([1, 2], 0, [0, 0], id="n-zero"),
    ],
)
def test_counts_from_weights_known(weights, n, expected):
    assert counts_from_weights(weights, n) == expected


@pytest.mark.parametrize("num_steps", [1, 2, 7, 25, 100])
def test_counts_from_weights_properties(num_steps):
    gen = torch.Generator().manual_seed(num_steps)
    for trial in range(30):
        w = torch.rand(num_steps, generator=gen, dtype=torch.float64)
        if trial % 3 == 0:
            w[torch.rand(num_steps, generator=gen) < 0.5] = 0  # zeros
        if trial % 3 == 1:
            w = torch.round(w * 3)  # many ties (and maybe all zero)
        for n in (0, 1, max(num_steps // 2, 1), num_steps + 1, 257):
            counts = counts_from_weights(w, n)
            assert len(counts) == num_steps and sum(counts) == n and min(counts) >= 0
            assert counts_from_weights(w.clone(), n) == counts
            if w.sum() > 0:
                quota = (w * n / w.sum()).tolist()
                assert all(abs(c - q) < 1 for c, q in zip(counts, quota, strict=True))
            else:
                assert counts == uniform_counts(num_steps, n)


def test_counts_from_weights_rejects_bad_weights():
    for bad in ([1, -1], [1, float("nan")], []):
        with pytest.raises(ValueError):
            counts_from_weights(bad, 4)
    with pytest.raises(ValueError):
        counts_from_weights([1, 1], -1)


# -- capture ---------------------------------------------------------------------------------------


def test_capture_rows_steps_and_inputs(dit_run):
    cal, model = dit_run.cal, dit_run.model
    assert len(cal) == SAMPLES * STEPS * 2 and cal.steps() == list(range(STEPS))
    assert set(cal.inputs) == {"hidden_states", "timestep", "class_labels"} and cal.static == {}
    assert cal.inputs["hidden_states"].shape == (len(cal), 4, 8, 8)
    schedule = model.scheduler.timesteps.float()
    for s in range(STEPS):
        at = cal.step == s
        assert sorted(cal.sample_id[at].tolist()) == sorted(list(range(SAMPLES)) * 2)
        assert int(cal.conditional[at].sum()) == SAMPLES
        assert torch.all(cal.inputs["timestep"][at].float() == schedule[s])
    labels = cal.inputs["class_labels"]
    assert torch.equal(labels[cal.conditional], cal.sample_id[cal.conditional] % model.num_classes)
    assert torch.all(labels[~cal.conditional] == fd.NULL_CLASS)
    assert cal.meta["feature_module"] == "transformer_blocks.1" and cal.meta["steps"] == STEPS


def test_capture_features_are_the_middle_block_of_the_conditional_rows(dit_run):
    cal, feats, model = dit_run.cal, dit_run.feats, dit_run.model
    assert feats.module == "transformer_blocks.1" and feats.steps == list(range(STEPS)) and len(feats) == STEPS
    assert all(f.shape == (SAMPLES, DIT_TOKENS * DIT_WIDTH) and f.dtype == torch.float32 for f in feats.features)
    for s in range(STEPS):
        rows = torch.nonzero((cal.step == s) & cal.conditional).flatten()
        rows = rows[cal.sample_id[rows].argsort()]
        seen: list = []
        handle = record_outputs(model.denoiser.transformer_blocks[1], seen)
        try:
            with torch.no_grad():
                model.denoiser(**{k: v[rows] for k, v in cal.inputs.items()}, return_dict=False)
        finally:
            handle.remove()
        torch.testing.assert_close(seen[0][1].reshape(SAMPLES, -1), feats.features[s], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(feats.features[0], feats.features[-1])


def test_replay_reproduces_the_sampler_calls(dit_run):
    cal, model = dit_run.cal, dit_run.model
    assert len(dit_run.outputs) == STEPS * 2  # two sampler batches
    recorded = torch.cat([out for _, out in dit_run.outputs])  # rows in call order = the set's order
    by_step = recorded[torch.argsort(cal.step, stable=True)]
    for batch_size, exact in ((2 * BATCH, True), (5, False)):
        replayed: list = []
        handle = record_outputs(model.denoiser, replayed)
        try:
            replay(cal, batch_size=batch_size)(model.denoiser)
        finally:
            handle.remove()
        steps = [s for s, out in replayed for _ in range(out.shape[0])]
        assert steps == sorted(cal.step.tolist())  # each batch ran inside its own sampling step
        got = torch.cat([out for _, out in replayed])
        if exact:  # the same batches as the sampler's calls: bitwise
            assert torch.equal(got, by_step)
        else:
            torch.testing.assert_close(got, by_step, rtol=1e-5, atol=1e-6)


def test_capture_unet_without_guidance():
    model = tiny_unet()
    cal, feats = capture(model, 2, batch_size=2, progress=False)
    assert len(cal) == 2 * STEPS and bool(cal.conditional.all())
    assert set(cal.inputs) == {"sample", "timestep", "encoder_hidden_states"}
    assert cal.inputs["encoder_hidden_states"].shape == (len(cal), 4, 32)
    assert feats.module == "mid_block" and [f.shape for f in feats.features] == [(2, 64 * 4 * 4)] * STEPS
    named, _ = capture(model, 2, steps=2, progress=False, feature_module="down_blocks.1")
    assert named.meta["feature_module"] == "down_blocks.1" and named.steps() == [0, 1]


def test_feature_module_needs_a_known_layout():
    with pytest.raises(ValueError, match="feature_module"):
        resolve_feature_module(torch.nn.Linear(2, 2))


# -- select ----------------------------------------------------------------------------------------


def picked(cal: CalibrationSet, step: int) -> list[int]:
    return sorted(set(cal.sample_id[cal.step == step].tolist()))


def test_select_counts_pairs_and_determinism(dit_run):
    cal = dit_run.cal
    chosen = select(cal, [1, 3, 0], seed=0)
    assert chosen.steps() == [0, 1] and len(chosen) == (1 + 3) * 2
    assert [len(picked(chosen, s)) for s in (0, 1)] == [1, 3]
    for s, i in {(int(s), int(i)) for s, i in zip(chosen.step, chosen.sample_id, strict=True)}:
        rows = (chosen.step == s) & (chosen.sample_id == i)
        assert sorted(chosen.conditional[rows].tolist()) == [False, True]  # the cond and null row together
        pair = chosen.inputs["hidden_states"][rows]
        assert torch.equal(pair[0], pair[1])
    again = select(cal, [1, 3, 0], seed=0)
    assert all(torch.equal(a, b) for a, b in zip(chosen._row_tensors().values(), again._row_tensors().values(),
                                                  strict=True))
    assert chosen.meta["selection"] == {"counts": [1, 3, 0], "seed": 0}
    # one step's draw does not depend on the other steps' counts; seeds vary it
    assert picked(select(cal, [1, 1, 1], seed=0), 0) == picked(chosen, 0)
    assert len({tuple(picked(select(cal, [1, 0, 0], seed=k), 0)) for k in range(12)}) > 1


def test_subset_takes_indices_in_order_or_a_mask(dit_run):
    cal = dit_run.cal
    assert cal.subset([5, 0]).sample_id.tolist() == [cal.sample_id[5], cal.sample_id[0]]
    masked = cal.subset(cal.step == 1)
    assert len(masked) == 2 * SAMPLES and masked.steps() == [1]


def test_select_rejects_impossible_counts(dit_run):
    with pytest.raises(ValueError, match="asked for 4"):
        select(dit_run.cal, [4, 0, 0])
    with pytest.raises(ValueError, match="2 counts for 3 steps"):
        select(dit_run.cal, [1, 1])


def test_replayed_selection_calibrates_per_step_ranges_like_the_sampler(dit_run):
    """Replaying the full set gives the very same per-step ranges as calibrating on the sampler."""
    per_step = Recipe(name="per-step-test", weight=QuantSpec(format="int8"),
                      input=QuantSpec(format="int8", granularity="tensor", symmetric=False, per_step=True))
    model = copy.deepcopy(dit_run.model)  # model.calibration only runs the model's own denoiser
    direct = diffquant.quantize(model.denoiser, per_step, progress=False,
                                calibration=model.calibration(SAMPLES, batch_size=BATCH, progress=False))
    model = dit_run.model
    replayed = diffquant.quantize(copy.deepcopy(model.denoiser), per_step, progress=False,
                                  calibration=replay(dit_run.cal, batch_size=4))
    subset = select(dit_run.cal, uniform_counts(STEPS, STEPS), seed=0)  # one sample per step
    selected = diffquant.quantize(copy.deepcopy(model.denoiser), per_step, progress=False,
                                  calibration=replay(subset, batch_size=4))
    layers = diffquant.api.quantized_layers(direct)
    assert layers
    for name, layer in layers.items():
        scale = layer.input_quantizer.scale
        assert scale.shape[0] == STEPS
        assert torch.equal(scale, diffquant.api.quantized_layers(replayed)[name].input_quantizer.scale)
        assert diffquant.api.quantized_layers(selected)[name].input_quantizer.scale.shape[0] == STEPS


# -- save / load -----------------------------------------------------------------------------------


def assert_same_set(a: CalibrationSet, b: CalibrationSet) -> None:
    ta, tb = a._row_tensors(), b._row_tensors()
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    assert a.static == b.static and a.meta == b.meta


def test_save_load_round_trip(dit_run, tmp_path):
    cal = select(dit_run.cal, [2, 1, 3], seed=3)
    cal.static["flag"] = True  # a static input travels in the sidecar
    path = cal.save(tmp_path / "cal.safetensors")
    sidecar = json.loads((tmp_path / "cal.json").read_text())
    assert sidecar["rows"] == len(cal) and sidecar["inputs"] == sorted(cal.inputs)
    assert_same_set(CalibrationSet.load(path), cal)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.json", "cal.safetensors"]
    with pytest.raises(ValueError, match=".safetensors"):
        cal.save(tmp_path / "cal.pt")


def test_load_rejects_a_torn_pair(dit_run, tmp_path):
    dit_run.cal.save(tmp_path / "a.safetensors")
    select(dit_run.cal, [1, 1, 1]).save(tmp_path / "b.safetensors")
    (tmp_path / "a.json").write_text((tmp_path / "b.json").read_text())  # sidecar of another set
    with pytest.raises(ValueError, match="do not match"):
        CalibrationSet.load(tmp_path / "a.safetensors")


def test_failed_save_leaves_no_partial_file(dit_run, tmp_path, monkeypatch):
    target = tmp_path / "cal.safetensors"
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError):  # no folder can be made below a file
        dit_run.cal.save(tmp_path / "file" / "cal.safetensors")
    (tmp_path / "file").unlink()
    good = select(dit_run.cal, [1, 1, 1])
    good.save(target)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(set_files, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        dit_run.cal.save(target)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp file, old set intact
    assert_same_set(CalibrationSet.load(target), good)


# -- capture from any calibration function ---------------------------------------------------------


def assert_same_capture(a: CalibrationSet, fa: StepFeatures, b: CalibrationSet, fb: StepFeatures) -> None:
    ta, tb = a._row_tensors(), b._row_tensors()
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k
    assert a.static == b.static and a.shared == b.shared == {} and a.meta["steps"] == b.meta["steps"]
    assert fa.module == fb.module and fa.steps == fb.steps
    assert all(torch.equal(x, y) for x, y in zip(fa.features, fb.features, strict=True))


@pytest.mark.parametrize("guidance", [3.0, 1.0])
def test_capture_calls_from_a_zoo_calibration_function_equals_capture(guidance):
    model = tiny_dit(guidance)
    cal, feats = capture(model, SAMPLES, batch_size=BATCH, progress=False)
    generic, generic_feats = capture_calls(model.calibration(SAMPLES, batch_size=BATCH, progress=False),
                                                model.denoiser)
    assert_same_capture(cal, feats, generic, generic_feats)
    assert generic.meta["num_samples"] == SAMPLES and generic.meta["guided_calls"] == (STEPS * 2 if guidance > 1 else 0)


def test_capture_calls_from_the_unet_equals_capture():
    model = tiny_unet()
    cal, feats = capture(model, 2, batch_size=2, progress=False)
    generic, generic_feats = capture_calls(model.calibration(2, batch_size=2, progress=False), model.denoiser)
    assert_same_capture(cal, feats, generic, generic_feats)


class Echo(torch.nn.Module):
    """A denoiser stand-in: forward(hidden_states, timestep, extra=None) -> hidden_states * 2."""

    def __init__(self):
        super().__init__()
        self.mid_block = torch.nn.Identity()

    def forward(self, hidden_states, timestep, extra=None):
        return self.mid_block(hidden_states * 2)


def test_capture_calls_infers_batches_sample_ids_and_guidance():
    x = torch.arange(12.0).reshape(6, 2)

    def calibration(den):
        for steps, rows in (((0, 1, 2), x[:2]), ((0, 1, 2), x[2:5]), ((0,), x[5:])):
            for s in steps:
                with diffquant.sampling_step(s, 3):
                    den(torch.cat([rows, rows]), torch.tensor(float(s)))  # guided: both halves equal
        with diffquant.sampling_step(1, 3):
            den(x[:4], torch.tensor(1.0))  # unguided 4 rows (halves differ): a new batch
        with diffquant.sampling_step(2, 3):
            den(x[:3], torch.tensor(2.0))  # 3 samples after 4: a new batch again

    cal, feats = capture_calls(calibration, Echo())
    ids = lambda s: cal.sample_id[cal.step == s].tolist()  # noqa: E731
    assert ids(0) == [0, 1, 0, 1, 2, 3, 4, 2, 3, 4, 5, 5]
    assert ids(1) == [0, 1, 0, 1, 2, 3, 4, 2, 3, 4, 6, 7, 8, 9]
    assert ids(2) == [0, 1, 0, 1, 2, 3, 4, 2, 3, 4, 10, 11, 12]
    assert cal.conditional[cal.step == 1].tolist() == [True] * 2 + [False] * 2 + [True] * 3 + [False] * 3 + [True] * 4
    assert cal.inputs["timestep"].shape == (len(cal),)  # 0-d timesteps broadcast to the rows
    assert cal.meta["num_samples"] == 13 and cal.meta["steps"] == 3 and cal.meta["guided_calls"] == 7
    # features: the conditional half of guided calls, every row otherwise, per step in call order
    assert [f.shape[0] for f in feats.features] == [6, 9, 8]
    torch.testing.assert_close(feats.features[0], torch.cat([x[:2], x[2:5], x[5:]]) * 2)


def _one_step_call(m):
    with diffquant.sampling_step(0):
        m(torch.ones(3, 2))


def test_capture_calls_needs_steps_and_calls_and_can_skip_features():
    den = torch.nn.Linear(2, 2)  # no feature module: fine without features
    cal, feats = capture_calls(_one_step_call, den, features=False)
    assert feats is None and len(cal) == 3 and cal.meta["feature_module"] is None and cal.meta["steps"] is None
    with pytest.raises(ValueError, match="feature_module"):
        capture_calls(_one_step_call, den)
    with pytest.raises(diffquant.calib.steps.StepContextError, match="sampling step"):
        capture_calls(lambda m: m(torch.ones(3, 2)), den, features=False)
    with pytest.raises(ValueError, match="never called"):
        capture_calls(lambda m: None, den, features=False)


@pytest.mark.parametrize("family", ["flux", "unet2d-condition", "ltx-video"])
def test_capture_calls_keeps_shared_nested_and_static_inputs(family, tmp_path):
    """FLUX's img_ids / txt_ids have no batch axis (shared), SDXL's added_cond_kwargs is a dict
    (dotted names), LTX passes ints (static): replay and save / load keep the calls exact."""
    from tests.tiny_models import TINY_MODELS

    tiny = TINY_MODELS[family]
    model, inputs = tiny.build(), tiny.inputs(2)
    outputs: list = []
    handle = record_outputs(model, outputs)

    def calibration(m):
        for s in range(2):
            with torch.no_grad(), diffquant.sampling_step(s):
                tiny.run(m, inputs)

    try:
        cal, _ = capture_calls(calibration, model, features=False)
        expected = {"flux": {"img_ids", "txt_ids"}}.get(family, set())
        assert set(cal.shared) == expected
        if family == "unet2d-condition":
            assert {"added_cond_kwargs.text_embeds", "added_cond_kwargs.time_ids"} <= set(cal.inputs)
        if family == "ltx-video":
            assert cal.static == {"num_frames": 2, "height": 4, "width": 4}
        loaded = CalibrationSet.load(cal.save(tmp_path / "cal.safetensors"))
        assert loaded.shared.keys() == cal.shared.keys()
        assert all(torch.equal(loaded.shared[k], v) for k, v in cal.shared.items())
        replay(loaded, batch_size=2)(model)
    finally:
        handle.remove()
    assert len(outputs) == 4 and torch.equal(outputs[0][1], outputs[2][1]) and torch.equal(outputs[1][1], outputs[3][1])


def test_capture_calls_refuses_a_shared_input_that_changes():
    def calibration(m):
        for s in range(2):
            with diffquant.sampling_step(s):
                m(torch.ones(3, 2), torch.zeros(3), extra=torch.full((5,), float(s)))

    with pytest.raises(ValueError, match="'extra' has no batch axis"):
        capture_calls(calibration, Echo(), features=False)


# -- capped counts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("weights", "n", "available", "expected"),
    [
        pytest.param([1, 1, 1], 6, [9, 9, 9], [2, 2, 2], id="no-cap"),
        pytest.param([8, 1, 1], 10, [4, 9, 9], [4, 3, 3], id="excess-shared"),
        pytest.param([8, 2, 1], 11, [4, 9, 9], [4, 5, 2], id="excess-by-weight"),  # 7 left: 4.67, 2.33
        pytest.param([8, 1, 1], 10, [4, 9, 1], [4, 5, 1], id="two-caps"),
        pytest.param([6, 3, 1], 10, [3, 4, 9], [3, 4, 3], id="cascade"),  # step 1 reaches its cap after step 0's
        pytest.param([1, 0, 0], 5, [2, 9, 9], [2, 2, 1], id="zero-weights-equally"),
        pytest.param([1, 1], 4, [2, 2], [2, 2], id="everything"),
        pytest.param([1, 1, 1], 2, [0, 5, 5], [0, 1, 1], id="empty-step"),
    ],
)
def test_capped_counts_known(weights, n, available, expected):
    assert capped_counts(weights, n, available) == expected


def test_capped_counts_minimum():
    assert capped_counts([0, 0, 5, 1], 8, [9, 9, 9, 9]) == counts_from_weights([0, 0, 5, 1], 8)
    counts = capped_counts([0, 0, 5, 1], 8, [9, 9, 9, 9], minimum=1)
    assert counts == [1, 1, 4, 2] and sum(counts) == 8  # one each, the other 4 by weight: 3.33, 0.67
    assert capped_counts([1, 1], 3, [0, 5], minimum=1) == [0, 3]  # a step with nothing keeps nothing
    with pytest.raises(ValueError, match="minimum"):
        capped_counts([1, 1, 1], 2, [5, 5, 5], minimum=1)


def test_capped_counts_rejects_impossible_requests():
    with pytest.raises(ValueError, match="only 6"):
        capped_counts([1, 1], 7, [3, 3])
    with pytest.raises(ValueError, match="one available count"):
        capped_counts([1, 1], 2, [3])
    with pytest.raises(ValueError):
        capped_counts([1, -1], 2, [3, 3])


@pytest.mark.parametrize("num_steps", [1, 2, 7, 25])
def test_capped_counts_properties(num_steps):
    gen = torch.Generator().manual_seed(num_steps)
    for trial in range(40):
        w = torch.rand(num_steps, generator=gen, dtype=torch.float64) ** 3  # uneven: caps bind
        if trial % 4 == 0:
            w[torch.rand(num_steps, generator=gen) < 0.5] = 0
        available = torch.randint(0, 12, (num_steps,), generator=gen).tolist()
        for n in sorted({0, min(1, sum(available)), sum(available) // 3, sum(available) // 2, sum(available)}):
            counts = capped_counts(w, n, available)
            assert sum(counts) == n and all(0 <= c <= a for c, a in zip(counts, available, strict=True))
            assert capped_counts(w.clone(), n, list(available)) == counts  # deterministic
            free = [t for t in range(num_steps) if counts[t] < available[t]]
            if w.sum() > 0:
                # a step below its cap never gets less than its share of n (the capped steps' excess
                # only adds to it), and a heavier one never gets fewer than a lighter one, up to rounding
                assert all(counts[t] > float(w[t] * n / w.sum()) - 1 for t in free)
                assert all(counts[i] >= counts[j] - 1 for i in free for j in free if w[i] >= w[j])
            if all(q < a for q, a in zip((w * n / w.sum()).tolist() if w.sum() > 0 else [n / num_steps] * num_steps,
                                         available, strict=True)):
                assert counts == counts_from_weights(w, n)  # no cap reached: plain proportional counts
