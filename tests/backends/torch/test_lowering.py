"""The torch backend: compile equals eager, lowered graph contents, cache hit/miss/corruption, shape changes.

Decisions are measured, so tests that assert *which* kernel runs restrict the candidates
(`kernels=`); the others assert invariants that hold whatever wins.
"""

import json

import pytest
import torch
import torch.nn as nn

import sparsecomp as sc
from sparsecomp.api import CompiledModel
from sparsecomp import patterns
from sparsecomp.backends.torch import SparseLinear
from sparsecomp.errors import NotYetAvailableError, SparsecompError
from sparsecomp.ir import compare_outputs
from nets import three_linears  # tests/_shared: the model both backends' tests use


def net(seed=0):
    return three_linears("2:4", seed)


def kinds(cm):
    mods = [n for n in cm.gm.graph.nodes if n.op == "call_module" and isinstance(cm.gm.get_submodule(n.target), SparseLinear)]
    dense = [n for n in cm.gm.graph.nodes if n.target is torch.ops.aten.linear.default]
    return len(mods), len(dense)


@pytest.mark.parametrize("batch", [1, 33])
def test_forced_sparse_kernel_matches_eager(batch, tmp_path):
    m = net()
    x = torch.randn(batch, 96)
    cm = sc.compile(m, (x,), kernels="torch-csr", cache_dir=str(tmp_path), use_tir=False)
    assert kinds(cm) == (2, 1)  # layers 0 and 2 lowered to the CSR kernel, layer 4 (dense weight) stays aten.linear
    rows = {r["layer"]: r for r in cm.report.rows}
    assert rows["0"]["kernel"] == "torch-csr" and rows["0"]["decision"] == "sparse" and rows["0"]["pattern"] == "unstructured"
    assert rows["2"]["pattern"] == "2:4" and rows["4"]["decision"] == "dense" and "not rewritten" in rows["4"]["reason"]
    assert cm.report.verify["ok"]
    lowered = CompiledModel(cm.gm, cm.report, "torch")  # always run the lowered graph, whatever e2e timing chose
    for xb in (x, torch.randn(7, 96), torch.zeros(1, 96)):  # other batch sizes after compile
        for runner in (cm, lowered):
            ok, err, allowed = compare_outputs(runner(xb), m(xb))
            assert ok, (err, allowed)
    with pytest.raises(SparsecompError, match=r"compiled for CPU inputs \(float32\[.*, 96\]\), got \(float32\[2, 3, 96\]\)"):
        lowered(torch.randn(2, 3, 96))  # another rank: a clear error naming both, not a wrong answer or a guard's text
    with pytest.raises(SparsecompError, match="compiled for other input shapes"):
        lowered(torch.randn(2, 95))  # the right rank with a static dim changed: the guard's own words
    # the per-call pytree structure check is off for speed; a call with other arguments still says why
    assert cm.gm.validate_inputs is False
    with pytest.raises(SparsecompError, match="compiled for other inputs"):
        lowered(x, x)
    # torch.export's hooks were no-ops here (tensor inputs) and are gone; hooks the user (or the
    # backend) registers still run, on the module and for every module
    from sparsecomp.backends.tir import begin_transpose_reuse, end_transpose_reuse
    from sparsecomp.backends.torch import SparseLinear as _SL

    hooks = list(cm.gm._forward_pre_hooks.values()) + list(cm.gm._forward_hooks.values())
    assert hooks == [begin_transpose_reuse, end_transpose_reuse]  # the backend's own, not export's
    seen = []
    h1 = cm.gm.register_forward_hook(lambda mod, args, out: seen.append("gm"))
    h2 = torch.nn.modules.module.register_module_forward_hook(
        lambda mod, args, out: seen.append("sparse") if isinstance(mod, _SL) else None)
    try:
        _ = lowered(x)
    finally:
        h1.remove()
        h2.remove()
    assert seen.count("gm") == 1 and seen.count("sparse") == 2
    _ = lowered(x)
    assert seen.count("gm") == 1  # removed: not called again
    assert cm.runs == cm.report.end_to_end["runs"] and cm.report.end_to_end["eager_ms"] > 0
    # the dense copies of lowered weights are freed; the dense layer keeps its weight
    names = {n for n, _ in cm.gm.named_parameters()}
    assert "0.weight" not in names and "4.weight" in names


