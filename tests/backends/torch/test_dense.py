"""The torch backend's one-row dense lowering (`backends/torch/dense.py`): dense Linear layers that
see one row per call move to the TIR GEMV only where it measures faster than torch's.

The timing is replaced by a fake in the tests that assert which way a layer goes (a real
measurement on a shared 2-core machine could go either way); numbers are checked against eager at
one row (the TIR kernel) and at other row counts (`F.linear` on the same weight).
"""

import pytest
import torch
import torch.nn as nn

pytest.importorskip("tvm")

import sparsecomp as sc  # noqa: E402
from sparsecomp.api import CompiledModel  # noqa: E402
from sparsecomp.backends.torch import TirDenseLinear  # noqa: E402
from sparsecomp.backends.torch import dense as dense_lowering  # noqa: E402
from sparsecomp.ir import compare_outputs  # noqa: E402
from sparsecomp.timing import Measurement  # noqa: E402


def mlp(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(37, 203), nn.ReLU(), nn.Linear(203, 29, bias=False)).eval()  # odd on purpose
    with torch.no_grad():
        m[0].weight[7].zero_()  # an all-zero row
    return m


def fake_timing(monkeypatch, tir_us: float, dense_us: float = 100.0):
    calls = []

    def compare(cands, **_kw):
        calls.append(sorted(cands))
        for fn in cands.values():
            fn()  # the candidates still run (they must not fail)
        return {k: Measurement((tir_us if k == dense_lowering.KERNEL else dense_us) * 1e-6, 20) for k in cands}

    monkeypatch.setattr(dense_lowering, "compare", compare)
    return calls


def lowered_modules(cm):
    return [m for m in cm.gm.modules() if isinstance(m, TirDenseLinear)]


def test_one_row_layers_move_to_the_tir_gemv_when_it_wins(monkeypatch, tmp_path):
    calls = fake_timing(monkeypatch, tir_us=50.0)
    m = mlp()
    cm = sc.compile(m, (torch.randn(1, 37),), cache_dir=str(tmp_path))
    assert len(lowered_modules(cm)) == 2
    assert not [n for n in cm.gm.graph.nodes if n.target is torch.ops.aten.linear.default]
    assert len(calls) == 2  # two weight shapes, one timing each
    assert cm.report.to_dict()["summary"]["dense_on_tir_gemv"] == 2 and "2 dense one-row layers on the TIR GEMV" in str(cm.report)
    rows = {r["layer"]: r for r in cm.report.rows}
    for layer in ("0", "2"):
        assert rows[layer]["kernel"] == "tir-dense-mv" and rows[layer]["decision"] == "dense"
        assert "not rewritten" in rows[layer]["reason"] and "2.00x faster than torch's" in rows[layer]["reason"]
    lowered = CompiledModel(cm.gm, cm.report, "torch")  # the lowered graph, whatever end-to-end timing chose
    for x in (torch.randn(1, 37), torch.zeros(1, 37), torch.randn(3, 37), torch.randn(64, 37)):
        ok, err, allowed = compare_outputs(lowered(x), m(x))
        assert ok, (x.shape, err, allowed)
    with pytest.raises(sc.SparsecompError, match="float32 CPU inputs"):
        lowered_modules(cm)[0](torch.randn(1, 37, dtype=torch.float64))
    xs = [torch.randn(1, 37) for _ in range(12)]  # one-row outputs the caller keeps stay as they were
    ys = [lowered(x) for x in xs]
    assert all(compare_outputs(y, m(x))[0] for x, y in zip(xs, ys))
    # the decision is cached: a second compile times nothing
    cm2 = sc.compile(m, (torch.randn(1, 37),), cache_dir=str(tmp_path))
    assert len(calls) == 2 and len(lowered_modules(cm2)) == 2
    assert all(r["cached"] for r in cm2.report.rows)


def test_cold_timing_cycles_weight_copies(monkeypatch, tmp_path):
    """A model whose weights exceed the last-level cache: each timed call runs every copy of the
    weight (so each is read from memory), the report gives the time per layer call, and cold and
    hot decisions are cached apart."""
    runs = []

    def compare(cands, **_kw):
        for name, fn in cands.items():
            before = len(runs)
            fn()
            runs.append((name, len(runs) - before))
        return {k: Measurement((150.0 if k == dense_lowering.KERNEL else 300.0) * 1e-6, 20) for k in cands}

    monkeypatch.setattr(dense_lowering, "compare", compare)
    monkeypatch.setattr(dense_lowering, "cold_copies", lambda nbytes: 3)
    real_linear, real_forward = dense_lowering.F.linear, TirDenseLinear.forward
    monkeypatch.setattr(dense_lowering.F, "linear", lambda *a, **k: (runs.append("torch"), real_linear(*a, **k))[1])
    monkeypatch.setattr(TirDenseLinear, "forward", lambda self, x: (runs.append("tir"), real_forward(self, x))[1])
    m = mlp()
    monkeypatch.setattr(dense_lowering, "model_is_cold", lambda gm: True)
    cold = sc.compile(m, (torch.randn(1, 37),), cache_dir=str(tmp_path))
    assert ("dense", 3) in runs and (dense_lowering.KERNEL, 3) in runs  # three copies per timed call
    row = next(r for r in cold.report.rows if r["layer"] == "0")
    assert row["dense_us"] == pytest.approx(100.0) and row["chosen_us"] == pytest.approx(50.0)  # per copy
    monkeypatch.setattr(dense_lowering, "model_is_cold", lambda gm: False)
    runs.clear()
    hot = sc.compile(m, (torch.randn(1, 37),), cache_dir=str(tmp_path))
    assert ("dense", 1) in runs and not any(r["cached"] for r in hot.report.rows if r["kernel"] == dense_lowering.KERNEL)


