"""Calibration: the sampling-step context, streamed activation statistics, pipeline runners."""

from diffquant.calib.pipeline import pipeline_calibration, register_condition_builder
from diffquant.calib.stats import ActivationStats, ChannelRange, LayerStats, collect_activation_stats
from diffquant.calib.steps import current_step, sampling_step, track_pipeline_steps

__all__ = [
    "ActivationStats",
    "ChannelRange",
    "LayerStats",
    "collect_activation_stats",
    "current_step",
    "pipeline_calibration",
    "register_condition_builder",
    "sampling_step",
    "track_pipeline_steps",
]
