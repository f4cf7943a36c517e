"""Granularity objects (formats/granularity.py): the registry QuantSpec.grain dispatches on, with the block
layout, K segment and packing order each one gives, and the rules of where each applies."""

from __future__ import annotations

import pytest
import torch

from diffquant.formats import GRANULARITIES, QuantSpec, SpecError, block_view, get_granularity, unblock_view
from diffquant.formats.granularity import CHANNEL, GROUP, TENSOR, TOKEN

X = torch.arange(2 * 3 * 10, dtype=torch.float32).reshape(2, 3, 10) - 29.5  # feature axis last, C = 10

# name -> (blocks of X's view, block length, K segment, for weights, static / dynamic activations)
TABLE = {
    "tensor": (1, 60, None, True, (True, True)),
    "channel": (6, 10, None, True, (True, False)),
    "token": (6, 10, None, False, (False, True)),
    "group": (18, 4, 4, True, (False, True)),  # group 4 over C = 10: 3 groups per row, the last padded
}


def test_the_registry_holds_each_name_once_in_spec_order():
    assert tuple(GRANULARITIES) == ("tensor", "channel", "token", "group")
    assert [GRANULARITIES[n] for n in GRANULARITIES] == [TENSOR, CHANNEL, TOKEN, GROUP]
    assert all(g.name == name for name, g in GRANULARITIES.items())


@pytest.mark.parametrize("name", sorted(TABLE))
def test_view_layout_segment_and_applicability(name):
    blocks, length, segment, weights, (static, dynamic) = TABLE[name]
    grain = get_granularity(name)
    group_size = 4 if grain.takes_group_size else None
    view = grain.view(X, group_size)
    assert view.shape == (blocks, length)
    assert torch.equal(grain.unview(view, X.shape), X)
    assert torch.equal(block_view(X, name, group_size), view) and torch.equal(unblock_view(view, X.shape, grain), X)
    assert grain.segment(group_size) == segment
    assert (grain.for_weights, grain.static_activation, grain.dynamic_activation) == (weights, static, dynamic)


@pytest.mark.parametrize("name", ["tensor", "channel", "group"])
def test_packing_order_round_trips_and_is_groups_by_output(name):
    grain = get_granularity(name)
    out, k = 3, 8
    spec = QuantSpec("int8", name, group_size=4 if grain.takes_group_size else None)
    blocks = torch.arange(spec.grain.view(torch.zeros(out, k), spec.group_size).shape[0], dtype=torch.float32)
    groups = grain.by_output(blocks.reshape(-1, 1), out)
    expected = {"tensor": (1, 1), "channel": (1, out), "group": (2, out)}[name]
    assert groups.shape == expected
    if name == "group":  # block (n, g) of the [out, K] view is row n's g-th group: [g, n] after packing
        assert groups[1, 2] == blocks[2 * 2 + 1]
    assert torch.equal(grain.from_output(groups), blocks.reshape(-1, 1))


def test_per_tensor_reduces_static_ranges_and_gptq_columns_to_one():
    lo, hi = torch.tensor([-1.0, -3.0, 0.5]), torch.tensor([2.0, 1.0, 4.0])
    assert [t.tolist() for t in TENSOR.static_range(lo, hi)] == [[-3.0], [4.0]]
    assert all(torch.equal(a, b) for a, b in zip(CHANNEL.static_range(lo, hi), (lo, hi), strict=True))
    columns = torch.ones(5, 4)
    assert TENSOR.column_blocks(columns).shape == (1, 20) and GROUP.column_blocks(columns).shape == (5, 4)


def test_only_per_input_channel_ranges_keep_inputs_off_the_integer_gemm():
    assert [g.name for g in GRANULARITIES.values() if not g.integer_activations] == ["channel"]
    assert [g.name for g in GRANULARITIES.values() if g.ranges_per_row] == ["token", "group"]
    assert [g.name for g in GRANULARITIES.values() if g.splittable] == ["tensor"]


@pytest.mark.parametrize(("name", "dynamic", "match"), [
    ("channel", True, "per-input-channel activation ranges are calibrated"),
    ("token", False, "per-token activation ranges change with every input"),
    ("group", False, "per-group activation ranges are computed at run time"),
])
def test_activation_rules_are_spec_errors(name, dynamic, match):
    spec = QuantSpec("int8", name, group_size=8 if name == "group" else None, dynamic=dynamic)
    assert spec.grain is GRANULARITIES[name]
    with pytest.raises(SpecError, match=match):
        spec.validate_for_activation()
    QuantSpec("int8", name, group_size=spec.group_size, dynamic=not dynamic).validate_for_activation()


def test_unknown_names_and_missing_group_sizes_are_spec_errors():
    with pytest.raises(SpecError, match="unknown granularity 'row'"):
        QuantSpec("int8", "row")
    with pytest.raises(SpecError, match="unknown granularity"):
        get_granularity(["group"])
    with pytest.raises(SpecError, match="group_size is required"):
        QuantSpec("int8", "group")
    with pytest.raises(SpecError, match="needs a group_size"):
        block_view(X, "group")
    with pytest.raises(SpecError, match="weights take granularity"):
        QuantSpec("int8", "token", dynamic=True).validate_for_weight()
