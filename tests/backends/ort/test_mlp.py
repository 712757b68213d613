"""sparse_mlp on the ORT backend: each candidate against the op's reference in onnxruntime, and compile.

Candidates (`backends/ort/mlp.py`): every mode, plain and gated, every activation, opset 20 (Gelu
op) and 16 (Erf / Tanh formulas), one model run at batch 1, 3 and 64 with graph optimizations on
and off; an MLP with no zeros and one with none active (empty gathers). Compile: forced choices
(`kernels=`), the exported graph's ops, the report and cache, the files.py read-back, the
reference fallback of an MLP with no placement, and a lossy lowering that must differ from the
plain dense MLP.
"""

import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from sparsecomp.backends.ort import files, mlp, runner
from sparsecomp.backends.ort.lowering import layer_model
from torch import nn

import sparsecomp as sc
from sparsecomp.api import CompiledModel
from sparsecomp.ir import compare_outputs

K, H, N = 37, 203, 29  # odd on purpose
ACTS = {"relu": F.relu, "silu": F.silu}


def _close(a, b):
    ok, err, allowed = compare_outputs(torch.as_tensor(a), b)
    assert ok, (err, allowed)


def _arrays(mode="exact", gated=False, act="relu", bias=-0.3, seed=0, per_channel=False) -> dict:
    """The op's tensor arguments with a threshold (and predictor) that skip about half the neurons."""
    g = torch.Generator().manual_seed(seed)
    v = {"w_up": torch.randn(H, K, generator=g) / K**0.5, "b_up": torch.randn(H, generator=g) * 0.1 + bias,
         "w_gate": None, "b_gate": None, "w_down_t": torch.randn(H, N, generator=g) / H**0.5,
         "b_down": torch.randn(N, generator=g), "activation": act, "mode": mode, "threshold": None, "scale": None,
         "pred_a": None, "pred_bt": None}
    if gated:
        v["w_gate"], v["b_gate"] = torch.randn(H, K, generator=g) / K**0.5, torch.randn(H, generator=g) * 0.1 + bias
    xs = torch.randn(256, K, generator=g)
    if mode == "threshold":
        v["scale"] = v["w_down_t"].norm(dim=1)
        score = _ref(v | {"mode": "exact"}, xs, hidden=True).abs() * v["scale"]
        v["threshold"] = score.quantile(0.5, dim=0) if per_channel else score.quantile(0.5)
    elif mode == "predictor":
        w_sel, b_sel = (v["w_gate"], v["b_gate"]) if gated else (v["w_up"], v["b_up"])
        u, s, vt = torch.linalg.svd(w_sel, full_matrices=False)
        v["pred_a"], v["pred_bt"] = vt[:8].contiguous(), (u[:, :8] * s[:8]).t().contiguous()  # rank 8
        from sparsecomp.dialect import predictor_scores

        v["threshold"] = predictor_scores(xs, v["pred_a"], v["pred_bt"], b_sel, act, None).quantile(0.7)
    return v


def _ref(v, x, hidden=False):
    args = [v[k] for k in mlp._ARGS[1:]]
    if hidden:  # the op with an identity down-projection: h itself
        args[4], args[5] = torch.eye(H), None
    return torch.ops.sparsecomp.sparse_mlp(x, *args)


def _model(v, label, opset=20, m=1):
    (cand,) = mlp.candidates(mlp.MLPArrays.from_values(v), opset, m=m, only={label})
    model = layer_model(cand, ["M", K], opset)
    onnx.checker.check_model(model, full_check=True)  # strict shape inference too
    return model


def _check(v, label, opset=20, batches=(1, 3, 64), optimize=(True, False), ms=(1, 64)):
    """One model per layout (chosen at M = 1 or M = 64), each run at every batch size."""
    for m in ms:
        model = _model(v, label, opset, m)
        for opt in optimize:
            sess = runner.session(model, optimize=opt)
            for batch in batches:
                x = torch.randn(batch, K, generator=torch.Generator().manual_seed(batch))
                _close(sess.run(["y"], {"x": x.numpy()})[0], _ref(v, x))
    return model


CASES = [(mode, gated, label) for mode in ("exact", "threshold", "predictor") for gated in (False, True)
         for label in (["dense", "active"] + (["predictor"] if mode == "predictor" else []))]