def test_torch_gemv_kept_unless_the_tir_one_wins_by_the_margin(monkeypatch, tmp_path):
    fake_timing(monkeypatch, tir_us=100.0 / dense_lowering.MARGIN * 1.01)  # faster, but under the margin
    m = mlp()
    cm = sc.compile(m, (torch.randn(1, 37),), cache_dir=str(tmp_path))
    assert not lowered_modules(cm)
    assert len([n for n in cm.gm.graph.nodes if n.target is torch.ops.aten.linear.default]) == 2
    assert all(r["kernel"] == "dense" and "torch's GEMV kept" in r["reason"] for r in cm.report.rows)
    assert cm.runs == "eager"  # nothing lowered: calls go to the model itself


def test_what_is_not_lowered(monkeypatch, tmp_path):
    calls = fake_timing(monkeypatch, tir_us=1.0)
    m = mlp()
    # several rows per call: the GEMM stays torch's, and nothing is timed
    cm = sc.compile(m, (torch.randn(4, 37),), cache_dir=str(tmp_path))
    assert not lowered_modules(cm) and not calls
    assert all(r["reason"].startswith("not rewritten") and "one row" not in r["reason"] for r in cm.report.rows)

    class Computed(nn.Module):  # a weight computed at run time is not a constant: not a Linear site
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(29, 37))

        def forward(self, x):
            return torch.nn.functional.linear(x, self.w * 2.0)

    cm = sc.compile(Computed().eval(), (torch.randn(1, 37),), cache_dir=str(tmp_path))
    assert not lowered_modules(cm) and not calls
    # a debugging kernel set without the TIR GEMV leaves dense layers alone
    cm = sc.compile(mlp(), (torch.randn(1, 37),), cache_dir=str(tmp_path), kernels="dense")
    assert not lowered_modules(cm) and not calls


def test_layers_of_one_shape_share_one_timing(monkeypatch, tmp_path):
    calls = fake_timing(monkeypatch, tir_us=50.0)
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(37, 37), nn.ReLU(), nn.Linear(37, 37)).eval()
    cm = sc.compile(m, (torch.randn(1, 37),), cache_dir=str(tmp_path))
    assert len(calls) == 1 and len(lowered_modules(cm)) == 2
    rows = cm.report.rows
    assert "decided by an earlier layer of this shape" in rows[1]["reason"] and "earlier layer" not in rows[0]["reason"]
    x = torch.randn(1, 37)
    ok, err, allowed = compare_outputs(CompiledModel(cm.gm, cm.report, "torch")(x), m(x))
    assert ok, (err, allowed)
    cm2 = sc.compile(m, (torch.randn(1, 37),), cache_dir=str(tmp_path))  # from the cache: both rows say so
    assert len(calls) == 1 and all(r["cached"] for r in cm2.report.rows)


def test_a_sparse_layer_whose_zeros_do_not_pay_may_take_the_tir_gemv(monkeypatch, tmp_path):
    """A `sparse_linear` layer at one row has the TIR GEMV among its candidates (a 50% layer
    whose sparse kernels lose to dense); it reports as dense, on that kernel."""
    from sparsecomp import patterns
    from sparsecomp.backends.torch import SparseLinear
    from sparsecomp.backends.torch import lowering

    def compare(cands, **_kw):
        for fn in cands.values():
            fn()
        return {k: Measurement((50.0 if k == dense_lowering.KERNEL else 100.0) * 1e-6, 20) for k in cands}

    monkeypatch.setattr(lowering, "compare", compare)
    fake_timing(monkeypatch, tir_us=50.0)
    torch.manual_seed(3)
    m = nn.Sequential(nn.Linear(96, 160), nn.ReLU(), nn.Linear(160, 29)).eval()
    patterns.impose(m, "unstructured:0.5", "0")
    cm = sc.compile(m, (torch.randn(1, 96),), cache_dir=str(tmp_path), kernels=f"dense,torch-csr,{dense_lowering.KERNEL}")
    rows = {r["layer"]: r for r in cm.report.rows}
    assert rows["0"]["kernel"] == dense_lowering.KERNEL and rows["0"]["decision"] == "dense"
    assert "the zeros do not pay at one row" in rows["0"]["reason"]
    assert rows["2"]["kernel"] == dense_lowering.KERNEL and "not rewritten" in rows["2"]["reason"]
    assert [type(mm).__name__ for mm in cm.gm.modules() if isinstance(mm, (SparseLinear, TirDenseLinear))].count("SparseLinear") == 1
    lowered = CompiledModel(cm.gm, cm.report, "torch")
    for x in (torch.randn(1, 96), torch.randn(5, 96)):
        ok, err, allowed = compare_outputs(lowered(x), m(x))
        assert ok, (x.shape, err, allowed)
    # under the margin, the layer stays on torch's GEMV
    monkeypatch.setattr(lowering, "compare", lambda cands, **_kw: {
        k: Measurement((100.0 / dense_lowering.MARGIN * 1.01 if k == dense_lowering.KERNEL else 100.0) * 1e-6, 20) for k in cands})
    cm = sc.compile(m, (torch.randn(1, 96),), cache_dir=str(tmp_path / "other"), kernels=f"dense,{dense_lowering.KERNEL}")
    assert {r["layer"]: r for r in cm.report.rows}["0"]["kernel"] == "dense"
