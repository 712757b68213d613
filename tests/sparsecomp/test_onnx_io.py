"""Tests for `sparsecomp.onnx_io`: weight sites, imposing patterns and importing ONNX into torch.fx.

Every zoo model is exported twice, once per exporter (cached once per test session per model):

- dynamo: `torch.onnx.export(model, args, kwargs=..., dynamo=True)`, torch 2.13's default (opset 20);
- legacy: `torch.onnx.export(model, args, dynamo=False, opset_version=17)`, the TorchScript exporter,
  through a positional wrapper for the keyword-input models (`_positional`).

Import matrix (`import_onnx` vs onnxruntime on the zoo's example inputs, outputs within
1e-4 * max|output|; torch 2.13.0, onnx 1.23, onnx2torch 1.5.15 plus our converters):

    model            dynamo (opset 20)   legacy (opset 17)
    mlp-relu         imports             imports
    bert-tiny        imports             imports
    bert-base        imports             imports
    opt-125m-like    imports             imports
    llama-tiny       imports             imports
    vit-tiny         imports             imports
    resnet18-like    imports             imports
    minilm           imports             imports

For the record, onnx2torch 1.5.15 alone (torchvision stubbed) stops at, per model:

    model            dynamo (opset 20)                          legacy (opset 17)
    mlp-relu         imports                                    imports
    bert-tiny/base   Cast 19, Gelu 20, IsNaN 20, Reshape 19     imports
    opt-125m-like    Reshape 19                                 Trilu 14
    llama-tiny       ReduceMean 18, Reshape 19                  Trilu 14
    vit-tiny         Gelu 20, Reshape 19                        imports
    resnet18-like    ReduceMean 18, Reshape 19                  imports
    minilm (HF)      Cast 19, Gelu 20, IsNaN 20, Reshape 19     GreaterOrEqual 16, then Flatten

and every dynamo Reshape has allowzero=1, which onnx2torch refuses. `_IMPORT_MATRIX` below holds
the expectations; an entry naming an op means import must fail with an OnnxError naming it.

Exported weights differ from the module's in one known case: both exporters fold an eval-mode
BatchNorm into the preceding Conv (resnet18-like), so the ONNX weight is `W * gamma /
sqrt(var + eps)` per output channel; dynamo even keeps the name `conv1.weight` for the folded
values. The site tests compare those sites with the folded weight.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import io
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from sparsecomp.errors import OnnxError, PatternError
from sparsecomp.onnx_io import OnnxWeightSite, impose_onnx, import_onnx, load_onnx, onnx_weight_sites
from sparsecomp.patterns import impose, nm_conformance

EXPORTERS = ("dynamo", "legacy")

# Small variants of the big models keep every Linear's real width (shapes are what matter to
# sparse kernels); depth and vocabulary only add export time. minilm is small at full size.
ZOO = {
    "mlp-relu": {},
    "bert-tiny": {},
    "bert-base": {"layers": 2, "vocab": 1000},
    "opt-125m-like": {"layers": 2, "vocab": 1000},
    "llama-tiny": {},
    "vit-tiny": {},
    "resnet18-like": {},
    "minilm": {},
}
FAST = {"bert-tiny"}  # everything else is marked slow (still part of `make test`)

# (model, exporter) -> None if import_onnx must import it and match onnxruntime, else the op type
# that the OnnxError must name.
_IMPORT_MATRIX: dict[tuple[str, str], str | None] = {(m, e): None for m in ZOO for e in EXPORTERS}


def _zoo_params():
    """(model, exporter) params; one xdist group per model, so each worker exports a model once."""
    out = []
    for name in ZOO:
        for exporter in EXPORTERS:
            marks = [pytest.mark.xdist_group(f"onnx_io-{name}")]
            if name not in FAST:
                marks.append(pytest.mark.slow)
            out.append(pytest.param(name, exporter, marks=marks, id=f"{name}-{exporter}"))
    return out


# ------------------------------------------------------------------------------------------------
# Export helpers


def _positional(model: nn.Module, keys: list[str]) -> nn.Module:
    """The same module, taking `keys` positionally (the legacy exporter has no keyword inputs).

    A shallow copy whose class is a subclass with a positional `forward`, rather than a wrapper
    module holding the model: a wrapper would prefix every scope name (`/m/encoder/...`), and
    the site names would no longer be the model's own qualified names.
    """
    cls = type(model)

    def forward(self, *args):
        return cls.forward(self, **dict(zip(keys, args)))

    wrapped = copy.copy(model)
    wrapped.__class__ = type(f"Positional{cls.__name__}", (cls,), {"forward": forward})
    return wrapped


def _split(example):
    return ((), dict(example)) if isinstance(example, dict) else (tuple(example), {})


def export(model: nn.Module, example, path, exporter: str) -> None:
    """Export `model` with one of torch 2.13's two exporters, as a user would.

    `dynamo-unoptimized` (optimize=False) and `legacy-unfolded` (do_constant_folding=False) keep
    the weight transposes as Transpose nodes instead of folding them into new initializers.
    """
    args, kwargs = _split(example)
    with contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        if exporter.startswith("dynamo"):
            torch.onnx.export(
                model, args, str(path), kwargs=kwargs or None, dynamo=True, verbose=False,
                optimize=exporter != "dynamo-unoptimized",
            )
        else:
            if kwargs:
                names = list(kwargs)
                model, args = _positional(model, names), tuple(kwargs.values())
            else:
                names = list(inspect.signature(model.forward).parameters)[: len(args)]
            torch.onnx.export(
                model, args, str(path), dynamo=False, opset_version=17, input_names=names,
                do_constant_folding=exporter != "legacy-unfolded",
            )


def run_ort(model_or_path, example) -> np.ndarray:
    """First output of the model in onnxruntime; inputs fed by position."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1  # tests run two workers on two cores
    src = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    sess = ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    args, kwargs = _split(example)
    values = list(args) + list(kwargs.values())
    feeds = {i.name: v.numpy() for i, v in zip(sess.get_inputs(), values)}
    return sess.run(None, feeds)[0]


