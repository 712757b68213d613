"""analyze-weights: facts measured on known weights, orientation rules, NaN flagged, graph unchanged."""

import pytest
import torch
import torch.nn as nn

from sparsecomp.frontend import capture
from sparsecomp.ir import format_graph
from sparsecomp.pass_manager import PassContext, PassManager
from sparsecomp.passes.analysis.analyze_weights import weight_stats
from sparsecomp.patterns import impose_pattern, parse_pattern


def run(model, x, pipeline="analyze-weights"):
    gm = capture(model.eval(), (x,))
    before = format_graph(gm, annotations=False)
    ctx = PassContext.create((x,))
    PassManager(pipeline).run(gm, ctx)
    assert format_graph(gm, annotations=False) == before  # analysis never changes the graph
    return gm, ctx.results["analyze-weights"]


def test_known_weight_facts():
    w = torch.zeros(8, 12)
    w[0, :6] = 1.0  # row 0: inputs 0..5
    w[:, 3] = 2.0  # every output reads input 3
    s = weight_stats("l", "linear", w)
    assert s.shape == [8, 12]
    assert s.density == pytest.approx((6 + 7) / 96)
    assert s.zero_rows == 0 and s.zero_cols == 6
    # row 0's first group of 4 inputs holds 4 nonzeros: the only group that breaks 2:4
    assert s.nm_conformance["2:4"] == pytest.approx(23 / 24)
    # 16x1 blocks (16 along out_features): the 8 rows pad to one block row; columns 0..5 touched
    assert s.block_occupancy["16x1"] == pytest.approx(6 / 12)
    assert s.block_occupancy["1x4"] == pytest.approx((2 + 7) / 24)
    assert s.bytes["dense"] == 96 * 4 and s.bytes["csr"] < s.bytes["dense"]
    assert "2:4" not in s.bytes  # only conformant N:M formats are priced


def test_fully_dense_and_fully_zero():
    dense = weight_stats("d", "linear", torch.ones(5, 7))
    assert dense.density == 1.0 and dense.zero_rows == 0 and dense.best_format()[0] == "dense"
    zero = weight_stats("z", "linear", torch.zeros(5, 7))
    assert zero.density == 0.0 and zero.zero_rows == 5 and zero.zero_cols == 7
    assert zero.nm_conformance == {"2:4": 1.0, "4:8": 1.0}
    assert all(v == 0.0 for v in zero.block_occupancy.values())


def test_imposed_patterns_are_recovered_in_the_graph():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 40))
    with torch.no_grad():
        m[0].weight.copy_(impose_pattern(m[0].weight, parse_pattern("2:4")))
        m[2].weight.copy_(impose_pattern(m[2].weight, parse_pattern("block:16x1:0.9")))
    gm, stats = run(m, torch.randn(3, 64))
    assert [s.name for s in stats] == ["0", "2"]
    assert stats[0].nm_conformance["2:4"] == 1.0 and stats[0].density == pytest.approx(0.5)
    assert "2:4" in stats[0].bytes
    n_blocks = 3 * 40  # ceil(96/16) x 40
    assert abs(stats[1].block_occupancy["16x1"] - 0.1) <= 1 / n_blocks
    assert stats[1].nm_conformance["2:4"] < 1.0  # a block pattern must NOT read as 2:4
    annotated = [n for n in gm.graph.nodes if "sparsecomp.weights" in n.meta]
    assert len(annotated) == 2


def test_matmul_orientation_and_conv_view():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(12, 8))  # x @ w: stored [in, out]
            self.conv = nn.Conv2d(8, 6, 3)

        def forward(self, x):
            return self.conv((x @ self.w)[:, :8].reshape(-1, 8, 1, 1).expand(-1, 8, 3, 3))

    m = M()
    with torch.no_grad():
        m.w[:, 0] = 1.0  # output feature 0 alive, every input feeds it
    _, stats = run(m, torch.randn(2, 12))
    mm, conv = stats
    assert (mm.op, mm.shape) == ("matmul", [8, 12])  # viewed as [out, in]
    assert mm.zero_rows == 7 and mm.zero_cols == 0
    assert (conv.op, conv.shape) == ("conv", [6, 72])


def test_nan_and_inf_are_flagged_not_hidden():
    w = torch.randn(4, 8)
    w[1, 2] = float("nan")
    w[3, 3] = float("inf")
    s = weight_stats("bad", "linear", w)
    assert (s.nan, s.inf) == (1, 1)
    assert s.flags == ["NaN:1", "Inf:1"]
    assert s.density == 1.0  # NaN is not a zero


def test_custom_block_and_nm_options():
    m = nn.Linear(32, 32)
    gm, stats = run(m, torch.randn(2, 32), 'analyze-weights{blocks="2x2,8x8",nm="1:4"}')
    assert set(stats[0].block_occupancy) == {"2x2", "8x8"}
    assert set(stats[0].nm_conformance) == {"1:4"}


@pytest.mark.parametrize("shape", [(37, 53), (64, 128)])
def test_sizes_from_one_mask_match_the_formats_own_estimates(shape):
    # weight_stats prices BSR from the occupancy it measured (one pass over a mask): it must agree
    # with the format's own estimate, edges not divisible by the block and a NaN included.
    from sparsecomp import formats

    g = torch.Generator().manual_seed(3)
    w = torch.randn(*shape, generator=g)
    w[torch.rand(*shape, generator=g) < 0.8] = 0
    w[1, 2] = float("nan")
    s = weight_stats("w", "linear", w, blocks=[(16, 1), (4, 4), (3, 5), (32, 32)], nm=[(2, 4)])
    for r, c in [(16, 1), (4, 4), (3, 5), (32, 32)]:
        assert s.bytes[f"bsr{r}x{c}"] == formats.BSR.estimate_nbytes(w, (r, c))
    assert s.density == pytest.approx(float((w != 0).float().mean()))
