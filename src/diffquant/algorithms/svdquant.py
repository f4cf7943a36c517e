"""SVDQuant: smoothing, a 16-bit low-rank branch and a quantized residual (METHODS.md §2).

For every group of layers (Linear, and ungrouped Conv2d unless `convs: false`) that read the same
input tensor (q/k/v of one attention; any other layers calibration saw consume one tensor, e.g. adaLN
linears fed by one embedding):

 1. Smoothing, one λ for the group: λ_j = max|X_j|^α / max|W_{:,j}|^β (max |W| over the group's
    stacked weights; for a conv over the output channels and the kernel window), X̂ = X · diag(λ)⁻¹,
    Ŵ = W · diag(λ). (α, β) is the method's grid
        (0, 0) ∪ {(α, 0)} ∪ {(α, 1 − α)},  α = step, 2·step, …, 1 − step   (step 0.05: 39 pairs)
    scored by the squared output error summed over the group, on input rows sampled during
    calibration, with the quantized X̂ and the plain-SVD split Ŵ ≈ L1·L2 + Q(R) (iteration 0 below).
 2. Low-rank split per layer: L1·L2 = top-r SVD of Ŵᵀ in float64 (L1 = U_r·Σ_r [in, r], L2 = V_rᵀ
    [r, out]), rounded to `branch_dtype`, R = Ŵ − (L1·L2)ᵀ. Refit: L ← SVD_r(Ŵ − Q(R)), R ← Ŵ − L,
    up to `iterations` times, keeping the iterate with the least output error and stopping at the
    first rise of the error (early_stop).
 3. The layer keeps x / λ as its `smooth` divisor, R as its weight (quantized by the recipe's weight
    spec when the job calibrates) and the branch: Y = Q(X̂)·Q(R)ᵀ + X̂·L1·L2 + b
    (nn.layers.QuantizedLayer). In full precision the transform changes nothing.
 4. Optional (`gptq`): once the split is chosen, R is quantized by GPTQ (algorithms/gptq.py: damping
    0.01, blocks of 128, the weight spec's own groups, e.g. INT4 groups of 64 or NVFP4 groups of 16
    with E4M3 scales, each group's scale fixed when GPTQ reaches it) on the Hessian 2·X̂ᵀX̂/n of the
    smoothed input rows X̂ = X / λ — the input R multiplies. The layer then holds GPTQ's dequantized
    weight and its weight quantizer GPTQ's scales (calibrated: the job does not re-round it), so
    checkpoints and frozen models keep GPTQ's codes. GPTQ runs only on the final residual: the
    smoothing search and the refit score round-to-nearest residuals, so GPTQ never changes which λ or
    which branch is kept (and costs one pass per layer, not one per candidate). It covers the same
    layers as the rest, convolutions included (their Hessian is that of the patch rows).

Output error is ‖X·Wᵀ − Ŷ‖² over the sampled rows, each layer on its own (for q/k/v the paper takes
the attention module's output; the sum of the three projections' errors is the layer-local
stand-in).

Convolutions (beyond the method, whose coverage is the transformer blocks' linears; a UNet keeps most
of its weights and error in its convs): the conv is the GEMM of its im2col patches, X [n, kh·kw·c_in]
with K in (kh, kw, c_in) order (calibration samples patch rows for convs: calib.stats.patch_rows), and
W its [c_out, K] weight matrix (QConv2d.weight_matrix). λ is per input channel, repeated over the
kernel positions; the input quantizer scores each pixel of a patch as the layer quantizes pixels; the
branch L1 [K, r], L2 [r, c_out] runs as a conv with the layer's geometry (c_in → r) then a 1x1 conv
(r → c_out) on X̂ (nn.layers.conv_low_rank). Grouped convs are left to plain rounding (logged): their
weight is no single GEMM over the patches. `convs: false` restores the Linear-only coverage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from diffquant.algorithms.gptq import gptq, hessian
from diffquant.algorithms.smoothquant import smoothing_factors
from diffquant.calib.stats import ActivationStats, RowSample
from diffquant.job import CalibrationRequiredError, QuantizationJob
from diffquant.kernels.cpu import torch_threads
from diffquant.nn.layers import QConv2d, QLinear, QuantizedLayer, low_rank_product
from diffquant.nn.quantizers import ActivationQuantizer, WeightQuantizer
from diffquant.recipes.config import RecipeError, StageConfig, check_int, register_stage

log = logging.getLogger("diffquant.svdquant")

BRANCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
RANDOMIZED_OVERSAMPLE, RANDOMIZED_POWER_ITERS, RANDOMIZED_SEED = 16, 4, 0
GPTQ_ROWS = 1024  # SVDQuant.gptq_rows' default

Quantize = Callable[[torch.Tensor], torch.Tensor]

# Groups whose weights are all at most this many elements are fitted with one intra-op thread: their
# float64 eigh / matmuls are too small to split, and on a busy 2-core machine OpenMP's barriers made
# two threads 13x slower than one (fmnist-dit's 256x256 and 256x1024 layers: 120 s vs 9 s per block).
SINGLE_THREAD_MAX_NUMEL = 1 << 22


def smoothing_grid(step: float) -> tuple[tuple[float, float], ...]:
    """The method's (α, β) candidates: (0, 0), then (α, 0) and (α, 1 − α) for α = step … 1 − step."""
    n = round(1 / step)
    alphas = [round(i / n, 10) for i in range(1, n)]
    return ((0.0, 0.0), *((a, 0.0) for a in alphas), *((a, round(1 - a, 10)) for a in alphas))


