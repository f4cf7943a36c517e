"""QuEST (METHODS.md §3): data-free selective fine-tuning of the layers that read the time embedding and of
the attention-related layers, so that W4A4 with static activations stays readable.

The stage starts from what the recipe's earlier stages left (the quest presets: block
reconstruction, AdaRound weights and LSQ input step sizes) and calibrates whatever is still uncalibrated
(round-to-nearest weights, static input ranges). Then:

 1. Layer groups, by role (the role adapters, so every covered family): C_TE, the quantized layers that
    read the time embedding (TIME_ROLES: a UNet ResBlock's time projection; adaLN modulation and the
    timestep MLP where a recipe quantizes them), and C_A, the attention-related ones (ATTENTION_ROLES:
    q / k / v / out of self- and cross-attention, the FFN). `layers: all` (the ablation) puts every
    other quantized layer in C_A too.
 2. Rounds of the job's calibration function, the full-precision sampler (fresh noise every round when it
    has `reseeded`, as zoo models' and pipeline_calibration's have; a calibration selection is replayed).
    No training data is read. For the rounds the denoiser's forward is replaced: each call runs the
    full-precision reference (a copy of the model taken in prepare, before any stage changed a weight),
    whose output the sampler gets (the trajectory is the teacher's), then the quantized student on the
    same inputs, and takes one Adam step on

        L = tla · Σ_{l∈C_TE} mse(Õ_l, O_l) + cma · Σ_{l∈C_A} mse(Õ_l, O_l) + lambda_g · mse(ε̃, ε)

    O_l: layer l's output in the reference, on full-precision inputs; Õ_l: the student's, on its own
    quantized inputs (the paper's L_TLA, L_CMA); ε, ε̃: the denoiser outputs (L_G). The paper's objective
    is L_TLA + L_CMA + 2·L_G (tla = cma = 1, lambda_g = 2).
 3. Learned: the float (latent) weights of the group being trained, through their weight quantizers with
    the step sizes frozen (rounding straight-through), and every static input step size (LSQ; one per
    sampling step when the input spec is per_step, or with `per_step_inputs`, which first copies a range
    held for all steps to one per step: the paper's PTQ start has one) and static attention-operand step
    size, all the time.
    Progressive (the paper's order): the first half of the rounds trains C_TE's weights, the second
    C_A's; a model without quantized time-embedding layers (DiTs under the default coverage) spends every
    round on C_A. `progressive: false` trains both groups from the first round. Learning rates decay
    linearly to zero over the rounds.
 4. The learned step sizes are written back; the trained weights stay float: their round-to-nearest codes
    under the frozen step sizes (what fake quantization computed while training) are the layer's codes.

First and last layers: the inputs of the first and the last quantized layer a denoiser call runs are given
`end_format` in prepare (default int8: the paper keeps its first and last layers at 8-bit activations;
"" leaves them as the recipe says).

Resumable like EfficientDM: after every round the learned tensors and the optimizer go to a checkpoint
(default ~/.cache/diffquant/train/quest-<hash of config and starting layers>), removed at the end; the
model is put back as the stage found it when training fails. Reported: the share of the denoiser's
parameters trained, the share of their codes that fine-tuning changed, the layers per group, the training
time and the loss per round.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from diffquant.algorithms.block_data import execution_order, first_float_tensor, record_calls
from diffquant.algorithms.reconstruction import attention_operands, only_learning
from diffquant.algorithms.training import (
    Observed,
    TrainingClock,
    adam_with_decay,
    decay_linearly,
    module_key,
    round_sampler,
    stage_checkpointer,
    written_back,
)
from diffquant.formats import UnknownFormatError, get_format
from diffquant.job import CalibrationRequiredError, QuantizationJob
from diffquant.nn.layers import QuantizedLayer
from diffquant.nn.learnable import LSQActivation, install_lsq, install_lsq_on, lsq_supports
from diffquant.recipes.config import RecipeError, StageConfig, check_int, check_number, register_stage

log = logging.getLogger("diffquant.quest")

# C_TE: layers whose input is (a projection of) the timestep embedding
TIME_ROLES = frozenset({"time_embed", "resblock.time_proj", "adaln"})
# C_A: the attention-related layers, the activation-sensitive ones below 6 bits
ATTENTION_ROLES = frozenset({"attn.q", "attn.k", "attn.v", "attn.out", "cross_attn.q", "cross_attn.k",
                             "cross_attn.v", "cross_attn.out", "ffn.up", "ffn.down"})
LAYER_CHOICES = ("selected", "all")


@register_stage
@dataclass(frozen=True)
class QuEST(StageConfig):
    """Selective data-free fine-tuning (module docstring).

    rounds: passes of the calibration sampler, one Adam step per denoiser call. lr_weight / lr_act: Adam
    rates of the latent weights and of the step sizes. tla / cma / lambda_g: weights of the three loss
    terms (0 switches a term off: the ablations). layers: "selected" (C_TE and C_A) or "all" (every
    quantized layer trained). progressive: C_TE's weights first, then C_A's. end_format: the input format
    of the first and last quantized layers ("" keeps the recipe's). per_step_inputs: give every static
    input range that has one range for all sampling steps one per step before training, each a copy of it
    (`expand_per_step`). checkpoint_dir as EfficientDM's.
    seed: the rounds' noise.
    """

    type: ClassVar[str] = "quest"
    optimizes: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = True
    rounds: int = 20
    lr_weight: float = 1e-5
    lr_act: float = 1e-4
    tla: float = 1.0
    cma: float = 1.0
    lambda_g: float = 2.0
    layers: str = "selected"
    progressive: bool = True
    end_format: str = "int8"
    per_step_inputs: bool = False
    checkpoint_dir: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_int(self, "rounds")
        for name in ("lr_weight", "lr_act"):
            check_number(self, name)
        for name in ("tla", "cma", "lambda_g"):
            check_number(self, name, strict=False)
        if self.layers not in LAYER_CHOICES:
            raise RecipeError(f"quest layers must be one of {LAYER_CHOICES}, got {self.layers!r}")
        if self.end_format:
            try:
                get_format(self.end_format)
            except UnknownFormatError as exc:
                raise RecipeError(f"quest end_format: {exc} ('' keeps the recipe's)") from exc
        if self.tla == self.cma == self.lambda_g == 0:
            raise RecipeError("quest needs a loss: tla, cma and lambda_g are all 0")

    def prepare(self, job: QuantizationJob) -> None:
        if not callable(job.calibration):
            raise CalibrationRequiredError(
                "quest distils along the full-precision sampler: pass diffquant.quantize a calibration "
                "function (a zoo model's .calibration(), diffquant.calib.pipeline_calibration or replay)")
        job.keep_reference()
        if self.end_format:
            job.report(self, end_layers=self.widen_ends(job))

    def widen_ends(self, job: QuantizationJob) -> list[str]:
        """Give the first and the last quantized input a denoiser call runs `end_format` (in the plan)."""
        names = [name for name, plan in job.plan.items() if plan.input is not None]
        if not names:
            return []
        call = record_calls(job.model, job.calibration, [], first_only=True)[0]
        device = next(job.model.parameters()).device
        order = execution_order(job.model, names, call, device)
        ends = sorted({order[0], order[-1]}) if order else []
        for name in ends:
            plan = job.plan[name]
            job.plan[name] = dataclasses.replace(plan, input=plan.input.with_changes(format=self.end_format))
        return ends

    def apply(self, job: QuantizationJob) -> None:
        if job.reference is None:
            raise RuntimeError("quest needs the full-precision reference its prepare() keeps")
        job.calibrate()  # anything the earlier stages left uncalibrated: round-to-nearest, static ranges
        if self.per_step_inputs:
            job.report(self, expanded_per_step=len(expand_per_step(job)))
        roles = {name: plan.role for name, plan in job.plan.items()}
        trainer = SelectiveTrainer(self, job.model, job.reference, job.layers, roles, job.progress)
        trainer.run(job.calibration)
        job.report(self, **trainer.summary())


def expand_per_step(job: QuantizationJob) -> list[str]:
    """Every calibrated static input range of the job's layers that holds for all sampling steps becomes one
    range per step of the calibration run, each a copy of it (in the quantizer and in the plan the checkpoint
    saves): the model computes exactly what it did, and training can then move each step's range on its
    own. What the paper's PTQ start does (one range) before QuEST learns the scales per step; reconstructing
    with per-step ranges instead cost 0.74 dB on fmnist-sd (edadm-w4a8 with per_step: 37.79 vs 38.53 dB)."""
    expanded = []
    for name, layer in job.layers.items():
        quantizer = layer.input_quantizer
        if quantizer is None or quantizer.spec.dynamic or quantizer.spec.per_step or quantizer.scale is None:
            continue
        steps = job.require_stats().require(name).num_steps
        if steps < 1:
            raise CalibrationRequiredError(
                f"quest per_step_inputs: layer {name!r} was calibrated without sampling steps; run the sampler "
                "under diffquant.calib.sampling_step (zoo models and pipeline_calibration do)")
        quantizer.spec = quantizer.spec.with_changes(per_step=True)
        quantizer.scale = quantizer.scale.expand(steps, *quantizer.scale.shape).clone()
        if quantizer.zero_point is not None:
            quantizer.zero_point = quantizer.zero_point.expand(steps, *quantizer.zero_point.shape).clone()
        job.plan[name] = dataclasses.replace(job.plan[name], input=quantizer.spec)
        expanded.append(name)
    return expanded


def layer_groups(choice: str, layers: dict[str, QuantizedLayer], roles: dict[str, str]) -> dict[str, list[str]]:
    """{"time": C_TE, "attention": C_A}: the layers with a trainable weight in each group, in model order."""
    trainable = [n for n, layer in layers.items() if layer.weight is not None and layer.weight_quantizer is not None]
    time = [n for n in trainable if roles.get(n) in TIME_ROLES]
    rest = [n for n in trainable if n not in time and (choice == "all" or roles.get(n) in ATTENTION_ROLES)]
    return {"time": time, "attention": rest}


class SelectiveTrainer:
    """Runs the stage on one model: groups, step-size quantizers, rounds, write-back (module docstring)."""

    def __init__(self, config: QuEST, model: nn.Module, reference: nn.Module, layers: dict[str, QuantizedLayer],
                 roles: dict[str, str], progress: bool = True) -> None:
        self.config, self.model, self.reference, self.layers, self.progress = config, model, reference, layers, progress
        self.groups = layer_groups(config.layers, layers, roles)
        group_list = [g for g in (self.groups["time"], self.groups["attention"]) if g]
        self.phases = group_list if config.progressive else [[n for g in group_list for n in g]]
        if not self.phases:
            raise RecipeError("quest found no layer to fine-tune: no quantized time-embedding or attention layer "
                              "with a weight quantizer (try layers: all)")
        # the layers whose outputs enter the loss, with their term's weight
        terms = [(self.groups["attention"], config.cma), (self.groups["time"], config.tla)]
        self.matched = {n: weight for names, weight in terms if weight > 0 for n in names}
        self.round_losses: list[float] = []
        self._losses: list[float] = []
        self._busy = False
        self._outputs: dict[str, dict[str, list[torch.Tensor]]] = {"fp": {}, "q": {}}

    # -- setup ---------------------------------------------------------------------------------
    def install(self) -> tuple[dict[str, LSQActivation], dict[str, LSQActivation]]:
        inputs = {n: install_lsq(layer) for n, layer in self.layers.items() if lsq_supports(layer.input_quantizer)}
        operands = {key: install_lsq_on(q, op) for key, (q, op) in attention_operands(self.model).items()
                    if lsq_supports(getattr(q, op))}
        return inputs, operands

    def trained(self, phase: int | None = None) -> list[str]:
        return [n for p in self.phases for n in p] if phase is None else self.phases[phase]

    def weights(self, phase: int | None = None) -> list[nn.Parameter]:
        return [self.layers[n].weight for n in self.trained(phase)]

    def phase_of(self, round_index: int) -> int:
        return len(self.phases) * round_index // self.config.rounds

    # -- the loop -------------------------------------------------------------------------------
    def run(self, calibration: Callable[[nn.Module], object]) -> None:
        cfg = self.config
        ckpt = stage_checkpointer(cfg, self.layers)  # keyed by the starting layers: before anything is installed
        originals = [w.detach().clone() for w in self.weights()]
        inputs, operands = self.install()
        learned = nn.ModuleDict({**{module_key(n): layer for n, layer in self.layers.items()},
                                 **{module_key(k) + "#operand": q for k, q in operands.items()}})
        self.steps = [p for q in [*inputs.values(), *operands.values()] for p in q.parameters(recurse=False)]
        # Adam updates float32 masters of 16-bit weights: its float16 state underflows (eps 1e-8 is 0 there)
        self.masters = [(w, w if w.dtype == torch.float32 else nn.Parameter(w.detach().float())) for w in self.weights()]
        self.optim = adam_with_decay([{"params": [master for _, master in self.masters], "lr": cfg.lr_weight},
                                      {"params": self.steps, "lr": cfg.lr_act}])
        try:
            self.train(calibration, learned, ckpt)
        except BaseException:
            with torch.no_grad():
                for weight, original in zip(self.weights(), originals, strict=True):
                    weight.copy_(original)
            self._put_back(inputs, operands, write=False)
            raise
        self._put_back(inputs, operands, write=True)
        self.codes_changed = self.share_of_codes_changed(originals)
        if self.round_losses:
            log.info("quest: loss %.4g (first round) -> %.4g (last round)", self.round_losses[0], self.round_losses[-1])

    @torch.no_grad()
    def share_of_codes_changed(self, originals: list[torch.Tensor]) -> float:
        """The share of the trained weights' codes that fine-tuning moved: what the step reached, since a
        latent weight on a grid point (as AdaRound leaves it) changes nothing until it crosses half a step."""
        changed = total = 0
        for name, original in zip(self.trained(), originals, strict=True):
            layer = self.layers[name]
            codes = [layer.weight_quantizer.codes(layer.weight_matrix(w)) for w in (layer.weight, original)]
            changed += int((codes[0] != codes[1]).sum())
            total += codes[0].numel()
        return changed / max(total, 1)

    def _put_back(self, inputs: dict[str, LSQActivation], operands: dict[str, LSQActivation], write: bool) -> None:
        for name, lsq in inputs.items():
            if write:
                lsq.write_back()
            self.layers[name].input_quantizer = lsq.base
        owners = attention_operands(self.model)
        for key, lsq in operands.items():
            if write:
                lsq.write_back()
            quantizers, op = owners[key]
            setattr(quantizers, op, lsq.base)

    def train(self, calibration, learned: nn.Module, ckpt) -> None:
        cfg = self.config
        start, elapsed = ckpt.load(learned, self.optim) if ckpt is not None else (0, 0.0)
        clock, observed = TrainingClock(elapsed), Observed("quest", self.model, self.finished)
        self._bar = tqdm(desc="quest", unit="step", disable=not self.progress, mininterval=5)
        try:
            with self.hooked():
                observed.report(start, cfg.rounds, clock)
                for r in range(start, cfg.rounds):
                    self.train_round(r, calibration)
                    if ckpt is not None:
                        ckpt.save(r + 1, learned, self.optim, clock.wall_s)
                    observed.report(r + 1, cfg.rounds, clock)
        finally:
            self._bar.close()
        self.wall_time_s, self.cpu_time_s = clock.wall_s, clock.cpu_s
        if ckpt is not None:
            shutil.rmtree(ckpt.directory, ignore_errors=True)

    def train_round(self, r: int, calibration) -> None:
        cfg = self.config
        decay_linearly(self.optim, r / cfg.rounds)
        phase = self.phase_of(r)
        sampler = round_sampler(calibration, cfg.seed + r)
        with only_learning(self.model, [*self.weights(phase), *self.steps]):
            sampler(self.model)
        if not self._losses:
            raise RuntimeError("the calibration function never called the denoiser")
        self.round_losses.append(sum(self._losses) / len(self._losses))
        if self._bar.total is None:
            self._bar.total, self._bar.n = len(self._losses) * cfg.rounds, len(self._losses) * (r + 1)
        self._bar.set_postfix(round=f"{r + 1}/{cfg.rounds}", phase=phase + 1, loss=f"{self.round_losses[-1]:.4g}")
        self._losses = []

    @contextlib.contextmanager
    def hooked(self) -> Iterator[None]:
        """The denoiser's forward replaced by `_distil`, and the matched layers' outputs captured in both
        the reference and the student."""
        handles = []
        for name in self.matched:
            handles.append(self.reference.get_submodule(name).register_forward_hook(self._capture("fp", name)))
            handles.append(self.layers[name].register_forward_hook(self._capture("q", name)))
        self.model.forward = self._distil  # an instance attribute shadows the class's forward
        try:
            yield
        finally:
            del self.model.forward
            for handle in handles:
                handle.remove()

    def _capture(self, side: str, name: str) -> Callable:
        def hook(_module, _args, output):
            if not self._busy:
                self._outputs[side].setdefault(name, []).append(output)
        return hook

    def _student(self, *args, **kwargs):
        return type(self.model).forward(self.model, *args, **kwargs)

    def _distil(self, *args, **kwargs):
        """The denoiser call during training: the reference's output for the sampler, after one step on the
        student (module docstring)."""
        if self._busy:  # a progress callback runs the finished model
            return self._student(*args, **kwargs)
        if torch.is_inference_mode_enabled():
            raise RuntimeError("quest needs gradients: run the sampler under torch.no_grad(), not "
                               "torch.inference_mode()")
        try:
            with torch.no_grad():
                output = self.reference(*args, **kwargs)
            with torch.enable_grad():
                student = first_float_tensor(self._student(*args, **kwargs)).float()
                loss = self.loss(student, first_float_tensor(output).detach().float())
            self.optim.zero_grad(set_to_none=True)
            loss.backward()
            self.step()
        finally:
            self._outputs = {"fp": {}, "q": {}}
        self._losses.append(float(loss.detach()))
        self._bar.update()
        return output

    def step(self) -> None:
        """One Adam step, through the float32 masters of 16-bit weights."""
        for weight, master in self.masters:
            if master is not weight and weight.grad is not None:
                master.grad, weight.grad = weight.grad.float(), None
        self.optim.step()
        with torch.no_grad():
            for weight, master in self.masters:
                if master is not weight:
                    weight.copy_(master)

    def loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        total = self.config.lambda_g * F.mse_loss(student, teacher)
        fp, q = self._outputs["fp"], self._outputs["q"]
        for name, weight in self.matched.items():
            for out_q, out_fp in zip(q.get(name, []), fp.get(name, []), strict=True):
                total = total + weight * F.mse_loss(out_q.float(), out_fp.detach().float())
        return total

    @contextlib.contextmanager
    def finished(self) -> Iterator[None]:
        """The model as the stage will leave it, for progress callbacks: the learned step sizes as written
        back, calls going straight to the student."""
        busy, self._busy = self._busy, True
        try:
            with written_back(self.layers.values()):
                yield
        finally:
            self._busy = busy

    def summary(self) -> dict:
        trained = sum(w.numel() for w in self.weights())
        total = sum(p.numel() for p in self.reference.parameters())
        return {"layers": {group: len(names) for group, names in self.groups.items()},
                "phases": len(self.phases), "trained_parameters": trained, "model_parameters": total,
                "trained_share": round(trained / total, 6),
                "codes_changed": round(self.codes_changed, 6), "step_sizes": len(self.steps),
                "training_seconds": round(self.wall_time_s, 3), "training_cpu_seconds": round(self.cpu_time_s, 3),
                "round_losses": [round(loss, 6) for loss in self.round_losses]}