@pytest.mark.parametrize("kernels,pool,single_ms,expect", [
    ("torch-csr", None, 5.0, 1), ("torch-csr", None, 7.9, None),  # no TIR kernel: one thread must win by 3%
    ("tir-csr", "tvm", 8.5, 1), ("tir-csr", "tvm", 9.0, None),  # on TVM's pool (it spins): torch's threads must win by 10%
    ("tir-csr", "openmp", 8.5, None), ("tir-csr", "openmp", 7.7, 1),  # on torch's threads: as without TIR
], ids=["csr-one-thread-wins", "csr-within-margin", "tvm-pool-threads-within-margin", "tvm-pool-threads-win",
        "openmp-threads-win", "openmp-one-thread-wins"])
def test_torch_ops_thread_count_is_measured(kernels, pool, single_ms, expect, tmp_path, monkeypatch):
    """compile times the lowered graph with torch's own ops on its thread count and on one thread
    (against eager). Without TIR kernels, or with them on torch's OpenMP threads, one thread is
    kept only when it wins by its margin; with them on TVM's own pool (its workers spin between
    kernels on the cores torch's workers need) torch's threads are kept only when they win by
    theirs. A call with one thread runs torch's ops on one thread and restores the user's setting
    afterwards."""
    import sparsecomp.timing as timing
    from sparsecomp.timing import Measurement

    if pool is not None:
        monkeypatch.setattr("sparsecomp.backends.tir.pool_tag", lambda: pool)

    fake = {"eager": 10.0, "compiled": 8.0, "compiled, torch ops on 1 thread": single_ms}
    real = timing.compare
    monkeypatch.setattr(timing, "compare", lambda cands, **kw: (
        {k: Measurement(fake[k] * 1e-3, 20) for k in cands} if set(cands) == set(fake) else real(cands, **kw)))
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    patterns.impose(m, "unstructured:0.9")
    before = torch.get_num_threads()
    monkeypatch.setattr(torch, "get_num_threads", lambda: max(before, 2))  # as on a machine with 2+ threads
    x = torch.randn(4, 96)
    cm = sc.compile(m, (x,), kernels=kernels, use_tir=kernels.startswith("tir"), cache_dir=str(tmp_path))
    assert all(r["kernel"].startswith(kernels) for r in cm.report.rows if r["decision"] == "sparse")
    assert cm.runs == "compiled" and cm.torch_threads == expect and cm.report.end_to_end["torch_threads"] == expect
    assert cm.report.end_to_end["compiled_ms"] == pytest.approx(single_ms if expect else 8.0)
    assert CompiledModel(cm.gm, cm.report, "torch").torch_threads == expect  # a re-wrapped graph keeps the choice
    set_calls = []
    real_set = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (set_calls.append(n), real_set(n))[1])
    ok, err, allowed = compare_outputs(cm(x), m(x))
    assert ok, (err, allowed)
    assert set_calls == ([1, max(before, 2)] if expect == 1 else [])  # one thread for the call, then the setting back
    # a call larger than the example keeps torch's threads (the choice was measured at 4 rows);
    # a smaller one gets the choice
    set_calls.clear()
    assert cm.report.end_to_end["torch_threads_max_numel"] == x.numel()
    big, small = torch.randn(64, 96), torch.randn(1, 96)
    assert compare_outputs(cm(big), m(big))[0] and set_calls == []
    assert compare_outputs(cm(small), m(small))[0]
    assert set_calls == ([1, max(before, 2)] if expect == 1 else [])


def test_measured_choice_is_always_correct(tmp_path):
    m = net(1)
    x = torch.randn(4, 96)
    cm = sc.compile(m, (x,), cache_dir=str(tmp_path), max_seconds_per_layer=0.05)
    n_sparse, n_dense = kinds(cm)
    assert n_sparse + n_dense == 3
    assert sum(r["decision"] == "sparse" for r in cm.report.rows) == n_sparse
    for r in cm.report.rows:
        if r["layer"] != "4":
            assert r["measured"] and "dense" in r["measured"]  # dense was always a candidate
            assert r["chosen_us"] == min(r["measured"].values())
    x2 = torch.randn(9, 96)
    assert compare_outputs(cm(x2), m(x2))[0]


