"""Calibration: the sampling-step context, streamed activation statistics, pipeline runners, and
calibration sets (captured denoiser inputs, TDAC / uniform selection, replay)."""

from diffquant.calib.pipeline import pipeline_calibration, register_condition_builder
from diffquant.calib.sets import (
    CalibrationSet,
    StepFeatures,
    capped_counts,
    capture,
    capture_calls,
    counts_from_weights,
    median_step_distance,
    replay,
    select,
    tdac_scores,
    tdac_weights,
    uniform_counts,
)
from diffquant.calib.stats import (
    ActivationStats,
    CalibrationMismatchError,
    ChannelRange,
    LayerStats,
    collect_activation_stats,
)
from diffquant.calib.steps import current_step, sampling_step, track_pipeline_steps

__all__ = [
    "ActivationStats",
    "CalibrationMismatchError",
    "CalibrationSet",
    "ChannelRange",
    "LayerStats",
    "StepFeatures",
    "capped_counts",
    "capture",
    "capture_calls",
    "collect_activation_stats",
    "counts_from_weights",
    "current_step",
    "pipeline_calibration",
    "register_condition_builder",
    "replay",
    "sampling_step",
    "select",
    "tdac_scores",
    "tdac_weights",
    "median_step_distance",
    "track_pipeline_steps",
    "uniform_counts",
]
