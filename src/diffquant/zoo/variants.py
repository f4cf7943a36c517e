"""Zoo variants: a shipped model with an outlier profile applied at load time (no weights of their own).

`fmnist-dit-outliers` and `fmnist-sd-outliers` compute what their base models compute (the profile is
function-preserving), but their layer inputs carry the channel outliers and weight tails of real
diffusion models, so methods are judged where real models live. The base models are easy to quantize;
these are realistic. Quantized folders made from a variant hold the transformed weights (and record
the profile), so loading one applies nothing again.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from diffquant.outliers import apply_profile, get_profile
from diffquant.zoo.model import PROVENANCE, LatentDiffusionModel
from diffquant.zoo.registry import ZooEntry, get, register


@dataclass(frozen=True)
class Variant:
    name: str
    base: str
    profile: str
    seed: int = 0

    def load(self, folder: Path) -> LatentDiffusionModel:
        base = get(self.base)
        model = replace(base.loader(folder), name=self.name)
        if folder.resolve() == base.folder.resolve():  # the shipped FP weights: give them the outliers
            record = apply_profile(model.denoiser, self.profile, self.seed)
            model.extra[PROVENANCE] = {"zoo_base": self.base, "outlier_profile": record.to_dict()}
        return model

    def entry(self) -> ZooEntry:
        base = get(self.base, shipped=False)
        description = (f"{self.base} with the '{self.profile}' outlier profile (seed {self.seed}) applied at load: "
                       f"{get_profile(self.profile).description}; same FP outputs as {self.base}")
        return ZooEntry(self.name, description, base.folder, self.load, regime="realistic")


VARIANTS = (
    Variant("fmnist-dit-outliers", "fmnist-dit", "realistic"),
    Variant("fmnist-sd-outliers", "fmnist-sd", "realistic"),
)


def register_variants() -> None:
    for variant in VARIANTS:
        register(variant.entry())