def run_torch(model, example) -> torch.Tensor:
    args, kwargs = _split(example)
    with torch.no_grad():
        return model(*args, **kwargs)


def assert_close(out, ref, rel=1e-4, what="output"):
    out = torch.as_tensor(np.asarray(out, dtype=np.float32) if isinstance(out, np.ndarray) else out.detach().float())
    ref = torch.as_tensor(np.asarray(ref, dtype=np.float32) if isinstance(ref, np.ndarray) else ref.detach().float())
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = (out - ref).abs().max().item()
    scale = max(ref.abs().max().item(), 1e-6)
    assert err <= rel * scale, f"{what}: max abs error {err:.3g} > {rel} * max|ref| ({scale:.3g})"


@pytest.fixture(scope="session")
def zoo_export(tmp_path_factory):
    """`zoo_export(name, exporter) -> (model, example, path)`, each export done once per session."""
    models: dict = {}
    paths: dict = {}

    def get(name: str, exporter: str):
        if name not in models:
            from sparsecomp.models import MissingExtraError
            from sparsecomp.models import get as zoo_get

            try:
                models[name] = zoo_get(name, seed=0, **ZOO[name])
            except MissingExtraError as e:
                pytest.skip(str(e))
        model, example = models[name]
        if (name, exporter) not in paths:
            path = tmp_path_factory.mktemp("onnx") / f"{name}-{exporter}.onnx"
            export(model, example, path, exporter)
            paths[(name, exporter)] = path
        return model, example, paths[(name, exporter)]

    return get


