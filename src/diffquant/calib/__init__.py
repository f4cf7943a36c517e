"""Calibration: the sampling-step context, streamed activation statistics, pipeline runners, and
calibration sets (captured denoiser inputs, TDAC / uniform selection, replay)."""

from diffquant.calib.capture import SamplerModel, capture, capture_calls, resolve_feature_module
from diffquant.calib.pipeline import pipeline_calibration, register_condition_builder
from diffquant.calib.playback import replay
from diffquant.calib.selection import capped_counts, counts_from_weights, select, uniform_counts
from diffquant.calib.sets import CalibrationSet
from diffquant.calib.stats import (
    ActivationStats,
    CalibrationMismatchError,
    ChannelRange,
    LayerStats,
    collect_activation_stats,
)
from diffquant.calib.steps import current_step, sampling_step, track_pipeline_steps
from diffquant.calib.tdac import (
    TDAC_LAMBDA,
    TDAC_RADIUS,
    StepFeatures,
    median_step_distance,
    tdac_scores,
    tdac_weights,
)

__all__ = [
    "TDAC_LAMBDA",
    "TDAC_RADIUS",
    "ActivationStats",
    "CalibrationMismatchError",
    "CalibrationSet",
    "ChannelRange",
    "LayerStats",
    "SamplerModel",
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
    "resolve_feature_module",
    "sampling_step",
    "select",
    "tdac_scores",
    "tdac_weights",
    "median_step_distance",
    "track_pipeline_steps",
    "uniform_counts",
]