# -- one layer's problem --------------------------------------------------------------------------


def along_rows(per_channel: torch.Tensor, taps: int) -> torch.Tensor:
    """A per-channel vector [C] along a row's K = taps·C inputs (repeated over a conv's kernel positions)."""
    return per_channel if taps == 1 else per_channel.repeat(taps)


@dataclass
class LayerProblem:
    """What the fit needs of one layer: sampled input rows before its current smoothing `x` [n, K],
    that smoothing (`smooth` [C] or None), its current weight matrix [out, K], the reference output
    x̂·Wᵀ [n, out], its weight spec's quantizer and its input fake-quantizer for a divisor [C].

    K = taps·C: a Linear's rows are its C input features (taps 1); a conv's are im2col patches of its
    kh·kw kernel positions (taps) of C channels each, channels fastest (QConv2d.weight_matrix's order).
    """

    name: str
    x: torch.Tensor
    smooth: torch.Tensor | None
    weight: torch.Tensor
    reference: torch.Tensor
    weight_quantizer: WeightQuantizer | None
    input_quant: Callable[[torch.Tensor], Quantize]
    taps: int = 1

    def divisor(self, factors: torch.Tensor) -> torch.Tensor:
        """The layer's smooth divisor after folding `factors` (as QuantizedLayer.fold_input_scale)."""
        return factors.clone() if self.smooth is None else self.smooth * factors

    def per_input(self, per_channel: torch.Tensor) -> torch.Tensor:
        return along_rows(per_channel, self.taps)

    def smoothed_weight(self, factors: torch.Tensor) -> torch.Tensor:
        return self.weight * self.per_input(factors).reshape(1, -1)

    def smoothed_input(self, divisor: torch.Tensor) -> torch.Tensor:
        return self.x / self.per_input(divisor)

    def quantized_input(self, divisor: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        """Q(x̂) as the layer computes it: a conv quantizes pixels, so each patch's taps one by one."""
        quantize = self.input_quant(divisor)
        return quantize(xs.reshape(-1, xs.shape[1] // self.taps)).reshape(xs.shape)

    def weight_absmax(self) -> torch.Tensor:
        """max |W[:, j]| per input channel j [C], over the outputs and a conv's kernel positions."""
        return self.weight.abs().amax(dim=0).reshape(self.taps, -1).amax(dim=0)

    def quantized_residual(self, residual: torch.Tensor) -> torch.Tensor:
        if self.weight_quantizer is None:
            return residual
        self.weight_quantizer.calibrate(residual)
        return self.weight_quantizer(residual)


@dataclass(frozen=True)
class Split:
    """One iterate: branch factors (None at rank 0), the quantized residual and its output error."""

    down: torch.Tensor | None
    up: torch.Tensor | None
    quantized_residual: torch.Tensor
    error: float


@dataclass(frozen=True)
class LowRankFit:
    """The refit's result: the best iterate and the error of every iterate (index 0: plain SVD)."""

    best: Split
    best_iteration: int
    errors: tuple[float, ...]


# -- the maths ------------------------------------------------------------------------------------


def _round_factor(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t rounded to `dtype`, held in float32 (contiguous, as the layer will hold it); kept in float32
    where `dtype` would overflow."""
    rounded = t.to(dtype).float().contiguous()
    return rounded if torch.isfinite(rounded).all() else t.float().contiguous()


def top_singular(matrix: torch.Tensor, rank: int, randomized: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_r·Σ_r, V_rᵀ) of the float64 SVD of `matrix` [in, out]; randomized: torch.svd_lowrank, seeded.

    The exact factors come from the eigenvectors of the smaller Gram matrix (float64): the same top-r
    factors as torch.linalg.svd to ~1e-14 relative on these layers, 2-4x faster on a CPU, which
    matters with 39 candidates and the refits per layer.
    """
    m = matrix.double()
    if randomized:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOMIZED_SEED)
            q = min(rank + RANDOMIZED_OVERSAMPLE, *m.shape)
            u, s, v = torch.svd_lowrank(m, q=q, niter=RANDOMIZED_POWER_ITERS)
        return u[:, :rank] * s[:rank], v[:, :rank].t()
    if m.shape[0] >= m.shape[1]:
        v = torch.linalg.eigh(m.t() @ m).eigenvectors[:, -rank:].flip(1)  # ascending -> top first
        return m @ v, v.t()
    u = torch.linalg.eigh(m @ m.t()).eigenvectors[:, -rank:].flip(1)
    sv = u.t() @ m  # Σ_r·V_rᵀ
    s = sv.norm(dim=1, keepdim=True)
    return u * s.t(), torch.where(s > 0, sv / s.clamp_min(torch.finfo(s.dtype).tiny), sv)


def output_error(problem: LayerProblem, xs: torch.Tensor, xq: torch.Tensor, split_rq: torch.Tensor,
                 down: torch.Tensor | None, up: torch.Tensor | None) -> float:
    """‖reference − (Q(x̂)·Q(R)ᵀ + x̂·L1·L2)‖² over the sampled rows."""
    y = xq @ split_rq.t()
    if down is not None:
        y = y + (xs @ down) @ up
    return float((problem.reference - y).double().pow(2).sum())


@dataclass(frozen=True)
class SplitSettings:
    rank: int
    branch_dtype: torch.dtype
    randomized: bool


def split(problem: LayerProblem, smoothed: torch.Tensor, target: torch.Tensor, xs: torch.Tensor,
          xq: torch.Tensor, settings: SplitSettings) -> Split:
    """Branch from SVD_r(target) (target = Ŵ, or Ŵ − Q(R) when refitting), residual R = Ŵ − L1·L2."""
    down = up = None
    residual = smoothed
    if settings.rank > 0:
        d, u = top_singular(target.t(), settings.rank, settings.randomized)
        down, up = _round_factor(d, settings.branch_dtype), _round_factor(u, settings.branch_dtype)
        residual = smoothed - low_rank_product(down, up)
    rq = problem.quantized_residual(residual)
    return Split(down, up, rq, output_error(problem, xs, xq, rq, down, up))


def fit_low_rank(problem: LayerProblem, factors: torch.Tensor, settings: SplitSettings, iterations: int,
                 early_stop: bool = True) -> LowRankFit:
    """Split Ŵ = W·diag(λ) and refit; the best iterate by output error (never worse than iteration 0)."""
    divisor = problem.divisor(factors)
    xs = problem.smoothed_input(divisor)
    xq = problem.quantized_input(divisor, xs)
    smoothed = problem.smoothed_weight(factors)
    current = split(problem, smoothed, smoothed, xs, xq, settings)
    best, best_iteration, errors = current, 0, [current.error]
    for i in range(1, iterations + 1 if settings.rank > 0 else 1):
        current = split(problem, smoothed, smoothed - current.quantized_residual, xs, xq, settings)
        errors.append(current.error)
        if current.error < best.error:
            best, best_iteration = current, i
        elif early_stop and current.error >= errors[-2]:
            break  # the error rose (or the iteration reached a fixed point)
    return LowRankFit(best, best_iteration, tuple(errors))


def group_factors(problems: list[LayerProblem], x_absmax: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """λ shared by a group: x statistic over its (identical) inputs, max |W[:, j]| over its weights."""
    w_absmax = torch.stack([p.weight_absmax() for p in problems]).amax(dim=0)
    return smoothing_factors(x_absmax, w_absmax, alpha, beta)


# -- the stage ------------------------------------------------------------------------------------


@register_stage
@dataclass(frozen=True)
class SVDQuant(StageConfig):
    """SVDQuant on every Linear and ungrouped Conv2d layer with a quantized weight (module docstring).

    rank: rank r of the 16-bit branch (0: smoothing search only, no branch). grid_step: spacing of α
    in the (α, β) grid (0.05: the method's 39 candidates). smooth: False skips the smoothing search
    (λ = 1; the low-rank-only ablation). iterations / early_stop: refits of the branch. branch_dtype:
    what the branch factors are rounded to (float16 as in the method; float32 for no rounding).
    randomized_svd_from: layers whose smaller side has at least this many features use a seeded
    randomized SVD (torch.svd_lowrank) instead of the exact one; None: always exact. sample_rows:
    calibration input rows sampled per layer to score candidates on (when the statistics hold more
    rows, the same sample_rows rows that a sample_rows-row calibration keeps: scoring_rows). gptq:
    quantize the final residual by GPTQ (algorithms/gptq.py; damping 0.01, block 128) instead of
    round-to-nearest (module docstring, step 4). gptq_rows: with gptq, the calibration samples
    max(sample_rows, gptq_rows) input rows per layer and GPTQ's Hessian is built from all of them
    (GPTQ wants at least as many rows as the layer has inputs; the rows cost gptq_rows x in x 4 bytes
    per layer while the stage runs). No effect without gptq, and left out of to_dict at its default,
    so recipes from before the field serialise (and hash) as before. convs: also fit the (ungrouped)
    Conv2d layers, on sampled im2col patch rows (module docstring); False leaves them to plain
    rounding, the method's own coverage. Left out of to_dict at its default (True), so existing recipe
    files hash as before (their results on UNets change: the convs are now fitted).
    """

    type: ClassVar[str] = "svdquant"
    needs_calibration: ClassVar[bool] = True
    rank: int = 32
    grid_step: float = 0.05
    smooth: bool = True
    iterations: int = 100
    early_stop: bool = True
    branch_dtype: str = "float16"
    randomized_svd_from: int | None = None
    sample_rows: int = 256
    gptq: bool = False
    gptq_rows: int = GPTQ_ROWS
    convs: bool = True

    def __post_init__(self) -> None:
        check_int(self, "rank", 0)
        check_int(self, "iterations", 0)
        check_int(self, "sample_rows", 1)
        check_int(self, "gptq_rows", 1)
        if self.randomized_svd_from is not None:
            check_int(self, "randomized_svd_from", 1)
        step = self.grid_step
        if isinstance(step, bool) or not isinstance(step, int | float) or not 0 < step <= 0.5 \
                or abs(1 / step - round(1 / step)) > 1e-6:
            raise RecipeError(f"svdquant grid_step must lie in (0, 0.5] and divide 1, got {step!r}")
        if self.branch_dtype not in BRANCH_DTYPES:
            raise RecipeError(f"svdquant branch_dtype must be one of {list(BRANCH_DTYPES)}, got {self.branch_dtype!r}")
        for flag in ("gptq", "convs"):
            if not isinstance(getattr(self, flag), bool):
                raise RecipeError(f"svdquant {flag} must be true or false, got {getattr(self, flag)!r}")

    def calibration_rows(self) -> int:
        return max(self.sample_rows, self.gptq_rows) if self.gptq else self.sample_rows

    def to_dict(self) -> dict:
        data = super().to_dict()
        if self.gptq_rows == GPTQ_ROWS:
            del data["gptq_rows"]  # the default: recipes from before the field serialise (and hash) as before
        if self.convs:
            del data["convs"]  # likewise
        return data

    @property
    def grid(self) -> tuple[tuple[float, float], ...]:
        return smoothing_grid(self.grid_step) if self.smooth else ((0.0, 0.0),)

    def settings_for(self, problem: LayerProblem) -> SplitSettings:
        smaller = min(problem.weight.shape)
        rank = min(self.rank, smaller)
        if rank < self.rank:
            log.warning("svdquant: layer %s has only %d features on its smaller side; rank %d used instead of %d",
                        problem.name, smaller, rank, self.rank)
        randomized = self.randomized_svd_from is not None and smaller >= self.randomized_svd_from
        return SplitSettings(rank, BRANCH_DTYPES[self.branch_dtype], randomized)

    def skip_reason(self, layer: QuantizedLayer) -> str | None:
        """Why the stage leaves a layer to plain rounding, or None for a layer it fits."""
        if layer.weight_quantizer is None:
            return "weight not quantized"
        if layer.low_rank is not None:
            return "already has a low-rank branch"
        if isinstance(layer, QConv2d):
            if not self.convs:
                return "convolution (convs: false)"
            return None if layer.supports_low_rank else "grouped convolution (no single GEMM over its patches)"
        return None if isinstance(layer, QLinear) else f"{type(layer).__name__} (not Linear / Conv2d)"

    def apply(self, job: QuantizationJob) -> None:
        reasons = {n: self.skip_reason(layer) for n, layer in job.layers.items()}
        layers = {n: layer for n, layer in job.layers.items() if reasons[n] is None}
        _log_skipped({n: r for n, r in reasons.items() if r is not None})
        stats = _require_samples(job, list(layers))
        groups = input_groups(stats, list(layers))
        for group in tqdm(groups, desc="svdquant", disable=not job.progress):
            self.apply_group({n: layers[n] for n in group}, stats)

    def apply_group(self, layers: dict[str, QuantizedLayer], stats: ActivationStats) -> None:
        small = max(layer.weight.numel() for layer in layers.values()) <= SINGLE_THREAD_MAX_NUMEL
        with torch_threads(1) if small else contextlib.nullcontext():
            self._fit_group(layers, stats)

    def _fit_group(self, layers: dict[str, QuantizedLayer], stats: ActivationStats) -> None:
        problems = [layer_problem(name, layer, stats, self.sample_rows) for name, layer in layers.items()]
        factors = self.search_factors(problems, stats)
        for problem, layer in zip(problems, layers.values(), strict=True):
            fit = fit_low_rank(problem, factors, self.settings_for(problem), self.iterations, self.early_stop)
            log.debug("svdquant %s: error %.4g -> %.4g after %d of %d refits", problem.name, fit.errors[0],
                      fit.best.error, fit.best_iteration, len(fit.errors) - 1)
            if not torch.all(factors == 1):
                layer.fold_input_scale(factors.to(layer.weight.device))
            if fit.best.down is not None:
                layer.split_low_rank(fit.best.down, fit.best.up)
            if self.gptq:
                quantize_residual_gptq(layer, stats.require_sample(problem.name), problem.name)

    def search_factors(self, problems: list[LayerProblem], stats: ActivationStats) -> torch.Tensor:
        """λ of the grid candidate with the least output error over the group (plain SVD split)."""
        x_absmax = torch.stack([_current_absmax(p, stats) for p in problems]).amax(dim=0)
        best, best_error = None, float("inf")
        for alpha, beta in self.grid:
            factors = group_factors(problems, x_absmax, alpha, beta)
            error = sum(fit_low_rank(p, factors, self.settings_for(p), 0).best.error for p in problems)
            if error < best_error:
                best, best_error = factors, error
        return best


def _log_skipped(reasons: dict[str, str]) -> None:
    """One line per reason: how many layers plain rounding keeps, and which grouped convs."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in reasons.items():
        by_reason.setdefault(reason, []).append(name)
    for reason, names in by_reason.items():
        listed = f": {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}" if "grouped" in reason else ""
        log.info("svdquant: %d layers left to plain rounding, %s%s", len(names), reason, listed)


def _require_samples(job: QuantizationJob, names: list[str]) -> ActivationStats:
    stats = job.require_stats()
    missing = [n for n in names if n not in stats or stats[n].sample is None or stats[n].sample.rows is None]
    if missing:
        raise CalibrationRequiredError(
            f"svdquant scores candidates on sampled input rows, which the calibration statistics lack for "
            f"{len(missing)} layers (e.g. {missing[:3]}): pass a calibration function to diffquant.quantize, or "
            "collect the statistics with collect_activation_stats(..., sample_rows=N)")
    return stats


def input_groups(stats: ActivationStats, names: list[str]) -> list[tuple[str, ...]]:
    """`names` partitioned into groups reading one input (ActivationStats.input_groups), in model order."""
    order = {n: i for i, n in enumerate(names)}
    groups, placed = [], set()
    for name in names:
        if name in placed:
            continue
        group = tuple(sorted((n for n in stats.input_group_of(name) if n in order), key=order.__getitem__))
        group = group if name in group else (name,)
        placed.update(group)
        groups.append(group)
    return groups


def layer_problem(name: str, layer: QuantizedLayer, stats: ActivationStats, rows: int | None = None) -> LayerProblem:
    """The layer's problem on its sampled input rows: at most `rows` of them (scoring_rows), all if None."""
    x = scoring_rows(stats.require(name).sample, rows).to(layer.weight.device)
    weight = layer.weight_matrix(layer.weight.detach()).float()
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"svdquant: the sampled rows of {name!r} have {x.shape[1]} features but its weight "
                         f"matrix {weight.shape[1]} inputs (a conv's rows are im2col patches: collect the "
                         "statistics with this version's collect_activation_stats)")
    smooth = None if layer.smooth is None else layer.smooth.float()
    reference = (x if smooth is None else x / along_rows(smooth, layer.taps)) @ weight.t()
    return LayerProblem(name, x, smooth, weight, reference, WeightQuantizer(layer.weight_quantizer.spec),
                        _input_quantization(layer, stats.require(name)), layer.taps)


def scoring_rows(sample: RowSample, rows: int | None) -> torch.Tensor:
    """At most `rows` rows of a layer's sample: those with the smallest sampling keys, in arrival order —
    the very rows a calibration with sample_rows = `rows` keeps (RowSample: bottom-k keys, one seeded
    generator), so a larger sample taken for GPTQ's Hessian leaves the scoring unchanged."""
    if rows is None or sample.rows.shape[0] <= rows:
        return sample.rows
    kept = sample.keys.topk(rows, largest=False).indices.sort().values
    return sample.rows[kept]


def quantize_residual_gptq(layer: QuantizedLayer, x: torch.Tensor, name: str = "") -> None:
    """Quantize the layer's residual weight by GPTQ on the Hessian of its smoothed input rows x / smooth
    (x [n, K]: the layer's sampled rows before smoothing, a conv's im2col patches): the weight becomes
    GPTQ's dequantized weight and the weight quantizer holds GPTQ's qparams, so job.calibrate leaves it
    alone and store_codes / checkpoints / freeze keep exactly the codes GPTQ chose (quantizer(W) == W
    bit for bit)."""
    x = x.to(layer.weight.device)
    xs = x if layer.smooth is None else x / along_rows(layer.smooth.to(x.dtype), layer.taps)
    weight = layer.weight_matrix(layer.weight.detach()).float()
    result = gptq(weight, hessian(xs), layer.weight_quantizer)  # damping 0.01, blocks of 128
    with torch.no_grad():
        layer.weight.copy_(layer.weight_from_matrix(result.weight).to(layer.weight.dtype))
    log.debug("svdquant %s: GPTQ on the residual from %d rows", name, x.shape[0])


def _current_absmax(problem: LayerProblem, stats: ActivationStats) -> torch.Tensor:
    absmax = stats.require(problem.name).overall.absmax.to(problem.weight.device)
    return absmax if problem.smooth is None else absmax / problem.smooth


def _input_quantization(layer: QuantizedLayer, layer_stats) -> Callable[[torch.Tensor], Quantize]:
    """divisor -> the fake quantization the layer will apply to x / divisor.

    Dynamic specs need nothing; static ones are calibrated from the statistics divided by the divisor
    (per-step ranges scored with the overall range: the stage runs outside any sampling step).
    """
    quantizer = layer.input_quantizer
    if quantizer is None:
        return lambda divisor: (lambda x: x)
    if quantizer.spec.dynamic:
        return lambda divisor: quantizer

    def static(divisor: torch.Tensor) -> Quantize:
        scoring = ActivationQuantizer(dataclasses.replace(quantizer.spec, per_step=False))
        scoring.calibrate(layer_stats.divided(divisor))
        return scoring

    return static