def test_one_row_layers_of_a_cold_model_are_timed_cold(tmp_path, monkeypatch):
    """At one row per call in a model whose weights exceed the last-level cache, sparse_linear
    candidates are timed with a flush before every timed call and the decision is cached under
    its own key; more rows per call, or a model that fits the cache, are timed as before."""
    from sparsecomp import timing

    flushes = []
    monkeypatch.setattr(timing, "cache_flush", lambda pause_s=0.001: (lambda: flushes.append(1)))
    m = net()
    x1 = torch.randn(1, 96)
    warm = sc.compile(m, (x1,), cache_dir=str(tmp_path), max_seconds_per_layer=0.05)
    assert not flushes
    monkeypatch.setattr(timing, "model_is_cold", lambda gm: True)
    cold = sc.compile(m, (x1,), cache_dir=str(tmp_path), max_seconds_per_layer=0.05)
    assert flushes and not any(r["cached"] for r in cold.report.rows if r["layer"] in ("0", "2"))
    n = len(flushes)
    sc.compile(m, (torch.randn(4, 96),), cache_dir=str(tmp_path), max_seconds_per_layer=0.05)
    assert len(flushes) == n
    for cm in (warm, cold):
        assert cm.report.verify["ok"]
        ok, err, allowed = compare_outputs(cm(x1), m(x1))
        assert ok, (err, allowed)


def test_cache_hit_then_corruption_remeasures(tmp_path):
    m = net(2)
    x = torch.randn(2, 96)
    first = sc.compile(m, (x,), cache_dir=str(tmp_path), kernels="dense,torch-csr")
    assert first.report.cache["miss"] == 2 and first.report.cache["written"] == 2
    second = sc.compile(m, (x,), cache_dir=str(tmp_path), kernels="dense,torch-csr")
    assert second.report.cache["hit"] == 2 and second.report.cache["miss"] == 0
    assert all(r.get("cached") for r in second.report.rows if r["layer"] != "4")
    assert [r["kernel"] for r in second.report.rows] == [r["kernel"] for r in first.report.rows]
    path = tmp_path / "decisions" / "torch.json"
    path.write_text(path.read_text()[:40])  # truncated file: ignored and rewritten
    third = sc.compile(m, (x,), cache_dir=str(tmp_path), kernels="dense,torch-csr")
    assert third.report.cache["corrupt"] >= 1 and third.report.cache["written"] == 2
    json.loads(path.read_text())
    # a cached kernel name the backend does not know is not trusted
    data = json.loads(path.read_text())
    for entry in data["entries"].values():
        entry["kernel"] = "warp-drive"
    path.write_text(json.dumps(data))
    fourth = sc.compile(m, (x,), cache_dir=str(tmp_path), kernels="dense,torch-csr")
    assert fourth.report.cache["hit"] == 0 and fourth.report.cache["corrupt"] == 2


def test_a_wrong_kernel_is_dropped_never_used(tmp_path, monkeypatch):
    from sparsecomp.backends.torch import kernels

    real = kernels._torch_csr

    def broken(weight, bias):
        run = real(weight, bias)
        return lambda x: run(x) + 1.0  # wrong on purpose

    monkeypatch.setattr(kernels, "_torch_csr", broken)
    m = net(3)
    cm = sc.compile(m, (torch.randn(2, 96),), cache_dir=str(tmp_path), kernels="dense,torch-csr")
    assert kinds(cm) == (0, 3)
    assert all("torch-csr dropped: max abs error" in r["reason"] for r in cm.report.rows if r["layer"] != "4")
    with pytest.raises(SparsecompError, match="no candidate kernel could run it"):
        sc.compile(m, (torch.randn(2, 96),), cache_dir=str(tmp_path), kernels="torch-csr")


def test_dense_model_stays_dense_and_exact(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 8)).eval()
    x = torch.randn(3, 32)
    cm = sc.compile(m, (x,), cache_dir=str(tmp_path))
    assert kinds(cm) == (0, 2)
    assert torch.equal(cm(x), m(x))
    assert cm.runs == "eager"  # nothing sparse: the captured graph would only add call overhead


def test_options_not_yet_available():
    m = net()
    with pytest.raises(SparsecompError, match=r"target activation sparsity must be in \(0, 1\)"):  # #5 is in
        sc.compile(m, (torch.randn(1, 96),), activation_sparsity="threshold:1.5")
    with pytest.raises(NotYetAvailableError, match="tvm"):  # ort is in (#4)
        sc.compile(m, (torch.randn(1, 96),), backend="tvm")
    with pytest.raises(SparsecompError, match="unknown backend 'cuda'"):
        sc.compile(m, (torch.randn(1, 96),), backend="cuda")