def _weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Linear/Conv layers with distinct weights, first name wins (shared weights: one site)."""
    out, seen = {}, set()
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d)) and id(mod.weight) not in seen:
            seen.add(id(mod.weight))
            out[name] = mod
    return out


def _bn_after_conv(model: nn.Module) -> dict[str, nn.BatchNorm2d]:
    """Conv name -> the BatchNorm registered right after it (the exporters fold these pairs)."""
    mods = list(model.named_modules())
    return {
        name: nxt
        for (name, mod), (_, nxt) in zip(mods, mods[1:])
        if isinstance(mod, nn.Conv2d) and isinstance(nxt, nn.BatchNorm2d)
    }


def _bn_folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return (conv.weight * scale[:, None, None, None]).detach()


def _initializer(model: onnx.ModelProto, name: str) -> torch.Tensor:
    for t in model.graph.initializer:
        if t.name == name:
            return torch.from_numpy(numpy_helper.to_array(t).copy())
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return torch.from_numpy(numpy_helper.to_array(n.attribute[0].t).copy())
    raise KeyError(name)


def _conforms_nm(w: torch.Tensor, n: int, m: int) -> bool:
    """N:M along in_features of the [out, in*k] view, computed here independently of patterns."""
    w2 = w.reshape(w.shape[0], -1)
    pad = (-w2.shape[1]) % m
    nz = torch.nn.functional.pad(w2 != 0, (0, pad)).reshape(w2.shape[0], -1, m)
    return bool((nz.sum(-1) <= n).all())


# ------------------------------------------------------------------------------------------------
# Weight sites on the zoo


@pytest.mark.parametrize("name,exporter", _zoo_params())
def test_zoo_weight_sites_match_model(zoo_export, name, exporter):
    model, _, path = zoo_export(name, exporter)
    onnx_model = load_onnx(path)
    opset = {o.domain: o.version for o in onnx_model.opset_import}[""]
    assert opset == (20 if exporter == "dynamo" else 17)  # the facts the converters are built for

    sites = onnx_weight_sites(onnx_model)
    layers = _weight_layers(model)
    folded = _bn_after_conv(model)
    by_name = {s.name: s for s in sites}
    assert len(by_name) == len(sites), "site names must be unique"
    assert sorted(by_name) == sorted(layers), "one site per Linear/Conv, named by its qualified name"
    for lname, layer in layers.items():
        site = by_name[lname]
        assert site.op in ("MatMul", "Gemm", "Conv")
        assert (site.op == "Conv") == isinstance(layer, (nn.Conv1d, nn.Conv2d))
        assert site.shape == tuple(layer.weight.shape)
        assert site.weight_2d.shape == (layer.weight.shape[0], layer.weight[0].numel())
        if lname in folded:
            # BatchNorm folded in by the exporter: legacy bit-exact, dynamo within rounding
            ref = _bn_folded(layer, folded[lname])
            torch.testing.assert_close(site.weight, ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())
            continue
        assert torch.equal(site.weight, layer.weight.detach()), f"{lname}: weight differs from the model's"
        if layer.bias is None:
            assert site.bias is None, f"{lname}: no bias in the model, site says {site.bias!r}"
        else:
            # by value: exporters merge equal initializers (e.g. several all-zero biases into one)
            assert site.bias is not None, f"{lname}: bias not found"
            assert torch.equal(_initializer(onnx_model, site.bias), layer.bias.detach())


# ------------------------------------------------------------------------------------------------
# Orientation: a 2:4-pruned MLP exported by plain torch


class _MLP(nn.Module):
    """Linear layers in the shapes both exporters write differently: bias/no bias, 2-D/3-D input."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 48, bias=False)
        self.head = nn.Linear(48, 16)

    def forward(self, x):  # x [batch, seq, 32]
        h = self.fc2(torch.relu(self.fc1(x)))  # 3-D input: MatMul (+ Add)
        return self.head(h[:, 0])  # 2-D input: Gemm in both exporters


def _prune_2to4_(model: nn.Module) -> None:
    """Keep the 2 largest |w| of every 4 consecutive in_features entries (plain torch)."""
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Linear):
                w = mod.weight
                groups = w.abs().reshape(w.shape[0], -1, 4)
                keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, groups.topk(2, dim=-1).indices, True)
                w.mul_(keep.reshape(w.shape))


ALL_EXPORTERS = EXPORTERS + ("dynamo-unoptimized", "legacy-unfolded")


