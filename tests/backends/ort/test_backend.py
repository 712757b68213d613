"""compile(backend="ort"): equals eager, the exported graph's contents, cache, bad inputs, fallbacks.

Decisions are measured, so tests that assert *which* lowering runs restrict the candidates
(`kernels=`); the others assert invariants that hold whatever wins.
"""

import json

import pytest
import torch
from sparsecomp.backends.ort import OrtModule, runner
from torch import nn

import sparsecomp as sc
from sparsecomp import patterns
from sparsecomp.api import CompiledModel
from sparsecomp.errors import OnnxError, SparsecompError
from sparsecomp.ir import compare_outputs
from nets import three_linears  # tests/_shared: the model both backends' tests use
from sparsecomp.ops import define_op


def net(seed=0):
    return three_linears("block:16x1:0.9", seed)


def ops(cm):
    counts = {}
    for n in cm.gm.onnx_model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def lowered(cm):
    """Always the ORT module, whatever the end-to-end check chose."""
    return CompiledModel(cm.gm, cm.report, "ort")


@pytest.mark.parametrize("batch", [1, 33])
def test_forced_lowerings_match_eager(batch, tmp_path):
    m = net()
    x = torch.randn(batch, 96)
    cm = sc.compile(m, (x,), backend="ort", kernels="sell4,bsr16x1-b4", cache_dir=str(tmp_path), max_seconds_per_layer=0.05)
    assert isinstance(cm.gm, OrtModule) and cm.backend == "ort"
    rows = {r["layer"]: r for r in cm.report.rows}
    assert rows["0"]["decision"] == "sparse" and rows["0"]["kernel"] == "sell4"  # bsr16x1 does not fit 90% unstructured
    assert rows["2"]["decision"] == "sparse" and rows["2"]["kernel"] in ("sell4", "bsr16x1-b4")
    assert rows["4"]["decision"] == "dense" and "not rewritten" in rows["4"]["reason"]
    assert cm.report.verify["ok"]
    for xb in (x, torch.randn(7, 96), torch.zeros(1, 96)):  # other batch sizes after compile
        for run in (cm, lowered(cm)):
            ok, err, allowed = compare_outputs(run(xb), m(xb))
            assert ok, (err, allowed)
    with pytest.raises(SparsecompError, match="compiled for other input shapes"):
        lowered(cm)(torch.randn(2, 3, 96))  # another rank: a clear error, not a wrong answer
    with pytest.raises(SparsecompError, match="compiled for other input shapes"):
        lowered(cm)(torch.randn(2, 95))
    # graph: layer 0 as sell4 (4 buckets + the inverse row order), the dense layer 4 as the exporter wrote it
    counts = ops(cm)
    assert counts.get("GatherElements", 0) >= 5 and "ReduceSum" in counts
    assert not any(n.domain for n in cm.gm.onnx_model.graph.node)  # standard ONNX only
    assert cm.gm.onnx_model.opset_import[0].version == 20


def test_measured_choice_is_always_correct(tmp_path):
    m = net(1)
    x = torch.randn(4, 96)
    cm = sc.compile(m, (x,), backend="ort", cache_dir=str(tmp_path), max_seconds_per_layer=0.05)
    assert cm.report.verify["ok"]
    for r in cm.report.rows:
        if r.get("measured"):
            assert r["kernel"].split("-compact")[0] in r["measured"] or r["decision"] == "dense"
            assert "dense" in r["measured"]  # dense is always a contender
    for xb in (x, torch.randn(9, 96)):
        ok, err, allowed = compare_outputs(lowered(cm)(xb), m(xb))
        assert ok, (err, allowed)


