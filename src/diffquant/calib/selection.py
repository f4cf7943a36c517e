"""How many calibration samples each sampling step gets, and which ones: the per-step counts
(uniform, proportional to weights, capped by what a step holds) and the seeded draw."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from diffquant.calib.sets import CalibrationSet


def uniform_counts(num_steps: int, n: int) -> list[int]:
    """Q-Diffusion's timestep-aware uniform sampling: n samples spread equally over the steps, the
    remainder to the earliest steps; sums exactly to n."""
    if num_steps < 1 or n < 0:
        raise ValueError(f"need num_steps >= 1 and n >= 0, got {num_steps}, {n}")
    base, extra = divmod(n, num_steps)
    return [base + (t < extra) for t in range(num_steps)]



def counts_from_weights(weights: Sequence[float] | torch.Tensor, n: int) -> list[int]:
    """n_t proportional to w_t, summing exactly to n: floor of n * w_t / sum(w), then the leftover
    one at a time to the largest remainders (ties to the earlier step), so |n_t - n*w_t/sum(w)| < 1.
    All-zero weights fall back to uniform_counts."""
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if n < 0 or w.numel() < 1 or not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"need n >= 0 and finite non-negative weights for >= 1 step, got n={n}, {w.tolist()}")
    total = w.sum()
    if total == 0:
        return uniform_counts(w.numel(), n)
    quota = (w * n / total).tolist()
    counts = [int(q // 1) for q in quota]
    by_remainder = sorted(range(len(quota)), key=lambda t: (counts[t] - quota[t], t))
    for t in by_remainder[: n - sum(counts)]:
        counts[t] += 1
    return counts


def capped_counts(weights: Sequence[float] | torch.Tensor, n: int, available: Sequence[int],
                  minimum: int = 0) -> list[int]:
    """counts_from_weights(weights, n), but no step above its `available` samples (select's limit).

    A step whose share n * w_t / sum(w) reaches its cap gets exactly the cap, and what it cannot take
    goes to the other steps in proportion to their weights (repeated until no share exceeds a cap; to
    the uncapped steps equally when their weights are all zero); the last shares are rounded as in
    counts_from_weights. So the counts sum exactly to n, count_t <= available_t, and with no cap
    reached they are counts_from_weights(weights, n). minimum: every step first gets min(minimum,
    available_t) (per-step ranges need data at every step), the rest is shared out as above.
    Deterministic. Raises ValueError when n exceeds sum(available) or the minimums exceed n.
    """
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    avail = [int(a) for a in available]
    _check_caps(w, n, avail, minimum)
    counts = [min(minimum, a) for a in avail]
    rest = n - sum(counts)
    if rest < 0:
        raise ValueError(f"a minimum of {minimum} samples per step needs {sum(counts)}, more than n = {n}")
    room = [a - c for a, c in zip(avail, counts, strict=True)]
    return [c + extra for c, extra in zip(counts, _fill_to_caps(w, rest, room), strict=True)]


def _check_caps(w: torch.Tensor, n: int, avail: list[int], minimum: int) -> None:
    if len(avail) != w.numel() or any(a < 0 for a in avail) or minimum < 0:
        raise ValueError(f"need one available count >= 0 per weight and minimum >= 0, got {avail} for "
                         f"{w.numel()} weights, minimum {minimum}")
    counts_from_weights(w, 0)  # validates the weights
    if n > sum(avail):
        raise ValueError(f"asked for {n} samples, but the steps hold only {sum(avail)} ({avail})")


def _fill_to_caps(w: torch.Tensor, rest: int, room: list[int]) -> list[int]:
    """`rest` samples shared out by weight, none above its step's `room`: steps whose share reaches
    their room are filled and leave; the others share what remains (equally when their weights are
    all zero), until no share exceeds a room; then counts_from_weights rounds the last shares."""
    extra = [0] * len(room)
    active = [t for t in range(len(room)) if room[t] > 0]
    while active:
        share = w[active]
        quota = share * rest / share.sum() if share.sum() > 0 else torch.full((len(active),), rest / len(active))
        full = [t for t, q in zip(active, quota.tolist(), strict=True) if q >= room[t]]
        if not full:
            for t, k in zip(active, counts_from_weights(share, rest), strict=True):
                extra[t] += k
            break
        for t in full:
            extra[t] += room[t]
            rest -= room[t]
        active = [t for t in active if t not in full]
    return extra


def select(cal_set: CalibrationSet, counts: Sequence[int], seed: int = 0) -> CalibrationSet:
    """counts[i] samples of step cal_set.steps()[i], drawn without replacement by a seeded generator.

    A count is of samples (trajectories at that step): a guided sample keeps its cond AND null rows.
    Rows keep their captured order. The same (set, counts, seed) always gives the same rows, and the
    draws of one step do not depend on the counts of the others.
    """
    steps = cal_set.steps()
    if len(counts) != len(steps):
        raise ValueError(f"{len(counts)} counts for {len(steps)} steps {steps}")
    gen = torch.Generator().manual_seed(seed)
    keep = torch.zeros(len(cal_set), dtype=torch.bool)
    for s, k in zip(steps, counts, strict=True):
        at = cal_set.step == s
        ids = torch.unique(cal_set.sample_id[at])
        if not 0 <= k <= len(ids):
            raise ValueError(f"step {s}: asked for {k} samples, the set has {len(ids)}")
        chosen = ids[torch.randperm(len(ids), generator=gen)[:k]]
        keep |= at & torch.isin(cal_set.sample_id, chosen)
    picked = cal_set.subset(torch.nonzero(keep).flatten())
    return replace(picked, meta={**picked.meta, "selection": {"counts": [int(k) for k in counts], "seed": seed}})