@pytest.mark.parametrize("exporter", ALL_EXPORTERS)
def test_pruned_mlp_sites_are_2to4_in_out_in_orientation(tmp_path, exporter):
    torch.manual_seed(0)
    model = _MLP().eval()
    _prune_2to4_(model)
    x = torch.randn(2, 5, 32)
    path = tmp_path / "mlp.onnx"
    export(model, (x,), path, exporter)
    onnx_model = load_onnx(path)
    sites = onnx_weight_sites(onnx_model)
    assert [s.name for s in sites] == ["fc1", "fc2", "head"]
    ops = {s.name: s.op for s in sites}
    assert ops["fc1"] == "MatMul" and ops["fc2"] == "MatMul" and ops["head"] == "Gemm"
    for site in sites:
        assert _conforms_nm(site.weight, 2, 4), f"{site.name}: not 2:4 along in_features"
        assert nm_conformance(site.weight, 2, 4) == 1.0
        assert torch.equal(site.weight, getattr(model, site.name).weight.detach())
        stored = _initializer(onnx_model, site.initializer)
        if site.op == "MatMul" and exporter in EXPORTERS:
            # stored [in, out]: the groups run down its columns, so along its rows it is not 2:4 --
            # the site finder's transpose is what makes the pattern visible
            assert stored.shape == site.weight.T.shape
            assert not _conforms_nm(stored, 2, 4)
        elif site.op == "MatMul":
            # unfolded: the parameter itself, [out, in], read through a Transpose node
            assert site.initializer == f"{site.name}.weight" and torch.equal(stored, site.weight)


@pytest.mark.parametrize("exporter", ALL_EXPORTERS)
def test_mlp_impose_onnx_matches_torch_impose(tmp_path, exporter):
    torch.manual_seed(0)
    model = _MLP().eval()
    x = torch.randn(2, 5, 32)
    path = tmp_path / "mlp.onnx"
    export(model, (x,), path, exporter)
    onnx_model = load_onnx(path)
    assert impose_onnx(onnx_model, "unstructured:0.7", layers="fc*") == ["fc1", "fc2"]
    assert impose(model, "unstructured:0.7", layers="fc*") == ["fc1", "fc2"]
    for site in onnx_weight_sites(onnx_model):
        assert torch.equal(site.weight, getattr(model, site.name).weight.detach())
    assert_close(run_ort(onnx_model, (x,)), run_torch(model, (x,)))