def test_nan_and_inf_weights_are_kept_exact(tmp_path):
    m = net(4)
    with torch.no_grad():
        m[0].weight[1, 2] = float("nan")
        m[0].weight[3, 4] = float("inf")
    x = torch.randn(3, 96)
    cm = sc.compile(m, (x,), cache_dir=str(tmp_path), kernels="dense,torch-csr,tir-csr,tir-sell")
    lowered = CompiledModel(cm.gm, cm.report, "torch")
    ok, _, _ = compare_outputs(lowered(x), m(x))  # NaN in the same places, finite values close
    assert ok


def test_nan_input_documented_difference():
    """A skipped zero weight does not turn a NaN input into NaN, as 0 x NaN does in a dense matmul."""
    from sparsecomp.backends.torch.kernels import _dense, _torch_csr

    w = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    x = torch.tensor([[float("nan"), 1.0]])
    dense, sparse = _dense(w, None)(x), _torch_csr(w, None)(x)
    assert torch.isnan(dense).all()  # 0 x NaN = NaN in row 1
    assert torch.isnan(sparse[0, 0]) and sparse[0, 1] == 2.0  # the zero was skipped
    xf = torch.tensor([[3.0, 1.0]])
    assert torch.equal(_dense(w, None)(xf), _torch_csr(w, None)(xf))  # finite inputs: identical


def test_half_precision_model_stays_dense_with_a_reason(tmp_path):
    m = net(5).to(torch.bfloat16)
    x = torch.randn(2, 96, dtype=torch.bfloat16)
    cm = sc.compile(m, (x,), cache_dir=str(tmp_path))
    assert kinds(cm) == (0, 3)
    assert all("bfloat16 (fp32 kernels only)" in r["reason"] for r in cm.report.rows)
    assert torch.equal(cm(x), m(x))


def test_other_input_dtype_is_a_clear_error(tmp_path):
    m = net(6)
    cm = sc.compile(m, (torch.randn(2, 96),), cache_dir=str(tmp_path), kernels="torch-csr")
    lowered = CompiledModel(cm.gm, cm.report, "torch")
    with pytest.raises(SparsecompError, match=r"compiled for CPU inputs \(float32\[.*, 96\]\), got \(float64\[2, 96\]\)"):
        lowered(torch.randn(2, 96, dtype=torch.float64))


def test_model_level_verification_failure_falls_back_to_dense(tmp_path, monkeypatch):
    import sparsecomp.ir as ir

    real = ir.compare_outputs
    calls = {"n": 0}

    def fail_first(actual, reference, **kw):  # the end-to-end check disagrees (e.g. accumulated error)
        calls["n"] += 1
        return (False, 1.0, 0.1) if calls["n"] == 1 else real(actual, reference, **kw)

    monkeypatch.setattr(ir, "compare_outputs", fail_first)
    m = net(7)
    x = torch.randn(2, 96)
    cm = sc.compile(m, (x,), cache_dir=str(tmp_path), kernels="dense,torch-csr")
    assert kinds(cm) == (0, 3)
    assert all(r["decision"] == "dense" and "fallback: compiled model disagreed" in r["reason"] for r in cm.report.rows)
    assert any("fell back to dense" in n for n in cm.report.notes)
    assert torch.equal(cm(x), m(x))


