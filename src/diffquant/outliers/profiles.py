"""Outlier profiles: seeded, function-preserving transforms that give a trained model the activation
outliers (and weight tails) of real diffusion models.

    record = apply_profile(model.denoiser, "realistic", seed=0)   # in place; returns what was done

At every scaling site (`sites.py`) a profile draws a few channels and multiplies them by a large
factor k at their source while the readers' input columns are divided by k: the readers' inputs get
channel outliers of about k times their typical channel, and the model's outputs do not change.
Weight tails take the opposite direction at linear-pair sites (a channel divided by k_w, the reader's
weight column multiplied by it). Factors are powers of two, so the rescaling is exact in floating
point; only adaLN-Zero's `1 + scale` term rounds. Profiles are registered by name; the published
figures they are drawn to match are in `statistics.PUBLISHED`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from diffquant.job import quantization_state
from diffquant.outliers.sites import PAIR_KINDS, SITE_KINDS, ScalingSite, SiteError, find_sites


class UnknownProfileError(ValueError):
    pass


@dataclass(frozen=True)
class Draw:
    """How many channels per site (a share of its width, at least 1) and their factor, log-uniform in
    [low, high] and rounded to a power of two."""

    share: float
    low: float
    high: float

    def __post_init__(self) -> None:
        if not 0 < self.share <= 1 or not 1 < self.low <= self.high:
            raise ValueError(f"invalid draw {self}: need 0 < share <= 1 and 1 < low <= high")

    def channels(self, width: int, gen: torch.Generator) -> int:
        most = max(1, math.ceil(self.share * width))
        return int(torch.randint(1, most + 1, (1,), generator=gen))

    def factors(self, count: int, gen: torch.Generator) -> torch.Tensor:
        lo, hi = math.log2(self.low), math.log2(self.high)
        exponents = torch.round(lo + (hi - lo) * torch.rand(count, generator=gen, dtype=torch.float64))
        return torch.pow(2.0, exponents)


@dataclass(frozen=True)
class OutlierProfile:
    """outliers: channel outliers at sites of `kinds`; tails: weight tails at the pair sites among
    them (None: no tails)."""

    name: str
    description: str
    kinds: tuple[str, ...] = SITE_KINDS
    outliers: Draw | None = None
    tails: Draw | None = None

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(SITE_KINDS)
        if unknown:
            raise ValueError(f"profile {self.name!r}: unknown site kinds {sorted(unknown)}; known: {SITE_KINDS}")
        if self.outliers is None and self.tails is None:
            raise ValueError(f"profile {self.name!r} changes nothing: give outliers, tails or both")


PROFILES: dict[str, OutlierProfile] = {}


def register_profile(profile: OutlierProfile) -> OutlierProfile:
    PROFILES[profile.name] = profile
    return profile


def get_profile(name: str) -> OutlierProfile:
    if name not in PROFILES:
        raise UnknownProfileError(f"unknown outlier profile {name!r}; available: {', '.join(sorted(PROFILES))}")
    return PROFILES[name]


# Channel outliers of 10-100x the median channel in a few (~1%) channels of the attention and MLP
# inputs; weight columns up to 16x their row's typical magnitude (see statistics.PUBLISHED).
REAL_OUTLIERS = Draw(share=0.015, low=10.0, high=100.0)
REAL_TAILS = Draw(share=0.015, low=4.0, high=16.0)

register_profile(OutlierProfile(
    "realistic",
    "channel outliers of 10-100x (powers of two) in ~1% of the channels at every site, and weight tails "
    "of 4-16x in the readers of attention values and gated FFNs",
    outliers=REAL_OUTLIERS, tails=REAL_TAILS))
register_profile(OutlierProfile(
    "activation-outliers", "the realistic profile's channel outliers only", outliers=REAL_OUTLIERS))
register_profile(OutlierProfile(
    "weight-tails", "the realistic profile's weight tails only", kinds=tuple(sorted(PAIR_KINDS)), tails=REAL_TAILS))


@dataclass
class SiteChange:
    site: str
    kind: str
    channels: list[int]
    factors: list[float]  # > 1: activation outliers; < 1: weight tails in the readers


@dataclass
class ProfileRecord:
    """What `apply_profile` did: enough to check it, show it and redo it."""

    profile: str
    seed: int
    changes: list[SiteChange] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def readers_of(self, sites: list[ScalingSite]) -> dict[str, float]:
        """Reader layer path -> the largest outlier factor put into its input."""
        by_path = {s.path: s for s in sites}
        largest: dict[str, float] = {}
        for change in self.changes:
            top = max(change.factors)
            for reader in by_path[change.site].readers:
                largest[reader] = max(largest.get(reader, 1.0), top)
        return largest


def _draw(site: ScalingSite, profile: OutlierProfile, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct channels of the site and their factors: outliers (k) and, at pair sites, tails (1/k_w)."""
    parts = [(profile.outliers, 1.0)]
    if site.kind in PAIR_KINDS:
        parts.append((profile.tails, -1.0))
    counts = [(d, sign, d.channels(site.width, gen)) for d, sign in parts if d is not None]
    order = torch.randperm(site.width, generator=gen)
    channels, factors, start = [], [], 0
    for draw, sign, count in counts:
        channels.append(order[start:start + count])
        factors.append(draw.factors(count, gen) ** sign)
        start += count
    return torch.cat(channels), torch.cat(factors)


def apply_profile(model: nn.Module, profile: str | OutlierProfile, seed: int = 0) -> ProfileRecord:
    """Apply the profile to the float `model` in place (function-preserving); the record lists every
    changed site with its channels and factors. Raises SiteError on a quantized model."""
    spec = get_profile(profile) if isinstance(profile, str) else profile
    if quantization_state(model) is not None:
        raise SiteError("the model is quantized: apply outlier profiles to the full-precision model, before "
                        "quantization (the profile moves factors into weights the quantizer has already rounded)")
    gen = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    record = ProfileRecord(spec.name, seed)
    for site in find_sites(model):
        if site.kind not in spec.kinds:
            continue
        channels, factors = _draw(site, spec, gen)
        if channels.numel() == 0:
            continue
        site.apply(modules, channels, factors)
        record.changes.append(SiteChange(site.path, site.kind, channels.tolist(), factors.tolist()))
    return record
