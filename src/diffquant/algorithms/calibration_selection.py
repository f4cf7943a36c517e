"""Calibration selection as a recipe stage: keep N samples of the calibration run, chosen per sampling
step uniformly (Q-Diffusion) or by EDA-DM's TDAC weights (METHODS.md §4, §12), for every later stage.

The stage must come first. Before anything else of the recipe runs (StageConfig.prepare: on the
full-precision model, before statistics are gathered), it runs the job's calibration function once and
records every denoiser call (diffquant.calib.capture_calls: rows, sample ids, guidance, and for TDAC
the feature module's outputs), allocates N samples over the steps, draws them (select), and replaces
the job's calibration function by a replay of the selection. The statistics, the later stages
(range_search, block_reconstruction, efficientdm) and the final calibration of static ranges
therefore see only the selected samples, and the sampler runs once.

Allocation: method "uniform" gives every step an equal share (uniform_counts), "tdac" shares in
proportion to TDAC's weights (counts_from_weights(tdac_weights(features, r, lam))); both through
capped_counts, so a step never gets more samples than it holds and its excess goes to the others
in proportion to their weights. When N exceeds everything captured, everything is kept and a warning
is logged (a short calibration run is not an error: later stages then see the whole run). When
a planned layer has per-step static input ranges, every step keeps at least one sample, since each
step's range needs data.

The selection is logged and kept in the replay's `calibration_set` (job.calibration.calibration_set),
whose meta["selection"] records the method, the counts, what each step held and the seed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from diffquant.calib import (
    TDAC_LAMBDA,
    TDAC_RADIUS,
    CalibrationSet,
    capped_counts,
    capture_calls,
    median_step_distance,
    replay,
    select,
    tdac_weights,
)
from diffquant.configs import reject_inapplicable
from diffquant.job import CalibrationRequiredError, QuantizationJob
from diffquant.recipes.config import RecipeError, StageConfig, check_int, check_number, register_stage

log = logging.getLogger("diffquant.calibration_selection")

# The fields each method reads beyond samples / seed / batch_size; one that only another method reads is
# rejected when set, since this method would silently ignore it.
METHOD_FIELDS: dict[str, tuple[str, ...]] = {"uniform": (), "tdac": ("r", "lam", "radius", "feature_module")}
METHODS = tuple(METHOD_FIELDS)
RADII = ("absolute", "median")  # how `r` is read: in the features' squared units, or x their median step distance


@register_stage
@dataclass(frozen=True)
class CalibrationSelection(StageConfig):
    """Keep `samples` samples (trajectories at a step, summed over the steps) of the calibration run
    for the later stages (module docstring). Must be the recipe's first stage.

    method: "uniform" (Q-Diffusion: equal counts per step) or "tdac" (EDA-DM: counts proportional
    to w_t = d_hat_t + lam * v_hat_t of the feature module's per-step outputs; r the density radius).
    radius: "absolute" reads r in the features' squared units (the paper's r = 3.0 / 0.3, tied to the
    authors' models); "median" reads it as r x the median pairwise step distance of these features
    (calib.median_step_distance), so one value means the same on any model. On the zoo models every
    pair of steps lies within the paper's r = 3.0 (largest distance ~0.75 on fmnist-dit), which makes
    density constant and the weights diversity alone; the presets therefore use radius "median".
    feature_module: where TDAC's features come from (None: the middle transformer block, or a UNet's
    mid_block; diffquant.calib.sets.resolve_feature_module). seed: which samples of a step are drawn.
    batch_size: rows per denoiser call when the selection is replayed.
    r, lam, radius and feature_module are TDAC's: set under method "uniform" they are an error.
    """

    type: ClassVar[str] = "calibration_selection"
    needs_calibration: ClassVar[bool] = True
    method: str = "uniform"
    samples: int = 256
    r: float = TDAC_RADIUS
    lam: float = TDAC_LAMBDA
    radius: str = "absolute"
    feature_module: str | None = None
    seed: int = 0
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise RecipeError(f"calibration_selection method must be one of {METHODS}, got {self.method!r}")
        if self.radius not in RADII:
            raise RecipeError(f"calibration_selection radius must be one of {RADII}, got {self.radius!r}")
        for name, low in (("samples", 1), ("batch_size", 1), ("seed", 0)):
            check_int(self, name, low)
        for name in ("r", "lam"):
            check_number(self, name, strict=False)
        if self.feature_module is not None and (not isinstance(self.feature_module, str) or not self.feature_module):
            raise RecipeError(f"calibration_selection feature_module must be a module name or null, "
                              f"got {self.feature_module!r}")
        others = {name for names in METHOD_FIELDS.values() for name in names} - set(METHOD_FIELDS[self.method])
        reject_inapplicable(self, tuple(sorted(others)), f"calibration_selection method {self.method!r}",
                            RecipeError)

    def prepare(self, job: QuantizationJob) -> None:
        """Capture the calibration run on the full-precision model and replace job.calibration by a
        replay of the selection; quantize() then gathers the statistics on the selection alone."""
        positions = [i + 1 for i, s in enumerate(job.recipe.stages) if s is self]
        if positions not in ([], [1]):
            raise RecipeError(f"calibration_selection must be the first stage of recipe {job.recipe.name!r}, "
                              f"and only once (it is stage {positions}): earlier stages would use unselected data")
        if not callable(job.calibration):
            raise CalibrationRequiredError(
                "calibration_selection captures the calibration run: pass diffquant.quantize a calibration "
                "function (a zoo model's .calibration(), diffquant.calib.pipeline_calibration, replay), "
                "not collected statistics")
        captured, features = capture_calls(job.calibration, job.model, self.feature_module,
                                           features=self.method == "tdac")
        chosen = self.choose(captured, features, per_step=_has_per_step_ranges(job.plan))
        job.report(self, **chosen.meta["selection"])
        replayed = replay(chosen, self.batch_size)
        replayed.calibration_set = chosen
        job.calibration = replayed

    def apply(self, job: QuantizationJob) -> None:
        """Nothing left to do: `prepare` chose the data."""

    def choose(self, captured: CalibrationSet, features=None, per_step: bool = False) -> CalibrationSet:
        """The selected subset of a captured set (features: its StepFeatures, needed for "tdac");
        per_step: keep at least one sample at every step."""
        steps = captured.steps()
        available = [int(torch.unique(captured.sample_id[captured.step == s]).numel()) for s in steps]
        total = sum(available)
        n = self.samples
        if n > total:
            log.warning("calibration_selection: %d samples asked, the calibration run gave %d (%d steps): "
                        "keeping all of them", n, total, len(steps))
            n = total
        minimum = 1 if per_step else 0
        if minimum * len(steps) > n:
            raise RecipeError(f"calibration_selection keeps {n} samples, fewer than the {len(steps)} steps, but "
                              "per-step input ranges need a sample at every step: raise `samples`")
        extra: dict[str, object] = {}
        if self.method == "tdac":
            if features is None or list(features.steps) != steps:
                raise ValueError("TDAC needs the captured set's step features, one entry per step")
            r = self.r * median_step_distance(features) if self.radius == "median" else self.r
            weights = tdac_weights(features, r, self.lam)
            extra = {"r": self.r, "radius": self.radius, "absolute_r": r, "lam": self.lam,
                     "feature_module": features.module,
                     "weights": [round(float(w), 6) for w in weights]}
        else:
            weights = torch.ones(len(steps), dtype=torch.float64)
        counts = capped_counts(weights, n, available, minimum)
        chosen = select(captured, counts, self.seed)
        chosen.meta["selection"] = {**chosen.meta["selection"], "method": self.method, "samples": self.samples,
                                    "steps": steps, "available": available, "minimum": minimum, **extra}
        log.info("calibration_selection: %s kept %d of %d samples over %d steps, counts %s (seed %d)",
                 self.method, sum(counts), total, len(steps), counts, self.seed)
        return chosen


def _has_per_step_ranges(plan) -> bool:
    return any(p.input is not None and not p.input.dynamic and p.input.per_step for p in plan.values())