@pytest.mark.parametrize("mode,gated,label", CASES, ids=[f"{m}-{'gated' if g else 'plain'}-{c}" for m, g, c in CASES])
def test_candidate_matches_reference(mode, gated, label):
    act = {"exact": "relu", "threshold": "gelu", "predictor": "silu"}[mode]
    model = _check(_arrays(mode, gated, act), label)
    ops = {n.op_type for n in model.graph.node}
    assert not any(n.domain for n in model.graph.node)  # standard ONNX only
    if label == "dense":
        assert "NonZero" not in ops
    else:
        assert {"NonZero", "Gather", "Gemm"} <= ops
    if label == "predictor":  # the up (and gate) rows are gathered too: w_up feeds a Gather, not a Gemm
        readers = [n.op_type for n in model.graph.node if "layer.w_up" in n.input]
        assert readers == ["Gather"]


@pytest.mark.parametrize("act", ["relu", "relu6", "relu2", "gelu", "gelu_tanh", "silu"])
@pytest.mark.parametrize("opset", [16, 20])
def test_activations_and_opsets(act, opset):
    model = _check(_arrays("threshold", False, act, bias=0.0), "active", opset, batches=(3,), optimize=(True,), ms=(1,))
    if act.startswith("gelu"):
        ops = {n.op_type for n in model.graph.node}
        assert ("Gelu" in ops) == (opset >= 20)  # the Gelu op exists from opset 20; formulas before


def test_per_channel_threshold():
    _check(_arrays("threshold", True, "silu", per_channel=True), "active", batches=(1, 5), optimize=(True,))


@pytest.mark.parametrize("bias,label", [(50.0, "active"), (-50.0, "active"), (-50.0, "predictor"), (50.0, "predictor")],
                         ids=["no-zeros", "none-active", "predictor-none-kept", "predictor-all-kept"])
def test_no_zeros_and_none_active(bias, label):
    v = _arrays("predictor" if label == "predictor" else "exact", True, "relu", bias=bias)
    if label == "predictor":  # keep everything or nothing, whatever the input
        v["threshold"] = torch.tensor(-1e9 if bias > 0 else 1e9)
    _check(v, label)
    x = torch.randn(4, K)
    if bias < 0:  # nact = 0: the output is the down bias alone (onnxruntime runs the empty Gather / Gemm)
        for m in (1, 64):
            y = runner.session(_model(v, label, m=m)).run(["y"], {"x": x.numpy()})[0]
            np.testing.assert_allclose(y, v["b_down"].expand(4, N).numpy(), rtol=0, atol=0)


def test_leading_dims_kept():
    v = _arrays("threshold", False, "gelu")
    model = layer_model(mlp.candidates(mlp.MLPArrays.from_values(v), 20, m=10, only={"active"})[0], ["B", "T", K], 20)
    x = torch.randn(2, 5, K)
    y = runner.session(model).run(["y"], {"x": x.numpy()})[0]
    assert y.shape == (2, 5, N)
    _close(y, _ref(v, x))


# ------------------------------------------------------------------------------------------------
# compile


def plain(bias=0.0, act=nn.ReLU):
    """up (layer "0") -> act -> down (layer "2"), the up bias shifted by `bias`."""
    m = nn.Sequential(nn.Linear(K, H), act(), nn.Linear(H, N))
    with torch.no_grad():
        m[0].bias += bias
    return m


class Gated(nn.Module):
    def __init__(self, act="relu"):
        super().__init__()
        self.gate, self.up, self.down, self.act = nn.Linear(K, H), nn.Linear(K, H), nn.Linear(H, N), act

    def forward(self, x):
        return self.down(ACTS[self.act](self.gate(x)) * self.up(x))


def _lowered(cm):
    return CompiledModel(cm.gm, cm.report, "ort")


def _mlp_row(cm):
    (row,) = [r for r in cm.report.rows if r.get("pattern", "").startswith("mlp")]
    return row


def _ops(proto):
    return {n.op_type for n in proto.graph.node}