def test_same_shape_layers_search_a_shortlist(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(*[nn.Linear(64, 64) for _ in range(3)]).eval()
    patterns.impose(m, "unstructured:0.9")
    cm = sc.compile(m, (torch.randn(2, 64),), cache_dir=str(tmp_path), max_seconds_per_layer=0.05)
    first, *rest = cm.report.rows
    assert "fastest kernels of an earlier layer" not in first["reason"]
    for r in rest:
        assert "fastest kernels of an earlier layer" in r["reason"]
        assert len(r["measured"]) <= 4 and "dense" in r["measured"]  # dense always measured
    assert len(first["measured"]) >= len(rest[0]["measured"])
    x = torch.randn(5, 64)
    assert compare_outputs(CompiledModel(cm.gm, cm.report, "torch")(x), m(x))[0]


def test_tune_searches_the_whole_grid_and_later_compiles_reuse_it(tmp_path):
    from sparsecomp.backends import tir

    if not tir.available():
        pytest.skip("TVM not installed: no kernel-variant grid to tune")
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)).eval()
    patterns.impose(m, "unstructured:0.9")
    x = torch.randn(2, 64)
    plain = sc.compile(m, (x,), cache_dir=str(tmp_path / "plain"), max_seconds_per_layer=0.02)
    tuned = sc.compile(m, (x,), cache_dir=str(tmp_path / "t"), max_seconds_per_layer=0.02, tune=True)
    for p, t in zip(plain.report.rows, tuned.report.rows):
        assert len(t["measured"]) > len(p["measured"])  # more variants timed, for every layer
        assert "fastest kernels of an earlier layer" not in t["reason"]
    again = sc.compile(m, (x,), cache_dir=str(tmp_path / "t"), max_seconds_per_layer=0.02)
    assert again.report.cache["hit"] == 2
    assert [r["kernel"] for r in again.report.rows] == [r["kernel"] for r in tuned.report.rows]
    assert all("tuned decision" in r["reason"] for r in again.report.rows)
    assert compare_outputs(CompiledModel(again.gm, again.report, "torch")(x), m(x))[0]


@pytest.mark.parametrize("others", [0.6, 0.0])
def test_timing_under_contention_is_reported(others, tmp_path, monkeypatch):
    """Layers timed while other processes take the CPUs: the report says the cached choices measured
    contention (and says nothing on a quiet machine, or when every decision came from the cache)."""
    from sparsecomp.timing import OthersCpu

    snaps = iter([(0, 0, 0.0), (1000, 100 + int(1000 * others), 100.0)] * 2)  # (total, busy, own) ticks
    monkeypatch.setattr(OthersCpu, "_snap", staticmethod(lambda: next(snaps)))
    m, x = net(2), torch.randn(2, 96)
    cm = sc.compile(m, (x,), cache_dir=str(tmp_path), max_seconds_per_layer=0.02)
    busy = [n for n in cm.report.notes if "other processes used" in n]
    assert busy == ([f"other processes used {others:.0%} of the CPUs while layers were timed: the measured choices "
                     "(now cached) reflect that contention and may not hold on a quiet machine; to measure again, "
                     "compile with an empty cache_dir (or clear the cache) when the machine is quiet"] if others else [])
    again = sc.compile(m, (x,), cache_dir=str(tmp_path), max_seconds_per_layer=0.02)  # every decision cached
    assert not [n for n in again.report.notes if "other processes used" in n]


def test_others_cpu_reads_the_machine():
    from sparsecomp.timing import OthersCpu

    with OthersCpu() as mon:
        sum(range(10**5))
    assert mon.share != mon.share or 0.0 <= mon.share <= 1.0  # NaN where /proc/stat is unreadable


class _GeluFFN(nn.Module):
    """Linear -> GELU -> Linear, with an optional second consumer of the first linear's output
    (then the GELU may not be fused) and a choice of GELU form (tanh is not the epilogue's)."""

    def __init__(self, approximate="none", second_use=False):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = nn.Linear(96, 160), nn.Linear(160, 96)
        self.approximate, self.second_use = approximate, second_use
        patterns.impose(self, "unstructured:0.8")
        with torch.no_grad():
            self.up.weight[7].zero_()  # an all-zero row: its outputs are gelu(bias)

    def forward(self, x):
        h = self.up(x)
        y = self.down(torch.nn.functional.gelu(h, approximate=self.approximate))
        return y + h[..., :96] if self.second_use else y


def _gelu_nodes(gm):
    return [n for n in gm.graph.nodes if n.target is torch.ops.aten.gelu.default]


@pytest.mark.parametrize("batch", [3, 64])
def test_gelu_is_fused_into_an_mm_kernels_epilogue(batch, tmp_path):
    pytest.importorskip("tvm")
    m = _GeluFFN().eval()
    x = torch.randn(batch, 96)
    cm = sc.compile(m, (x,), kernels="tir-csr", cache_dir=str(tmp_path), max_seconds_per_layer=0.02)
    assert _gelu_nodes(cm.gm) == [] and kinds(cm) == (2, 0)  # the GELU node is gone, into layer "up"
    rows = {r["layer"]: r for r in cm.report.rows}
    assert "act=gelu" in rows["up"]["kernel"] and "GELU fused" in rows["up"]["reason"]
    assert "act=gelu" not in rows["down"]["kernel"]
    lowered = CompiledModel(cm.gm, cm.report, "torch")
    for xb in (x, torch.randn(1, 96), torch.randn(17, 96) * 5, torch.zeros(2, 96)):  # batch change, wide range, all-zero
        ok, err, allowed = compare_outputs(lowered(xb), m(xb))
        assert ok, (xb.shape, err, allowed)
    # must not match: the same graph with the GELU dropped (the fused module really applies it)
    no_gelu = nn.Sequential(m.up, m.down)
    assert not compare_outputs(lowered(x), no_gelu(x))[0]


