"""Small reference models trained and shipped by diffquant, and the data they use."""

from diffquant.zoo.model import (
    ClassConditioning,
    Conditioning,
    LatentDiffusionModel,
    generate,
    sample_latents,
)
from diffquant.zoo.registry import ZooEntry, entries, get, is_zoo_name, load, register

__all__ = [
    "ClassConditioning",
    "Conditioning",
    "LatentDiffusionModel",
    "ZooEntry",
    "entries",
    "generate",
    "get",
    "is_zoo_name",
    "load",
    "register",
    "sample_latents",
]