@pytest.mark.parametrize("make", [lambda: plain(-0.5), lambda: Gated()], ids=["plain", "gated"])
def test_exact_forced_active_any_batch(make, tmp_path):
    torch.manual_seed(0)
    model = make().eval()
    cm = sc.compile(model, (torch.randn(1, K),), backend="ort", activation_sparsity="exact", kernels="active",
                    cache_dir=str(tmp_path), max_seconds_per_layer=0.02)
    assert cm.report.verify["ok"]
    row = _mlp_row(cm)
    assert row["decision"] == "sparse" and row["kernel"] == "active" and row["m"] == 1
    assert row["shape"] == [K, H, N] and 0 < row["density"] < 1 and "neurons active" in row["reason"]
    proto = cm.gm.onnx_model
    assert {"NonZero", "Gather"} <= _ops(proto) and "SparseMLP" not in _ops(proto)
    assert not any(n.domain for n in proto.graph.node) and all(o.domain != "sparsecomp.placeholder" for o in proto.opset_import)
    for opt in (True, False):
        sess = runner.session(proto, optimize=opt)
        for batch in (1, 3, 64):
            xb = torch.randn(batch, K)
            _close(sess.run(None, {proto.graph.input[0].name: xb.numpy()})[0], model(xb))
    xb = torch.randn(7, K)
    _close(_lowered(cm)(xb), model(xb))


@pytest.mark.parametrize("mode,kernel", [("threshold", "active"), ("predictor", "predictor")])
def test_lossy_forced_matches_reference_not_dense(mode, kernel, tmp_path):
    torch.manual_seed(0)
    model = (Gated("silu") if mode == "predictor" else plain(act=nn.GELU)).eval()
    x = torch.randn(3, K)
    cal = [(torch.randn(16, K),) for _ in range(4)]
    cm = sc.compile(model, (x,), backend="ort", activation_sparsity=f"{mode}:0.5", calibration=cal, kernels=kernel,
                    cache_dir=str(tmp_path), max_seconds_per_layer=0.02)
    assert cm.report.verify["ok"] and cm.report.verify["reference"] == "rewritten graph on reference ops"
    row = _mlp_row(cm)
    assert row["kernel"] == kernel and row["pattern"].endswith(mode) and row["calibration"]["calibrated_sparsity"] >= 0.5
    got = _lowered(cm)(x)
    # neurons are skipped: the lowering computes the lossy op, not the plain dense MLP
    assert not compare_outputs(got, model(x))[0]
    assert (got - model(x)).abs().max() > 1e-3


def test_measured_choice_report_and_cache(tmp_path):
    torch.manual_seed(0)
    model = plain(-0.5).eval()
    x = torch.randn(1, K)
    first = sc.compile(model, (x,), backend="ort", activation_sparsity="exact", cache_dir=str(tmp_path), max_seconds_per_layer=0.02)
    row = _mlp_row(first)
    assert set(row["measured"]) == {"dense", "active"} and row["kernel"] in row["measured"] and not row["cached"]
    assert row["dense_us"] == row["measured"]["dense"] and row["chosen_us"] == row["measured"][row["kernel"]]
    assert row["decision"] == ("dense" if row["kernel"] == "dense" else "sparse")
    assert row["reason"].startswith("dense is fastest" if row["kernel"] == "dense" else f"{row['speedup']:.2f}x faster")
    second = sc.compile(model, (x,), backend="ort", activation_sparsity="exact", cache_dir=str(tmp_path), max_seconds_per_layer=0.02)
    assert _mlp_row(second)["cached"] and _mlp_row(second)["kernel"] == row["kernel"]


def test_files_read_back_an_export_with_mlps(tmp_path):
    torch.manual_seed(0)
    model = Gated().eval()
    cm = sc.compile(model, (torch.randn(2, K),), backend="ort", activation_sparsity="exact", kernels="active",
                    cache_dir=str(tmp_path), max_seconds_per_layer=0.02)
    proto = cm.gm.onnx_model
    (rec,) = files.layers(proto)
    assert rec["op"] == "sparse_mlp" and rec["kernel"] == "active" and rec["shape"] == [K, H, N]
    assert rec["linears"] == {"up": "up", "gate": "gate", "down": "down"} and rec["mode"] == "exact"
    with warnings.catch_warnings():  # onnx's arrays are read-only: torch would warn on a plain from_numpy
        warnings.simplefilter("error", UserWarning)
        weights = {name: w for name, w, _ in files.stored_weights(proto)}
    assert set(weights) == {"up", "gate", "down"}
    for name, w in weights.items():
        assert torch.equal(w, getattr(model, name).weight.detach())
    dense = files.dense_equivalent(proto)
    assert "NonZero" not in _ops(dense)
    x = torch.randn(4, K)
    _close(runner.session(dense).run(None, files.example_feeds(proto) | {proto.graph.input[0].name: x.numpy()})[0], model(x))
    files.save(proto, tmp_path / "m.onnx")  # the full onnx.checker pass, as export_onnx runs it
    rep = sc.analyze(str(tmp_path / "m.onnx"))
    assert {r.name for r in rep.layers} == {"up", "gate", "down"}


