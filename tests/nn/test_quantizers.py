"""Static activation quantizers (nn/quantizers.py): calibration of per-channel ranges."""

from __future__ import annotations

import torch

from diffquant.calib.stats import LayerStats
from diffquant.formats import QuantSpec
from diffquant.formats.ops import qparams_from_range
from diffquant.nn.quantizers import ActivationQuantizer


def test_a_channel_seen_only_at_zero_gets_a_usable_step_and_stays_exact():
    spec = QuantSpec("int4", "channel", symmetric=False)
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
    x[:, 2] = 0.0  # dead unit
    x[:, 4] = 1e-30  # underflowed to almost nothing
    quantizer = ActivationQuantizer(spec)
    stats = LayerStats()
    stats.observe(x, None)
    quantizer.calibrate(stats)
    plain, _ = qparams_from_range(x.amin(0), x.amax(0), spec.qformat, False, spec.scale_format)
    live = [0, 1, 3, 5]
    assert torch.equal(quantizer.scale[live], plain[live])  # the floor leaves live channels alone
    assert plain[2] < 1e-37 and quantizer.scale[2] >= plain[live].median() * 2**-20 / 15
    assert torch.equal(quantizer(x)[:, 2], x[:, 2])  # 0 stays exact
    assert (quantizer(x)[:, 4] - x[:, 4]).abs().max() <= 1e-30
