"""The ONNX Runtime backend: the rewritten graph as one standard-ONNX model, run by stock onnxruntime.

Lowering table (which sparsecomp op becomes what; `kernels.py` has the ONNX of each):

    sparsecomp.sparse_linear(x, W, b) -> one of, measured per layer in onnxruntime:
        dense        MatMul(x, W^T) + b   (W^T stored dense, or compact and rebuilt once at load)
        liveRxC      Gather(live cols) -> smaller MatMul -> Gather(row map) + b    (dead rows / cols)
        ell, sellK   GatherElements(x, cols) * values -> ReduceSum             (constant fan-in, M ~ 1)
        bsrRxC[-bK]  Gather(x^T blocks) -> batched MatMul(values) -> Transpose   (R x C blocks)
    sparsecomp.sparse_mlp(x, ...) -> one of, measured per MLP in onnxruntime (`mlp.py`):
        dense        Gemm(up) -> act [* act(gate)] [* keep-mask] -> Gemm(down)   (the op's reference)
        active       h as dense -> NonZero(union of active neurons) -> Gather(h's active neurons,
                     W_down^T rows) -> Gemm                                 (skips inactive down rows)
        predictor    low-rank predictor's keep-mask -> union -> Gather(W_up / W_gate rows) -> Gemm
                     -> act -> * keep -> Gather(W_down^T rows) -> Gemm      (skips both projections)
        pruned       (exact mode, a weight <= 70% nonzero) each projection on its own measured
                     sparse_linear lowering above, every neuron computed   (keeps the weight sparsity)
        (weights not constants: its reference, exported dense, with a note)
    self-attention whose q / k / v are block-format sparse_linear layers of one input (`attention.py`):
                 split heads -> SDPA -> merge (the exporter's, ~10 Transposes) -> one site lowered
                 from q^T / k^T / v^T as the block layers leave them: K^T per head is a view, Q
                 and P enter their MatMuls transposed (FusedMatMul in onnxruntime), the context
                 leaves as ctx^T for a block-format out-projection; an If picks the batch-1 branch
                 (no Transpose node) or the general one
    any other sparsecomp op
                 -> its reference implementation, decomposed to ATen and exported dense, with a
                    note naming the op and node in the report (`export._reference_decompositions`,
                    the spot a real lowering replaces); if it does not decompose: OnnxError naming them.

Shape of the package (the same as every backend):
- `kernels.py`: the candidate decompositions and their compact storage (values + narrow indices,
  Cast at run time, folded by onnxruntime at load);
- `lowering.py`: per-layer decisions timed in onnxruntime on one-layer models, cached in
  `DecisionCache("ort")`; `mlp.py`: the sparse_mlp candidates and their per-MLP decisions (same rules);
- `export.py`: FX -> ONNX (torch's exporter with a placeholder per sparse layer and attention
  site, replaced by the chosen nodes), metadata, checker; `attention.py`: the attention sites;
- `runner.py`: sessions with sparsecomp's thread setting (own pools, or one process-wide pool on
  request: `use_global_thread_pool`) and `OrtModule`, the runner `lower` returns;
- `files.py`: writing a model (external data above the protobuf limit) and reading a sparsecomp
  export back (stored weights for `analyze`, the dense equivalent for `bench`).
"""

from __future__ import annotations

from typing import Any

from torch import fx

from sparsecomp.dialect import SPARSE_LINEAR, SPARSE_MLP
from sparsecomp.lowering import Lowered

from .export import DEFAULT_OPSET, MIN_OPSET, export_graph
from .lowering import decide_layers
from .mlp import decide_mlps
from .runner import OUTPUT, OrtModule, fusion_choice, fusion_note, pool_note, session, threads, use_global_thread_pool

__all__ = ["DEFAULT_OPSET", "MIN_OPSET", "NAME", "OrtModule", "fusion_choice", "lower", "session", "threads", "use_global_thread_pool"]

NAME = "ort"


def _onnx_input(name: str, graph_inputs: set[str]) -> str | None:
    """The ONNX input a placeholder feeds: its own name, or `<name>_orig` where torch's exporter
    renamed an input the model also returns unchanged (an output took the name); None: dropped."""
    return name if name in graph_inputs else f"{name}_orig" if f"{name}_orig" in graph_inputs else None


def lower(gm, example, *, cache=None, max_seconds: float = 0.5, only=None, progress=None, opset: int | None = None,
          dynamic_axes: Any = "auto", tune: bool = False, **_other_backends_options) -> Lowered:
    """Choose every sparse layer's (and MLP's) lowering by timing in onnxruntime, export, and open a session.

    `tune`: time every candidate for every layer under its own cache key (`lowering.choose_linear`).
    `**_other_backends_options` (e.g. the torch backend's `use_tir`) are accepted and ignored, so
    `compile()` can pass one set of options to every backend.
    """
    from .export import check_opset

    opset = check_opset(opset)  # a bad opset fails before any measuring
    label = gm.meta.get("sparsecomp.model_name", "model")
    n_mlps = sum(1 for n in gm.graph.nodes if n.op == "call_function" and str(n.target) == SPARSE_MLP)
    n_linears = sum(1 for n in gm.graph.nodes if n.op == "call_function" and str(n.target) == SPARSE_LINEAR)

    def step(offset):  # one progress count over both kinds
        return None if progress is None else (lambda i, _n, layer: progress(offset + i, n_linears + n_mlps, layer))

    placements, decisions = decide_layers(gm, example, cache=cache, max_seconds=max_seconds, only=only,
                                          progress=step(0), opset=opset, tune=tune)
    mlp_placements, mlp_decisions = decide_mlps(gm, example, cache=cache, max_seconds=max_seconds, only=only,
                                                progress=step(n_linears), opset=opset, tune=tune)
    placements.update(mlp_placements)
    decisions = [*decisions, *mlp_decisions]
    notes: list[str] = []

    def exporter(*, opset=opset, dynamic_axes=dynamic_axes):
        model, info = export_graph(gm, example, placements, opset=opset, dynamic_axes=dynamic_axes, label=label, notes=notes)
        return model, info

    model, _ = exporter()
    sess = session(model)
    # The runner flattens a call as the captured graph does (its placeholders, in order); each
    # placeholder's target is the argument name, which is also the ONNX input's name. Inputs the
    # exporter dropped (unused by the graph) are not fed.
    graph_inputs = {i.name for i in model.graph.input}
    flat_names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    # forward()'s own parameter names (torch.export's codegen keeps them), so keyword calls bind
    # also to inputs the graph does not use or that are nested
    pytree_info = getattr(getattr(gm.graph, "_codegen", None), "pytree_info", None)
    arg_names = list(pytree_info.orig_args) if pytree_info is not None and getattr(pytree_info, "orig_args", None) else None
    # outputs that are not values of the graph (None, a number) have no ONNX output: put back per call
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    flat_out = out_node.args[0] if isinstance(out_node.args[0], (tuple, list)) else (out_node.args[0],)
    constants = [OUTPUT if isinstance(a, fx.Node) else a for a in flat_out]
    module = OrtModule(model, sess, in_spec=getattr(gm, "_in_spec", None), out_spec=getattr(gm, "_out_spec", None),
                       input_names=[_onnx_input(n, graph_inputs) for n in flat_names], label=label,
                       exporter=lambda **kw: exporter(**kw)[0], arg_names=arg_names,
                       out_constants=constants if any(c is not OUTPUT for c in constants) else None)
    for note in (pool_note(), fusion_note(model)):
        if note:
            notes.append(note)
    return Lowered(module, decisions, notes, artifacts={"onnx": model})
