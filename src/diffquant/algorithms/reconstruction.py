"""Block reconstruction after round-to-nearest: BRECQ / Q-Diffusion and EDA-DM's fine-grained loss
(METHODS.md §4, §12).

The stage first calibrates the job (RTN weight scales, static input ranges), then replays the job's
calibration function once in full precision, recording every denoiser call (inputs on the CPU, with
its sampling step). Blocks are reconstructed one at a time, in the order the model runs them:

 1. Cache (one block at a time, to bound memory) the block's inputs and outputs in full precision and
    its inputs in the quantized model, where earlier blocks are already reconstructed. Each pass
    stops the denoiser at the block (a hook raises), so nothing after it is computed.
 2. Learn, with Adam: AdaRound's V for every weight of the block (integer or floating-point format:
    up or down to the neighbouring grid value) and LSQ step sizes for every static (calibrated)
    input quantizer (diffquant.nn.learnable). Per batch (rows of one sampling step when the block
    has per-step input ranges, since a step's scale row is what a batch trains), inputs are
    QDrop-mixed: each element from the FP input with probability qdrop_p, else from the quantized
    one. Loss:

        L = E(B_q, B_fp) + eta · Σ_{inner quantized layers but the last run} E(ℓ_q, ℓ_fp)
            + lambda_round · Σ_weights 1 − |2h(V) − 1|^β

    E = squared error summed over the feature axis (dim 1 of 4-D NCHW outputs, else the last) and
    averaged over the rest (BRECQ's lp_loss). ℓ_fp are the block's layer outputs in full precision
    on the FP inputs. eta = 0 is BRECQ / Q-Diffusion; EDA-DM uses eta = 0.8 - 1.0. The regulariser
    is off for the first `warmup` fraction, then β falls linearly from beta_start to beta_end. The
    step sizes' learning rate follows a cosine to 0 (both authors); V's is constant.
 3. Harden the block's rounding (codes fixed, float weights kept for the FP passes of later blocks)
    and write the learned step sizes back into the quantizers.

At the end every reconstructed weight is replaced by its decoded hardened codes, so each layer is an
ordinary RTN-format layer (scales unchanged, codes the grid neighbours of W/s: {floor, ceil} on an
integer grid, the adjacent representable values on a floating-point one): saving, freezing and
packing work unchanged. NB: afterwards `quantizers_disabled` computes with these weights, not with
the original ones.

Blocks (BLOCK_PATTERNS, outermost match): each `transformer_blocks.N` of a DiT; each resnet and each
attention (plain Attention or Transformer2DModel) in a UNet's down / mid / up blocks. A quantized
layer in no block (a UNet's down/upsampler convs; head or embedding layers a recipe includes) is
reconstructed alone as a one-layer block. Split input quantizers (shortcut splitting of a UNet's
skip concatenations, QuantSpec.split_shortcut) learn both halves' step sizes.

Attention-matmul operand quantizers (nn.attention: q, k, v and the softmax output, installed by a
recipe's `attention`) inside a block are learned with the block's input quantizers, as EDA-DM learns
"activation step sizes incl. attention Q/K/V and softmax quantizers": every static one gets an LSQ
step size (same learning rate and schedule), the block's batches are per step when any of them is
per-step, and the learned sizes are written back at the end of the block. Full-precision passes
(recording, the FP block inputs / outputs and targets) switch them off with the layers.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from diffquant.algorithms.block_data import (
    BlockGroup,
    DenoiserCall,
    block_io,
    execution_order,
    find_blocks,
    flatten,
    full_precision,
    group_records,
    record_calls,
)
from diffquant.calib.steps import sampling_step
from diffquant.job import CalibrationRequiredError, QuantizationJob
from diffquant.nn.attention import AttentionQuantizers, attention_quantizers, quantization_switches
from diffquant.nn.layers import QuantizedLayer
from diffquant.nn.learnable import (
    AdaRoundWeight,
    HardenedWeight,
    LSQActivation,
    adaround_supports,
    commit_weight,
    harden,
    install_adaround,
    install_lsq,
    install_lsq_on,
    lsq_supports,
    restore,
)
from diffquant.recipes.config import RecipeError, StageConfig, check_int, register_stage

log = logging.getLogger("diffquant.reconstruction")


def _per_step(quantizer: nn.Module | None) -> bool:
    return quantizer is not None and not quantizer.spec.dynamic and quantizer.spec.per_step


# An attention operand quantizer: (its AttentionQuantizers, the operand name).
Operand = tuple[AttentionQuantizers, str]


def attention_operands(module: nn.Module) -> dict[str, Operand]:
    """The attention operand quantizers under `module` by "<attention path>.<operand>"."""
    return {f"{path}.{op}" if path else op: (quantizers, op)
            for path, quantizers in attention_quantizers(module).items() for op in quantizers.quantizers()}


def reconstruction_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over the feature axis (1 for NCHW, else last), mean over the rest."""
    return (out.float() - target.float()).pow(2).sum(1 if out.dim() == 4 else -1).mean()