def test_cache_hit_and_corrupt_cache(tmp_path):
    m, x = net(), torch.randn(2, 96)
    sc.compile(m, (x,), backend="ort", kernels="dense,sell4", cache_dir=str(tmp_path), max_seconds_per_layer=0.05)
    cm = sc.compile(m, (x,), backend="ort", kernels="dense,sell4", cache_dir=str(tmp_path), max_seconds_per_layer=0.05)
    assert cm.report.cache["hit"] == 2 and all(r.get("cached") for r in cm.report.rows if r.get("measured"))
    path = tmp_path / "decisions" / "ort.json"
    data = json.loads(path.read_text())
    for entry in data["entries"].values():
        entry["kernel"] = "no-such-kernel"  # a foreign / stale entry
    path.write_text(json.dumps(data))
    cm = sc.compile(m, (x,), backend="ort", kernels="dense,sell4", cache_dir=str(tmp_path), max_seconds_per_layer=0.05)
    assert cm.report.cache["corrupt"] == 2 and cm.report.verify["ok"]  # ignored and measured again
    assert all(r["kernel"] != "no-such-kernel" and not r.get("cached") for r in cm.report.rows if r.get("measured"))


def test_dense_model_and_kwargs_and_tuple_outputs(tmp_path):
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(32, 48), nn.Linear(32, 48)

        def forward(self, x, *, scale):
            return self.a(x) * scale, {"b": self.b(x)}

    m = Two().eval()
    patterns.impose(m, "unstructured:0.8", "a")
    ex = {"x": torch.randn(2, 5, 32), "scale": torch.tensor(2.0)}
    cm = sc.compile(m, ex, backend="ort", kernels="ell", cache_dir=str(tmp_path), max_seconds_per_layer=0.05)
    out = lowered(cm)(x=torch.randn(3, 4, 32), scale=torch.tensor(3.0))
    assert isinstance(out, tuple) and set(out[1]) == {"b"} and out[0].shape == (3, 4, 48)
    ref = m(x=torch.randn(1, 1, 32), scale=torch.tensor(1.0))
    assert ref[0].shape == (1, 1, 48)


class _Passes(nn.Module):
    """Returns an input unchanged (torch's exporter renames that ONNX input `mask_orig`) and None."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(32, 48)

    def forward(self, x, mask):
        return self.a(x), mask, None


def test_outputs_that_are_an_input_or_none(tmp_path):
    torch.manual_seed(0)
    m = _Passes().eval()
    patterns.impose(m, "unstructured:0.8")
    cm = sc.compile(m, (torch.randn(2, 32), torch.ones(2, 7)), backend="ort", cache_dir=str(tmp_path),
                    max_seconds_per_layer=0.05)
    assert [i.name for i in cm.gm.onnx_model.graph.input] == ["x", "mask_orig"]
    for batch in (1, 5):
        x, mask = torch.randn(batch, 32), torch.rand(batch, 7)
        y, mask_out, none = lowered(cm)(x, mask)
        assert none is None and torch.equal(mask_out, mask) and compare_outputs(y, m(x, mask)[0])[0]
        assert not torch.equal(mask_out, torch.ones(batch, 7))  # the call's mask, not the example's
    path = tmp_path / "m.onnx"
    sc.export_onnx(cm, None, path)
    assert path.exists()


def test_tune_after_compile_measures_again_and_later_compiles_use_it(tmp_path):
    """tune=True on the ort backend: every candidate timed under its own key (not the compile's
    cached decisions), then preferred by an untuned compile; MLPs too."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.Linear(64, 64)).eval()
    patterns.impose(m, "unstructured:0.9")
    x = torch.randn(2, 64)
    for i, extra in enumerate(({}, {"activation_sparsity": "exact"})):
        cache = str(tmp_path / f"c{i}")  # (the MLP's projections are the first model's layers: their own cache)
        first = sc.compile(m, (x,), backend="ort", cache_dir=cache, max_seconds_per_layer=0.02, **extra)
        n = len(first.report.rows)
        tuned = sc.compile(m, (x,), backend="ort", cache_dir=cache, max_seconds_per_layer=0.02, tune=True, **extra)
        assert tuned.report.cache["hit"] == 0 and tuned.report.cache["written"] >= n  # measured again
        again = sc.compile(m, (x,), backend="ort", cache_dir=cache, max_seconds_per_layer=0.02, **extra)
        assert again.report.cache["hit"] >= n and all("tuned decision" in r["reason"] for r in again.report.rows)
        assert [r["kernel"] for r in again.report.rows] == [r["kernel"] for r in tuned.report.rows]
        assert compare_outputs(lowered(again)(x), m(x))[0]


