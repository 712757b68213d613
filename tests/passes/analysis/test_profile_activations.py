"""profile-activations: per-channel zero fractions equal a direct count; needs calibration."""

import pytest
import torch
import torch.nn as nn

from sparsecomp.frontend import capture
from sparsecomp.errors import SparsecompError
from sparsecomp.pass_manager import PassContext, PassManager


def test_counts_match_direct_computation():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    with torch.no_grad():
        m[0].bias[:5] = -100.0  # channels 0..4 of the hidden layer are always zero (dead)
    batches = [(torch.randn(6, 8),) for _ in range(3)]
    gm = capture(m, batches[0])
    ctx = PassContext.create(batches[0], batches)
    PassManager('profile-activations{thresholds="0.5"}').run(gm, ctx)
    stats = {s.name: s for s in ctx.results["profile-activations"]}
    hidden = torch.cat([torch.relu(m[0](b[0])) for b in batches])
    expected = (hidden == 0).double().mean(0)
    torch.testing.assert_close(stats["2"].zero_per_channel, expected)
    torch.testing.assert_close(stats["2"].near_zero_per_channel["0.5"], (hidden.abs() < 0.5).double().mean(0))
    assert stats["2"].dead_channels >= 5 and stats["2"].samples == 18
    assert stats["0"].zero_fraction == 0.0  # gaussian inputs have no exact zeros
    node = next(n for n in gm.graph.nodes if n.meta.get("sparsecomp.activations") is stats["2"])
    assert node.args[0].target is torch.ops.aten.relu.default


def test_conv_channels_are_dim_1():
    m = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 2, 1)).eval()
    x = torch.randn(2, 3, 5, 5)
    gm = capture(m, (x,))
    ctx = PassContext.create((x,), [(x,)])
    PassManager("profile-activations").run(gm, ctx)
    s = ctx.results["profile-activations"][1]
    assert s.channels == 8 and s.samples == 2 * 25
    torch.testing.assert_close(s.zero_per_channel, (torch.relu(m[0](x)) == 0).double().mean((0, 2, 3)))


def test_needs_calibration():
    m = nn.Linear(4, 4)
    gm = capture(m, (torch.randn(2, 4),))
    with pytest.raises(SparsecompError, match="needs calibration data"):
        PassManager("profile-activations").run(gm, PassContext.create((torch.randn(2, 4),)))
