"""The zoo registry: names of the shipped reference models and how to load them.

`diffquant.zoo.load("fmnist-dit")` returns a LatentDiffusionModel; the CLI accepts zoo names
wherever a model path is accepted. Each model module registers its loader here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from diffquant.zoo.model import LatentDiffusionModel

WEIGHTS_ROOT = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    folder: Path  # the shipped pipeline folder
    loader: Callable[[Path], LatentDiffusionModel]  # folder (FP or quantized) -> model
    # "easy": trained weights as shipped, mild input outliers (2-12x the median channel); "realistic": with
    # real models' outliers (an outlier-profile variant). Methods are reported on both.
    regime: str = "easy"

    @property
    def available(self) -> bool:
        return (self.folder / "model_index.json").is_file()


_ZOO: dict[str, ZooEntry] = {}


class UnknownZooModelError(KeyError, ValueError):
    """A name that no zoo model has: a KeyError for lookups, a ValueError (user input) for the CLI."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""  # KeyError's str() would quote the message


def register(entry: ZooEntry) -> ZooEntry:
    _ZOO[entry.name] = entry
    return entry


def _ensure_registered() -> None:
    # Lazy on purpose: the model modules import diffusers' pipelines (seconds, and warnings from optional
    # packages), which `import diffquant.zoo` (every CLI command) must not pay for.
    import diffquant.zoo.models  # noqa: F401  (model modules register themselves)


def entries() -> dict[str, ZooEntry]:
    _ensure_registered()
    return dict(_ZOO)


def get(name: str, shipped: bool = True) -> ZooEntry:
    """The entry of `name`; shipped: its weights must be present (FileNotFoundError otherwise)."""
    _ensure_registered()
    if name not in _ZOO:
        raise UnknownZooModelError(f"unknown zoo model {name!r}; available: {', '.join(sorted(_ZOO)) or 'none'}")
    entry = _ZOO[name]
    if shipped and not entry.available:
        raise FileNotFoundError(f"zoo model {name!r} has no shipped weights at {entry.folder}")
    return entry


def is_zoo_name(name: str) -> bool:
    _ensure_registered()
    return name in _ZOO


def load(name: str, folder: str | Path | None = None) -> LatentDiffusionModel:
    """Load zoo model `name`: its shipped full-precision weights, or a (quantized) copy in `folder`."""
    entry = get(name)
    return entry.loader(Path(folder) if folder is not None else entry.folder)
