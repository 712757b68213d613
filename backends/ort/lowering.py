"""Per-layer choice for the ORT backend, measured in onnxruntime itself.

For every `sparse_linear` node:
1. record the node's real input on the example inputs (an `fx.Interpreter` run), so candidates
   are timed at the layer's true shape (M = rows per call) with its true weights;
2. build each candidate (`kernels.candidates`: dense, dead rows/cols removed, ell / sell, block
   formats the weight's occupancy allows) as a one-layer ONNX model, run it in an
   InferenceSession (the same session options as the final model, on the shared thread pool) and
   check it against `F.linear` within 1e-4 x max|output|; a candidate that disagrees or cannot
   run is dropped with the reason. Gathers that would materialise more than
   `kernels.MAX_GATHER_BYTES` are not even built (cost model: prune only);
3. time the survivors interleaved (`sparsecomp.timing.compare`, bounded by `max_seconds`; the 10th
   percentile, robust to other work on the machine) and keep the fastest, dense included: nothing
   sparse is chosen unless it beats dense by `SPARSE_MARGIN` in onnxruntime. When the model's
   weights exceed the last-level cache, each candidate is timed on enough copies of the layer to
   stream its arrays from memory, as the whole model does (`copies_for`);
4. cache the choice in `DecisionCache("ort")` (key: machine, onnxruntime version, threads, shape,
   M, dtype, the weight's sparsity-pattern hash, the candidate set); a cached choice is rebuilt
   and re-checked on the layer's input before it is used, never trusted blindly.

A layer that runs dense stores its weight compactly when that is smaller (`kernels.storage_choice`:
same run time, onnxruntime rebuilds W^T once at load).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import fx

from sparsecomp.cache import DecisionCache, pattern_hash
from sparsecomp.dialect import SPARSE_LINEAR, sparse_linear_args
from sparsecomp.errors import SparsecompError
from sparsecomp.ir import compare_outputs, record_inputs
from sparsecomp.lowering import LayerDecision, speedup_text
from sparsecomp.timing import cold_copies, compare, model_is_cold

from . import kernels as K
from .export import Placement
from .runner import session, threads

__all__ = ["CANDIDATE_SET_VERSION", "LinearChoice", "choose_linear", "decide_layers", "layer_model", "run_candidate", "time_candidates"]

CANDIDATE_SET_VERSION = 2  # bump when kernels or their timing change: old cached decisions no longer apply (2: candidates timed spinning within a run)
SHORTLIST = 2  # sparse kernels kept for later layers of the same shape, M and density
SPARSE_MARGIN = 1.05  # a sparse lowering must beat dense by 5% (timing noise must not flip a layer)


def layer_model(cand: K.Candidate, x_shape: list[int], opset: int = 20, copies: int = 1):
    """A one-layer ONNX model running `cand` on an input of `x_shape` (for timing and tests);
    with `copies` > 1, that many independent copies of the layer (outputs y, y1, y2, ...)."""
    from onnx import TensorProto, helper

    nodes, inits, outs = [], [], []
    for k in range(copies):
        e = K.Emitter("layer" if k == 0 else f"layer{k}")
        y = "y" if k == 0 else f"y{k}"
        cand.emit(e, "x", y)
        nodes += e.nodes
        inits += e.initializers
        outs.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, [*x_shape[:-1], int(cand.shape[0])]))
    g = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))], outs, inits)
    # The lowest IR version the opset allows, not onnx's newest: an onnxruntime older than the onnx
    # package (ORT 1.30 beside onnx 1.23.1) refuses IR versions it does not know.
    opsets = [helper.make_opsetid("", opset)]
    return helper.make_model(g, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))


def copies_for(cand: K.Candidate, cold: bool, m: int) -> int:
    """How many copies of a layer to cycle through per timed call so its arrays come from memory,
    not cache, as they do in a model whose weights exceed the last-level cache (a 9 MB dense layer
    timed alone stays in a 32 MB L3 and looks 2-3x faster at M = 1 than it runs in bert or opt).
    Only where memory decides (M <= COLD_MAX_M): a GEMM over more rows is compute-bound, and
    copies would only multiply the compile time."""
    if not cold or m > COLD_MAX_M:
        return 1
    return cold_copies(cand.stored_bytes, MAX_COPIES)


MAX_COPIES = 32
COLD_MAX_M = 16


def run_candidate(cand: K.Candidate, x: torch.Tensor, reference: torch.Tensor, opset: int, copies: int = 1):
    """(callable, why): a session running the candidate (`copies` times per call), checked on the
    layer's real input."""
    try:
        sess = session(layer_model(cand, list(x.shape), opset, copies), spinning="run")  # timed side by side
        feed = {"x": x.numpy()}
        out = torch.from_numpy(sess.run(["y"], feed)[0])
    except Exception as err:  # noqa: BLE001 - a candidate that cannot run this shape is dropped, with the reason
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return None, f"{type(err).__name__}: {first[:160]}"
    ok, err, allowed = compare_outputs(out, reference)
    if not ok:
        return None, f"max abs error {err:.3g} > {allowed:.3g}"
    return (lambda: sess.run(None, feed)), ""