def test_threads_leave_other_onnxruntime_users_alone(tmp_path):
    """Compiling must not switch the process to a global pool: onnxruntime would then refuse every
    plain InferenceSession a user (or another library) opens."""
    import onnxruntime as ort

    m, x = net(), torch.randn(2, 96)
    cm = sc.compile(m, (x,), backend="ort", kernels="dense", cache_dir=str(tmp_path), max_seconds_per_layer=0.05)
    plain = ort.InferenceSession(cm.gm.onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert plain.run(None, {"input": x.numpy()})[0].shape == (2, 24)
    assert not runner._POOL


def test_opt_in_global_pool_in_a_fresh_process():
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import numpy as np, onnxruntime as ort
        from onnx import helper
        from sparsecomp.backends.ort import runner
        g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [helper.make_tensor_value_info("x", 1, [2])],
                              [helper.make_tensor_value_info("y", 1, [2])])
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)], ir_version=9)
        assert runner.use_global_thread_pool(1) == 1
        assert runner.session(model).run(None, {"x": np.array([-1.0, 2.0], np.float32)})[0].tolist() == [0.0, 2.0]
        try:
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
            raise SystemExit("a per-session pool was accepted beside the global one")
        except RuntimeError as err:
            assert runner._GLOBAL_POOL_REFUSED in str(err)
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


_double = None


def test_sparsecomp_op_without_lowering_exports_its_reference(tmp_path):
    """An op the ORT backend cannot lower is exported as its dense reference, and the report says so."""
    global _double
    if _double is None:
        _double = define_op("_test_ort_double", "(Tensor x) -> Tensor", reference=lambda x: x * 2.0 + 1.0,
                            fake=lambda x: torch.empty_like(x))

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x):
            return torch.ops.sparsecomp._test_ort_double(self.fc(x))

    m = M().eval()
    x = torch.randn(3, 16)
    cm = sc.compile(m, (x,), backend="ort", cache_dir=str(tmp_path))
    assert any("sparsecomp::_test_ort_double" in n and "dense reference" in n for n in cm.report.notes)
    ok, err, allowed = compare_outputs(lowered(cm)(x), m(x))
    assert ok, (err, allowed)


_opaque = None


def test_op_that_cannot_decompose_is_a_clear_error(tmp_path):
    global _opaque
    if _opaque is None:
        _opaque = define_op("_test_ort_opaque", "(Tensor x) -> Tensor",
                            reference=lambda x: torch.from_numpy(x.detach().numpy() * 3.0),
                            fake=lambda x: torch.empty_like(x))

    class M(nn.Module):
        def forward(self, x):
            return torch.ops.sparsecomp._test_ort_opaque(x)

    with pytest.raises(OnnxError, match="_test_ort_opaque.*no ONNX lowering"):
        sc.compile(M().eval(), (torch.randn(2, 8),), backend="ort", cache_dir=str(tmp_path))


def test_bad_opset_before_any_work(tmp_path, monkeypatch):
    import sparsecomp.backends.ort as ort_backend

    monkeypatch.setattr(ort_backend, "decide_layers", lambda *a, **k: pytest.fail("measured before checking the opset"))
    with pytest.raises(OnnxError, match="minimum is opset 16"):
        ort_backend.lower(None, None, opset=12)


# ------------------------------------------------------------------------------------------------
# onnxruntime fusions measured slower are left off (runner.fusion_choice)


def _optimized_ops(model, disabled, tmp_path):
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
    return [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]


def test_probed_fusion_names_are_ones_onnxruntime_knows(tmp_path):
    """onnxruntime ignores an unknown name in disabled_optimizers silently: check each name works."""
    model, _ = runner._residual_norm_model(rows=4, hidden=8, layers=2)
    assert "SkipLayerNormalization" in _optimized_ops(model, [], tmp_path)
    for name in runner.PROBED_FUSIONS:
        ops = _optimized_ops(model, [name], tmp_path)
        assert "SkipLayerNormalization" not in ops and ops.count("LayerNormalization") == 2