def _tree_error(out: Any, target: Any) -> torch.Tensor:
    pairs = [(o, t) for o, t in zip(flatten(out), flatten(target), strict=True)
             if isinstance(o, torch.Tensor) and o.is_floating_point()]
    return sum(reconstruction_error(o, t) for o, t in pairs)


# -- the stage ------------------------------------------------------------------------------------


@register_stage
@dataclass(frozen=True)
class BlockReconstruction(StageConfig):
    """Block reconstruction with AdaRound weights and LSQ input step sizes (module docstring).

    iterations / batch_size: Adam steps per block and rows per step. eta: weight of EDA-DM's inner
    layer terms (0: BRECQ / Q-Diffusion). qdrop_p: probability that an input element comes from the
    FP model rather than the quantized one (0: quantized inputs only, Q-Diffusion; 0.5: QDrop,
    EDA-DM). lambda_round: weight of the rounding regulariser; beta_start -> beta_end its annealing
    after the `warmup` fraction of iterations. lr_weight / lr_act: Adam learning rates of AdaRound's
    V and of the step sizes. adaround / lsq: what is learned (weight rounding, on integer and
    floating-point grids / static input step sizes). seed: batches and QDrop masks. Must be the
    recipe's last stage (it calibrates the job) and needs a calibration function to replay, e.g.
    diffquant.calib.replay(cal_set).
    """

    type: ClassVar[str] = "block_reconstruction"
    optimizes: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = True
    iterations: int = 1000
    batch_size: int = 32
    eta: float = 0.0
    qdrop_p: float = 0.5
    lambda_round: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    lr_weight: float = 1e-3
    lr_act: float = 4e-5
    adaround: bool = True
    lsq: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("iterations", "batch_size", "seed"):
            check_int(self, name, int(name != "seed"))
        checks = {"eta": self.eta >= 0, "qdrop_p": 0 <= self.qdrop_p <= 1,
                  "lambda_round": self.lambda_round >= 0,
                  "warmup": 0 <= self.warmup < 1, "lr_weight": self.lr_weight > 0, "lr_act": self.lr_act > 0,
                  "beta_end": 0 < self.beta_end <= self.beta_start}
        for name, ok in checks.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not ok:
                raise RecipeError(f"block_reconstruction {name} out of range: {value!r}")
        if not (self.adaround or self.lsq):
            raise RecipeError("block_reconstruction learns nothing with adaround: false and lsq: false")

    def beta_at(self, iteration: int) -> float | None:
        """β of the regulariser at `iteration`; None during the warm-up (regulariser off)."""
        start = self.warmup * self.iterations
        if iteration < start:
            return None
        progress = (iteration - start) / max(self.iterations - start, 1)
        return self.beta_end + (self.beta_start - self.beta_end) * max(0.0, 1 - progress)

    def apply(self, job: QuantizationJob) -> None:
        calibration = getattr(job, "calibration", None)
        if not callable(calibration):
            raise CalibrationRequiredError(
                "block_reconstruction replays the calibration data: pass diffquant.quantize a calibration "
                "function (e.g. diffquant.calib.replay(cal_set)), not collected statistics")
        job.calibrate()  # reconstruction starts from round-to-nearest
        Reconstructor(self, job.model, job.layers, job.progress).run(calibration)