def time_candidates(trial: list[K.Candidate], x: torch.Tensor, reference: torch.Tensor, *, opset: int, cold: bool, m: int,
                    max_seconds: float, min_runs: int, notes: list[str]) -> tuple[dict[str, float], str | None]:
    """Check each candidate on the layer's real input (dropped, with the reason in `notes`, if it
    disagrees or cannot run), time the survivors interleaved and return (measured us per
    candidate, the fastest label; None if none runs). A sparse candidate must beat dense by
    `SPARSE_MARGIN` (shared by every op this backend lowers)."""
    copies, runners = {}, {}
    for c in trial:
        copies[c.label] = copies_for(c, cold, m)
        fn, why = run_candidate(c, x, reference, opset, copies[c.label])
        if fn is not None:
            runners[c.label] = fn
        else:
            notes.append(f"{c.label} dropped: {why}")
    if not runners:
        return {}, None
    times = compare(runners, min_runs=min_runs, max_seconds=max_seconds)
    # The low decile, not the median: on a machine shared with other work, contention only
    # ever adds time, and the 10th percentile of interleaved runs is what the kernel costs.
    measured = {k: v.p10 * 1e6 / copies[k] for k, v in times.items()}
    best = min(measured, key=measured.get)
    if best != "dense" and "dense" in measured and measured[best] > measured["dense"] / SPARSE_MARGIN:
        notes.append(f"{best} was within {SPARSE_MARGIN - 1:.0%} of dense: kept dense")
        best = "dense"
    return measured, best


@dataclass
class LinearChoice:
    """The measured ONNX lowering of one weight at one input shape (`choose_linear`)."""

    candidate: K.Candidate  # for a layer that runs dense: its storage choice (plain or compact)
    m: int
    density: float
    dense_us: float
    chosen_us: float
    measured: dict
    cached: bool
    reason: str


def cached_decision(cache: DecisionCache, key: str, tuned_key: str | None, by_label: dict, notes: list[str]) -> dict | None:
    """The cached decision for `key`, preferring the one `tune` made under `tuned_key` (it timed
    every candidate, with more time: it beats a compile's shortlist); None when neither is cached."""
    entry, i = cache.decision([(tuned_key, by_label), (key, by_label)] if tuned_key is not None else [(key, by_label)])
    if entry is not None and tuned_key is not None and i == 0:
        notes.append("tuned decision (sparsecomp tune)")
    return entry


