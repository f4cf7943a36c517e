"""Outlier profiles: seeded draws within their published ranges, recorded, and clear errors."""

from __future__ import annotations

import math

import pytest
import torch

from diffquant.outliers import Draw, OutlierProfile, UnknownProfileError, apply_profile, get_profile
from diffquant.outliers.profiles import REAL_OUTLIERS, REAL_TAILS
from diffquant.outliers.sites import PAIR_KINDS
from tests.tiny_models import TINY_MODELS

pytestmark = pytest.mark.usefixtures("single_thread")


def _record(profile: str = "realistic", seed: int = 0, family: str = "unet2d-condition"):
    return apply_profile(TINY_MODELS[family].build(), profile, seed)


def test_the_same_seed_gives_the_same_model() -> None:
    a, b = TINY_MODELS["dit"].build(), TINY_MODELS["dit"].build()
    assert apply_profile(a, "realistic", 7).to_dict() == apply_profile(b, "realistic", 7).to_dict()
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    assert _record(seed=7).to_dict() != _record(seed=8).to_dict()


def test_factors_are_powers_of_two_within_the_draws() -> None:
    record = _record()
    for change in record.changes:
        for factor in change.factors:
            exponent = math.log2(factor)
            assert exponent == round(exponent)
            draw, k = (REAL_OUTLIERS, factor) if factor > 1 else (REAL_TAILS, 1 / factor)
            assert round(math.log2(draw.low)) <= math.log2(k) <= round(math.log2(draw.high))


def test_channel_counts_and_disjoint_outliers_and_tails() -> None:
    """A few channels per site (at most share x width); outliers and tails never share a channel
    (activation and weight extremes sit in different channels, PTQ4DiT)."""
    model = TINY_MODELS["unet2d-condition"].build()
    record = apply_profile(model, "realistic", 1)
    for change in record.changes:
        assert len(set(change.channels)) == len(change.channels)
        outliers = sum(f > 1 for f in change.factors)
        tails = sum(f < 1 for f in change.factors)
        assert outliers >= 1
        assert (tails >= 1) == (change.kind in PAIR_KINDS)


def test_weight_tails_only_scale_channels_down_at_pair_sites() -> None:
    record = _record("weight-tails")
    assert record.changes and all(c.kind in PAIR_KINDS and max(c.factors) < 1 for c in record.changes)


def test_readers_of_names_the_largest_factor() -> None:
    from diffquant.outliers import find_sites

    model = TINY_MODELS["dit"].build()
    sites = find_sites(model)
    record = apply_profile(model, "activation-outliers", 0)
    readers = record.readers_of(sites)
    qkv = [p for p in readers if p.endswith(("to_q", "to_k", "to_v"))]
    assert qkv and all(readers[p] >= 8 for p in qkv)


def test_errors_are_clear() -> None:
    with pytest.raises(UnknownProfileError, match="available: activation-outliers, realistic, weight-tails"):
        get_profile("huge")
    with pytest.raises(ValueError, match="invalid draw"):
        Draw(share=0.0, low=10, high=100)
    with pytest.raises(ValueError, match="invalid draw"):
        Draw(share=0.1, low=100, high=10)
    with pytest.raises(ValueError, match="changes nothing"):
        OutlierProfile("empty", "nothing")
    with pytest.raises(ValueError, match="unknown site kinds"):
        OutlierProfile("bad", "x", kinds=("resblock",), outliers=REAL_OUTLIERS)