class _Shared(nn.Module):
    """A module called three times (3-D, 3-D, 2-D input) and an LM head tied to the embedding."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(8, 8)
        self.emb = nn.Embedding(8, 8)
        self.head = nn.Linear(8, 8, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x, ids):
        h = self.shared(self.shared(x))  # MatMul twice (one folded [in, out] copy)
        g = self.shared(h[:, 0])  # Gemm on the original [out, in] parameter
        return g + self.head(self.emb(ids))[:, 0]  # Gather and MatMul read the same parameter


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_shared_and_tied_weights_are_one_site_each(tmp_path, exporter):
    torch.manual_seed(0)
    model = _Shared().eval()
    example = (torch.randn(2, 3, 8), torch.randint(0, 8, (2, 3)))
    path = tmp_path / "shared.onnx"
    export(model, example, path, exporter)
    onnx_model = load_onnx(path)
    sites = {s.name: s for s in onnx_weight_sites(onnx_model)}
    assert sorted(sites) == ["head", "shared"]  # the tied head is named by its caller, not `emb`
    assert len(sites["shared"].consumers) == 3
    for name, site in sites.items():
        assert torch.equal(site.weight, getattr(model, name).weight.detach())
    # imposing writes every stored copy, as imposing on the shared torch Parameter changes them all
    assert sorted(impose_onnx(onnx_model, "2:4")) == ["head", "shared"]
    impose(model, "2:4")
    assert_close(run_ort(onnx_model, example), run_torch(model, example))


# ------------------------------------------------------------------------------------------------
# impose_onnx round trip


_IMPOSE_GLOBS = {"bert-tiny": "encoder.layer.*.intermediate.dense", "minilm": "encoder.layer.*.output.dense"}


@pytest.mark.parametrize("name,exporter", _zoo_params())
def test_zoo_impose_onnx_matches_torch_impose(zoo_export, name, exporter):
    model, example, path = zoo_export(name, exporter)
    glob = _IMPOSE_GLOBS.get(name)
    onnx_model = load_onnx(path)
    imposed = impose_onnx(onnx_model, "2:4", layers=glob)

    torch_model = copy.deepcopy(model)
    expected = impose(torch_model, "2:4", layers=glob)
    assert sorted(imposed) == sorted(expected), "ONNX site names and torch layer names must select the same layers"

    for site in onnx_weight_sites(onnx_model):
        if site.name in imposed:
            assert _conforms_nm(site.weight, 2, 4), f"{site.name}: not 2:4 after impose_onnx"
    assert_close(run_ort(onnx_model, example), run_torch(torch_model, example), what=f"{name} {exporter} 2:4")


def _hand_model() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A graph no torch exporter writes, with every chain the site finder must walk through.

    y1 = x @ Cast(Transpose(W16))     W16 float16, stored [out=6, in=8]
    y2 = Gemm(x, C, transB=0)         C held by a Constant node, stored [in=8, out=6]
    y3 = (x @ S) @ Identity(S)        S [8, 8] shared by two MatMuls: one site
    """
    rng = np.random.default_rng(0)
    w16 = rng.standard_normal((6, 8)).astype(np.float16)
    c = rng.standard_normal((8, 6)).astype(np.float32)
    s = rng.standard_normal((8, 8)).astype(np.float32)
    nodes = [
        helper.make_node("Transpose", ["W16"], ["W16t"], perm=[1, 0], name="t"),
        helper.make_node("Cast", ["W16t"], ["Wf"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("MatMul", ["x", "Wf"], ["y1"], name="mm_cast"),
        helper.make_node("Constant", [], ["C"], value=numpy_helper.from_array(c, "C"), name="const"),
        helper.make_node("Gemm", ["x", "C"], ["y2"], transB=0, name="gemm_const"),
        helper.make_node("MatMul", ["x", "S"], ["h"], name="mm_shared_a"),
        helper.make_node("Identity", ["S"], ["S_copy"], name="id"),
        helper.make_node("MatMul", ["h", "S_copy"], ["y3"], name="mm_shared_b"),
    ]
    graph = helper.make_graph(
        nodes,
        "hand",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8])],
        [_f("y1", [3, 6]), _f("y2", [3, 6]), _f("y3", [3, 8])],
        initializer=[numpy_helper.from_array(w16, "W16"), numpy_helper.from_array(s, "S")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model, {"W16": w16, "C": c, "S": s}


def test_sites_walk_cast_transpose_constant_identity():
    model, raw = _hand_model()
    sites = {s.node_name: s for s in onnx_weight_sites(model)}
    assert sorted(sites) == ["gemm_const", "mm_cast", "mm_shared_a"]
    assert sites["mm_cast"].initializer == "W16" and sites["mm_cast"].weight.dtype == torch.float32
    assert torch.equal(sites["mm_cast"].weight, torch.from_numpy(raw["W16"]).float())  # [out, in] as stored
    assert sites["gemm_const"].initializer == "C"
    assert torch.equal(sites["gemm_const"].weight, torch.from_numpy(raw["C"]).T)
    shared = sites["mm_shared_a"]
    assert shared.consumers == ("mm_shared_a", "mm_shared_b")
    assert torch.equal(shared.weight, torch.from_numpy(raw["S"]).T)
    # no torch names to recover: the node names stand in
    assert {s.name for s in sites.values()} == {"mm_cast", "gemm_const", "mm_shared_a"}


def test_impose_onnx_writes_back_in_stored_orientation_and_dtype():
    model, raw = _hand_model()
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    assert sorted(impose_onnx(model, "2:4")) == ["gemm_const", "mm_cast", "mm_shared_a"]

    w16 = next(t for t in model.graph.initializer if t.name == "W16")
    assert w16.data_type == TensorProto.FLOAT16 and list(w16.dims) == [6, 8]
    w = torch.from_numpy(numpy_helper.to_array(w16).astype(np.float32))  # stored [out, in]
    assert _conforms_nm(w, 2, 4)
    c = _initializer(model, "C")  # stored [in, out]
    assert list(c.shape) == [8, 6] and _conforms_nm(c.T, 2, 4)
    s = _initializer(model, "S")
    assert _conforms_nm(s.T, 2, 4)
    # kept entries are untouched
    for new, old in ((w, raw["W16"].astype(np.float32)), (c, raw["C"]), (s, raw["S"])):
        kept = new != 0
        assert torch.equal(new[kept], torch.from_numpy(np.asarray(old))[kept])

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    y1, y2, y3 = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    xt = torch.from_numpy(x)
    torch.testing.assert_close(torch.from_numpy(y1), xt @ w.T, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(torch.from_numpy(y2), xt @ c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(y3), (xt @ s) @ s, rtol=1e-5, atol=1e-5)


def test_impose_onnx_conv_and_block_pattern(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 1)).eval()
    x = torch.randn(1, 3, 10, 10)
    path = tmp_path / "conv.onnx"
    export(model, (x,), path, "dynamo")
    onnx_model = load_onnx(path)
    assert [s.name for s in onnx_weight_sites(onnx_model)] == ["0", "2"]
    assert impose_onnx(onnx_model, "block:4x1:0.5", layers="2") == ["2"]
    impose(model, "block:4x1:0.5", layers="2")
    assert_close(run_ort(onnx_model, (x,)), run_torch(model, (x,)))


def test_impose_onnx_glob_matching_nothing_lists_names():
    model, _ = _hand_model()
    with pytest.raises(PatternError, match="matches no weight") as e:
        impose_onnx(model, "2:4", layers="encoder.*")
    assert "mm_cast" in e.value.hint and "gemm_const" in e.value.hint


def test_impose_onnx_bad_spec_is_pattern_error():
    model, _ = _hand_model()
    with pytest.raises(PatternError, match="bad weight pattern"):
        impose_onnx(model, "3:three")


def test_impose_onnx_model_without_weights():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    with pytest.raises(PatternError, match="no MatMul/Gemm/Conv weight"):
        impose_onnx(helper.make_model(graph), "2:4")


# ------------------------------------------------------------------------------------------------
# Loading: external data and bad files


def test_external_data_loads(tmp_path):
    model, raw = _hand_model()
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="ext.bin", size_threshold=0)
    assert (tmp_path / "ext.bin").exists()
    sites = {s.node_name: s for s in onnx_weight_sites(load_onnx(path))}
    assert torch.equal(sites["mm_shared_a"].weight, torch.from_numpy(raw["S"]).T)

    # without its data file: one OnnxError naming the model
    (tmp_path / "ext.bin").rename(tmp_path / "elsewhere.bin")
    with pytest.raises(OnnxError, match="external weight data") as e:
        load_onnx(path)
    assert str(path) in e.value.message
    # a ModelProto read without its data cannot be analysed either; the error says how to load it
    bare = onnx.load(str(path), load_external_data=False)
    with pytest.raises(OnnxError, match="external"):
        onnx_weight_sites(bare)