@pytest.mark.parametrize("approximate,second_use", [("tanh", False), ("none", True)], ids=["tanh-gelu", "second-consumer"])
def test_gelu_is_not_fused_when_it_is_not_the_epilogues(approximate, second_use, tmp_path):
    pytest.importorskip("tvm")
    m = _GeluFFN(approximate, second_use).eval()
    x = torch.randn(8, 96)
    cm = sc.compile(m, (x,), kernels="tir-csr", cache_dir=str(tmp_path), max_seconds_per_layer=0.02)
    assert len(_gelu_nodes(cm.gm)) == 1
    assert all("act=" not in r["kernel"] for r in cm.report.rows)
    assert compare_outputs(CompiledModel(cm.gm, cm.report, "torch")(x), m(x))[0]


def test_gelu_stays_a_torch_op_after_a_one_row_kernel(tmp_path):
    pytest.importorskip("tvm")
    m = _GeluFFN().eval()
    x = torch.randn(1, 96)  # M = 1: an "mv" kernel, which has no epilogue
    cm = sc.compile(m, (x,), kernels="tir-csr", cache_dir=str(tmp_path), max_seconds_per_layer=0.02)
    assert len(_gelu_nodes(cm.gm)) == 1 and "act=" not in cm.report.rows[0]["kernel"]
    assert compare_outputs(CompiledModel(cm.gm, cm.report, "torch")(x), m(x))[0]


def test_a_fused_gelu_kernel_that_fails_its_check_is_not_used(tmp_path, monkeypatch):
    """A GELU epilogue kernel that disagrees with F.gelu on the layer's input is dropped: the GELU
    stays a torch op, the report says why, and the outputs still match."""
    pytest.importorskip("tvm")
    from sparsecomp.backends.torch import lowering
    from sparsecomp.backends.torch.kernels import Candidate

    def wrong(cand):  # "fused", but the epilogue is missing
        return Candidate(cand.name, cand.fmt, {**cand.params, "act": "gelu"}, cand.make)

    monkeypatch.setattr(lowering, "with_gelu", wrong)
    m = _GeluFFN().eval()
    x = torch.randn(8, 96)
    cm = sc.compile(m, (x,), kernels="tir-csr", cache_dir=str(tmp_path), max_seconds_per_layer=0.02)
    assert len(_gelu_nodes(cm.gm)) == 1
    row = next(r for r in cm.report.rows if r["layer"] == "up")
    assert "act=" not in row["kernel"] and "GELU left to torch: max abs error" in row["reason"]
    assert compare_outputs(CompiledModel(cm.gm, cm.report, "torch")(x), m(x))[0]


@pytest.mark.parametrize("rows", [1, 2])
def test_tune_after_compile_measures_again_in_the_same_cache(tmp_path, rows):
    """tune's decisions have their own key, also where the shortlist already is the whole grid."""
    from sparsecomp.backends import tir

    if not tir.available():
        pytest.skip("TVM not installed: no kernel-variant grid to tune")
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)).eval()
    patterns.impose(m, "unstructured:0.9")
    x = torch.randn(rows, 64)
    cache = str(tmp_path / "c")
    sc.compile(m, (x,), cache_dir=cache, max_seconds_per_layer=0.02)
    tuned = sc.compile(m, (x,), cache_dir=cache, max_seconds_per_layer=0.02, tune=True)
    assert tuned.report.cache["hit"] == 0  # measured, not the untuned decisions
    again = sc.compile(m, (x,), cache_dir=cache, max_seconds_per_layer=0.02)
    assert again.report.cache["hit"] == 2 and all("tuned decision" in r["reason"] for r in again.report.rows)


