"""`sparse-linear`: constant-weight matmuls whose weight is sparse enough become
`sparsecomp::sparse_linear` (backend-neutral; the backend's lowering picks format and kernel by
measurement, and may still keep a layer dense when nothing sparse pays).

Rules (one per matched shape; the rule name lands in each new node's provenance):
- `linear`:  aten.linear(x, W, b)              -> sparse_linear(x, W, b)
- `addmm`:   aten.addmm(b, x, t(W))            -> sparse_linear(x, W, b)
- `matmul`:  aten.matmul/mm(x, W_in_out)       -> sparse_linear(x, W_in_out^T, None)
             (the transposed copy is stored as a new attribute `<name>_sparsecomp_wt`)
- `conv1x1`: aten.conv2d(x, W[o, i, 1, 1], b) with stride 1, no padding, dilation 1, groups 1
             -> permute(sparse_linear(permute(x, NHWC), W[o, i], b), NCHW)
             (the [o, i] view is stored as `<name>_sparsecomp_w2d`)
Other convolutions are left alone.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.fx as fx

from sparsecomp import dialect, patterns
from sparsecomp.ir import get_attr_value, linear_sites
from sparsecomp.passes.analysis.analyze_weights import META_KEY as WEIGHTS_KEY
from sparsecomp.passes.analysis.analyze_weights import parse_nm_list, weight_stats
from sparsecomp.registry import Bounds, PassResult, register_pass

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
def sparse_linear(gm, ctx, *, min_sparsity: Annotated[float, Bounds(0, 1)] = 0.5, nm: str = "2:4,4:8",
                  min_features: Annotated[int, Bounds(lo=1)] = 16) -> PassResult:
    """Replace matmuls with a sparse-enough constant fp32 weight by `sparsecomp::sparse_linear`.

    Requires: an ATen-level graph (`sparsecomp.capture`); reads `node.meta["sparsecomp.weights"]`
      from `analyze-weights` when present (else measures the weight itself).
    Ensures: every linear / addmm / matmul node (`x @ W` and `x @ W.t()` alike) whose constant
      2-D fp32 weight has at least `min_features` rows and columns and sparsity >= min_sparsity
      (inclusive) or is N:M-conformant (patterns in `nm`) is replaced by
      `sparsecomp.sparse_linear(x, W[out, in], bias)` computing the same values; so is a 1x1,
      stride-1, ungrouped conv2d, between two permutes (NCHW -> NHWC -> NCHW). Each new node
      carries `sparsecomp.weights` (the analysed facts) and the reason in `sparsecomp.sparse_linear`.
      Every other node is untouched; `ctx.results["sparse-linear"]` lists (layer, rewritten?,
      reason) for every call_function site, kept dense ones (other dtypes, small or not sparse
      enough, other convolutions) with why. Graphs imported from ONNX keep their layers as
      onnx2torch modules, which this pass does not rewrite.
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
        if node.op != "call_function":
            continue
        if site.kind == "conv" and not _is_pointwise_conv2d(gm, node):
            k = "x".join(str(v) for v in site.weight(gm).shape[2:])
            decisions.append((site.name, False, f"convolution {k} (only 1x1, stride-1, ungrouped ones become sparse_linear)"))
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
        if site.kind == "conv":
            _rewrite_conv1x1(gm, node, site, w2, stats, name, reason)
            rewritten += 1
            continue
        with graph.inserting_before(node):
            if site.transposed:  # x @ W stored [in, out]: keep a contiguous [out, in] copy
                attr = site.weight_target.replace(".", "_") + "_sparsecomp_wt"
                gm.register_buffer(attr, get_attr_value(gm, site.weight_target).detach().t().contiguous())
                w_node = graph.get_attr(attr)
                w_node.meta["val"] = w2
                w_node.meta["sparsecomp.rule"] = "matmul"
                rule = "matmul"
            else:  # stored [out, in]: read directly, or through the transpose that `x @ W.t()` applies
                w_arg = node.args[2] if node.target is aten.addmm.default else node.args[1]
                w_node = w_arg if w_arg.op == "get_attr" else w_arg.args[0]
                rule = "addmm" if node.target is aten.addmm.default else site.kind
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


def _is_pointwise_conv2d(gm, node: fx.Node) -> bool:
    """conv2d with a 1x1 kernel, stride 1, no padding, dilation 1, groups 1 (a per-pixel Linear)."""
    if node.target is not aten.conv2d.default:
        return False
    w = get_attr_value(gm, node.args[1].target)
    args = list(node.args) + [None] * (7 - len(node.args))
    stride, padding, dilation, groups = (args[3] or [1, 1]), (args[4] or [0, 0]), (args[5] or [1, 1]), (args[6] or 1)
    return (w.dim() == 4 and tuple(w.shape[2:]) == (1, 1) and list(stride) == [1, 1] and list(padding) == [0, 0]
            and list(dilation) == [1, 1] and groups == 1)


def _rewrite_conv1x1(gm, node: fx.Node, site, w2: torch.Tensor, stats, name: str, reason: str) -> None:
    graph = gm.graph
    attr = site.weight_target.replace(".", "_") + "_sparsecomp_w2d"
    gm.register_buffer(attr, w2.contiguous())
    x, bias = node.args[0], node.args[2] if len(node.args) > 2 else None
    with graph.inserting_before(node):
        w_node = graph.get_attr(attr)
        nhwc = graph.call_function(aten.permute.default, (x, [0, 2, 3, 1]))
        lin = graph.call_function(dialect.sparse_linear.default, (nhwc, w_node, bias))
        out = graph.call_function(aten.permute.default, (lin, [0, 3, 1, 2]))
    val = node.meta.get("val")
    if val is not None:
        out.meta["val"] = val
        lin.meta["val"] = val.permute(0, 2, 3, 1)
        nhwc.meta["val"] = x.meta["val"].permute(0, 2, 3, 1) if "val" in x.meta else None
    w_node.meta["val"] = w2
    for n in (w_node, nhwc, lin, out):
        n.meta["sparsecomp.rule"] = "conv1x1"
        n.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
    lin.meta[WEIGHTS_KEY] = stats
    lin.meta["sparsecomp.sparse_linear"] = {"layer": name, "reason": reason}
    node.replace_all_uses_with(out)
    graph.erase_node(node)
