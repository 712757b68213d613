"""`sparse-linear`: constant-weight matmuls whose weight is sparse enough become
`sparsecomp::sparse_linear` (backend-neutral; the backend's lowering picks format and kernel by
measurement, and may still keep a layer dense when nothing sparse pays).

Rules (one per matched shape; the rule name lands in each new node's provenance):
- `linear`:  aten.linear(x, W, b)              -> sparse_linear(x, W, b)
- `addmm`:   aten.addmm(b, x, t(W))            -> sparse_linear(x, W, b)
- `matmul`:  aten.matmul/mm(x, W_in_out)       -> sparse_linear(x, W_in_out^T, None)
             (the transposed copy is stored as a new attribute `<name>_sparsecomp_wt`)
Convolutions are left alone for now (1x1 convolutions come with their NCHW lowering).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from sparsecomp import dialect, patterns
from sparsecomp.ir import get_attr_value, linear_sites
from sparsecomp.passes.analysis.analyze_weights import META_KEY as WEIGHTS_KEY
from sparsecomp.passes.analysis.analyze_weights import parse_nm_list, weight_stats
from sparsecomp.registry import PassResult, register_pass

__all__ = ["qualifies"]

aten = torch.ops.aten


def qualifies(density: float, nm_conformance: dict[str, float], min_sparsity: float) -> tuple[bool, str]:
    """(rewrite?, reason): sparsity >= min_sparsity (inclusive), or N:M-conformant."""
    sparsity = 1.0 - density
    conformant = [k for k, v in nm_conformance.items() if v == 1.0]
    if density == 0.0 or sparsity >= min_sparsity - 1e-12:
        return True, f"sparsity {sparsity:.1%} >= {min_sparsity:.0%}"
    if conformant and sparsity > 0:
        return True, f"{conformant[0]}-conformant"
    return False, f"sparsity {sparsity:.1%} < min_sparsity {min_sparsity:.0%}"


@register_pass("sparse-linear", kind="rewrite")
def sparse_linear(gm, ctx, *, min_sparsity: float = 0.5, nm: str = "2:4,4:8", min_features: int = 16) -> PassResult:
    """Replace matmuls with a sparse-enough constant fp32 weight by `sparsecomp::sparse_linear`.

    Requires: an ATen-level graph (`sparsecomp.capture`); reads `node.meta["sparsecomp.weights"]`
      from `analyze-weights` when present (else measures the weight itself).
    Ensures: every linear / addmm / matmul node whose constant 2-D fp32 weight has sparsity >=
      min_sparsity (inclusive) or is N:M-conformant (patterns in `nm`) is replaced by
      `sparsecomp.sparse_linear(x, W[out, in], bias)` computing the same values; the new node
      carries `sparsecomp.weights` (the analysed facts) and the reason in `sparsecomp.sparse_linear`.
      Every other node is untouched; `ctx.results["sparse-linear"]` lists (layer, rewritten?, reason).
    Options:
      min_sparsity: rewrite weights with at least this fraction of zeros (inclusive).
      nm: N:M patterns that qualify a weight whatever its sparsity, comma-separated.
      min_features: leave layers with fewer output or input features than this dense.
    """
    nm_list = parse_nm_list(nm)
    decisions = []
    rewritten = 0
    for site in linear_sites(gm):
        node = site.node
        if site.kind == "conv" or node.op != "call_function":
            continue
        w2 = site.weight_2d(gm)
        name = site.name
        if w2.dtype != torch.float32:
            decisions.append((name, False, f"dtype {str(w2.dtype).replace('torch.', '')} (fp32 kernels only)"))
            continue
        if min(w2.shape) < min_features:
            decisions.append((name, False, f"shape {list(w2.shape)} below min_features={min_features}"))
            continue
        stats = node.meta.get(WEIGHTS_KEY)
        if stats is None:
            stats = weight_stats(name, site.kind, w2, blocks=[], nm=nm_list)
        nmc = {f"{n}:{m}": stats.nm_conformance.get(f"{n}:{m}", patterns.nm_conformance(w2, n, m)) for n, m in nm_list}
        ok, reason = qualifies(stats.density, nmc, min_sparsity)
        decisions.append((name, ok, reason))
        if not ok:
            continue
        graph = gm.graph
        x = node.args[1] if node.target is aten.addmm.default else node.args[0]
        bias = None
        if node.target is aten.addmm.default:
            bias = node.args[0]
        elif site.kind == "linear":
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        with graph.inserting_before(node):
            if site.transposed:  # x @ W stored [in, out]: keep a contiguous [out, in] copy
                attr = site.weight_target.replace(".", "_") + "_sparsecomp_wt"
                gm.register_buffer(attr, get_attr_value(gm, site.weight_target).detach().t().contiguous())
                w_node = graph.get_attr(attr)
                w_node.meta["val"] = w2
                w_node.meta["sparsecomp.rule"] = "matmul"
                rule = "matmul"
            else:
                w_node = node.args[2].args[0] if node.target is aten.addmm.default else node.args[1]
                rule = "addmm" if node.target is aten.addmm.default else "linear"
            new = graph.call_function(dialect.sparse_linear.default, (x, w_node, bias))
        new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta", "nn_module_stack", "stack_trace")})
        new.meta[WEIGHTS_KEY] = stats
        new.meta["sparsecomp.sparse_linear"] = {"layer": name, "reason": reason}
        new.meta["sparsecomp.rule"] = rule
        old_w = node.args[2] if node.target is aten.addmm.default else node.args[1]
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        if isinstance(old_w, fx.Node) and old_w.op == "call_function" and not old_w.users:
            graph.erase_node(old_w)  # the transpose that fed addmm / matmul
        rewritten += 1
    ctx.results["sparse-linear"] = decisions
    return PassResult(rewritten > 0, {"rewritten": rewritten, "kept-dense": len(decisions) - rewritten})
