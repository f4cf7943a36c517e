"""Typed recipe configs: what gets quantized how, and which transform stages run first.

A recipe is plain data (JSON/YAML round-trip). Its `stages` are typed stage configs looked up by
their `type` in a registry that algorithm modules fill, so a new method is a new stage class and a
new preset file — never a new branch here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import yaml

from diffquant.configs import check_field_types, check_instance_types, reject_unknown_keys
from diffquant.formats.spec import QuantSpec, SpecError
from diffquant.nn.attention import AttentionQuantConfig

if TYPE_CHECKING:  # a stage acts on the job, and the job holds the recipe: the job module imports this one
    from diffquant.job import QuantizationJob

RECIPE_VERSION = 1


class RecipeError(ValueError):
    """An invalid recipe: unknown keys, bad values, an override matching nothing."""


def _check_keys(kind: str, data: Mapping[str, Any], cls: type) -> None:
    if not isinstance(data, Mapping):
        raise RecipeError(f"{kind}: expected a mapping of its fields, got {data!r}")
    reject_unknown_keys(kind, data, cls, RecipeError)
    check_field_types(kind, data, cls, RecipeError)


# -- stages -----------------------------------------------------------------------------------

_STAGES: dict[str, type[StageConfig]] = {}


@dataclass(frozen=True)
class StageConfig:
    """Base of typed stage configs. Subclasses register under a `type` name and implement apply().

    A stage transforms the wrapped, not yet calibrated model (see diffquant.job.QuantizationJob);
    transforms must leave the full-precision function unchanged.
    """

    type: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False
    needs_training_data: ClassVar[bool] = False  # reads job.training (e.g. QAT on the diffusion loss)
    # runs gradient-based optimisation (minutes on a CPU, not seconds): `diffquant selfcheck` leaves such
    # presets to --all
    optimizes: ClassVar[bool] = False
    # The stage's algorithm revision: bump it when the same config starts to give another model (a new
    # default behaviour), so results cached under the recipe's key (report folders, training
    # checkpoints) are not reused. Revision 1 is left out of the key: older keys stay valid.
    revision: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every stage's fields are checked against their annotations before its own __post_init__ runs
        (range checks), whether the stage comes from a recipe file or is built in Python."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")

        def __post_init__(self: StageConfig) -> None:
            if type(self).__post_init__ is __post_init__:  # once, by the most derived class's hook
                check_instance_types(self, f"stage {self.type!r}", RecipeError)
            if own is not None:
                own(self)
            else:
                super(cls, self).__post_init__()

        cls.__post_init__ = __post_init__

    def __post_init__(self) -> None:
        """Range checks of a stage's fields (subclasses); their types are checked before (__init_subclass__)."""

    def prepare(self, job: QuantizationJob) -> None:
        """Runs on the full-precision model before calibration statistics are gathered and the layers
        wrapped; a stage that chooses the calibration data replaces job.calibration here."""

    def apply(self, job: QuantizationJob) -> None:
        raise NotImplementedError

    def calibration_rows(self) -> int:
        """Input rows per layer the stage needs sampled during calibration (0: ranges suffice)."""
        return 0

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, **dataclasses.asdict(self)}

    def cache_key(self) -> dict[str, Any]:
        """What identifies the stage's result: its config, and its revision from 2 on."""
        data = self.to_dict()
        return data if self.revision == 1 else {**data, "revision": self.revision}


def check_int(stage: StageConfig, name: str, minimum: int = 1) -> None:
    """A stage field that must be an integer >= minimum (bools refused), else RecipeError."""
    value = getattr(stage, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RecipeError(f"{stage.type} {name} must be an integer >= {minimum}, got {value!r}")


def check_number(stage: StageConfig, name: str, minimum: float = 0.0, strict: bool = True) -> None:
    """A stage field that must be a finite number > minimum (>= when not strict), else RecipeError."""
    value = getattr(stage, name)
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value) and (
        value > minimum if strict else value >= minimum)
    if not ok:
        raise RecipeError(f"{stage.type} {name} must be {'>' if strict else '>='} {minimum:g}, got {value!r}")


def register_stage(cls: type[StageConfig]) -> type[StageConfig]:
    if not cls.type:
        raise TypeError(f"{cls.__name__} needs a `type` name")
    _STAGES[cls.type] = cls
    return cls


def registered_stages() -> dict[str, type[StageConfig]]:
    return dict(_STAGES)


def stage_from_dict(data: dict[str, Any]) -> StageConfig:
    """The stage config `data` describes; its type must be registered (diffquant/__init__.py imports
    every algorithm module, so each has registered its stages before any recipe is read)."""
    if not isinstance(data, Mapping):
        raise RecipeError(f"a stage is a mapping with a `type` (e.g. {{type: smoothquant}}), got {data!r}")
    data = dict(data)
    kind = data.pop("type", None)
    if not isinstance(kind, str) or kind not in _STAGES:
        raise RecipeError(f"unknown stage type {kind!r}; known: {sorted(_STAGES)}")
    cls = _STAGES[kind]
    _check_keys(f"stage {kind!r}", data, cls)
    try:
        return cls(**data)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"stage {kind!r}: {exc}") from exc


