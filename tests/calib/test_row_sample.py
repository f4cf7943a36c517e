"""Calibration extras for data-driven stages: a bounded uniform sample of input rows, and which layers
read the very same input tensor."""

from __future__ import annotations

import torch
from torch import nn

from diffquant.calib.stats import RowSample, collect_activation_stats


def indexed_rows(start: int, count: int) -> torch.Tensor:
    """Rows whose every entry is the row's global index, so a sample says which rows it kept."""
    return torch.arange(start, start + count, dtype=torch.float32).unsqueeze(1).expand(count, 3).contiguous()


def sample_of(calls: int = 20, rows: int = 100, capacity: int = 50) -> RowSample:
    sample = RowSample(capacity)
    for i in range(calls):
        sample.update(indexed_rows(i * rows, rows))
    return sample


def test_row_sample_is_bounded_without_repeats_and_spans_every_call():
    sample = sample_of()
    kept = sample.rows[:, 0]
    assert sample.rows.shape == (50, 3) and sample.seen == 2000
    assert len(set(kept.tolist())) == 50 and kept.min() >= 0 and kept.max() < 2000
    assert torch.equal(kept, kept.sort().values)  # in order of arrival
    assert 600 < float(kept.mean()) < 1400  # uniform over all calls, not the first or the last ones
    assert torch.equal(sample_of().rows, sample.rows)  # seeded


def test_row_sample_keeps_copies_not_views_of_the_activation():
    x = indexed_rows(0, 10)
    sample = RowSample(16)
    sample.update(x)
    x.zero_()
    assert torch.equal(sample.rows, indexed_rows(0, 10))


def test_row_sample_keeps_everything_below_capacity():
    assert torch.equal(sample_of(calls=2, rows=10, capacity=50).rows[:, 0], torch.arange(20.0))


class SharedInputs(nn.Module):
    """q/k/v read one tensor; `other` an equal-shaped different one; `late` the same tensor after an
    in-place change; `sometimes` the shared tensor in the first call only."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.other, self.late, self.sometimes = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * 2
        out = self.q(h) + self.k(h) + self.v(h) + self.other(x * 2)
        self.sometimes(h if self.calls == 0 else h.clone())
        h.add_(1)  # same object, new values
        self.calls += 1
        return out + self.late(h)


def test_layers_reading_one_tensor_are_grouped():
    model = SharedInputs()
    names = ["q", "k", "v", "other", "late", "sometimes"]
    stats = collect_activation_stats({n: getattr(model, n) for n in names},
                                     lambda: [model(torch.randn(4, 8)) for _ in range(3)], sample_rows=4)
    assert stats.input_groups == [("q", "k", "v")]
    assert stats.input_group_of("k") == ("q", "k", "v") and stats.input_group_of("late") == ("late",)
    assert all(stats[n].sample.rows.shape == (4, 8) for n in names)
    assert torch.equal(stats["q"].sample.rows, stats["v"].sample.rows)  # same rows for a shared input


def test_ranges_only_by_default():
    model = SharedInputs()
    stats = collect_activation_stats({"q": model.q}, lambda: model(torch.randn(4, 8)))
    assert stats["q"].sample is None and stats["q"].overall is not None