def test_mlp_without_placement_exports_its_reference():
    from sparsecomp.backends.ort.export import export_graph

    from sparsecomp.frontend import capture
    from sparsecomp.ir import normalize_inputs
    from sparsecomp.pass_manager import PassContext, PassManager

    sc.api._load_passes()
    torch.manual_seed(0)
    model, x = plain(-0.5).eval(), torch.randn(2, K)
    gm = capture(model, (x,), name="plain")
    PassManager('find-mlps,sparse-mlp{mode="exact"}').run(gm, PassContext.create((x,), [], model_name="plain"))
    assert any("sparse_mlp" in str(n.target) for n in gm.graph.nodes)
    notes = []
    proto, _ = export_graph(gm, normalize_inputs((x,)), {}, opset=20, notes=notes)
    assert any("sparse_mlp" in n and "no ONNX lowering" in n for n in notes)
    assert "NonZero" not in _ops(proto) and files.layers(proto) == []
    for batch in (1, 6):
        xb = torch.randn(batch, K)
        _close(runner.session(proto).run(None, {proto.graph.input[0].name: xb.numpy()})[0], model(xb))


def test_lossy_fallback_keeps_dense_only_when_it_agrees_in_direction():
    # onnxruntime's GEMM may round a neuron at its threshold the other way than torch's: no
    # candidate within 1e-4, yet the dense lowering is right in direction -> kept, with a note.
    # In exact mode, or when the output is really wrong, it is an error.
    from sparsecomp.errors import SparsecompError

    v = _arrays("threshold", False, "gelu")
    a, x = mlp.MLPArrays.from_values(v), torch.randn(3, K)
    ref = _ref(v, x)
    notes = []
    assert mlp._lossy_fallback(a, "l", x, ref + 1e-3 * ref.abs().max(), 20, notes) == "dense"
    assert "flips neurons at the threshold" in notes[0]
    with pytest.raises(SparsecompError, match="no candidate lowering"):
        mlp._lossy_fallback(a, "l", x, -ref, 20, [])
    with pytest.raises(SparsecompError, match="no candidate lowering"):
        mlp._lossy_fallback(mlp.MLPArrays.from_values(_arrays()), "l", x, _ref(_arrays(), x), 20, [])


def test_layout_follows_rows_per_call():
    # few rows: [M, nact] (the down Gemm untransposed: onnxruntime's GEMV at M = 1); many: [nact, M]
    v = _arrays("predictor", True, "silu")
    for label in ("active", "predictor"):
        few, many = _model(v, label, m=1), _model(v, label, m=mlp.FEW_ROWS + 1)
        trans_a = [[a.i for a in n.attribute if a.name == "transA"] for n in many.graph.node if n.op_type == "Gemm"]
        assert "Transpose" not in _ops(few) and "Transpose" in _ops(many) and [1] in trans_a
        assert not any(a.name == "transA" for n in few.graph.node for a in n.attribute)


@pytest.mark.parametrize("make,spec", [(lambda: plain(-0.3), "unstructured:0.9"), (lambda: Gated(), "unstructured:0.8"),
                                       (lambda: plain(-0.3), "block:16x1:0.9")], ids=["plain-u90", "gated-u80", "plain-16x1"])
