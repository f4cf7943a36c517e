"""LoRA on quantized (and float) models, without re-quantization.

    handle = diffquant.lora.attach(model, state_dict, scale=0.8, name="style")
    diffquant.lora.set_scale(handle, 0.5)        # or set_scale("style", 0.5, model=model)
    diffquant.lora.detach(model, "style")        # outputs bitwise identical to before attach

`state_dict` is a LoRA in the diffusers/PEFT layout: per adapted Linear, `<path>.lora_A.weight` [r, in]
and `<path>.lora_B.weight` [out, r] (also `lora_down` / `lora_up`, PEFT's `lora_A.<adapter>.weight`,
and an optional `<path>.alpha` scalar: the update is B·A·scale·alpha/r, alpha/r = 1 without it).
Paths may carry a prefix (`transformer.`, `unet.`, `base_model.model.`, ...); it is stripped and the rest
matched against the model's module names.

Two ways a LoRA joins a layer:

* **SVDQuant layers** (a Linear-like layer with a low-rank branch: QLinear with `low_rank_down`,
  PackedLinear, EmulatedPackedLinear) — the LoRA is concatenated onto the branch. The branch sees the smoothed
  input x̂ = x / λ, so the LoRA's down factor is multiplied by λ per input channel:
  x̂ · (diag(λ)·Aᵀ) = x · Aᵀ, and its up factor by scale·alpha/r:

      L1' = [L1 | diag(λ)·Aᵀ]   [in, r + r_lora]
      L2' = [L2 ; s·Bᵀ]          [r + r_lora, out]

  One branch GEMM as before (what SVDQuant runtimes do); the 4-bit residual is untouched. The
  original factor tensors are kept and put back on detach, so detaching is exact.
* **Any other layer** (quantized without a branch, packed, or float nn.Linear) — the LoRA runs as a
  side branch on the layer's input as the model gives it (before smoothing and quantization), through
  a forward hook: y + s · (x·Aᵀ)·Bᵀ. Removing the hook restores the layer exactly.

* **Convolutions** (nn.Conv2d, QConv2d, PackedConv2d; e.g. SD-1.5's 1x1 `proj_in` / `proj_out` and the
  resnet convs of LoCon-style LoRAs) — a side branch of two convolutions, as diffusers runs them:
  A [r, in, kh, kw] with the layer's stride / padding / dilation, then B [out, r, 1, 1]. Grouped
  convolutions raise NotImplementedError. Also on SVDQuant convolutions (with a low-rank branch): the
  side branch reads the raw input and leaves the layer's branch factors untouched, so attach / detach
  stay exact there too (concatenating would need A in the branch's GEMM view, scaled by λ per tap).

Changing the strength rebuilds the concatenation (SVDQuant layers) or just changes the number the hook
reads; adapters with strength 0 are left out of the concatenation, so strength 0 is bitwise the base.

What a LoRA leaves out: it is not part of the quantized checkpoint, and it does not survive freezing.
`save_quantized`, `freeze` and `quantize` refuse a model with a LoRA attached (LoraAttachedError): saving
would store the concatenated factors as the model's own branch, freezing would bake them into the packed
layers where detach can no longer reach them, and quantizing would wrap the adapted layers, dropping the
LoRA and its detach state. Detach, quantize / save / freeze, then attach again (attaching to a frozen
model works the same way).
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from diffquant.nn.layers import QConv2d
from diffquant.nn.packed_conv import ConvGeometry

__all__ = ["LoraAttachedError", "LoraError", "LoraHandle", "attach", "attached", "detach", "parse_lora",
           "require_detached", "set_scale"]

KNOWN_PREFIXES = ("base_model.model.", "transformer.", "unet.", "model.", "diffusion_model.", "text_encoder.")
_FACTOR = re.compile(r"^(?P<path>.+)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(?:\.[^.]+)?\.weight$")
_ALPHA = re.compile(r"^(?P<path>.+)\.alpha$")
_STATE = "_diffquant_lora"  # per-layer state: a plain attribute, outside the state dict


class LoraError(ValueError):
    """A LoRA state dict that does not fit the model."""


class LoraAttachedError(RuntimeError):
    """An operation that would bake an attached LoRA into the model (saving, freezing)."""


@dataclass
class LoraFactors:
    """One adapted layer's LoRA: A [r, in], B [out, r] (a convolution's: A [r, in, kh, kw], B [out, r, 1, 1]),
    alpha (None: alpha = r)."""

    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def factor(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank


def parse_lora(state_dict: dict[str, torch.Tensor]) -> dict[str, LoraFactors]:
    """Group a diffusers/PEFT LoRA state dict by adapted module path (prefixes not yet stripped)."""
    groups: dict[str, LoraFactors] = {}
    unknown = []
    for key, value in state_dict.items():
        if m := _FACTOR.match(key):
            entry = groups.setdefault(m["path"], LoraFactors())
            if m["kind"] in ("lora_A", "lora_down"):
                entry.down = value
            else:
                entry.up = value
        elif m := _ALPHA.match(key):
            groups.setdefault(m["path"], LoraFactors()).alpha = float(torch.as_tensor(value).reshape(()))
        else:
            unknown.append(key)
    if unknown:
        raise LoraError(f"keys that are not LoRA factors (lora_A/lora_B/lora_down/lora_up .weight, .alpha): "
                        f"{sorted(unknown)[:20]}")
    for path, entry in groups.items():
        if entry.down is None or entry.up is None:
            raise LoraError(f"{path}: needs both a down (lora_A) and an up (lora_B) factor")
        if (entry.down.dim(), entry.up.dim()) not in ((2, 2), (4, 4)):
            raise LoraError(f"{path}: factors {tuple(entry.down.shape)}, {tuple(entry.up.shape)} are neither a "
                            f"Linear LoRA (2-D) nor a convolution LoRA (4-D)")
        if entry.up.shape[1] != entry.down.shape[0]:
            raise LoraError(f"{path}: lora_B {tuple(entry.up.shape)} does not fit lora_A {tuple(entry.down.shape)}")
    return groups


def _match(path: str, modules: dict[str, nn.Module]) -> str | None:
    candidate = path
    while True:
        if candidate in modules:
            return candidate
        prefix = next((p for p in KNOWN_PREFIXES if candidate.startswith(p)), None)
        if prefix is None:
            return None
        candidate = candidate[len(prefix):]


# -- per-layer state ------------------------------------------------------------------------------------


@dataclass
class _Entry:
    down: torch.Tensor  # [in, r]: Aᵀ, times λ on a branch layer; a convolution's A [r, in, kh, kw]
    up: torch.Tensor  # [r, out]: Bᵀ, times alpha/r; a convolution's B [out, r, 1, 1] times alpha/r
    scale: float
    hook: torch.utils.hooks.RemovableHandle | None = None
    conv: ConvGeometry | None = None  # set for a convolution's side branch


@dataclass
class _LayerState:
    branch: tuple[torch.Tensor, torch.Tensor] | None  # the layer's own factors (objects kept), if it has a branch
    entries: dict[str, _Entry] = field(default_factory=dict)


def _has_branch(module: nn.Module) -> bool:
    """A Linear-like layer with a low-rank branch to concatenate onto (convolutions take side branches)."""
    return getattr(module, "low_rank_down", None) is not None and _conv_geometry(module) is None


def _conv_geometry(module: nn.Module) -> ConvGeometry | None:
    """The convolution a float, quantized or packed Conv2d computes, or None for other layers."""
    if hasattr(module, "geometry"):
        return module.geometry
    return ConvGeometry.of(module) if isinstance(module, (nn.Conv2d, QConv2d)) else None


def _check_layer(name: str, module: nn.Module, factors: LoraFactors) -> None:
    """The factors fit the layer: a Linear-like layer (2-D factors) or an ungrouped convolution (4-D)."""
    conv = _conv_geometry(module)
    if conv is not None:
        if conv.groups != 1:
            raise NotImplementedError(f"{name}: LoRA on grouped convolutions is not supported")
        expected = ((factors.rank, conv.in_channels, *conv.kernel_size), (conv.out_channels, factors.rank, 1, 1))
        if (tuple(factors.down.shape), tuple(factors.up.shape)) != expected:
            raise LoraError(f"{name}: LoRA factors A {tuple(factors.down.shape)}, B {tuple(factors.up.shape)} do not "
                            f"fit a convolution {conv.in_channels} -> {conv.out_channels}, kernel {conv.kernel_size} "
                            f"(expected {expected[0]}, {expected[1]})")
        return
    inputs, outputs = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if inputs is None or outputs is None:
        raise NotImplementedError(f"{name}: a {type(module).__name__} is not a layer LoRA can adapt")
    if factors.down.dim() != 2 or factors.down.shape[1] != inputs or factors.up.shape[0] != outputs:
        raise LoraError(f"{name}: LoRA factors A {tuple(factors.down.shape)}, B {tuple(factors.up.shape)} do not "
                        f"fit a {inputs} -> {outputs} layer")


def _set_factor(module: nn.Module, attr: str, value: torch.Tensor) -> None:
    if attr in module._parameters:
        module._parameters[attr] = value if isinstance(value, nn.Parameter) else nn.Parameter(value,
                                                                                              requires_grad=False)
    else:
        module._buffers[attr] = value


def _rebuild_branch(module: nn.Module, state: _LayerState) -> None:
    """Install [L1 | LoRA downs] and [L2 ; s·LoRA ups], or the original factors when nothing is on."""
    down, up = state.branch
    active = [e for e in state.entries.values() if e.scale != 0.0]
    if active:
        dtype = torch.promote_types(down.dtype, torch.float32)
        down = torch.cat([down.detach().to(dtype)] + [e.down.to(dtype) for e in active], dim=1).contiguous()
        up = torch.cat([up.detach().to(dtype)] + [(e.up * e.scale).to(dtype) for e in active], dim=0).contiguous()
    _set_factor(module, "low_rank_down", down)
    _set_factor(module, "low_rank_up", up)


def _side_hook(entry: _Entry):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if entry.scale == 0.0:
            return output
        x = args[0]
        down, up = entry.down.to(x.dtype), entry.up.to(x.dtype)
        if entry.conv is not None:
            g = entry.conv
            return output + F.conv2d(F.conv2d(x, down, None, g.stride, g.padding, g.dilation), up) * entry.scale
        return output + ((x @ down) @ up) * entry.scale
    return hook


def _side_entry(module: nn.Module, factors: LoraFactors, scale: float) -> _Entry:
    """A side branch's factors: Aᵀ, Bᵀ·alpha/r for a Linear layer; A, B·alpha/r for a convolution."""
    conv = _conv_geometry(module)
    down, up = factors.down.detach().to(torch.float32), factors.up.detach().to(torch.float32) * factors.factor
    if conv is None:
        down, up = down.t(), up.t()
    return _Entry(down.contiguous(), up.contiguous(), float(scale), conv=conv)