def choose_linear(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor, *, layer: str,
                  cache: DecisionCache | None, cold: bool, opset: int, max_seconds: float = 0.5, min_runs: int = 20,
                  only: set[str] | None = None, shortlists: dict | None = None, tune: bool = False) -> LinearChoice:
    """Build, check and time every candidate lowering of `x @ weight.T + bias` on the real input
    `x` in onnxruntime, keep the fastest (a sparse one must beat dense by `SPARSE_MARGIN`), cache
    it. Used for each `sparse_linear` node and for the projections of a pruned MLP (`mlp.py`).
    `shortlists` (shared across calls): later weights of one shape, M and density time only the
    fastest candidates of the first. `tune`: every candidate for every layer (no shortlist), under
    its own cache key (so it measures again after a compile); an untuned compile then prefers a
    tuned decision for the layer."""
    import onnxruntime

    shortlists = {} if shortlists is None else shortlists
    if weight.dtype != torch.float32 or x.dtype != torch.float32:
        raise SparsecompError(f"layer {layer}: the ort backend lowers float32 layers only, got {weight.dtype}",
                              hint="the sparse-linear rewrite keeps other dtypes dense; check the pipeline")
    m = x.numel() // x.shape[-1] if x.dim() else 1
    with torch.no_grad():
        reference = torch.nn.functional.linear(x, weight, bias)
    density = float((weight != 0).float().mean()) if weight.numel() else 0.0
    notes: list[str] = []
    pruned: list[str] = []
    cands = K.candidates(weight, bias, only=only, m=m, pruned=pruned)
    if pruned:
        notes.append(f"not timed (gathers > {K.MAX_GATHER_BYTES >> 20} MB per call at M={m}): " + ", ".join(pruned))
    if not cands:  # `only` allowed nothing that runs this layer: dense, and say why
        cands = [K.by_label(weight, bias, "dense")]
        notes.append(f"no allowed kernel ({', '.join(sorted(only or []))}) fits this layer")
    by_label = {c.label: c for c in cands}
    key, entry, chosen, cached, measured = None, None, None, False, {}
    if cache is not None:
        def key_for(tuned: bool):
            return cache.key(op="sparse_linear", shape=list(weight.shape), m=m, dtype=str(weight.dtype),
                             pattern=pattern_hash(weight), version=CANDIDATE_SET_VERSION, candidates=sorted(by_label),
                             ort=onnxruntime.__version__, threads=threads(), bias=bias is not None, cold=cold,
                             **({"tuned": True} if tuned else {}))

        key = key_for(tune)
        entry = cached_decision(cache, key, key_for(True) if not tune and only is None else None, by_label, notes)
    if entry is not None:
        chosen = by_label[entry["kernel"]]
        fn, why = run_candidate(chosen, x, reference, opset)
        if fn is not None:
            cached, measured = True, dict(entry.get("measured", {}))
            dense_us, chosen_us = entry["dense_us"], entry["chosen_us"]
        else:
            notes.append(f"cached choice {chosen.label} failed verification ({why}); re-measured")
            chosen = None
    family = (tuple(weight.shape), m, round(density, 2))
    if chosen is None and len(cands) == 1:  # nothing to choose between: check it, time nothing
        fn, why = run_candidate(cands[0], x, reference, opset)
        if fn is None:
            raise SparsecompError(f"layer {layer}: lowering {cands[0].label} does not run in onnxruntime ({why})",
                                  hint="please report it; --debug shows the trace")
        chosen, dense_us, chosen_us = cands[0], 0.0, 0.0  # 0: not measured (shown as "-")
        notes.append("the only candidate left: not timed")
    if chosen is None:
        trial = cands
        if family in shortlists and not tune:
            trial = [c for c in cands if c.label in shortlists[family] or c.family == "dense"]
            notes.append(f"timed the {len(trial) - 1} fastest kernels of an earlier layer of this shape and density")
        measured, best = time_candidates(trial, x, reference, opset=opset, cold=cold, m=m, max_seconds=max_seconds,
                                         min_runs=min_runs, notes=notes)
        if best is None:
            raise SparsecompError(f"layer {layer}: no candidate lowering runs in onnxruntime ({'; '.join(notes)})",
                                  hint="please report it; --debug shows the trace")
        chosen = by_label[best]
        if family not in shortlists:
            shortlists[family] = sorted((k for k in measured if by_label[k].family != "dense"), key=measured.get)[:SHORTLIST]
        dense_us, chosen_us = measured.get("dense", float("nan")), measured[best]
        if cache is not None:
            cache.put(key, {"kernel": best, "dense_us": dense_us, "chosen_us": chosen_us, "measured": measured})
    if chosen.decision == "dense":
        stored = K.storage_choice(weight, bias)
        reason = "dense is fastest in onnxruntime (measured)" if len(measured) > 1 else "dense: no sparse lowering left to try"
        if stored.label != chosen.label:
            reason += f"; stored compactly ({stored.stored_bytes / 2**20:.2f} MiB instead of {chosen.stored_bytes / 2**20:.2f})"
        chosen = stored
    else:
        reason = speedup_text(dense_us, chosen_us, " in onnxruntime")
    reason = "; ".join([reason, *notes])
    return LinearChoice(chosen, m, density, dense_us, chosen_us, measured, cached, reason)


def decide_layers(gm: fx.GraphModule, example, *, cache: DecisionCache | None, max_seconds: float = 0.5,
                  min_runs: int = 20, only: set[str] | None = None, progress=None, opset: int = 20, tune: bool = False
                  ) -> tuple[dict[str, Placement], list[LayerDecision]]:
    """Measure and choose every sparse_linear node's lowering (the graph is not modified); `tune`:
    see `choose_linear`."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and str(n.target) == SPARSE_LINEAR]
    if not nodes:
        return {}, []
    inputs = record_inputs(gm, nodes, example)
    cold = model_is_cold(gm)
    placements: dict[str, Placement] = {}
    decisions: list[LayerDecision] = []
    shortlists: dict[tuple, list[str]] = {}
    for i, node in enumerate(nodes):
        layer, weight, bias = sparse_linear_args(gm, node)
        x = inputs[node]
        c = choose_linear(weight, bias, x, layer=layer, cache=cache, cold=cold, opset=opset, max_seconds=max_seconds,
                          min_runs=min_runs, only=only, shortlists=shortlists, tune=tune)
        chosen, m, density, dense_us, chosen_us = c.candidate, c.m, c.density, c.dense_us, c.chosen_us
        measured, cached, reason = c.measured, c.cached, c.reason
        decision = LayerDecision(layer, list(weight.shape), m, density, chosen.decision, chosen.label, dense_us, chosen_us,
                                 reason, cached, measured)
        placements[node.name] = Placement(node.name, layer, chosen, list(weight.shape),
                                          {"density": density, "m": m, "dense_us": dense_us, "chosen_us": chosen_us})
        decisions.append(decision)
        if progress is not None:
            progress(i + 1, len(nodes), layer)
    return placements, decisions


def stored_bytes(placements: dict[str, Placement]) -> int:
    return int(np.sum([p.candidate.stored_bytes for p in placements.values()])) if placements else 0
