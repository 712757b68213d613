"""sparsecomp.export_onnx: the file (checker, dynamic axes, metadata, compact storage, external
data), the round trips export -> analyze / bench, and every bad input answered before any work."""

import json
import os

import numpy as np
import onnx
import pytest
import torch
from sparsecomp.backends.ort import files, session
from torch import nn

import sparsecomp as sc
from sparsecomp import api, patterns
from sparsecomp.errors import OnnxError


def mlp(seed=0, spec="unstructured:0.9"):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128)).eval()
    patterns.impose(m, spec)
    return m


def run_file(path, x, optimize=True):
    s = session(str(path), optimize=optimize)
    return torch.from_numpy(s.run(None, {s.get_inputs()[0].name: x.numpy()})[0])


def close(out, ref):
    return float((out - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One export shared by the tests that only read it."""
    tmp = tmp_path_factory.mktemp("export")
    m = mlp()
    x = torch.randn(2, 7, 128)
    info = sc.export_onnx(m, (x,), tmp / "m.onnx", kernels="sell4,dense", cache_dir=str(tmp / "cache"), max_seconds_per_layer=0.05)
    return m, x, info, onnx.load(str(tmp / "m.onnx"))


def test_file_checks_runs_and_keeps_batch_and_sequence_dynamic(exported):
    m, x, info, model = exported
    onnx.checker.check_model(info["path"], full_check=True)
    assert info["external_data"] is None and info["opset"] == 20 and info["bytes"] == os.path.getsize(info["path"])
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence", 128]
    for xb in (x, torch.randn(1, 1, 128), torch.randn(7, 3, 128)):  # batch 1 and 7, other sequence lengths
        for optimize in (True, False):  # ORT graph optimizations on and ORT_DISABLE_ALL
            assert close(run_file(info["path"], xb, optimize), m(xb))


def test_metadata(exported):
    _, _, _, model = exported
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["sparsecomp.version"] == sc.__version__ and meta["sparsecomp.backend"] == "ort"
    assert meta["sparsecomp.pipeline"].startswith("analyze-weights") and "sparse-linear" in meta["sparsecomp.pipeline"]
    decisions = json.loads(meta["sparsecomp.decisions"])
    assert [d["layer"] for d in decisions] == ["0", "2"] and all("kernel" in d and "reason" in d for d in decisions)
    layers = files.layers(model)
    assert [r["layer"] for r in layers] == ["0", "2"] and all(r["shape"] and r["arrays"] for r in layers)
    assert json.loads(meta["sparsecomp.inputs"])[0]["shape"] == [2, 7, 128]
    assert model.producer_name == "sparsecomp"


def test_storage_is_compact(exported):
    """Values + narrow indices: a 90%-sparse layer takes ~1/5 of its dense bytes, whatever runs."""
    _, _, info, model = exported
    dense_bytes = 2 * 128 * 256 * 4
    assert info["bytes"] < 0.3 * dense_bytes
    idx = [t for t in model.graph.initializer if t.data_type in (onnx.TensorProto.UINT8, onnx.TensorProto.UINT16)]
    assert idx  # stored narrow, Cast to int32 in the graph (folded by onnxruntime at load)
    assert not [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT64 and np.prod(t.dims) > 16]


def test_round_trip_export_analyze(exported):
    m, x, info, _ = exported
    from_file = {l.name: l for l in sc.analyze(info["path"]).layers}
    from_torch = {l.name: l for l in sc.analyze(m, (x,)).layers}
    assert set(from_file) == set(from_torch) == {"0", "2"}
    for name, ref in from_torch.items():
        got = from_file[name]
        assert got.shape == ref.shape and got.density == ref.density and got.zero_rows == ref.zero_rows
        assert got.nm_conformance == ref.nm_conformance and got.block_occupancy == ref.block_occupancy


def test_dense_equivalent_is_the_same_function(exported):
    m, x, _, model = exported
    dense = files.dense_equivalent(model)
    onnx.checker.check_model(dense, full_check=True)
    assert {n.op_type for n in dense.graph.node} <= {"MatMul", "Add", "Relu"}
    s = session(dense)
    assert close(torch.from_numpy(s.run(None, {"input": x.numpy()})[0]), m(x))


def test_export_of_compiled_model_does_not_recompile(tmp_path, monkeypatch):
    m, x = mlp(1), torch.randn(3, 128)
    cm = sc.compile(m, (x,), backend="ort", kernels="dense,sell4", cache_dir=str(tmp_path / "c"), max_seconds_per_layer=0.05)
    monkeypatch.setattr(api, "compile", lambda *a, **k: pytest.fail("compiled again"))
    info = sc.export_onnx(cm, (x,), tmp_path / "cm.onnx")
    assert close(run_file(info["path"], x), m(x))
    # another opset and static shapes: exported again from the same decisions, checked against the compiled model
    info17 = sc.export_onnx(cm, (x,), tmp_path / "cm17.onnx", opset=17, dynamic_axes=None)
    model17 = onnx.load(info17["path"])
    assert info17["opset"] == 17 and [d.dim_value for d in model17.graph.input[0].type.tensor_type.shape.dim] == [3, 128]
    assert close(run_file(info17["path"], x, optimize=False), m(x))
    # a static re-export checked on inputs of another shape: a clear error, not onnxruntime's
    with pytest.raises(OnnxError, match="does not run on these example inputs"):
        sc.export_onnx(cm, (torch.randn(5, 128),), tmp_path / "cm5.onnx", dynamic_axes=None)


def test_bad_inputs_fail_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(api, "compile", lambda *a, **k: pytest.fail("worked before checking"))
    m, x = mlp(), torch.randn(2, 128)
    with pytest.raises(OnnxError, match="does not exist"):
        sc.export_onnx(m, (x,), tmp_path / "missing" / "m.onnx")
    with pytest.raises(OnnxError, match="is a directory"):
        sc.export_onnx(m, (x,), tmp_path)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path) else real_access(p, mode))
    with pytest.raises(OnnxError, match="read-only"):  # (tests run as root, who may write anywhere: simulated)
        sc.export_onnx(m, (x,), tmp_path / "m.onnx")
    monkeypatch.setattr(os, "access", real_access)
    if os.path.isdir("/proc") and os.access("/proc", os.W_OK):  # permissions say yes, writing says no (root)
        with pytest.raises(OnnxError, match="creating a file in '/proc' failed"):
            sc.export_onnx(m, (x,), "/proc/m.onnx")
    assert not list(tmp_path.glob(".sparsecomp-*"))  # the probe file is gone
    with pytest.raises(OnnxError, match="opset 13 is too old.*minimum is opset 16"):
        sc.export_onnx(m, (x,), tmp_path / "m.onnx", opset=13)
    with pytest.raises(OnnxError, match="compiles for backend 'ort', got backend='torch'"):
        sc.export_onnx(m, (x,), tmp_path / "m.onnx", backend="torch")
    torch_cm = api.CompiledModel(m, api.CompileReport("m", "torch", "p"), "torch")
    with pytest.raises(OnnxError, match="compiled for backend 'torch'"):
        sc.export_onnx(torch_cm, (x,), tmp_path / "m.onnx")


def test_external_data_above_the_protobuf_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "PROTOBUF_LIMIT", 1000)  # a 2 GiB model is too slow for a test: lower the limit
    m, x = mlp(2), torch.randn(2, 128)
    info = sc.export_onnx(m, (x,), tmp_path / "big.onnx", kernels="dense", cache_dir=str(tmp_path / "c"), max_seconds_per_layer=0.05)
    assert info["external_data"] == str(tmp_path / "big.onnx.data") and os.path.getsize(info["external_data"]) > 1000
    assert info["bytes"] == os.path.getsize(info["path"]) + os.path.getsize(info["external_data"])
    assert os.path.getsize(info["path"]) < 50_000  # the graph only
    assert close(run_file(info["path"], x), m(x))
    assert {l.name for l in sc.analyze(str(tmp_path / "big.onnx")).layers} == {"0", "2"}


# ------------------------------------------------------------------------------------------------
# block layers chained through elementwise ops keep the activation transposed (export.chain_orientations)


class _Chain(nn.Module):
    """Linear -> GELU -> Linear -> ReLU -> Linear, odd widths (not multiples of the 16-row block);
    `leak` also returns the first activation, a second reader that must stop the first chain."""

    def __init__(self, leak=False):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(96, 200), nn.Linear(200, 72), nn.Linear(72, 40)
        self.leak = leak

    def forward(self, x):
        h = torch.nn.functional.gelu(self.a(x))
        y = self.c(torch.relu(self.b(h)))
        return (y, h) if self.leak else y


def _chain(leak=False, seed=0):
    torch.manual_seed(seed)
    m = _Chain(leak).eval()
    for name in ("a", "b", "c"):
        patterns.impose(m, "block:16x1:0.9", name)
    with torch.no_grad():
        m.b.weight[:16].zero_()  # an all-zero block-row
    return m


def _layouts(model):
    return {r["layer"]: r.get("layout") for r in files.layers(model)}


def _count(model, op):
    return sum(n.op_type == op for n in model.graph.node)


def test_block_layers_pass_the_activation_on_transposed(tmp_path):
    m, x = _chain(), torch.randn(2, 5, 96)
    info = sc.export_onnx(m, (x,), tmp_path / "c.onnx", kernels="bsr16x1", cache_dir=str(tmp_path / "cache"), max_seconds_per_layer=0.05)
    model = onnx.load(info["path"])
    assert _layouts(model) == {"a": {"x": "plain", "y": "transposed"}, "b": {"x": "transposed", "y": "transposed"},
                               "c": {"x": "transposed", "y": "plain"}}
    assert _count(model, "Transpose") == 2  # one into the chain, one out of it (6 unchained)
    assert {"Gelu", "Relu"} <= {n.op_type for n in model.graph.node}
    onnx.checker.check_model(info["path"], full_check=True)
    for xb in (x, torch.randn(1, 1, 96), torch.randn(7, 3, 96), torch.zeros(1, 2, 96)):  # batch 1 and 7, all-zero input
        for optimize in (True, False):
            assert close(run_file(info["path"], xb, optimize), m(xb))
    dense = files.dense_equivalent(model)  # the decoder's view: plain layers, same function
    s = session(dense)
    assert close(torch.from_numpy(s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]), m(x))


def test_a_second_reader_keeps_the_activation_plain(tmp_path):
    m, x = _chain(leak=True), torch.randn(3, 96)
    info = sc.export_onnx(m, (x,), tmp_path / "c.onnx", kernels="bsr16x1", cache_dir=str(tmp_path / "cache"), max_seconds_per_layer=0.05)
    model = onnx.load(info["path"])
    layouts = _layouts(model)
    assert layouts["a"] is None  # h is a graph output too: a's y stays [M, 200]
    assert layouts["b"] == {"x": "plain", "y": "transposed"} and layouts["c"] == {"x": "transposed", "y": "plain"}
    assert _count(model, "Transpose") == 4
    s = session(info["path"])
    y, h = s.run(None, {s.get_inputs()[0].name: x.numpy()})
    ref_y, ref_h = m(x)
    assert close(torch.from_numpy(y), ref_y) and close(torch.from_numpy(h), ref_h)


def test_a_tail_fed_plain_input_as_transposed_is_wrong():
    """The orientation flags matter: the same arrays read with the wrong orientation give another function."""
    from onnx import TensorProto, helper
    from sparsecomp.backends.ort import kernels as K

    torch.manual_seed(1)
    lin = nn.Sequential(nn.Linear(48, 48)).eval()
    patterns.impose(lin, "block:16x1:0.75")
    lin = lin[0]
    cand = K.by_label(lin.weight, lin.bias, "bsr16x1")
    x = torch.randn(48, 48)  # square: both readings run, only one is right
    outs = {}
    for x_t in (False, True):
        e = K.Emitter("layer")
        lead = e.node("Shape", ["x"], end=-1)
        cand.emit(e, "x", "y", K.Orientation(x_t=x_t, lead=lead))
        g = helper.make_graph(e.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [48, 48])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], e.initializers)
        s = session(helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)], ir_version=9))
        outs[x_t] = torch.from_numpy(s.run(None, {"x": x.numpy()})[0])
    ref = lin(x)
    assert close(outs[False], ref)
    assert close(outs[True], lin(x.T.contiguous()))  # x read as x^T: the function of the transposed input
    assert not close(outs[True], ref)


def test_an_opset_the_exporter_cannot_write_is_an_error_not_a_newer_file(tmp_path):
    """LayerNormalization is an opset-17 op: at opset 16 torch's exporter writes opset 18 instead;
    a file of another opset than asked for is never returned."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.LayerNorm(256), torch.nn.Linear(256, 64)).eval()
    sc.impose(m, "unstructured:0.9")
    x = torch.randn(3, 128)
    cm = sc.compile(m, (x,), backend="ort", kernels="dense,sell4", cache_dir=str(tmp_path / "c"), max_seconds_per_layer=0.02)
    with pytest.raises(OnnxError, match="cannot be written at ONNX opset 16: torch's exporter wrote opset 18"):
        sc.export_onnx(cm, (x,), tmp_path / "m16.onnx", opset=16)
    info = sc.export_onnx(cm, (x,), tmp_path / "m17.onnx", opset=17)
    assert info["opset"] == 17 and onnx.load(info["path"]).opset_import[0].version == 17
    assert close(run_file(info["path"], x), m(x))


def test_impose_on_a_sparsecomp_export_is_refused(exported, tmp_path, capsys):
    """A sparsecomp export stores sparse layers compactly (values + indices): a pattern imposed on
    those arrays is not the layer's pattern (0.99 gave densities ~0.008), so it is refused; the
    plain ONNX file of the same function still takes it exactly."""
    from sparsecomp.cli import main
    from sparsecomp.loader import load_model
    from sparsecomp.onnx_io import impose_onnx

    _, _, info, model = exported
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    with pytest.raises(OnnxError, match="is a sparsecomp export: its weights are stored in compact formats") as e:
        impose_onnx(copy, "unstructured:0.99")
    assert "impose on the torch model" in e.value.hint and "export again" in e.value.hint
    assert copy == model  # nothing written
    with pytest.raises(OnnxError, match=f"^{info['path']}: .*sparsecomp export"):
        load_model(info["path"], impose="unstructured:0.99")
    code = main(["analyze", info["path"], "--impose", "unstructured:0.99"])
    err = capsys.readouterr().err
    assert code != 0 and "sparsecomp export" in err and "Traceback" not in err

    plain = tmp_path / "plain.onnx"  # the dense equivalent: a plain ONNX file
    onnx.save(files.dense_equivalent(model), str(plain))
    loaded = load_model(str(plain), impose="unstructured:0.99")
    assert len(loaded.imposed) == 2
    densities = [l.density for l in sc.analyze(loaded.onnx).layers]
    assert len(densities) == 2 and all(abs(d - 0.01) < 1e-3 for d in densities), densities


class _Twice(nn.Module):
    """One Linear called twice (shared weights, as ALBERT's layers): lowered once per call."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 64)

    def forward(self, x):
        return self.a(torch.relu(self.a(x)))


@pytest.mark.parametrize("kernel", ["dense", "sell4", "bsr16x1"])
def test_a_module_called_twice_gets_one_lowering_per_call(kernel, tmp_path):
    torch.manual_seed(0)
    m = _Twice().eval()
    patterns.impose(m, "block:16x1:0.9", "a")
    x = torch.randn(2, 5, 64)
    cm = sc.compile(m, (x,), backend="ort", kernels=kernel, cache_dir=str(tmp_path / "cache"), max_seconds_per_layer=0.05)
    proto = cm.gm.onnx_model  # (node and initializer names were duplicated before: onnxruntime refused the model)
    assert [r["layer"] for r in files.layers(proto)] == ["a", "a#2"]
    for xb in (x, torch.randn(1, 5, 64), torch.randn(3, 5, 64)):
        for optimize in (True, False):
            s = session(proto, optimize=optimize)
            assert close(torch.from_numpy(s.run(None, {s.get_inputs()[0].name: xb.numpy()})[0]), m(xb))
    s = session(files.dense_equivalent(proto))
    assert close(torch.from_numpy(s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]), m(x))


def test_export_of_a_model_whose_calls_go_eager_says_the_file_is_lossy(tmp_path, monkeypatch):
    """compile(backend="ort", activation_sparsity="threshold:...") whose graph measured slower than
    eager: its calls skip nothing, but the file is the lowered (lossy) graph, and export says so."""
    from types import SimpleNamespace

    from sparsecomp import timing

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16)).eval()
    x, cal = torch.randn(1, 16), [(torch.randn(4, 16),) for _ in range(4)]
    monkeypatch.setattr(timing, "compare", lambda cands, **kw: {k: SimpleNamespace(median=1e-3 if k == "eager" else 2e-3)
                                                                  for k in cands})
    cm = sc.compile(m, (x,), backend="ort", activation_sparsity="threshold:0.5", calibration=cal,
                    cache_dir=str(tmp_path / "c"), max_seconds_per_layer=0.02)
    assert cm.runs == "eager" and torch.equal(cm(x), m(x))
    info = sc.export_onnx(cm, (x,), tmp_path / "t.onnx")
    assert len(info["notes"]) == 1 and info["notes"][0].startswith("the file applies activation sparsity threshold:0.5")
    xs = torch.randn(8, 16)
    assert close(run_file(info["path"], xs), api.CompiledModel(cm.gm, cm.report, "ort")(xs))  # the lowered graph
    assert not close(run_file(info["path"], xs), m(xs))  # lossy: not the model
    lossless = sc.compile(mlp(), (torch.randn(2, 128),), backend="ort", cache_dir=str(tmp_path / "c"), max_seconds_per_layer=0.02)
    assert sc.export_onnx(lossless, None, tmp_path / "l.onnx")["notes"] == []
