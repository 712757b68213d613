"""The sparsecomp:: op dialect helpers (sparsecomp/ops.py).

Ops cannot be unregistered, so every op defined here is named `_test_ops_*` and defined once
per process (module-scoped fixture).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
import torch.fx
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensorMode

from sparsecomp import ops
from sparsecomp.errors import SparsecompError

def _scaled_linear_ref(x: Tensor, weight: Tensor, scale: float) -> Tensor:
    """y = (x @ weight.T) * scale."""
    return (x @ weight.T) * scale


def _scaled_linear_fake(x, weight, scale):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _gather_sum_ref(x, idx, n):
    # explicit schema: idx holds columns of x to add up, n is checked against idx's width
    assert idx.shape[-1] == n
    return x[..., idx.long()].sum(dim=-1)


def _gather_sum_fake(x, idx, n):
    return x.new_empty((*x.shape[:-1], idx.shape[0]))


@pytest.fixture(scope="module")
def scratch_ops():
    if "_test_ops_scaled_linear" not in ops.registered_ops():
        ops.define_op("_test_ops_scaled_linear", reference=_scaled_linear_ref, fake=_scaled_linear_fake)
        ops.sparse_op(
            "sparsecomp::_test_ops_gather_sum", fake=_gather_sum_fake, schema="(Tensor x, Tensor idx, int n) -> Tensor"
        )(_gather_sum_ref)
    return torch.ops.sparsecomp._test_ops_scaled_linear, torch.ops.sparsecomp._test_ops_gather_sum


class UsesOps(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("weight", torch.randn(6, 8, generator=g))
        self.register_buffer("idx", torch.tensor([[0, 3], [5, 2], [1, 1]], dtype=torch.int32))

    def forward(self, x):
        y = torch.ops.sparsecomp._test_ops_scaled_linear(x, self.weight, 0.5)
        return torch.ops.sparsecomp._test_ops_gather_sum(torch.relu(y), self.idx, 2)


def _eager_reference(m, x):
    y = (x @ m.weight.T) * 0.5
    return torch.relu(y)[..., m.idx.long()].sum(dim=-1)


def test_define_registers_schema_and_reference(scratch_ops):
    lin, gsum = scratch_ops
    defs = ops.registered_ops()
    assert str(lin.default._schema) == "sparsecomp::_test_ops_scaled_linear(Tensor x, Tensor weight, float scale) -> Tensor"
    assert defs["_test_ops_scaled_linear"].schema == "(Tensor x, Tensor weight, float scale) -> Tensor"
    assert defs["_test_ops_scaled_linear"].doc.startswith("y = (x @ weight.T)")
    assert defs["_test_ops_gather_sum"].qualname == "sparsecomp::_test_ops_gather_sum"
    assert defs["_test_ops_gather_sum"].overload is gsum.default
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    torch.testing.assert_close(lin(x, w, 2.0), (x @ w.T) * 2.0)
    assert torch.equal(lin(x, w, 2.0), _scaled_linear_ref(x, w, 2.0))


def test_fake_impl_gives_shape_and_dtype(scratch_ops):
    lin, _ = scratch_ops
    with FakeTensorMode():
        x = torch.empty(7, 3, 8, dtype=torch.float16)
        w = torch.empty(5, 8, dtype=torch.float16)
        out = lin(x, w, 1.0)
    assert out.shape == (7, 3, 5) and out.dtype == torch.float16
    # torch's own consistency check between fake and real kernels
    torch.library.opcheck(
        lin.default, (torch.randn(2, 8), torch.randn(5, 8), 3.0), test_utils=("test_schema", "test_faketensor")
    )


def test_op_appears_in_fx_graph(scratch_ops):
    lin, gsum = scratch_ops
    gm = torch.fx.symbolic_trace(UsesOps())
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert lin in targets or lin.default in targets
    assert "sparsecomp._test_ops_gather_sum" in gm.code
    x = torch.randn(4, 8)
    torch.testing.assert_close(gm(x), _eager_reference(gm, x))


def test_export_with_dynamic_batch(scratch_ops):
    lin, gsum = scratch_ops
    m = UsesOps()
    batch = torch.export.Dim("batch")
    ep = torch.export.export(m, (torch.randn(4, 8),), dynamic_shapes={"x": {0: batch}}, strict=False)
    nodes = [n for n in ep.graph.nodes if n.op == "call_function" and ops.is_sparsecomp_op(n.target)]
    assert [n.target for n in nodes] == [lin.default, gsum.default]
    # the fake impl propagated a symbolic batch dimension through both ops
    out_val = nodes[-1].meta["val"]
    assert isinstance(out_val.shape[0], torch.SymInt) and out_val.shape[1] == 3
    for b in (1, 9):
        x = torch.randn(b, 8)
        torch.testing.assert_close(ep.module()(x), _eager_reference(m, x))
    assert "sparsecomp._test_ops_scaled_linear" in str(ep.graph_module.code)


def test_run_on_reference_calls_references(scratch_ops, monkeypatch):
    m = UsesOps()
    batch = torch.export.Dim("batch")
    ep = torch.export.export(m, (torch.randn(2, 8),), dynamic_shapes={"x": {0: batch}}, strict=False)
    gm = ep.module()
    x = torch.randn(5, 8)
    # swap the recorded reference for a tracking one: run_on_reference must call the registry's
    # reference directly, not whatever kernel the dispatcher holds for the op
    seen = []

    def tracking_ref(x, weight, scale):
        seen.append(tuple(x.shape))
        return _scaled_linear_ref(x, weight, scale)

    od = ops.op_def("_test_ops_scaled_linear")
    monkeypatch.setitem(ops._REGISTRY, od.name, dataclasses.replace(od, reference=tracking_ref))
    out = ops.run_on_reference(gm, x)
    assert seen == [(5, 8)]
    out = out[0] if isinstance(out, (tuple, list)) else out
    torch.testing.assert_close(out, _eager_reference(m, x))


def test_reference_lookup_forms(scratch_ops):
    lin, gsum = scratch_ops
    for key in (
        "_test_ops_scaled_linear",
        "sparsecomp::_test_ops_scaled_linear",
        "sparsecomp._test_ops_scaled_linear.default",
        lin,
        lin.default,
    ):
        assert ops.reference_impl(key) is _scaled_linear_ref
    assert ops.reference_impl(gsum.default) is _gather_sum_ref
    assert ops.op_def("_test_ops_gather_sum").fake is _gather_sum_fake
    assert ops.is_sparsecomp_op(lin.default) and ops.is_sparsecomp_op(lin)
    assert not ops.is_sparsecomp_op(torch.ops.aten.add.Tensor)
    assert not ops.is_sparsecomp_op(torch.relu)
    assert not ops.is_sparsecomp_op("_test_ops_scaled_linear")  # node targets are never strings here
    with pytest.raises(SparsecompError) as ei:
        ops.reference_impl("no_such_op")
    assert "_test_ops_scaled_linear" in ei.value.hint
    with pytest.raises(SparsecompError):
        ops.reference_impl(torch.ops.aten.add.Tensor)


def test_redefinition_is_a_clear_error(scratch_ops):
    with pytest.raises(SparsecompError) as ei:
        ops.define_op("_test_ops_scaled_linear", reference=_scaled_linear_ref, fake=_scaled_linear_fake)
    assert "already defined" in ei.value.message and ei.value.hint
    with pytest.raises(SparsecompError):
        ops.define_op("sparsecomp::_test_ops_gather_sum", reference=_scaled_linear_ref, fake=_scaled_linear_fake)


def test_name_taken_outside_the_registry():
    if not hasattr(torch.ops.sparsecomp, "_test_ops_foreign"):
        torch.library.define("sparsecomp::_test_ops_foreign", "(Tensor x) -> Tensor")
    with pytest.raises(SparsecompError) as ei:
        ops.define_op("_test_ops_foreign", reference=lambda x: x.clone(), fake=lambda x: x.new_empty(x.shape))
    assert "already defined" in ei.value.message


@pytest.mark.parametrize(
    "name, schema, reference",
    [
        ("bad name", None, _scaled_linear_ref),
        ("a.b", None, _scaled_linear_ref),
        ("other::x", None, _scaled_linear_ref),
        ("_test_ops_bad_schema", "(Tensor x, ) -> ", _scaled_linear_ref),
        ("_test_ops_mutating", "(Tensor(a!) x, Tensor weight, float scale) -> ()", _scaled_linear_ref),
        ("_test_ops_wrong_names", "(Tensor a, Tensor b, float c) -> Tensor", _scaled_linear_ref),
        ("_test_ops_no_hints", None, lambda x, y: x + y),
    ],
)
def test_define_rejects_bad_declarations(name, schema, reference):
    with pytest.raises(SparsecompError):
        ops.define_op(name, schema, reference=reference, fake=_scaled_linear_fake)
    bare = name.split("::")[-1]
    assert bare not in ops.registered_ops()
    if bare.isidentifier():
        assert not hasattr(torch.ops.sparsecomp, bare), "a rejected declaration must not leak into torch"


def test_import_is_cheap():
    code = (
        "import sys, sparsecomp.ops; "
        "heavy = [m for m in ('onnx', 'onnxruntime', 'tvm', 'networkx', 'sparsecomp.formats', 'sparsecomp.patterns') "
        "if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