def test_sessions_take_the_measured_choice_and_report_it(tmp_path, monkeypatch):
    import onnxruntime as ort

    seen = []
    real = ort.InferenceSession

    def spy(*args, **kwargs):
        seen.append(kwargs.get("disabled_optimizers"))
        return real(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    monkeypatch.setattr(runner, "_FUSIONS", {"disabled": ["SkipLayerNormFusion"], "us": {"SkipLayerNormFusion": (200.0, 40.0)}})
    model, shape = runner._residual_norm_model(rows=4, hidden=8, layers=2)
    runner.session(model)
    runner.session(model, optimize=False)  # ORT_DISABLE_ALL: nothing to disable
    runner.session(model, disabled_optimizers=[])  # onnxruntime's defaults, asked for
    assert seen == [["SkipLayerNormFusion"], None, None]
    assert "200 us fused against 40 us unfused" in runner.fusion_note(model)

    class Norm(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.norm = nn.Linear(16, 16), nn.LayerNorm(16)

        def forward(self, x):
            return self.norm(x + self.lin(x))

    m = Norm().eval()
    cm = sc.compile(m, (torch.randn(2, 16),), backend="ort", cache_dir=str(tmp_path), max_seconds_per_layer=0.05)
    assert any("SkipLayerNormalization fusion is left off" in n for n in cm.report.notes)
    monkeypatch.setattr(runner, "_FUSIONS", {"disabled": [], "us": {"SkipLayerNormFusion": (40.0, 40.0)}})
    assert runner.fusion_note(model) is None


def test_fusion_probe_measures_once_and_can_be_declined(monkeypatch):
    monkeypatch.setattr(runner, "_FUSIONS", {})
    choice = runner.fusion_choice()
    fused, unfused = choice["us"]["SkipLayerNormFusion"]
    assert fused > 0 and unfused > 0
    assert ("SkipLayerNormFusion" in choice["disabled"]) == (fused > 1.1 * unfused)
    assert runner.fusion_choice() is choice  # measured once per process
    monkeypatch.setattr(runner, "_FUSIONS", {})
    monkeypatch.setenv("SPARSECOMP_ORT_FUSIONS", "default")
    assert runner.fusion_choice() == {"disabled": [], "us": {}}
    monkeypatch.setattr(runner, "_FUSIONS", {})
    monkeypatch.setenv("SPARSECOMP_ORT_FUSIONS", "defualt")
    with pytest.raises(SparsecompError, match="SPARSECOMP_ORT_FUSIONS='defualt' is not a setting"):
        runner.fusion_choice()


# ------------------------------------------------------------------------------------------------
# Calls the compiled ORT module must answer as the torch backend does: bound to the compiled
# signature, or one clear SparsecompError naming the input (never ignored, never onnxruntime's log)


class _TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 64)

    def forward(self, a, b):
        return self.fc(a) + b


@pytest.fixture(scope="module")
def two_inputs(tmp_path_factory):
    torch.manual_seed(0)
    m = _TwoInputs().eval()
    patterns.impose(m, "block:16x1:0.9")
    a, b = torch.randn(4, 64), torch.randn(4, 64)
    cm = sc.compile(m, (a, b), backend="ort", kernels="dense,bsr16x1-b4",
                    cache_dir=str(tmp_path_factory.mktemp("cache")), max_seconds_per_layer=0.05)
    return m, a, b, lowered(cm)


def test_extra_positional_input_is_an_error(two_inputs):
    _, a, b, run = two_inputs
    with pytest.raises(SparsecompError, match=r"_TwoInputs was compiled for 2 inputs \(a, b\), got 3"):
        run(a, b, a)
    with pytest.raises(SparsecompError, match=r"compiled for 2 inputs \(a, b\), got 1: missing b"):
        run(a)


def test_keyword_calls_bind_to_the_compiled_names(two_inputs):
    m, a, b, run = two_inputs
    ref = m(a, b)
    for out in (run(a=a, b=b), run(a, b=b), run(b=b, a=a)):
        ok, err, allowed = compare_outputs(out, ref)
        assert ok, (err, allowed)
    with pytest.raises(SparsecompError, match=r"has no input 'c'.*\(a, b\)"):
        run(a, c=b)
    with pytest.raises(SparsecompError, match="got input 'a' twice"):
        run(a, b, a=a)


def test_keyword_example_is_called_by_keyword(tmp_path):
    """Inputs given by keyword in the example: a positional call cannot be bound safely (the
    example's keyword order need not be the model's), so it is an error that says how to call."""
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x, y):
            return self.fc(x) - y

    m = Two().eval()
    x, y = torch.randn(2, 16), torch.randn(2, 16)
    cm = lowered(sc.compile(m, {"x": x, "y": y}, backend="ort", kernels="dense", cache_dir=str(tmp_path), max_seconds_per_layer=0.05))
    ok, err, allowed = compare_outputs(cm(y=y, x=x), m(x, y))
    assert ok, (err, allowed)
    with pytest.raises(SparsecompError, match=r"compiled for keyword inputs \(x=, y=\), got 2 positional") as info:
        cm(x, y)
    assert "Two(x=..., y=...)" in info.value.hint