# -- handles -----------------------------------------------------------------------------------------------

_LIVE: weakref.WeakSet[LoraHandle] = weakref.WeakSet()


class LoraHandle:
    """One attached LoRA: its name, strength and the layers it adapts."""

    def __init__(self, model: nn.Module, name: str, scale: float, layers: dict[str, str]) -> None:
        self._model = weakref.ref(model)
        self.name = name
        self.scale = float(scale)
        self.layers = layers  # module path -> "branch" | "side"
        self.attached = True

    @property
    def model(self) -> nn.Module:
        model = self._model()
        if model is None:
            raise RuntimeError(f"the model LoRA {self.name!r} was attached to is gone")
        return model

    def set_scale(self, scale: float) -> None:
        set_scale(self, scale)

    def detach(self) -> None:
        detach(self.model, self)

    def __hash__(self) -> int:
        return id(self)

    def __repr__(self) -> str:
        kinds = {k: sum(v == k for v in self.layers.values()) for k in ("branch", "side")}
        return (f"LoraHandle(name={self.name!r}, scale={self.scale}, layers={len(self.layers)} "
                f"(branch={kinds['branch']}, side={kinds['side']}), attached={self.attached})")


def attached(model: nn.Module) -> dict[str, LoraHandle]:
    """The LoRAs attached to `model`, by name."""
    return model.__dict__.setdefault("_diffquant_loras", {})


