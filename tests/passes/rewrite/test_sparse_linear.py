"""sparse-linear: eager-equal outputs, op counts after the pass, and weights that must NOT be rewritten."""

import pytest
import torch
import torch.nn as nn

import sparsecomp as sc
from sparsecomp import patterns
from sparsecomp.ir import compare_outputs

from sparsecomp.dialect import sparse_linear

SPARSE = sparse_linear.default


def count(gm, target):
    return sum(1 for n in gm.graph.nodes if n.target is target)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(64, 96)
        self.fc2 = nn.Linear(96, 64)
        self.w = nn.Parameter(torch.randn(64, 40))  # x @ w, stored [in, out]
        self.head = nn.Linear(40, 8, bias=False)

    def forward(self, x):
        return self.head(self.fc2(torch.relu(self.fc1(x))) @ self.w)


def build(seed=0):
    torch.manual_seed(seed)
    m = Net().eval()
    patterns.impose(m, "unstructured:0.9", "fc1")
    patterns.impose(m, "2:4", "fc2")  # 50% and conformant
    with torch.no_grad():
        m.w.copy_(patterns.impose_pattern(m.w.t(), "block:16x1:0.75").t())
        m.head.weight[3].zero_()  # an all-zero row, otherwise dense: stays dense
    return m


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_equivalent_to_eager_and_op_counts(batch):
    m = build()
    x = torch.randn(batch, 64)
    gm, ctx = sc.run_pipeline(m, (x,), "analyze-weights,sparse-linear")
    assert count(gm, SPARSE) == 3
    assert count(gm, torch.ops.aten.linear.default) == 1  # head: dense
    assert count(gm, torch.ops.aten.matmul.default) == 0
    rewritten = {name: ok for name, ok, _ in ctx.results["sparse-linear"]}
    assert rewritten == {"fc1": True, "fc2": True, "w": True, "head": False}
    for xb in (x, torch.randn(3, 64), torch.zeros(2, 64)):  # other batch sizes and all-zero input
        ok, err, allowed = compare_outputs(gm(xb), m(xb))
        assert ok, (err, allowed)
    provenance = [n.meta["sparsecomp.provenance"]["rule"] for n in gm.graph.nodes if n.target is SPARSE]
    assert sorted(provenance) == ["linear", "linear", "matmul"]


def test_threshold_is_inclusive_and_nm_always_qualifies():
    m = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32)).eval()
    patterns.impose(m, "unstructured:0.25", "0")
    patterns.impose(m, "4:8", "1")  # 50% ... and conformant
    x = torch.randn(2, 32)
    gm, ctx = sc.run_pipeline(m, (x,), "sparse-linear{min_sparsity=0.25}")
    assert count(gm, SPARSE) == 2
    gm, ctx = sc.run_pipeline(m, (x,), "sparse-linear{min_sparsity=0.9}")
    assert [ok for _, ok, _ in ctx.results["sparse-linear"]] == [False, True]
    assert "4:8-conformant" in ctx.results["sparse-linear"][1][2]


def test_must_not_rewrite():
    class Small(nn.Module):
        def __init__(self):
            super().__init__()
            self.tiny = nn.Linear(8, 32)  # 8 inputs: below min_features
            self.big = nn.Linear(32, 32).double()  # fp64: no kernels

        def forward(self, x):
            return self.big(self.tiny(x).double())

    m = Small().eval()
    patterns.impose(m, "unstructured:0.9")
    gm, ctx = sc.run_pipeline(m, (torch.randn(2, 8),), "analyze-weights,sparse-linear")
    assert count(gm, SPARSE) == 0
    reasons = dict((n, r) for n, _, r in ctx.results["sparse-linear"])
    assert "min_features" in reasons["tiny"] and "float64" in reasons["big"]


