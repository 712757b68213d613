"""Each ONNX lowering of sparse_linear, run in onnxruntime (graph optimizations on and off).

Three ways, as everywhere: numbers (every candidate equals F.linear on random shapes and edge
cases: all-zero rows and columns, an all-zero weight, a fully dense weight, odd shapes that do not
divide the block, no bias, dynamic batch 1 and 7 and another sequence length), graph structure
(which ONNX op types each candidate emits, and that its indices are stored narrow), and inputs
that must not match (a candidate whose arrays are damaged is caught by the check).
"""

import numpy as np
import onnx
import pytest
import torch
from sparsecomp.backends.ort import kernels as K
from sparsecomp.backends.ort.lowering import layer_model
from sparsecomp.backends.ort.runner import session

from sparsecomp import patterns


def weight(out_f, in_f, spec=None, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f)
    if spec:
        patterns.impose(lin, spec)
    return lin.weight.detach().clone(), lin.bias.detach().clone()


def run(cand, x, optimize=True):
    model = layer_model(cand, ["batch", "seq", x.shape[-1]] if x.dim() == 3 else ["rows", x.shape[-1]])
    return torch.from_numpy(session(model, optimize=optimize).run(None, {"x": x.numpy()})[0])


def assert_matches(cand, w, b, xs):
    for optimize in (True, False):
        for x in xs:
            ref = torch.nn.functional.linear(x, w, b)
            out = run(cand, x, optimize)
            assert out.shape == ref.shape
            tol = 1e-4 * max(float(ref.abs().max()), 1e-6)
            assert float((out - ref).abs().max()) <= tol, (cand.label, optimize, tuple(x.shape))


XS = [torch.randn(1, 1, 96), torch.randn(7, 3, 96), torch.randn(2, 5, 96)]  # batch 1 and 7, another seq length


def every(w, b):
    """Every candidate for w, plus the ones the pruning rules leave out (forced here)."""
    wn, bn = w.numpy(), None if b is None else b.numpy()
    cands = {c.label: c for c in K.candidates(w, b)}
    cands["dense-compact"] = K._dense(wn, bn, compact=True)
    cands.setdefault("ell", K._ell(wn, bn, 1))
    cands.setdefault("sell4", K._ell(wn, bn, 4))
    for r, c in ((16, 1), (4, 4), (5, 3)):  # 5x3 divides neither 160 nor 96: padded blocks
        for nb in (1, 4):
            cand = K._bsr(wn, bn, r, c, nb)
            cands[cand.label] = cand
    live = K._live(wn, bn)
    if live is not None:
        cands[live.label] = live
    return cands


@pytest.mark.parametrize("spec", ["unstructured:0.9", "block:16x1:0.9", "2:4"])
def test_every_candidate_matches_linear(spec):
    w, b = weight(160, 96, spec)
    with torch.no_grad():
        w[5] = 0  # an all-zero row (a dead output)
        w[:, 7] = 0  # an all-zero column (an unused input)
    cands = every(w, b)
    assert {"dense", "dense-compact", "ell", "sell4", "bsr16x1", "bsr5x3-b4"} <= set(cands)
    assert any(label.startswith("live") for label in cands)  # the dead row and column
    for cand in cands.values():
        assert_matches(cand, w, b, XS)


def test_edge_weights():
    # all zero (every row dead), fully dense, no bias, odd shapes, one output
    for w, b in [(torch.zeros(33, 96), torch.randn(33)), (weight(40, 96)[0], None), (weight(1, 96, "unstructured:0.5")[0], torch.randn(1))]:
        for cand in every(w, b).values():
            assert_matches(cand, w, b, XS[:2])


def test_two_dimensional_input_and_inf_weights():
    w, b = weight(64, 96, "unstructured:0.9")
    w[3, 4] = float("inf")  # kept exact, like any nonzero
    xs = [torch.randn(1, 96).abs() + 0.1, torch.randn(7, 96).abs() + 0.1]  # positive: inf stays inf, no NaN
    for cand in every(w, b).values():
        for x in xs:
            out, ref = run(cand, x), torch.nn.functional.linear(x, w, b)
            assert torch.equal(torch.isinf(out), torch.isinf(ref)), cand.label
            fin = torch.isfinite(ref)
            assert float((out[fin] - ref[fin]).abs().max()) <= 1e-4 * float(ref[fin].abs().max()), cand.label


