"""Lowering for the torch backend: each `sparsecomp::sparse_linear` becomes the fastest measured kernel.

Lowering table:

    sparsecomp.sparse_linear(x, W, b)  ->  call_module SparseLinear (chosen kernel) | aten.linear (dense)
    aten.gelu(sparse_linear(x, W, b))  ->  call_module SparseLinear (chosen kernel, GELU in its epilogue)

(The second row, epilogue fusion: when the chosen kernel is a TIR M > 1 kernel and the layer's
only consumer is an erf GELU, the kernel applies it to each output before storing it, which
saves torch's separate pass over the output: on bert-base seq 128 that pass cost ~0.4 ms per
FFN on one thread. The fused kernel is checked against F.gelu of the reference like any other.)

(At one row per call the candidates include the dense TIR GEMV, `tir-dense-mv`: a layer whose
zeros do not pay there may still beat torch's GEMV. It must win by `dense.MARGIN` and reports as
dense.)

For every sparse_linear node the backend:
1. records the node's real input on the example inputs (an `fx.Interpreter` run), so candidates are
   timed on the layer's true shape (M = rows per call) and true weights;
2. checks each candidate's output against `F.linear` on that input (max abs error <= 1e-4 x
   max|output|); a candidate that disagrees is dropped and the report says so;
3. times the survivors interleaved with the core harness (`sparsecomp.timing.compare`, bounded) and
   keeps the fastest, `dense` included: nothing sparse is chosen unless it wins;
4. caches the decision (`sparsecomp.cache.DecisionCache("torch")`, keyed by machine, shape, M,
   dtype and the weight's sparsity-pattern hash); a cached choice is re-verified, never trusted blindly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx

from sparsecomp.cache import DecisionCache, pattern_hash
from sparsecomp.dialect import SPARSE_LINEAR, sparse_linear_args
from sparsecomp.errors import SparsecompError
from sparsecomp.ir import compare_outputs, record_inputs
from sparsecomp.lowering import TIR_GEMV, LayerDecision, speedup_text
from sparsecomp.timing import ColdTiming, compare

from .dense import MARGIN as DENSE_MARGIN
from .kernels import Candidate, candidates, with_gelu
from .kernels import pool_tag as _pool_tag
from .kernels import flush_pause_s

__all__ = ["CANDIDATE_SET_VERSION", "KernelChoice", "LayerDecision", "SparseLinear", "choose_kernel", "lower_sparse_linear"]

CANDIDATE_SET_VERSION = 1  # bump when kernels change: old cached decisions no longer apply
SHORTLIST = 3  # kernels kept for later layers of the same shape and density


class SparseLinear(torch.nn.Module):
    """A lowered sparse_linear: runs the chosen kernel (its packed weight lives in the runner)."""

    def __init__(self, layer: str, kernel: str, runner, out_features: int):
        super().__init__()
        self.layer, self.kernel, self.out_features = layer, kernel, out_features
        self._runner = runner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Kernels are built for fp32 CPU tensors: anything else is a clear error, never a wrong answer.
        if x.dtype != torch.float32 or x.device.type != "cpu":
            raise SparsecompError(
                f"layer {self.layer} was compiled for float32 CPU inputs, got {str(x.dtype).replace('torch.', '')} on {x.device}",
                hint="cast the inputs to float32 on the CPU, or compile the model again for this dtype/device",
            )
        return self._runner(x)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, kernel={self.kernel}"


def _check(make, weight, bias, x, reference, rtol: float):
    """(runner or None, why): build the candidate and check it on the layer's real input."""
    try:
        runner = make(weight, bias)
        with torch.no_grad():
            out = runner(x)
    except Exception as err:  # a kernel that cannot run this shape is dropped, with the reason
        return None, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    ok, err, allowed = compare_outputs(out, reference, rtol=rtol)
    return (runner, "") if ok else (None, f"max abs error {err:.3g} > {allowed:.3g}")


@dataclass
class KernelChoice:
    """The measured kernel for one weight at one input shape (what `choose_kernel` decided)."""

    candidate: Candidate
    runner: object  # x -> x @ W.T + b
    dense_us: float
    chosen_us: float
    measured: dict = field(default_factory=dict)
    cached: bool = False
    notes: list = field(default_factory=list)


