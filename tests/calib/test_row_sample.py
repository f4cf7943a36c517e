"""Calibration extras for data-driven stages: a bounded uniform sample of input rows, and which layers
read the very same input tensor."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffquant.calib.stats import ROW_SAMPLE_SEED, Rows, RowSample, collect_activation_stats, patch_rows


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


def test_row_sample_is_the_bottom_k_of_every_key_drawn():
    """Gathering only each call's `capacity` smallest keys keeps the same rows as sampling from all of them."""
    g = torch.Generator().manual_seed(ROW_SAMPLE_SEED)
    keys = torch.cat([torch.rand(100, generator=g, dtype=torch.float64) for _ in range(20)])
    expected = keys.topk(50, largest=False).indices.sort().values.float()
    assert torch.equal(sample_of().rows[:, 0], expected)


def test_update_gathers_at_most_capacity_rows_per_call():
    asked = []

    def gather(index: torch.Tensor) -> torch.Tensor:
        asked.append(index.numel())
        return indexed_rows(0, 1000)[index]

    sample = RowSample(16)
    for _ in range(3):
        sample.update_rows(Rows(1000, gather))
    assert asked == [16, 16, 16] and sample.rows.shape == (16, 3) and sample.seen == 3000


CONV_GEOMETRIES = {
    "3x3": dict(kernel_size=3, padding=1),
    "3x3-stride2": dict(kernel_size=3, stride=2, padding=1),
    "3x3-dilated": dict(kernel_size=3, padding=2, dilation=2),
    "1x1": dict(kernel_size=1),
    "3x2-same": dict(kernel_size=(3, 2), padding="same"),
    "2x2-valid-stride2": dict(kernel_size=2, stride=2, padding="valid"),
}


@pytest.mark.parametrize("geometry", CONV_GEOMETRIES.values(), ids=CONV_GEOMETRIES)
def test_conv_patch_rows_times_the_weight_matrix_are_the_conv_output(geometry):
    """Rows in (b, oh, ow) order, K in (kh, kw, c) order as QConv2d.weight_matrix, zeros in the padding."""
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 3, **geometry)
    x = torch.randn(2, 5, 7, 6)
    rows = patch_rows(conv, x)
    patches = rows.gather(torch.arange(rows.count))
    matrix = conv.weight.detach().permute(0, 2, 3, 1).reshape(3, -1)
    with torch.no_grad():
        expected = conv(x).permute(0, 2, 3, 1).reshape(-1, 3)
    assert patches.shape == (expected.shape[0], matrix.shape[1])
    torch.testing.assert_close(patches @ matrix.t() + conv.bias.detach(), expected, rtol=1e-5, atol=1e-5)
    some = torch.tensor([1, 4, 5, rows.count - 1])
    assert torch.equal(rows.gather(some), patches[some])


def test_convolutions_sample_patch_rows_and_divide_them_per_channel():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    stats = collect_activation_stats({"c": conv}, lambda: [conv(torch.randn(2, 4, 16, 16)) for _ in range(3)],
                                     sample_rows=32)
    sample = stats["c"].sample
    assert sample.rows.shape == (32, 36) and sample.taps == 9 and sample.seen == 3 * 2 * 16 * 16
    assert stats["c"].overall.absmax.shape == (4,)  # ranges stay per channel
    divisor = torch.tensor([1.0, 2.0, 4.0, 8.0])
    torch.testing.assert_close(stats["c"].divided(divisor).sample.rows, sample.rows / divisor.repeat(9))


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