def require_detached(model: nn.Module, action: str) -> None:
    """Raise LoraAttachedError if a LoRA is attached to `model`, or to a model enclosing one of its
    layers (module docstring: why)."""
    names = sorted(attached(model))
    if names:
        raise LoraAttachedError(f"cannot {action} while LoRA {', '.join(map(repr, names))} is attached: detach it "
                                f"first (diffquant.lora.detach(model, name)) and attach it again afterwards")
    adapted = next((name for name, module in model.named_modules() if _STATE in module.__dict__), None)
    if adapted is not None:
        raise LoraAttachedError(f"cannot {action} while a LoRA is attached to layer {adapted!r} (through an "
                                "enclosing model): detach it there first and attach it again afterwards")


@torch.no_grad()
def attach(model: nn.Module, lora: dict[str, torch.Tensor], scale: float = 1.0, name: str = "default") -> LoraHandle:
    """Attach a diffusers/PEFT LoRA state dict to `model` (quantized, frozen or float) at strength `scale`."""
    handles = attached(model)
    if name in handles:
        raise ValueError(f"a LoRA named {name!r} is already attached; detach it or pick another name")
    groups = parse_lora(lora)
    modules = dict(model.named_modules())
    matched, unmatched = {}, []
    for path, factors in groups.items():
        target = _match(path, modules)
        if target is None:
            unmatched.append(path)
        else:
            matched[target] = factors
    if unmatched:
        raise LoraError(f"{len(unmatched)} LoRA module path(s) match no module of the model (after stripping "
                        f"prefixes {', '.join(KNOWN_PREFIXES)}): {sorted(unmatched)}")
    for target, factors in matched.items():
        _check_layer(target, modules[target], factors)

    layers = {}
    for target, factors in matched.items():
        module = modules[target]
        state: _LayerState | None = module.__dict__.get(_STATE)
        if state is None:
            branch = (module.low_rank_down, module.low_rank_up) if _has_branch(module) else None
            state = _LayerState(branch)
            module.__dict__[_STATE] = state
        if state.branch is not None:
            down = factors.down.detach().to(torch.float32).t()
            up = factors.up.detach().to(torch.float32).t() * factors.factor
            smooth = getattr(module, "smooth", None)
            if smooth is not None:
                down = down * smooth.detach().to(torch.float32)[:, None]
            entry = _Entry(down.contiguous(), up.contiguous(), float(scale))
            state.entries[name] = entry
            _rebuild_branch(module, state)
            layers[target] = "branch"
        else:
            entry = _side_entry(module, factors, scale)
            entry.hook = module.register_forward_hook(_side_hook(entry))
            state.entries[name] = entry
            layers[target] = "side"
    handle = LoraHandle(model, name, scale, layers)
    handles[name] = handle
    _LIVE.add(handle)
    return handle