OPS = {  # candidate -> op types it must emit (beyond shape plumbing)
    "dense": {"MatMul", "Add"},
    "dense-compact": {"ScatterElements", "Transpose", "MatMul", "Add", "Cast"},
    "ell": {"GatherElements", "Mul", "ReduceSum", "Add", "Cast"},
    "sell4": {"GatherElements", "Mul", "ReduceSum", "Concat", "Add", "Cast"},
    "bsr16x1": {"Gather", "MatMul", "Transpose", "Pad", "Cast"},  # the bias rides in the GEMM (a ones column)
    "bsr16x1-b4": {"Gather", "MatMul", "Concat", "Transpose", "Pad", "Cast"},
}
NEVER = {"dense": {"Gather", "GatherElements", "Cast"}, "ell": {"MatMul", "Gather"},
         "bsr16x1": {"GatherElements", "ReduceSum", "Add"}, "bsr16x1-b4": {"Add"}}


def test_graph_structure_and_narrow_storage():
    w, b = weight(160, 96, "block:16x1:0.9")
    cands = every(w, b)
    for label, want in OPS.items():
        model = layer_model(cands[label], ["batch", 96])
        onnx.checker.check_model(model, full_check=True)
        ops = {n.op_type for n in model.graph.node}
        assert want <= ops, (label, ops)
        assert not (NEVER.get(label, set()) & ops), (label, ops)
        if label != "dense":
            # indices into 96 inputs / 160 rows: uint8 on disk, Cast to int32 for Gather at run time
            idx = [t for t in model.graph.initializer if t.data_type in (onnx.TensorProto.UINT8, onnx.TensorProto.UINT16)]
            assert idx and not [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT64 and t.dims and t.dims[0] > 8]
    # one bucket per sell bucket: 4 GatherElements for the rows, 1 for the inverse row order
    assert sum(n.op_type == "GatherElements" for n in layer_model(cands["sell4"], ["b", 96]).graph.node) == 5
    assert sum(n.op_type == "GatherElements" for n in layer_model(cands["ell"], ["b", 96]).graph.node) == 1


def test_storage_is_compact_and_decodes_exactly():
    w, b = weight(768, 768, "unstructured:0.9")
    dense, compact = K._dense(w.numpy(), b.numpy(), compact=False), K._dense(w.numpy(), b.numpy(), compact=True)
    assert compact.stored_bytes < 0.2 * dense.stored_bytes  # fp32 values + uint16 columns, ~3% padding
    assert K.storage_choice(w, b).label == "dense-compact"
    assert K.storage_choice(*weight(64, 96)).label == "dense"  # a dense weight stays plain
    for label, cand in every(w, b).items():
        e = K.Emitter("L")
        cand.emit(e, "x", "y")
        arrays = {t.name: onnx.numpy_helper.to_array(t) for t in e.initializers}
        fam = cand.family
        layout = {"shape": [768, 768], "family": fam, "arrays": e.arrays,
                  "block": cand.block}
        np.testing.assert_array_equal(K.decode_weight(layout, arrays), w.numpy(), err_msg=label)


def test_damaged_storage_does_not_match():
    """The check that guards every candidate catches wrong arrays (a must-not-match input)."""
    from sparsecomp.backends.ort.lowering import run_candidate

    w, b = weight(64, 96, "unstructured:0.9")
    x = torch.randn(3, 96)
    ref = torch.nn.functional.linear(x, w, b)
    good = K._ell(w.numpy(), b.numpy(), 1)
    assert run_candidate(good, x, ref, 20)[0] is not None
    wrong = w.clone()
    wrong[0, wrong[0].nonzero()[0, 0]] += 1.0  # one stored value off
    fn, why = run_candidate(K._ell(wrong.numpy(), b.numpy(), 1), x, ref, 20)
    assert fn is None and "max abs error" in why


def test_block_shapes_follow_occupancy():
    w, _ = weight(256, 128, "block:16x1:0.9")
    shapes = [(r, c) for r, c, _ in K.block_shapes(w.numpy())]
    assert shapes[0] == (16, 1)  # lowest occupancy, then the larger block
    assert K.block_shapes(weight(256, 128, "unstructured:0.5")[0].numpy()) == []  # no block structure: none tried


def test_layer_models_declare_the_lowest_ir_version_of_their_opset():
    """onnxruntime 1.30 refuses IR version 14, which onnx 1.23 writes by default (seen on a
    machine with that pair): the timing models must declare the opset's minimum instead."""
    from onnx import helper

    w = torch.randn(8, 16)
    for opset in (16, 20):
        model = layer_model(K.candidates(w, None)[0], ["rows", 16], opset=opset)
        assert model.ir_version == helper.find_min_ir_version_for([helper.make_opsetid("", opset)]) < 14