def test_rewritten_graph_still_exports():
    m = build()
    x = torch.randn(4, 64)
    gm, _ = sc.run_pipeline(m, (x,), "sparse-linear")
    ep = torch.export.export(gm, (x,), strict=False)
    assert any(n.target is SPARSE for n in ep.graph.nodes)


def test_pointwise_conv_becomes_sparse_linear_and_others_do_not():
    torch.manual_seed(0)

    class ConvNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.pw = nn.Conv2d(32, 48, 1)
            self.k3 = nn.Conv2d(48, 16, 3, padding=1)  # 3x3: must NOT be rewritten
            self.strided = nn.Conv2d(16, 32, 1, stride=2)  # strided 1x1: must NOT be rewritten

        def forward(self, x):
            return self.strided(self.k3(torch.relu(self.pw(x))))

    m = ConvNet().eval()
    patterns.impose(m, "unstructured:0.8")
    x = torch.randn(2, 32, 7, 9)
    gm, ctx = sc.run_pipeline(m, (x,), "sparse-linear")
    assert count(gm, SPARSE) == 1
    assert count(gm, torch.ops.aten.conv2d.default) == 2
    for xb in (x, torch.randn(1, 32, 7, 9)):
        ok, err, allowed = compare_outputs(gm(xb), m(xb))
        assert ok, (err, allowed)
    rules = {n.meta["sparsecomp.provenance"]["rule"] for n in gm.graph.nodes if "sparsecomp.provenance" in n.meta}
    assert rules == {"conv1x1"}



class HandLinear(nn.Module):
    """A Linear spelled by hand: `x @ W.t() (+ b)`, W stored [out, in]."""

    def __init__(self, out_f, in_f, bias):
        super().__init__()
        self.w = nn.Parameter(torch.randn(out_f, in_f))
        self.b = nn.Parameter(torch.randn(out_f)) if bias else None

    def forward(self, x):
        y = x @ self.w.t()
        return y + self.b if self.b is not None else y


def hand_linear(out_f, in_f, bias):
    torch.manual_seed(0)
    m = HandLinear(out_f, in_f, bias).eval()
    with torch.no_grad():
        m.w.copy_(patterns.impose_pattern(m.w, "unstructured:0.9"))
        m.w[5].zero_()  # an all-zero row
    return m


@pytest.mark.parametrize("shape, bias", [((96, 64), False), ((64, 64), False), ((48, 80), True)])
def test_matmul_with_a_transposed_weight(shape, bias):
    m = hand_linear(*shape, bias)
    x = torch.randn(2, 5, shape[1])
    gm, ctx = sc.run_pipeline(m, (x,), "analyze-weights,sparse-linear")
    assert count(gm, SPARSE) == 1
    node = next(n for n in gm.graph.nodes if n.target is SPARSE)
    assert node.args[1].op == "get_attr" and node.args[1].target == "w"  # W itself, [out, in]
    assert count(gm, torch.ops.aten.t.default) == 0 and count(gm, torch.ops.aten.matmul.default) == 0
    for xb in (x, torch.randn(1, 1, shape[1]), torch.zeros(3, 2, shape[1])):
        ok, err, allowed = compare_outputs(gm(xb), m(xb))
        assert ok, (err, allowed)
    other = hand_linear(*shape, bias)  # must NOT match: one nonzero weight changed
    with torch.no_grad():
        r, c = (other.w != 0).nonzero()[0].tolist()
        other.w[r, c] += 1.0
    assert not compare_outputs(gm(x), other(x))[0]


def test_matmul_with_a_transposed_weight_compiles():
    m = hand_linear(96, 64, True)
    cm = sc.compile(m, (torch.randn(4, 64),), max_seconds_per_layer=0.05)
    assert cm.report.verify["ok"] and [r["layer"] for r in cm.report.rows] == ["w"]
    x = torch.randn(3, 64)  # another batch size
    ok, err, allowed = compare_outputs(cm(x), m(x))
    assert ok, (err, allowed)