class Reconstructor:
    """Runs the stage's block loop on one model (module docstring)."""

    def __init__(self, config: BlockReconstruction, model: nn.Module, layers: dict[str, QuantizedLayer],
                 progress: bool = True) -> None:
        self.config, self.model, self.layers, self.progress = config, model, layers, progress
        param = next(model.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")
        self.index_gen = torch.Generator().manual_seed(config.seed)
        self.mask_gen = torch.Generator(device=self.device).manual_seed(config.seed)
        self.errors: dict[str, tuple[float, float]] = {}  # block -> block error (first, last iteration)

    def run(self, calibration: Callable[[nn.Module], object]) -> None:
        calls = record_calls(self.model, calibration, quantization_switches(self.model))
        blocks = find_blocks(list(self.layers))
        order = execution_order(self.model, list(blocks), calls[0], self.device)
        skipped = set(blocks) - set(order)
        if skipped:
            log.warning("reconstruction: %d blocks never ran during calibration, left to RTN: %s",
                        len(skipped), sorted(skipped)[:3])
        original = {name: layer.input_quantizer.scale.clone() for name, layer in self.layers.items()
                    if lsq_supports(layer.input_quantizer)}
        original_operands = {key: getattr(q, op).scale.clone() for key, (q, op) in attention_operands(self.model).items()
                             if lsq_supports(getattr(q, op))}
        try:
            for name in tqdm(order, desc="reconstruct blocks", disable=not self.progress):
                self.reconstruct_block(name, {n: self.layers[n] for n in blocks[name]}, calls)
        except BaseException:
            self._undo(original, original_operands)
            raise
        for layer in self.layers.values():
            if isinstance(layer.weight_quantizer, HardenedWeight):
                commit_weight(layer)

    def _undo(self, original: dict[str, torch.Tensor], original_operands: dict[str, torch.Tensor]) -> None:
        """Back to round-to-nearest: base quantizers, calibrated step sizes."""
        for name, layer in self.layers.items():
            restore(layer)
            if name in original:
                layer.input_quantizer.scale.copy_(original[name])
        for key, (quantizers, op) in attention_operands(self.model).items():
            quantizer = getattr(quantizers, op)
            if isinstance(quantizer, LSQActivation):
                quantizer = quantizer.base
                setattr(quantizers, op, quantizer)
            if key in original_operands:
                quantizer.scale.copy_(original_operands[key])

    def learnable(self, layers: dict[str, QuantizedLayer]) -> tuple[dict[str, QuantizedLayer], ...]:
        """(layers whose rounding is learned, layers whose input step sizes are learned)."""
        weights = {name: layer for name, layer in layers.items() if self.config.adaround
                   and layer.weight_quantizer is not None and layer.weight is not None
                   and adaround_supports(layer.weight_quantizer.spec)}
        inputs = {name: layer for name, layer in layers.items()
                  if self.config.lsq and lsq_supports(layer.input_quantizer)}
        return weights, inputs

    def learnable_operands(self, block: nn.Module) -> dict[str, Operand]:
        """The block's attention operand quantizers whose step sizes are learned (static, one-level scales)."""
        return {key: (q, op) for key, (q, op) in attention_operands(block).items()
                if self.config.lsq and lsq_supports(getattr(q, op))}

    def reconstruct_block(self, name: str, layers: dict[str, QuantizedLayer],
                          calls: list[DenoiserCall]) -> None:
        weights, inputs = self.learnable(layers)
        block = self.model.get_submodule(name)
        operands = self.learnable_operands(block)
        if not (weights or inputs or operands):
            return
        with full_precision(quantization_switches(self.model)):
            fp = block_io(self.model, block, calls, self.device, outputs=True)
        quantized = block_io(self.model, block, calls, self.device, outputs=False)
        per_step = any(_per_step(layer.input_quantizer) for layer in layers.values()) or any(
            _per_step(getattr(q, op)) for q, op in operands.values())
        groups = group_records(fp, quantized, per_step)
        del fp, quantized
        adas = {n: install_adaround(layer) for n, layer in weights.items()}
        lsqs = {n: install_lsq(layer) for n, layer in inputs.items()}
        operand_lsqs = {key: install_lsq_on(q, op) for key, (q, op) in operands.items()}
        self.errors[name] = self.train(name, block, layers, groups, list(adas.values()),
                                       [*lsqs.values(), *operand_lsqs.values()])
        log.info("reconstruction %s: block error %.4g -> %.4g", name, *self.errors[name])
        for layer_name in adas:
            harden(layers[layer_name])
        for layer_name, lsq in lsqs.items():
            lsq.write_back()
            layers[layer_name].input_quantizer = lsq.base
        for key, lsq in operand_lsqs.items():
            lsq.write_back()
            quantizers, op = operands[key]
            setattr(quantizers, op, lsq.base)

    def optimizer(self, adas: list[AdaRoundWeight], lsqs: list[LSQActivation]):
        groups = [{"params": [a.v for a in adas], "lr": self.config.lr_weight},
                  {"params": [q.scale for q in lsqs], "lr": self.config.lr_act}]
        opt = torch.optim.Adam([g for g in groups if g["params"]])
        iters = self.config.iterations
        cosine = lambda i: 0.5 * (1 + math.cos(math.pi * i / iters))  # noqa: E731
        schedules = [lambda i: 1.0, cosine] if adas and lsqs else [lambda i: 1.0] if adas else [cosine]
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedules)

    def draw(self, groups: list[BlockGroup]) -> tuple[BlockGroup, torch.Tensor]:
        """A random group (by its row count), then up to batch_size of its rows."""
        sizes = torch.tensor([float(g.fp_in.count) for g in groups])
        group = groups[int(torch.multinomial(sizes, 1, generator=self.index_gen))]
        rows = torch.randperm(group.fp_in.count, generator=self.index_gen)[: self.config.batch_size]
        return group, rows

    def mixed_inputs(self, group: BlockGroup, rows: torch.Tensor) -> tuple[Any, Any]:
        """(QDrop-mixed inputs, FP inputs) of the rows: each float element from FP with prob. qdrop_p."""
        fp, q = group.fp_in.take(rows), group.q_in.take(rows)
        mixed = []
        for a, b, batched in zip(fp, q, group.fp_in.batched, strict=True):
            if batched and a.is_floating_point() and self.config.qdrop_p < 1:
                p = self.config.qdrop_p
                a = b if p == 0 else torch.where(
                    torch.rand(a.shape, generator=self.mask_gen, device=a.device) < p, a, b)
            mixed.append(a)
        return group.fp_in.build(mixed), group.fp_in.build(fp)

    def train(self, name: str, block: nn.Module, layers: dict[str, QuantizedLayer], groups: list[BlockGroup],
              adas: list[AdaRoundWeight], lsqs: list[LSQActivation]) -> tuple[float, float]:
        cfg = self.config
        opt, schedule = self.optimizer(adas, lsqs)
        inner = _LayerOutputs(layers) if cfg.eta > 0 else None
        errors: list[float] = []  # the block error at the first and the last iteration
        learned = [a.v for a in adas] + [q.scale for q in lsqs]
        with only_learning(block, learned), contextlib.ExitStack() as stack:
            if inner is not None:
                stack.enter_context(inner)
            for i in tqdm(range(cfg.iterations), desc=name, disable=not self.progress, leave=False):
                group, rows = self.draw(groups)
                (args, kwargs), (fp_args, fp_kwargs) = self.mixed_inputs(group, rows)
                with sampling_step(group.step):
                    fp_inner, target = self._targets(block, layers, inner, group, rows, fp_args, fp_kwargs)
                    out = block(*args, **kwargs)
                error = _tree_error(out, target)
                loss = error + (cfg.eta * inner.error(fp_inner) if inner is not None else 0)
                beta = cfg.beta_at(i)
                if beta is not None and adas and cfg.lambda_round > 0:
                    loss = loss + cfg.lambda_round * sum(a.regularizer(beta) for a in adas)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                schedule.step()
                if i in (0, cfg.iterations - 1):
                    errors.append(float(error.detach()))
        return errors[0], errors[-1]

    def _targets(self, block, layers, inner, group, rows, fp_args, fp_kwargs) -> tuple[dict, Any]:
        """(inner layers' FP outputs or {}, the block's FP output) for the batch."""
        if inner is None:
            return {}, group.fp_out.build(group.fp_out.take(rows))
        with torch.no_grad(), full_precision(quantization_switches(block)):
            target = block(*fp_args, **fp_kwargs)
        return inner.take(), target


class _LayerOutputs:
    """Forward hooks collecting the block's layer outputs; the error over all but the last run."""

    def __init__(self, layers: dict[str, QuantizedLayer]) -> None:
        self.layers = layers
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles: list = []

    def __enter__(self) -> _LayerOutputs:
        for name, layer in self.layers.items():
            self.handles.append(layer.register_forward_hook(
                lambda _m, _a, out, name=name: self.outputs.__setitem__(name, out)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def take(self) -> dict[str, torch.Tensor]:
        outputs, self.outputs = self.outputs, {}
        return outputs

    def error(self, fp: dict[str, torch.Tensor]) -> torch.Tensor:
        quantized = self.take()
        inner = [n for n in fp if n in quantized][:-1]  # dict order = order of first run
        return sum((reconstruction_error(quantized[n], fp[n]) for n in inner), torch.zeros(()))


@contextlib.contextmanager
def only_learning(block: nn.Module, learned: list[torch.Tensor]) -> Iterator[None]:
    """No gradients for the block's own parameters while its quantizers are learned."""
    ids = {id(p) for p in learned}
    frozen = [p for p in block.parameters() if p.requires_grad and id(p) not in ids]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)