def _resolve(target: LoraHandle | str, model: nn.Module | None) -> LoraHandle:
    if isinstance(target, LoraHandle):
        return target
    if model is not None:
        handle = attached(model).get(target)
        if handle is None:
            raise KeyError(f"no LoRA named {target!r} is attached to this model; attached: {sorted(attached(model))}")
        return handle
    found = [h for h in _LIVE if h.name == target and h.attached]
    if not found:
        raise KeyError(f"no attached LoRA named {target!r}")
    if len(found) > 1:
        raise ValueError(f"several models have a LoRA named {target!r}; pass model= or the handle")
    return found[0]


@torch.no_grad()
def set_scale(target: LoraHandle | str, scale: float, model: nn.Module | None = None) -> None:
    """Change an attached LoRA's strength at run time (no re-attach, no re-quantization)."""
    handle = _resolve(target, model)
    if not handle.attached:
        raise RuntimeError(f"LoRA {handle.name!r} is detached")
    modules = dict(handle.model.named_modules())
    handle.scale = float(scale)
    for path in handle.layers:
        module = modules[path]
        state: _LayerState = module.__dict__[_STATE]
        state.entries[handle.name].scale = float(scale)
        if state.branch is not None:
            _rebuild_branch(module, state)


@torch.no_grad()
def detach(model: nn.Module, target: LoraHandle | str = "default") -> None:
    """Remove a LoRA; with none left, each layer holds exactly its original factors / no hooks again."""
    handle = _resolve(target, model)
    if handle.model is not model:
        raise ValueError(f"LoRA {handle.name!r} is attached to another model")
    modules = dict(model.named_modules())
    for path in handle.layers:
        module = modules[path]
        state: _LayerState = module.__dict__[_STATE]
        entry = state.entries.pop(handle.name)
        if entry.hook is not None:
            entry.hook.remove()
        if state.branch is not None:
            _rebuild_branch(module, state)
        if not state.entries:
            del module.__dict__[_STATE]
    handle.attached = False
    attached(model).pop(handle.name, None)
    _LIVE.discard(handle)