def test_pruned_mlp_keeps_its_weight_sparsity(make, spec, tmp_path):
    """A pruned AND ReLU-sparse MLP: the `pruned` lowering runs each projection on its own measured
    sparse-linear lowering (stored compactly), and matches eager at any batch, optimizations on
    and off; its weights read back exactly; the plain dense equivalent still runs."""
    from sparsecomp.patterns import impose

    torch.manual_seed(0)
    model = make().eval()
    impose(model, spec)
    cm = sc.compile(model, (torch.randn(1, K),), backend="ort", activation_sparsity="exact", kernels="pruned",
                    cache_dir=str(tmp_path), max_seconds_per_layer=0.02)
    assert cm.report.verify["ok"]
    row = _mlp_row(cm)
    assert row["kernel"] == "pruned" and row["decision"] == "sparse" and "pruned weights: up " in row["reason"]
    proto = cm.gm.onnx_model
    (rec,) = files.layers(proto)
    assert set(rec["parts"]) == ({"up", "gate", "down"} if isinstance(model, Gated) else {"up", "down"})
    assert all(k.split(".", 1)[0] in rec["parts"] for k in rec["arrays"])
    assert rec["stored_bytes"] < 0.6 * 4 * (K * H + H * N) * (2 if isinstance(model, Gated) else 1)  # stored compactly
    for opt in (True, False):
        sess = runner.session(proto, optimize=opt)
        for batch in (1, 3, 64):
            xb = torch.randn(batch, K)
            _close(sess.run(None, {proto.graph.input[0].name: xb.numpy()})[0], model(xb))
    linears = ("up", "gate", "down") if isinstance(model, Gated) else ("0", "2")
    weights = {name: w for name, w, _ in files.stored_weights(proto)}
    for name in linears:
        mod = getattr(model, name) if isinstance(model, Gated) else model[int(name)]
        assert torch.equal(weights[name], mod.weight.detach())
    x = torch.randn(4, K)
    dense = files.dense_equivalent(proto)
    _close(runner.session(dense).run(None, {proto.graph.input[0].name: x.numpy()})[0], model(x))


def test_dense_weights_get_no_pruned_lowering(tmp_path):
    """Near miss: an MLP whose weights are dense is never offered the pruned lowering."""
    torch.manual_seed(0)
    model = plain(-0.5).eval()
    cm = sc.compile(model, (torch.randn(1, K),), backend="ort", activation_sparsity="exact", cache_dir=str(tmp_path),
                    max_seconds_per_layer=0.02)
    row = _mlp_row(cm)
    assert "pruned" not in row["measured"] and row["kernel"] in ("dense", "active") and "pruned weights" not in row["reason"]


@pytest.mark.parametrize("kernel", ["active", "dense", "predictor"])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_pruned_weights_stored_compactly_whatever_runs(kernel, gated, tmp_path):
    """A pruned MLP that runs `active`, `dense` or `predictor` stores its weights as sell arrays
    rebuilt once at load (roles `w_up.*`, ...): a small file, the same outputs (optimizations on
    and off, any batch), the weights read back exactly."""
    from sparsecomp.patterns import impose

    torch.manual_seed(0)
    model = (Gated() if gated else plain(-0.3)).eval()
    impose(model, "unstructured:0.85")
    x = torch.randn(1, K)
    if kernel == "predictor":
        cal = [(torch.randn(16, K),) for _ in range(8)]
        cm = sc.compile(model, (x,), backend="ort", activation_sparsity="predictor:0.5", calibration=cal, kernels=kernel,
                        cache_dir=str(tmp_path), max_seconds_per_layer=0.02)
    else:
        cm = sc.compile(model, (x,), backend="ort", activation_sparsity="exact", kernels=kernel,
                        cache_dir=str(tmp_path), max_seconds_per_layer=0.02)
    assert cm.report.verify["ok"] and _mlp_row(cm)["kernel"] == kernel
    proto = cm.gm.onnx_model
    (rec,) = files.layers(proto)
    assert "w_up" not in rec["arrays"] and "w_up.values0" in rec["arrays"] and "w_down_t.values0" in rec["arrays"]
    stored = {t.name: t for t in proto.graph.initializer}
    weight_bytes = sum(onnx.numpy_helper.to_array(stored[n]).nbytes for r, n in rec["arrays"].items()
                       if r.split(".", 1)[0] in ("w_up", "w_gate", "w_down_t"))
    assert weight_bytes < 0.5 * 4 * (K * H * (2 if gated else 1) + H * N)
    if kernel != "predictor":  # lossy: the compiled reference is checked by verify above
        for opt in (True, False):
            sess = runner.session(proto, optimize=opt)
            for batch in (1, 3, 64):
                xb = torch.randn(batch, K)
                _close(sess.run(None, {proto.graph.input[0].name: xb.numpy()})[0], model(xb))
    weights = {name: w for name, w, _ in files.stored_weights(proto)}
    for name in (("up", "gate", "down") if gated else ("0", "2")):
        mod = getattr(model, name) if gated else model[int(name)]
        assert torch.equal(weights[name], mod.weight.detach())
    dense = runner.session(files.dense_equivalent(proto))  # the plain MLP (lossy modes: with the corrected down bias)
    xb = torch.randn(4, K)
    out = dense.run(None, {proto.graph.input[0].name: xb.numpy()})[0]
    if kernel != "predictor":
        _close(out, model(xb))