def choose_kernel(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor, *, layer: str,
                  cache: DecisionCache | None, max_seconds: float = 0.5, min_runs: int = 20, use_tir: bool = True,
                  rtol: float = 1e-4, only: set[str] | None = None, tune: bool = False,
                  shortlists: dict | None = None, flush: Callable[[], None] | None = None) -> KernelChoice:
    """Check every candidate kernel for `x @ weight.T + bias` on the real input `x`, time the
    survivors interleaved, keep the fastest (dense included) and cache the decision. Used for each
    `sparse_linear` node, and by the sparse-MLP lowering for the projections of a pruned MLP.

    `shortlists` (shared across calls) lets later weights of one shape, M and density time only
    the fastest kernels of the first. `flush`: called before every timed call (`timing.cache_flush`)
    to time the layer cold, as it runs inside a model whose weights exceed the cache; the decision
    is cached under its own key."""
    shortlists = {} if shortlists is None else shortlists
    m = x.numel() // x.shape[-1] if x.dim() else 1
    with torch.no_grad():
        reference = torch.nn.functional.linear(x, weight, bias)
    density = float((weight != 0).float().mean())
    key = None
    cands = candidates(weight, m, use_tir=use_tir, only=only, exhaustive=tune)
    by_label = {c.label: c for c in cands}
    chosen: Candidate | None = None
    cached = False
    measured: dict[str, float] = {}
    notes = []
    if cache is not None:
        phash = pattern_hash(weight)

        def key_for(labels, tuned):
            # `tuned`: tune's decisions (4x the time per layer) have their own key even where the
            # shortlist already is the whole grid, so `tune` after `compile` measures again
            return cache.key(op="sparse_linear", shape=list(weight.shape), m=m, dtype=str(weight.dtype),
                             pattern=phash, version=CANDIDATE_SET_VERSION, candidates=sorted(labels), cold=flush is not None,
                             pool=_pool_tag(), tuned=tune if tuned is None else tuned)

        key = key_for(by_label, None)
        lookups = [(key, by_label)]
        if not tune and only is None:  # a decision `tune` made for this layer beats the shortlist's
            full = {c.label: c for c in candidates(weight, m, use_tir=use_tir, exhaustive=True)}
            lookups.insert(0, (key_for(full, True), full))
        entry, i = cache.decision(lookups)
        if entry is not None:
            labels = lookups[i][1]
            chosen, cached = labels[entry["kernel"]], True
            measured = dict(entry.get("measured", {}))
            if labels is not by_label:
                notes.append("tuned decision (sparsecomp tune)")
    runners = {}
    if chosen is not None:
        runner, why = _check(chosen.make, weight, bias, x, reference, rtol)
        if runner is not None:
            runners[chosen.label] = runner
            dense_us, chosen_us = entry["dense_us"], entry["chosen_us"]
        else:
            notes.append(f"cached choice {chosen.label} failed verification ({why}); re-measured")
            chosen, cached = None, False
    family = (tuple(weight.shape), m, round(density, 2))
    nonfinite = chosen is None and not bool(torch.isfinite(x).all()) and any(c.name == "dense" for c in cands)
    if nonfinite:
        # A NaN / Inf reaching this layer (from an earlier one) cannot be checked against: a
        # skipped zero weight does not spread it as 0 x NaN does in the dense product, so every
        # sparse candidate would "disagree" (one dropped note each). Dense, said once.
        cands = [c for c in cands if c.name == "dense"]
        notes.append("the layer's input holds NaN / Inf on the example inputs (from an earlier layer): sparse kernels "
                     "skip zero weights and so do not spread them as the dense product does; kept dense")
    if chosen is None:
        trial = cands
        if family in shortlists and not tune:
            trial = [c for c in cands if c.label in shortlists[family] or c.name == "dense"]
            notes.append(f"searched the {len(trial) - 1} fastest kernels of an earlier layer of this shape and density")
        for c in trial:
            runner, why = _check(c.make, weight, bias, x, reference, rtol)
            if runner is not None:
                runners[c.label] = runner
            else:
                notes.append(f"{c.label} dropped: {why[:120]}")
        xs = x
        times = compare({k: (lambda r=r: r(xs)) for k, r in runners.items()}, min_runs=min_runs, max_seconds=max_seconds,
                        between=flush)
        measured = {k: v.median * 1e6 for k, v in times.items()}
        if not measured:
            raise SparsecompError(f"layer {layer}: no candidate kernel could run it ({'; '.join(notes)})",
                                  hint="include 'dense' among the kernels")
        best = min(measured, key=measured.get)
        if best == TIR_GEMV and "dense" in measured and measured[best] * DENSE_MARGIN >= measured["dense"]:
            best = min((k for k in measured if k != TIR_GEMV), key=measured.get)  # as in dense.py: must win by the margin
        chosen = by_label[best]
        if family not in shortlists and not nonfinite:  # (nor is it a shortlist for the layer's kin)
            shortlists[family] = sorted((k for k in measured if k != "dense"), key=measured.get)[:SHORTLIST]
        dense_us, chosen_us = measured.get("dense", float("nan")), measured[best]
        if cache is not None and not nonfinite:  # (a decision forced by this input's NaN is not the layer's)
            cache.put(key, {"kernel": best, "dense_us": dense_us, "chosen_us": chosen_us, "measured": measured})
    return KernelChoice(chosen, runners[chosen.label], dense_us, chosen_us, measured, cached, notes)


