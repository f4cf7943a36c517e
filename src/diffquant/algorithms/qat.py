"""Plain quantization-aware training: the baseline EfficientDM is measured against (METHODS.md §1).

The stage calibrates the job (round-to-nearest weight scales, static input ranges), makes the weight
step sizes and the static input step sizes (and zero points) learnable (LSQ, diffquant.nn.learnable),
and fine-tunes *every* parameter of the model together with them on training data: Adam on
`job.training(model, i)` (e.g. diffquant.zoo.training.diffusion_objective, the denoising loss on the
model's training latents) for `iterations` steps, learning rates decaying linearly to zero. Afterwards
the learned step sizes are written back (rounded to the spec's scale formats), leaving an ordinary
round-to-nearest-format model of the trained weights. Resumable like EfficientDM: the model and
optimizer state are checkpointed every 100 steps (default ~/.cache/diffquant/train/qat-<hash>).
Progress callbacks (diffquant.algorithms.training.progress_callback) run before the first step and
after every step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from diffquant.algorithms.training import (
    Observed,
    adam_with_decay,
    decay_linearly,
    stage_checkpointer,
    train_steps,
    written_back,
)
from diffquant.job import QuantizationJob
from diffquant.nn.layers import QuantizedLayer, quantization_enabled
from diffquant.nn.learnable import (
    LSQActivation,
    LSQWeight,
    install_lsq,
    install_lsq_weight,
    lsq_supports,
    restore,
)
from diffquant.recipes.config import StageConfig, check_int, check_number, register_stage


@register_stage
@dataclass(frozen=True)
class QAT(StageConfig):
    """LSQ weights + activations, all weights fine-tuned on training data (module docstring).

    iterations: Adam steps. lr_weight: the model's parameters; lr_weight_scale / lr_act: weight and
    input step sizes (and input zero points when learn_zero_point). checkpoint_dir as EfficientDM's.
    """

    type: ClassVar[str] = "qat"
    optimizes: ClassVar[bool] = True
    needs_training_data: ClassVar[bool] = True
    iterations: int = 1000
    lr_weight: float = 1e-5
    lr_weight_scale: float = 1e-5
    lr_act: float = 5e-4
    learn_zero_point: bool = True
    checkpoint_dir: str | None = None

    def __post_init__(self) -> None:
        check_int(self, "iterations")
        for name in ("lr_weight", "lr_weight_scale", "lr_act"):
            check_number(self, name, strict=False)

    def apply(self, job: QuantizationJob) -> None:
        training = job.require_training()
        job.calibrate()
        trainer = QATTrainer(self, job.model, job.layers)
        trainer.run(training)
        job.report(self, training_seconds=round(trainer.wall_time_s, 3),
                   training_cpu_seconds=round(trainer.cpu_time_s, 3))


class QATTrainer:
    def __init__(self, config: QAT, model: nn.Module, layers: dict[str, QuantizedLayer]) -> None:
        self.config, self.model, self.layers = config, model, layers

    def install(self) -> tuple[dict[str, LSQWeight], dict[str, LSQActivation]]:
        weights = {name: install_lsq_weight(layer) for name, layer in self.layers.items()
                   if layer.weight is not None and layer.weight_quantizer is not None
                   and not layer.weight_quantizer.spec.scale_format.two_level}
        acts = {name: install_lsq(layer, learn_zero_point=self.config.learn_zero_point)
                for name, layer in self.layers.items() if lsq_supports(layer.input_quantizer)}
        return weights, acts

    def optimizer(self, weights: dict[str, LSQWeight], acts: dict[str, LSQActivation]) -> torch.optim.Adam:
        scales = [q.scale for q in weights.values()]
        act_params = [p for q in acts.values() for p in q.parameters(recurse=False)]
        quantizer_ids = {id(p) for p in scales + act_params}
        model_params = [p for p in self.model.parameters() if id(p) not in quantizer_ids]
        cfg = self.config
        return adam_with_decay([{"params": model_params, "lr": cfg.lr_weight},
                                {"params": scales, "lr": cfg.lr_weight_scale},
                                {"params": act_params, "lr": cfg.lr_act}])

    @contextlib.contextmanager
    def finished(self) -> Iterator[None]:
        """The model as the stage will leave it, for progress callbacks: the trained weights under the
        learned step sizes as written back."""
        layers = self.layers.values()
        with quantization_enabled(layers, True), written_back(layers):
            yield

    def run(self, training) -> None:
        cfg = self.config
        ckpt = stage_checkpointer(cfg, self.layers)  # keyed by the starting weights: before any step
        weights, acts = self.install()
        optim = self.optimizer(weights, acts)
        layers = list(self.layers.values())

        def step(i: int) -> dict[str, float]:
            decay_linearly(optim, i / cfg.iterations)
            with torch.enable_grad(), quantization_enabled(layers, True):
                loss = training(self.model, i)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            return {"loss": float(loss.detach())}

        params = list(self.model.parameters())
        requires = [p.requires_grad for p in params]
        try:
            for p in params:
                p.requires_grad_(True)
            clock = train_steps(step, cfg.iterations, self.model, optim, ckpt, Observed("qat", self.model, self.finished))
            self.wall_time_s, self.cpu_time_s = clock.wall_s, clock.cpu_s
        except BaseException:
            for layer in layers:
                restore(layer)
            raise
        finally:
            for p, flag in zip(params, requires, strict=True):
                p.requires_grad_(flag)
        for lsq in [*weights.values(), *acts.values()]:
            lsq.write_back()
        for layer in layers:
            restore(layer)
