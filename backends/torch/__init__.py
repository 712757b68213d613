"""The torch backend: the rewritten FX graph runs in PyTorch, sparse layers on measured kernels.

- `kernels.py`: the candidate kernels (dense `F.linear`, torch.sparse CSR, TVM TIR kernels).
- `lowering.py`: the lowering table (`sparse_linear` -> chosen kernel module or `aten.linear`),
  per-layer decisions by measurement, cached.
- `mlp.py`: `sparse_mlp` -> a `SparseMLP` module running the measured strategy (TIR kernels that
  skip inactive neurons, union of active neurons for M > 1 with a measured dense crossover).
- `dense.py`: the remaining dense `aten.linear` layers that see one row per call -> `TirDenseLinear`
  (the TIR GEMV) where it measures faster than torch's.
- runner: the lowered GraphModule itself (`lower` returns it ready to call).
"""

from __future__ import annotations

from sparsecomp.backends.tir import begin_transpose_reuse, end_transpose_reuse
from sparsecomp.ir import plain_call_convention
from sparsecomp.lowering import LayerDecision, Lowered

from .kernels import pool_tag, tir_available
from .lowering import SparseLinear, lower_sparse_linear
from .dense import KERNEL as DENSE_KERNEL
from .dense import TirDenseLinear, lower_dense_linear
from .mlp import SparseMLP, lower_sparse_mlp

__all__ = ["NAME", "lower", "LayerDecision", "SparseLinear", "SparseMLP", "TirDenseLinear", "tir_available"]

NAME = "torch"


def lower(gm, example, *, cache=None, max_seconds: float = 0.5, use_tir: bool = True, only=None,
          progress=None, tune: bool = False) -> Lowered:
    """Lower every sparsecomp op in `gm` (in place); the lowered graph is the runner.

    `tune`: search every kernel variant (see `lower_sparse_linear`)."""
    if use_tir:
        pool_tag()  # where the TIR kernels run; a misspelt SPARSECOMP_TIR_POOL fails here, naming it
    decisions = lower_sparse_linear(gm, example, cache=cache, max_seconds=max_seconds, use_tir=use_tir, only=only,
                                    progress=progress, tune=tune)
    decisions += lower_sparse_mlp(gm, example, cache=cache, max_seconds=max_seconds, use_tir=use_tir, only=only,
                                  progress=progress)
    if use_tir and tir_available() and (only is None or DENSE_KERNEL in only):  # `only`: a debugging set of kernels
        decisions += lower_dense_linear(gm, example, cache=cache, max_seconds=max_seconds, progress=progress)
    # Lowered layers leave their weights' get_attr nodes dead; the generated forward would still
    # fetch each one (a chain of nn.Module attribute lookups, ~1 ms per call for opt-125m-like).
    dead = [n for n in gm.graph.nodes if n.op == "get_attr" and not n.users]
    for node in dead:
        gm.graph.erase_node(node)
    if dead:
        gm.recompile()
    plain_call_convention(gm)  # no pytree flatten / unflatten per call where the signature is plain tensors
    if any(isinstance(m, SparseLinear) for m in gm.modules()):
        # the mm kernels may share one transpose of an input between layers within a forward, never
        # across calls (hooks only where they can matter: each one costs every call a few us)
        gm.register_forward_pre_hook(begin_transpose_reuse)
        gm.register_forward_hook(end_transpose_reuse, always_call=True)
    notes = []
    if use_tir and not tir_available():
        notes.append("TVM is not installed: sparse candidates were limited to torch.sparse CSR (pip install 'sparsecomp[tvm]')")
    elif use_tir and pool_tag() == "tvm" and any(isinstance(m, (SparseLinear, SparseMLP, TirDenseLinear)) for m in gm.modules()):
        from sparsecomp.backends.tir import pool_status

        notes.append(f"{pool_status()}: inside a model each kernel then waits for torch's OpenMP workers to give up the "
                     "cores (opt-125m-like's exact-mode MLPs: ~10% slower); see backends/tir/_pool.py")
    return Lowered(gm, decisions, notes)