def lower_sparse_linear(gm: fx.GraphModule, example: tuple[tuple, dict], *, cache: DecisionCache | None,
                        max_seconds: float = 0.5, min_runs: int = 20, use_tir: bool = True, rtol: float = 1e-4,
                        only: set[str] | None = None, progress=None, tune: bool = False) -> list[LayerDecision]:
    """Replace every sparse_linear node of `gm` by its measured choice; returns the decisions.

    `tune`: time every kernel variant of the grid (not the cost model's shortlist), for every layer
    (no shortlist shared between layers of one shape). A tuned decision is cached under its own key
    and preferred by later untuned compiles of the same layer (`sparsecomp tune`, then `compile`).
    """
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and str(n.target) == SPARSE_LINEAR]
    if not nodes:
        return []
    inputs = record_inputs(gm, nodes, example)
    decisions = []
    lowered_weights: set[str] = set()
    # Layers of one shape, rows per call and density (e.g. the 12 encoder blocks of a BERT) rank the
    # kernels alike: the first one searches every candidate, the others only its fastest few. This
    # cut compile time several-fold (each candidate costs an LLVM build and a check) at no measured loss.
    shortlists: dict[tuple, list[str]] = {}
    cold = ColdTiming(gm, pause_s=flush_pause_s())
    for i, node in enumerate(nodes):
        layer, weight, bias = sparse_linear_args(gm, node)
        x = inputs[node]
        m = x.numel() // x.shape[-1] if x.dim() else 1
        density = float((weight != 0).float().mean())
        flush = cold.flush(m, weight.numel() * weight.element_size())  # see `timing.ColdTiming`
        choice = choose_kernel(weight, bias, x, layer=layer, cache=cache, max_seconds=max_seconds, min_runs=min_runs,
                               use_tir=use_tir, rtol=rtol, only=only, tune=tune, shortlists=shortlists,
                               flush=flush)
        chosen, notes, dense_us, chosen_us = choice.candidate, choice.notes, choice.dense_us, choice.chosen_us
        measured, cached = choice.measured, choice.cached
        if chosen.fmt == "dense":
            reason = "dense is fastest (measured)" if len(measured) > 1 else "no sparse kernel could run it"
            reason = "; ".join([reason, *notes])
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(torch.ops.aten.linear.default, tuple(node.args))
        else:
            lead = (f"the zeros do not pay at one row; the TIR GEMV measured {dense_us / chosen_us:.2f}x faster than torch's"
                    if chosen.fmt == "dense-tir" else speedup_text(dense_us, chosen_us))
            runner, gelu = choice.runner, _gelu_consumer(node)
            if gelu is not None:
                fused, fused_runner, why = _fuse_gelu(chosen, weight, bias, x, rtol)
                if fused is not None:
                    chosen, runner = fused, fused_runner
                    notes.append("GELU fused into the kernel's epilogue")
                else:
                    if why:  # an epilogue exists for this kernel but failed its check
                        notes.append(f"GELU left to torch: {why}")
                    gelu = None
            reason = "; ".join([lead, *notes])
            name = f"sparse_{i}_{layer.replace('.', '_')}"
            gm.add_submodule(name, SparseLinear(layer, chosen.label, runner, weight.shape[0]))
            lowered_weights.add(node.args[1].target)
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(name, (node.args[0],))
            if gelu is not None:  # the module now returns gelu(linear): it takes the GELU's place
                gelu.replace_all_uses_with(new)
                gm.graph.erase_node(gelu)
        new.meta.update(node.meta)
        new.meta["sparsecomp.rule"] = f"sparse_linear->{chosen.label}"
        new.meta["sparsecomp.decision"] = {"kernel": chosen.label, "speedup": round(dense_us / chosen_us, 2) if chosen_us else None}
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        decisions.append(LayerDecision(layer, list(weight.shape), m, density, "dense" if chosen.fmt in ("dense", "dense-tir") else "sparse",
                                       chosen.label, dense_us, chosen_us, reason, cached, measured))
        if progress is not None:
            progress(i + 1, len(nodes), layer)
    _drop_unused_weights(gm, lowered_weights)
    gm.graph.lint()
    gm.recompile()
    return decisions


def _gelu_consumer(node: fx.Node) -> fx.Node | None:
    """The erf GELU that is `node`'s only consumer, if any (a fusable epilogue)."""
    if len(node.users) != 1:
        return None
    (user,) = node.users
    if user.op != "call_function" or user.target is not torch.ops.aten.gelu.default or user.args[0] is not node:
        return None
    approximate = user.kwargs.get("approximate", user.args[1] if len(user.args) > 1 else "none")
    return user if approximate == "none" else None


def _fuse_gelu(chosen: Candidate, weight, bias, x, rtol: float):
    """(candidate, runner, "") with GELU in the chosen kernel's epilogue; (None, None, "") when the
    kernel has no epilogue; (None, None, why) when the fused kernel failed its check."""
    fused = with_gelu(chosen)
    if fused is None:
        return None, None, ""
    with torch.no_grad():
        reference = torch.nn.functional.gelu(torch.nn.functional.linear(x, weight, bias))
    runner, why = _check(fused.make, weight, bias, x, reference, rtol)
    return (fused, runner, "") if runner is not None else (None, None, why)


def _drop_unused_weights(gm: fx.GraphModule, targets: set[str]) -> None:
    """Free the dense weights of layers now run by a kernel (which holds a packed copy)."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and node.target in targets and not node.users:
            gm.graph.erase_node(node)
    still_read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for target in targets - still_read:
        owner, _, attr = target.rpartition(".")
        delattr(gm.get_submodule(owner) if owner else gm, attr)
