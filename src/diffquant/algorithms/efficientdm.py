"""EfficientDM (METHODS.md §1): quantization-aware LoRA trained by data-free distillation, with
temporal LSQ activation quantizers.

The stage calibrates the job (round-to-nearest weight scales, static — usually per-step — input
ranges), then:

 1. installs a QALoRA adapter (diffquant.nn.qalora: Y = Q(X)·Q(W0 + B·A)ᵀ, rank 32) on every
    quantized layer with a float weight, except those `lora_skip` selects;
 2. makes every static input quantizer learnable (LSQ step size and zero point; one per sampling step
    when the recipe's input spec is `per_step`: temporal LSQ, "TALSQ");
 3. runs the job's calibration function — the full-precision sampler — `rounds` times with the model
    in full precision, so the trajectory is the teacher's. A hook on the denoiser sees every call: it
    runs the quantized student on the same inputs and takes one Adam step on
    L = mean ‖ε_student − ε_teacher‖² (the denoiser's raw output: with classifier-free guidance both
    the conditional and the unconditional halves of the batched call are matched), then hands the
    teacher's output back to the sampler. No training data is read. A calibration function with a
    `reseeded(seed)` attribute (zoo models, diffquant.calib.pipeline_calibration) starts every round
    from fresh noise; any other (e.g. diffquant.calib.replay) replays the same inputs each round;
 4. merges W0 + B·A into the weights and writes the learned step sizes / zero points back, leaving an
    ordinary round-to-nearest-format model (no adapter, no extra inference cost).

Learning rates: activation parameters `lr_act`; LoRA `lr_lora`, per layer multiplied by
mean(s_w) / (mean over layers of mean(s_w)) when `scale_aware_lr` — the paper's scale-aware
optimisation rescales LoRA gradients by the layer's weight step size, which under Adam amounts to a
per-layer learning rate. Both decay linearly to zero over the rounds (one factor per round).

The layers the paper keeps at 8 bits without LoRA (time embedding, first and last layers) stay in full
precision under every diffquant recipe (the adapters' default skip), so EfficientDM and the RTN or
reconstruction recipes are compared on the same layers.

Training is resumable: after every round the adapters, quantizer parameters and optimizer go to a
checkpoint (default ~/.cache/diffquant/train/efficientdm-<hash of config and weights>), removed when
the stage finishes; rerunning an interrupted quantization resumes there. Progress callbacks
(diffquant.algorithms.training.progress_callback) run before the first round and after every round.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from diffquant.algorithms.block_data import first_float_tensor
from diffquant.algorithms.reconstruction import only_learning
from diffquant.algorithms.training import (
    Observed,
    TrainingClock,
    adam_with_decay,
    decay_linearly,
    module_key,
    round_sampler,
    stage_checkpointer,
    train_steps,
    written_back,
)
from diffquant.job import CalibrationRequiredError, QuantizationJob
from diffquant.nn.attention import quantization_switches
from diffquant.nn.layers import QuantizedLayer, quantization_enabled
from diffquant.nn.learnable import LSQActivation, install_lsq, lsq_supports, restore
from diffquant.nn.qalora import QALoRAWeight, install_qalora, merge_qalora, remove_qalora
from diffquant.plan import override_selects
from diffquant.recipes.config import (
    Override,
    RecipeError,
    StageConfig,
    check_int,
    check_number,
    register_stage,
)

log = logging.getLogger("diffquant.efficientdm")


@register_stage
@dataclass(frozen=True)
class EfficientDM(StageConfig):
    """QALoRA + (temporal) LSQ trained by data-free distillation (module docstring).

    rank: LoRA rank (capped by the layer's shape). rounds: passes of the calibration sampler; one
    optimizer step per denoiser call. lr_lora / lr_act: Adam learning rates of the LoRA factors and of
    the activation step sizes / zero points. scale_aware_lr: per-layer LoRA rate ∝ mean weight step.
    lsq: learn the static input quantizers (False: ranges stay as calibrated). learn_zero_point: also
    learn asymmetric zero points. lora_skip: override-style matches ("role:<glob>" or a path glob) of
    layers without LoRA. objective: "distillation" (the method) or "data" (the ablation without
    distillation: `data_steps` Adam steps on the recipe's training objective). checkpoint_dir: where
    training is checkpointed (None: the default cache folder; "" disables checkpoints). seed: LoRA
    initialisation and the rounds' noise.
    """

    type: ClassVar[str] = "efficientdm"
    optimizes: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = True
    rank: int = 32
    rounds: int = 40
    lr_lora: float = 1e-4
    lr_act: float = 5e-4
    scale_aware_lr: bool = True
    lsq: bool = True
    learn_zero_point: bool = True
    lora_skip: tuple[str, ...] = field(default_factory=tuple)
    objective: str = "distillation"
    data_steps: int = 1000
    checkpoint_dir: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "lora_skip", tuple(self.lora_skip))
        for name in ("rank", "rounds", "data_steps"):
            check_int(self, name)
        for name in ("lr_lora", "lr_act"):
            check_number(self, name)
        if self.objective not in OBJECTIVES:
            raise RecipeError(f"efficientdm objective must be one of {OBJECTIVES}, got {self.objective!r}")
        for match in self.lora_skip:
            if not isinstance(match, str) or not match:
                raise RecipeError(f"efficientdm lora_skip entries are match patterns, got {match!r}")

    @property
    def needs_training_data(self) -> bool:  # the ablation without distillation trains on data
        return self.objective == "data"

    def to_dict(self) -> dict:
        return {**super().to_dict(), "lora_skip": list(self.lora_skip)}  # lists for YAML / JSON

    def apply(self, job: QuantizationJob) -> None:
        if self.objective == "distillation" and not callable(job.calibration):
            raise CalibrationRequiredError(
                "efficientdm distils along the full-precision sampler: pass diffquant.quantize a calibration "
                "function (a zoo model's .calibration(), diffquant.calib.pipeline_calibration or replay)")
        training = job.require_training() if self.objective == "data" else None
        job.calibrate()  # LoRA and LSQ start from round-to-nearest
        roles = {name: plan.role for name, plan in job.plan.items()}
        distiller = Distiller(self, job.model, job.layers, roles, job.progress)
        distiller.run(job.calibration, training)
        # training time across resumes (a resumed run's prepare/apply "seconds" count only the last part)
        job.report(self, training_seconds=round(distiller.wall_time_s, 3),
                   training_cpu_seconds=round(distiller.cpu_time_s, 3),
                   round_losses=[round(loss, 6) for loss in distiller.round_losses])


OBJECTIVES = ("distillation", "data")


# -- the training loop ----------------------------------------------------------------------------


class Distiller:
    """Runs the stage on one model: adapters, optimizer, rounds, merge (module docstring)."""

    def __init__(self, config: EfficientDM, model: nn.Module, layers: dict[str, QuantizedLayer],
                 roles: dict[str, str] | None = None, progress: bool = True) -> None:
        self.config, self.model, self.layers, self.progress = config, model, layers, progress
        self.roles = roles or {}
        # what turns the student into the teacher (layers and attention operand quantizers); found once,
        # not on every distillation step
        self.switches = quantization_switches(model)
        self.round_losses: list[float] = []  # mean distillation loss per round, for reports and tests
        self._busy = False
        self._losses: list[float] = []
        self._bar = None

    # -- setup ---------------------------------------------------------------------------------
    def lora_layers(self) -> dict[str, QuantizedLayer]:
        skip = [Override(match=m) for m in self.config.lora_skip]
        return {name: layer for name, layer in self.layers.items()
                if layer.weight is not None and layer.weight_quantizer is not None
                and not any(override_selects(o, name, self.roles.get(name, "")) for o in skip)}

    def install(self) -> tuple[dict[str, QALoRAWeight], dict[str, LSQActivation]]:
        gen = torch.Generator().manual_seed(self.config.seed)
        loras = {name: install_qalora(layer, self.config.rank, gen) for name, layer in self.lora_layers().items()}
        acts = {name: install_lsq(layer, learn_zero_point=self.config.learn_zero_point)
                for name, layer in self.layers.items() if self.config.lsq and lsq_supports(layer.input_quantizer)}
        if not (loras or acts):
            raise RecipeError("efficientdm found nothing to train: no layer with a weight quantizer or a static input")
        return loras, acts

    def optimizer(self, loras: dict[str, QALoRAWeight], acts: dict[str, LSQActivation]) -> torch.optim.Adam:
        steps = {name: float(q.scale.float().mean()) for name, q in loras.items()}
        reference = sum(steps.values()) / max(len(steps), 1)
        groups = []
        for name, qalora in loras.items():
            factor = steps[name] / reference if self.config.scale_aware_lr and reference > 0 else 1.0
            groups.append({"params": [qalora.down, qalora.up], "lr": self.config.lr_lora * factor})
        act_params = [p for q in acts.values() for p in q.parameters(recurse=False)]
        groups.append({"params": act_params, "lr": self.config.lr_act})
        return adam_with_decay(groups)

    @contextlib.contextmanager
    def finished(self) -> Iterator[None]:
        """The model as the stage will leave it, for progress callbacks: quantized (the distillation loop
        runs the teacher), learned quantizers as written back, the distillation hook quiet. The adapters
        stay: Q(W0 + B·A) is what merging leaves."""
        busy, self._busy = self._busy, True
        try:
            with quantization_enabled(self.switches, True), written_back(self.layers.values()):
                yield
        finally:
            self._busy = busy

    # -- the loop -------------------------------------------------------------------------------
    def run(self, calibration: Callable[[nn.Module], object] | None, training=None) -> None:
        """Train (distilling along `calibration`, or on `training` batches with objective "data"), then
        merge the adapters and write the quantizers back; on failure put everything back as it was."""
        loras, acts = self.install()
        try:
            if self.config.objective == "data":
                self.train_on_data(training, loras, acts)
            else:
                self.train(calibration, loras, acts)
        except BaseException:
            for layer in self.layers.values():
                remove_qalora(layer)
                restore(layer)
            raise
        for name in loras:
            merge_qalora(self.layers[name])
        for name, lsq in acts.items():
            lsq.write_back()
            self.layers[name].input_quantizer = lsq.base
        if self.round_losses:
            log.info("efficientdm: distillation loss %.4g (first round) -> %.4g (last round)",
                     self.round_losses[0], self.round_losses[-1])

    def learned(self, loras: dict[str, QALoRAWeight], acts: dict[str, LSQActivation]) -> nn.ModuleDict:
        """The trained modules in one module, for checkpoints."""
        return nn.ModuleDict({**{module_key(n): q for n, q in loras.items()},
                              **{module_key(n) + "#input": q for n, q in acts.items()}})

    def train_on_data(self, training, loras: dict[str, QALoRAWeight], acts: dict[str, LSQActivation]) -> None:
        """The ablation without distillation: the same adapters and quantizers on the diffusion loss."""
        cfg, learned = self.config, self.learned(loras, acts)
        self.optim = self.optimizer(loras, acts)

        def step(i: int) -> dict[str, float]:
            decay_linearly(self.optim, i / cfg.data_steps)
            with torch.enable_grad(), quantization_enabled(self.switches, True):
                loss = training(self.model, i)
            self.optim.zero_grad(set_to_none=True)
            loss.backward()
            self.optim.step()
            return {"loss": float(loss.detach())}

        with only_learning(self.model, list(learned.parameters())):
            clock = train_steps(step, cfg.data_steps, learned, self.optim, stage_checkpointer(cfg, self.layers),
                                Observed("efficientdm (data)", self.model, self.finished))
        self.wall_time_s, self.cpu_time_s = clock.wall_s, clock.cpu_s

    def train(self, calibration, loras: dict[str, QALoRAWeight], acts: dict[str, LSQActivation]) -> None:
        cfg, learned = self.config, self.learned(loras, acts)
        self.optim = self.optimizer(loras, acts)
        ckpt = stage_checkpointer(cfg, self.layers)
        start, elapsed = ckpt.load(learned, self.optim) if ckpt is not None else (0, 0.0)
        clock, observed = TrainingClock(elapsed), Observed("efficientdm", self.model, self.finished)
        self._bar = tqdm(desc="efficientdm", unit="step", disable=not self.progress, mininterval=5)
        handle = self.model.register_forward_hook(self._distil, with_kwargs=True)
        try:
            with only_learning(self.model, list(learned.parameters())), quantization_enabled(self.switches, False):
                observed.report(start, cfg.rounds, clock)
                for r in range(start, cfg.rounds):
                    decay_linearly(self.optim, r / cfg.rounds)
                    sampler = round_sampler(calibration, cfg.seed + r)
                    sampler(self.model)
                    if not self._losses:
                        raise RuntimeError("the calibration function never called the denoiser")
                    self.round_losses.append(sum(self._losses) / len(self._losses))
                    self._bar.set_postfix(round=f"{r + 1}/{cfg.rounds}", loss=f"{self.round_losses[-1]:.4g}")
                    if self._bar.total is None:
                        self._bar.total = len(self._losses) * cfg.rounds
                        self._bar.n = len(self._losses) * (r + 1)
                    self._losses = []
                    if ckpt is not None:
                        ckpt.save(r + 1, learned, self.optim, clock.wall_s)
                    observed.report(r + 1, cfg.rounds, clock)
        finally:
            handle.remove()
            self._bar.close()
        self.wall_time_s, self.cpu_time_s = clock.wall_s, clock.cpu_s
        if ckpt is not None:
            shutil.rmtree(ckpt.directory, ignore_errors=True)

    def _distil(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        """Forward hook on the denoiser: one distillation step on this call's inputs; the sampler
        keeps the teacher's output (returning None leaves it unchanged)."""
        if self._busy:
            return None
        if torch.is_inference_mode_enabled():
            raise RuntimeError("efficientdm needs gradients: run the sampler under torch.no_grad(), "
                               "not torch.inference_mode()")
        teacher = first_float_tensor(output).detach().float()
        self._busy = True
        try:
            with torch.enable_grad(), quantization_enabled(self.switches, True):
                student = first_float_tensor(module(*args, **kwargs)).float()
                loss = F.mse_loss(student, teacher)
            self.optim.zero_grad(set_to_none=True)
            loss.backward()
            self.optim.step()
        finally:
            self._busy = False
        self._losses.append(float(loss.detach()))
        self._bar.update()
        return None