# -- overrides --------------------------------------------------------------------------------

FP = "fp"  # an override's weight/input value meaning "leave in full precision"


@dataclass(frozen=True)
class Override:
    """Change the plan for the layers `match` selects; later overrides win.

    match:   "role:<glob>" over roles (e.g. "role:ffn.*", "role:time_embed") or a glob over module
             paths (e.g. "down_blocks.0.*"). Must select at least one layer of the model.
    weight / input: "fp" to leave that side unquantized, or a dict of QuantSpec fields to change
             in the recipe's spec for that side (e.g. {"format": "int8"}). Omit to keep it as planned.
    include: quantize layers whose role the adapter keeps in full precision by default.
    skip:    leave the selected layers entirely in full precision.
    """

    match: str
    weight: str | dict[str, Any] | None = None
    input: str | dict[str, Any] | None = None
    include: bool = False
    skip: bool = False

    def __post_init__(self) -> None:
        check_instance_types(self, "override", RecipeError)
        if self.include and self.skip:
            raise RecipeError(f"override {self.match!r}: include and skip exclude each other")
        for side in ("weight", "input"):
            value = getattr(self, side)
            if isinstance(value, str) and value != FP:
                raise RecipeError(f"override {self.match!r}: {side} must be {FP!r} or a dict, got {value!r}")
            if isinstance(value, dict):
                reject_unknown_keys(f"override {side}", value, QuantSpec, RecipeError)
                check_field_types(f"override {self.match!r}: {side} spec", value, QuantSpec, RecipeError)


def patch_spec(base: QuantSpec | None, patch: str | dict[str, Any] | None, side: str) -> QuantSpec | None:
    if patch is None:
        return base
    if patch == FP:
        return None
    if base is None:
        raise RecipeError(
            f"an override patches the {side} spec but the recipe quantizes no {side}s: give a full spec in "
            f"the recipe's `{side}` instead"
        )
    try:
        return base.with_changes(**patch)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"override of {side} spec: {exc}") from exc


# -- the recipe -------------------------------------------------------------------------------


def _attention_from_dict(data: Any) -> AttentionQuantConfig:
    if isinstance(data, AttentionQuantConfig):
        return data
    try:
        return AttentionQuantConfig.from_dict(data)
    except SpecError as exc:
        raise RecipeError(f"`attention`: {exc}") from exc


def _spec_from_dict(side: str, data: Any) -> QuantSpec:
    try:
        return QuantSpec.from_dict(data)
    except SpecError as exc:
        raise RecipeError(f"`{side}`: {exc}") from exc


def _entries(key: str, data: Mapping[str, Any]) -> list[Any]:
    """The list under `key` (stages, overrides); absent or null: none. Anything else is an error, not a
    sequence to iterate (a string would become one entry per character)."""
    value = data.get(key)
    if value is None:
        return []
    if not isinstance(value, list | tuple):
        raise RecipeError(f"`{key}` is a list of mappings, got {value!r}")
    return list(value)


def _override_from_dict(data: Any) -> Override:
    _check_keys("override", data, Override)
    return Override(**data)