def test_truncated_external_data(tmp_path):
    model, _ = _hand_model()
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="ext.bin", size_threshold=0)
    data = (tmp_path / "ext.bin").read_bytes()
    (tmp_path / "ext.bin").write_bytes(data[: len(data) - 10])
    with pytest.raises(OnnxError, match="external") as e:
        load_onnx(path)
    assert str(path) in e.value.message


def test_bfloat16_weight_round_trip():
    w = torch.randn(4, 8).to(torch.bfloat16)
    init = helper.make_tensor("W", TensorProto.BFLOAT16, [8, 4], w.T.contiguous().view(torch.int16).numpy().tobytes(), raw=True)
    nodes = [
        helper.make_node("Cast", ["W"], ["Wf"], to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["x", "Wf"], ["y"], name="mm"),
    ]
    graph = helper.make_graph(nodes, "bf16", [_f("x", [1, 8])], [_f("y", [1, 4])], initializer=[init])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (site,) = onnx_weight_sites(model)
    assert site.weight.dtype == torch.float32 and torch.equal(site.weight, w.float())
    impose_onnx(model, "2:4")
    stored = model.graph.initializer[0]
    assert stored.data_type == TensorProto.BFLOAT16 and list(stored.dims) == [8, 4]
    (site,) = onnx_weight_sites(model)
    assert _conforms_nm(site.weight, 2, 4)
    kept = site.weight != 0
    assert torch.equal(site.weight[kept], w.float()[kept])