def test_a_call_with_inputs_of_another_kind_dtype_or_rank_is_a_clear_error():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 128)).eval()
    patterns.impose(m, "unstructured:0.95")
    x = torch.randn(1, 256)
    cm = sc.compile(m, (x,), max_seconds_per_layer=0.05)
    cm = CompiledModel(cm.gm, cm.report, "torch")  # the lowered graph, whatever the end-to-end timing chose
    for bad, got in ((torch.randn(256), r"float32\[256\]"), (x.numpy(), "ndarray"), (x.double(), r"float64\[1, 256\]"),
                     (x.to("meta"), r"float32\[1, 256\]\) on meta")):
        with pytest.raises(SparsecompError, match=r"compiled for CPU inputs \(float32\[.*, 256\]\), got \(" + got):
            cm(bad)
    y = torch.randn(5, 256)
    assert compare_outputs(cm(y), m(y))[0]  # the same call with right inputs still works


def test_nan_reaching_a_layer_keeps_it_dense_and_says_why_once(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64)).eval()
    patterns.impose(m, "unstructured:0.9")
    with torch.no_grad():
        m[0].weight[3, 5] = float("nan")  # row 3 of the first layer's output is NaN: it reaches layer 2
    x = torch.randn(2, 64)
    cm = sc.compile(m, (x,), cache_dir=str(tmp_path), max_seconds_per_layer=0.02)
    second = next(r for r in cm.report.rows if r["layer"] == "2")
    assert second["decision"] == "dense" and "input holds NaN / Inf" in second["reason"]
    assert "dropped" not in second["reason"]
    ok, err, allowed = compare_outputs(CompiledModel(cm.gm, cm.report, "torch")(x), m(x))  # NaN where eager has it
    assert ok, (err, allowed)
    with torch.no_grad():
        m[0].weight[3, 5] = 1.0  # finite again: same shapes, same sparsity pattern (NaN counted as nonzero)
    again = sc.compile(m, (x,), cache_dir=str(tmp_path), max_seconds_per_layer=0.02)
    second = next(r for r in again.report.rows if r["layer"] == "2")
    assert not second["cached"] and "NaN" not in second["reason"]  # the forced dense was not cached as the layer's choice
    assert len(second["measured"]) > 1  # its candidates were timed


def test_a_nan_layer_does_not_shortlist_its_kin(tmp_path):
    """Two layers of one shape and density: the first sees a NaN, the second does not. The
    first's dense-only decision is no shortlist for the second, which times its candidates."""

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(256, 512), nn.Linear(256, 512)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    torch.manual_seed(0)
    m = Two().eval()
    patterns.impose(m, "unstructured:0.95")
    x, y = torch.randn(2, 256), torch.randn(2, 256)
    x[0, 0] = float("nan")
    cm = sc.compile(m, (x, y), cache_dir=str(tmp_path), max_seconds_per_layer=0.02)
    rows = {r["layer"]: r for r in cm.report.rows}
    assert "input holds NaN" in rows["a"]["reason"] and rows["a"]["decision"] == "dense"
    assert "fastest kernels of an earlier layer" not in rows["b"]["reason"] and len(rows["b"]["measured"]) > 1


class _Reused(nn.Module):
    """l2 shares l1's weight; l3 is called twice: four layer calls, four sites."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(96, 96), nn.Linear(96, 96), nn.Linear(96, 96, bias=False)
        self.l2.weight = self.l1.weight

    def forward(self, x):
        return self.l3(torch.relu(self.l2(torch.relu(self.l1(x))))) + self.l3(x)


def test_report_has_one_row_per_layer_call(tmp_path):
    """A weight two layers share and a layer called twice: one row per call with its own decision
    (the second call of a name is `name#2`), not a second row claiming it was not rewritten."""
    from sparsecomp.patterns import impose

    torch.manual_seed(0)
    m = _Reused().eval()
    impose(m, "unstructured:0.9")
    x = torch.randn(2, 96)
    cm = sc.compile(m, (x,), kernels="torch-csr", cache_dir=str(tmp_path), use_tir=False)
    rows = cm.report.rows
    assert kinds(cm) == (4, 0) and len(rows) == 4
    assert all(r["decision"] == "sparse" and r["kernel"].startswith("torch-csr") for r in rows), rows
    names = [r["layer"] for r in rows]
    assert len(set(names)) == 4 and sum(n.endswith("#2") for n in names) == 2
    assert "4/4 layers sparse" in str(cm.report)
    assert compare_outputs(cm(x), m(x))[0]