def test_nested_extra_items_are_an_error(tmp_path):
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, pair):
            return self.fc(pair[0]) + pair[1]

    m = Pair().eval()
    p, q = torch.randn(2, 16), torch.randn(2, 16)
    cm = lowered(sc.compile(m, ((p, q),), backend="ort", kernels="dense", cache_dir=str(tmp_path), max_seconds_per_layer=0.05))
    ok, err, allowed = compare_outputs(cm((p, q)), m((p, q)))
    assert ok, (err, allowed)
    with pytest.raises(SparsecompError, match="compiled for 2 input tensors .* got 3"):
        cm((p, q, q))


def test_dtype_mismatch_names_the_dtypes_and_onnxruntime_stays_quiet(two_inputs, capfd):
    _, a, b, run = two_inputs
    capfd.readouterr()
    with pytest.raises(SparsecompError, match=r"compiled for float32 inputs: input 'a' is float64") as info:
        run(a.double(), b)
    assert "float32" in info.value.hint and "batch/sequence" not in info.value.hint
    with pytest.raises(SparsecompError, match=r"input 'a' has shape \[4, 63\].*dim 1 is fixed at 64"):
        run(a[:, :63], b)
    with pytest.raises(SparsecompError, match=r"agree on dim 'batch': input 'a' has 4 \(dim 0\), input 'b' has 5"):
        run(a, torch.randn(5, 64))
    with pytest.raises(SparsecompError, match=r"input 'b' has rank 3"):
        run(a, b[None])
    err = capfd.readouterr().err
    assert "onnxruntime" not in err and "[E:" not in err, err


def test_meta_and_sparse_inputs_are_clear_errors(two_inputs):
    _, a, b, run = two_inputs
    with pytest.raises(SparsecompError, match=r"compiled for float32 CPU inputs: input 'a' is float32 on meta"):
        run(a.to("meta"), b)
    with pytest.raises(SparsecompError, match=r"compiled for float32 CPU inputs: input 'b' is sparse float32 on cpu"):
        run(a, b.to_sparse())
    with pytest.raises(SparsecompError, match=r"input 'b' is str"):
        run(a, "b")


def test_a_failed_run_is_one_error_without_onnxruntime_log(capfd):
    """What the checks cannot see (here: two dynamic dims the graph needs equal but the file names
    apart) still comes back as a SparsecompError, and onnxruntime logs nothing."""
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"])], "g",
                          [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 4]),
                           helper.make_tensor_value_info("b", TensorProto.FLOAT, ["m", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    mod = OrtModule(model, runner.session(model), in_spec=None, out_spec=None, input_names=["a", "b"], label="add")
    assert mod(torch.ones(2, 4), torch.ones(2, 4)).tolist() == [[2.0] * 4] * 2
    capfd.readouterr()
    with pytest.raises(SparsecompError, match="^add") as info:
        mod(torch.ones(2, 4), torch.ones(3, 4))
    err = capfd.readouterr().err
    assert "[E:" not in err, err  # onnxruntime's own log line, before the error
    assert "onnxruntime failed on these inputs" in str(info.value) and "\n" not in str(info.value)