def test_bad_files_raise_onnx_error_with_path(tmp_path):
    missing = tmp_path / "missing.onnx"
    with pytest.raises(OnnxError, match="does not exist") as e:
        load_onnx(missing)
    assert str(missing) in e.value.message and e.value.hint

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not an onnx model\n" * 10)
    with pytest.raises(OnnxError, match="cannot parse|not a complete") as e:
        load_onnx(garbage)
    assert str(garbage) in e.value.message and e.value.hint

    model, _ = _hand_model()
    data = model.SerializeToString()
    truncated = tmp_path / "truncated.onnx"
    for cut in (len(data) // 3, len(data) // 2, len(data) - 7):
        truncated.write_bytes(data[:cut])
        with pytest.raises(OnnxError) as e:
            load_onnx(truncated)
        assert str(truncated) in e.value.message

    with pytest.raises(OnnxError, match="directory"):
        load_onnx(tmp_path)
    with pytest.raises(OnnxError, match="does not exist"):
        import_onnx(missing)  # import goes through the same checks


def test_error_messages_are_one_line(tmp_path):
    garbage = tmp_path / "g.onnx"
    garbage.write_bytes(b"\x08\x07garbage")
    with pytest.raises(OnnxError) as e:
        load_onnx(garbage)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------
# import_onnx


@pytest.mark.parametrize("name,exporter", _zoo_params())
def test_zoo_import_onnx(zoo_export, name, exporter):
    model, example, path = zoo_export(name, exporter)
    expected_failure = _IMPORT_MATRIX[(name, exporter)]
    if expected_failure is not None:
        with pytest.raises(OnnxError, match=expected_failure):
            import_onnx(path)
        return
    gm = import_onnx(path)
    assert isinstance(gm, torch.fx.GraphModule)
    # called like the model itself: the ONNX input names (the forward's argument names) are kept
    assert_close(run_torch(gm, example), run_ort(path, example), what=f"{name} {exporter} import")


def _single_op_model(node: onnx.NodeProto, inputs, outputs, inits=(), opset: int = 20) -> onnx.ModelProto:
    graph = helper.make_graph([node], "op", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    return model


def _f(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _i64(name, values):
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


# Each case: one op as written by some exporter, checked against onnxruntime.
_OP_CASES = {
    "gelu-tanh": (helper.make_node("Gelu", ["x"], ["y"], approximate="tanh"), [], 20),
    "gelu-erf": (helper.make_node("Gelu", ["x"], ["y"]), [], 20),
    "reducemean18-axes-input": (helper.make_node("ReduceMean", ["x", "ax"], ["y"], keepdims=0), [_i64("ax", [-1])], 18),
    "reducemean18-no-axes": (helper.make_node("ReduceMean", ["x"], ["y"], keepdims=1), [], 18),
    "reducemax18-noop": (helper.make_node("ReduceMax", ["x"], ["y"], noop_with_empty_axes=1), [], 18),
    "split18-num-outputs-uneven": (helper.make_node("Split", ["x"], ["y", "y2"], axis=-1, num_outputs=2), [], 18),
    "split18-sizes": (helper.make_node("Split", ["x", "sz"], ["y", "y2"], axis=1), [_i64("sz", [1, 2])], 18),
    "pad18-axes": (helper.make_node("Pad", ["x", "p", "", "ax"], ["y"]), [_i64("p", [1, 2]), _i64("ax", [-1])], 18),
    "pad19-reflect": (helper.make_node("Pad", ["x", "p"], ["y"], mode="reflect"), [_i64("p", [0, 0, 1, 0, 0, 2])], 19),
    "trilu-lower": (helper.make_node("Trilu", ["x", "k"], ["y"], upper=0), [_i64("k", 1)], 17),
    "trilu-upper": (helper.make_node("Trilu", ["x"], ["y"]), [], 17),
    "cumsum-default": (helper.make_node("CumSum", ["x", "a"], ["y"]), [_i64("a", 1)], 17),
    "cumsum-reverse-exclusive": (helper.make_node("CumSum", ["x", "a"], ["y"], reverse=1, exclusive=1), [_i64("a", 2)], 17),
    "flatten-axis-rank": (helper.make_node("Flatten", ["x"], ["y"], axis=3), [], 17),
    "reshape-allowzero": (helper.make_node("Reshape", ["x", "s"], ["y"], allowzero=1), [_i64("s", [3, -1])], 20),
    "reshape-zero-copies": (helper.make_node("Reshape", ["x", "s"], ["y"]), [_i64("s", [0, -1])], 20),
    "isnan20": (helper.make_node("IsNaN", ["x"], ["y"]), [], 20),
}


@pytest.mark.parametrize("case", list(_OP_CASES))
def test_added_converters_match_onnxruntime(case):
    node, inits, opset = _OP_CASES[case]
    outputs = [onnx.ValueInfoProto(name=o) for o in node.output]  # untyped: onnxruntime infers them
    model = _single_op_model(node, [_f("x", [2, 3, 5])], outputs, inits, opset)
    x = np.random.default_rng(0).standard_normal((2, 3, 5)).astype(np.float32)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    out = import_onnx(model)(torch.from_numpy(x))
    out = out if isinstance(out, (tuple, list)) else (out,)
    assert len(out) == len(ref)
    for o, r in zip(out, ref):
        assert tuple(o.shape) == r.shape, case
        np.testing.assert_allclose(o.detach().numpy(), r, rtol=1e-5, atol=1e-6, err_msg=case)


def test_import_names_the_unsupported_op():
    node = helper.make_node("Col2Im", ["x", "s", "b"], ["y"], name="fold_1")
    model = _single_op_model(
        node, [_f("x", [1, 4, 9])], [_f("y", None)], [_i64("s", [4, 4]), _i64("b", [2, 2])], opset=18
    )
    with pytest.raises(OnnxError) as e:
        import_onnx(model)
    msg = e.value.message
    assert "Col2Im" in msg and "opset 18" in msg and "fold_1" in msg
    assert "dynamo=False" in e.value.hint and "analyze" in e.value.hint


def test_import_names_custom_domain_ops():
    node = helper.make_node("FusedMatMul", ["x", "x"], ["y"], domain="com.microsoft", name="fused")
    graph = helper.make_graph([node], "g", [_f("x", [2, 2])], [_f("y", [2, 2])])
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    with pytest.raises(OnnxError, match=r"FusedMatMul \[com\.microsoft opset 1\] at fused"):
        import_onnx(model)


def test_import_does_not_leave_torchvision_stub_behind():
    node = helper.make_node("NonMaxSuppression", ["b", "s"], ["y"], name="nms")
    model = _single_op_model(
        node,
        [_f("b", [1, 4, 4]), _f("s", [1, 1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, None)],
        opset=17,
    )
    try:
        importlib.import_module("torchvision")
        has_torchvision = True
    except Exception:
        has_torchvision = False
    if has_torchvision:
        pytest.skip("a working torchvision is installed: NMS converts normally")
    with pytest.raises(OnnxError, match="NonMaxSuppression.*torchvision.*nms"):
        import_onnx(model)
    tv = sys.modules.get("torchvision")
    assert tv is None or not getattr(tv, "__sparsecomp_stub__", False)


def test_import_keeps_input_names():
    model, _ = _hand_model()
    gm = import_onnx(model)
    x = torch.randn(3, 8)
    y_kw = gm(x=x)
    y_pos = gm(x)
    for a, b in zip(y_kw, y_pos):
        assert torch.equal(a, b)


def test_site_dataclass_public_fields():
    model, _ = _hand_model()
    site = onnx_weight_sites(model)[0]
    assert isinstance(site, OnnxWeightSite)
    assert {"name", "op", "node_name", "initializer", "weight", "bias"} <= set(site.__dataclass_fields__)
    assert "tensor(" not in repr(site)  # reprs stay one line: the weight is left out


def test_impose_onnx_refuses_a_sparsecomp_export():
    """sparsecomp's own export (marked by its `sparsecomp.layers` metadata) stores sparse layers
    compactly: imposing on its arrays would not be the layer's pattern."""
    model, _ = _hand_model()
    before = model.SerializeToString()
    onnx.helper.set_model_props(model, {"sparsecomp.layers": "[]"})
    with pytest.raises(OnnxError, match="is a sparsecomp export: its weights are stored in compact formats") as e:
        impose_onnx(model, "unstructured:0.5")
    assert "impose on the torch model" in e.value.hint
    del model.metadata_props[:]
    assert model.SerializeToString() == before  # untouched
    assert sorted(impose_onnx(model, "unstructured:0.5")) == ["gemm_const", "mm_cast", "mm_shared_a"]  # plain: imposed


def test_import_onnx_refuses_a_sparsecomp_export():
    """A sparsecomp export is already compiled: importing it to compile or optimise again would
    find nothing to work on, so it is refused with where to run it instead."""
    model, _ = _hand_model()
    onnx.helper.set_model_props(model, {"sparsecomp.layers": "[]"})
    with pytest.raises(OnnxError, match="is a sparsecomp export \\(already compiled\\)") as e:
        import_onnx(model)
    assert "sparsecomp bench FILE" in e.value.hint
