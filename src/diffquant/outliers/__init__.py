"""Activation outliers of real diffusion models, given to any diffusers model without changing what it
computes (`profiles`, `sites`), and measured (`statistics`, `diffquant outliers`)."""

from diffquant.outliers.profiles import (
    PROFILES,
    Draw,
    OutlierProfile,
    ProfileRecord,
    UnknownProfileError,
    apply_profile,
    get_profile,
    register_profile,
)
from diffquant.outliers.sites import SITE_KINDS, ScalingSite, SiteError, find_sites

__all__ = [
    "PROFILES",
    "SITE_KINDS",
    "Draw",
    "OutlierProfile",
    "ProfileRecord",
    "ScalingSite",
    "SiteError",
    "UnknownProfileError",
    "apply_profile",
    "find_sites",
    "get_profile",
    "register_profile",
]