def _recipe_parts(data: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a recipe mapping that are typed configs themselves, parsed."""
    parts: dict[str, Any] = {side: _spec_from_dict(side, data[side])
                             for side in ("weight", "input") if data.get(side) is not None}
    if data.get("attention") is not None:
        parts["attention"] = _attention_from_dict(data["attention"])
    parts["stages"] = tuple(stage_from_dict(s) for s in _entries("stages", data))
    parts["overrides"] = tuple(_override_from_dict(o) for o in _entries("overrides", data))
    return parts


def _read_recipe_file(path: Path) -> Any:
    """The parsed content of a recipe file; undecodable text and malformed YAML/JSON are RecipeErrors."""
    text = path.read_bytes()  # OSError (missing, a folder, unreadable) is the caller's to report
    try:
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text.decode())
    except UnicodeDecodeError as exc:
        raise RecipeError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise RecipeError(f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from exc
    except yaml.YAMLError as exc:
        raise RecipeError(f"not valid YAML: {_yaml_problem(exc)}") from exc


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line for a YAML error (its str() spans several, with a source excerpt)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
    return problem if mark is None else f"{problem} (line {mark.line + 1}, column {mark.column + 1})"


_PLAIN_FIELDS = ("name", "description", "version")  # the recipe's fields that are not typed configs


@dataclass(frozen=True)
class Recipe:
    """A quantization recipe.

    weight / input: default specs for the weights and the inputs (activations) of every covered
    layer; None leaves that side in full precision. stages: transforms run before the layers are
    quantized (e.g. SmoothQuant). overrides: per-role / per-module-pattern changes.
    attention: specs of the operands of the two matmuls inside attention (query, key, value, probs:
    nn.attention.AttentionQuantConfig), for every supported attention module whose q/k/v projections
    the plan quantizes; None (the default, and left out of to_dict) keeps those matmuls in full
    precision.
    """

    name: str
    description: str = ""
    weight: QuantSpec | None = None
    input: QuantSpec | None = None
    stages: tuple[StageConfig, ...] = ()
    overrides: tuple[Override, ...] = ()
    version: int = RECIPE_VERSION
    attention: AttentionQuantConfig | None = None

    def __post_init__(self) -> None:
        check_field_types("recipe", {k: getattr(self, k) for k in _PLAIN_FIELDS}, Recipe, RecipeError)
        if self.version != RECIPE_VERSION:
            raise RecipeError(f"recipe version {self.version} is not supported (this diffquant reads {RECIPE_VERSION})")
        if self.weight is None and self.input is None:
            raise RecipeError(f"recipe {self.name!r} quantizes neither weights nor inputs")
        if self.weight is not None:
            self.weight.validate_for_weight()
        if self.input is not None:
            self.input.validate_for_activation()
        if self.attention is not None and not isinstance(self.attention, AttentionQuantConfig):
            raise RecipeError(f"recipe {self.name!r}: `attention` takes an AttentionQuantConfig (from_dict parses "
                              f"a mapping), got {type(self.attention).__name__}")
        if self.attention is not None and not self.attention.specs():
            raise RecipeError(f"recipe {self.name!r}: `attention` quantizes no operand (leave the key out instead)")

    @property
    def needs_calibration(self) -> bool:
        static_input = self.input is not None and not self.input.dynamic
        static_attention = self.attention is not None and bool(self.attention.calibrated_operands())
        return static_input or static_attention or any(s.needs_calibration for s in self.stages) or any(
            isinstance(o.input, dict) and not o.input.get("dynamic", True) for o in self.overrides
        )

    @property
    def optimizes(self) -> bool:
        """Some stage runs gradient-based optimisation (StageConfig.optimizes)."""
        return any(s.optimizes for s in self.stages)

    @property
    def needs_training_data(self) -> bool:
        return any(s.needs_training_data for s in self.stages)

    @property
    def calibration_rows(self) -> int:
        """Input rows per layer that calibration samples for the stages (diffquant.calib.RowSample)."""
        return max((s.calibration_rows() for s in self.stages), default=0)

    @property
    def label(self) -> str:
        """Bits of the recipe in WxAy notation (y = 16 for full-precision inputs)."""
        w = self.weight.bits if self.weight else 16
        a = self.input.bits if self.input else 16
        return f"W{w}A{a}"

    @property
    def attention_label(self) -> str | None:
        """Which attention operands the recipe quantizes, e.g. "q,k,v int4; probs uint8" (None: none)."""
        return None if self.attention is None else self.attention.label

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = {
            "version": self.version,
            "name": self.name,
            "description": self.description,
            "weight": None if self.weight is None else self.weight.to_dict(),
            "input": None if self.input is None else self.input.to_dict(),
        }
        if self.attention is not None:  # left out when unset: older recipes serialise (and hash) as before
            data["attention"] = self.attention.to_dict()
        return {**data, "stages": [s.to_dict() for s in self.stages],
                "overrides": [dataclasses.asdict(o) for o in self.overrides]}

    def cache_key(self) -> str:
        """JSON identifying the model this recipe makes (to_dict, with the stages' revisions from 2 on):
        what caches of quantized results are keyed by."""
        data = {**self.to_dict(), "stages": [s.cache_key() for s in self.stages]}
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        if not isinstance(data, Mapping):
            got = "nothing (an empty file?)" if data is None else f"{type(data).__name__} {data!r}"
            raise RecipeError(f"a recipe is a mapping, got {got}")
        if "name" not in data:
            raise RecipeError("a recipe needs a `name`")
        reject_unknown_keys("recipe", data, cls, RecipeError)
        check_field_types("recipe", {k: data[k] for k in _PLAIN_FIELDS if k in data}, cls, RecipeError)
        try:
            parts = _recipe_parts(data)
        except (SpecError, RecipeError) as exc:
            raise RecipeError(f"recipe {data['name']!r}: {exc}") from exc
        try:
            return cls(**{**data, **parts})
        except SpecError as exc:  # RecipeErrors of __post_init__ name the recipe already
            raise RecipeError(f"recipe {data['name']!r}: {exc}") from exc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_file(cls, path: str | Path) -> Recipe:
        """A recipe from a .json file or a YAML one; any error in its content is one RecipeError that
        names the file (OSError when it cannot be read)."""
        path = Path(path)
        try:
            return cls.from_dict(_read_recipe_file(path))
        except RecipeError as exc:
            raise RecipeError(f"recipe file {path}: {exc}") from exc

