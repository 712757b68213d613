"""Self-attention whose q / k / v projections run a block format: lowered on transposed heads.

A block-format layer computes y^T `[out, M]` and pays a Transpose to hand back y `[M, out]`
(`kernels.Orientation`). Around self-attention the exported graph then transposes again: the
heads split of q, k and v (`view` + `transpose(1, 2)`), K^T inside the attention, and the merge of
the context (`transpose(1, 2)` + `reshape`). In 16x1-block bert-base at 128 tokens these are 10 of
the 13 Transposes of a layer (with the out-projection's Pad), ~0.3 ms of ~3.9 ms.

So where q, k and v are `sparse_linear` layers of one input lowered to a block format (`chains`),
the export (`fuse_sites`, on its own copy of the FX graph) replaces

    sdpa(split(q(x)), split(k(x)), split(v(x)), attn_mask) -> transpose(1, 2) -> reshape [B, S, H*D]

by one placeholder, `sparsecomp::ort_attention(q, k, v, mask, tag, heads, scale)` (exported as
`sparsecomp.placeholder::Attention`), and `emit` lowers it from q^T, k^T, v^T `[H*D, B*S]` as the
block layers leave them:

    If B == 1:  [H*D, S] -> Reshape [H, D, S]                        (Q^T, K^T, V^T per head: views)
    else:       [H*D, B*S] -> Reshape [H, D, B, S] -> Transpose [H, B, D, S]
    scores = MatMul(Transpose(Q^T), K^T) * scale [+ mask']           (onnxruntime fuses the
    P = Softmax(scores)                                               Transposes into FusedMatMul's
    ctx^T = MatMul(V^T, Transpose(P)) [x keep]   [H, (B,) D, S]        transA / transB)
    -> [H*D, B*S] for a block-format out-projection (it reads x^T), else [B, S, H*D]

The semantics are torch's SDPA, its guard included: a query row whose keys are all masked gives
zeros, as eager does (`_guard`: computed on the mask, mask' and keep, not on P as the exporter does). Sites that do not match exactly (causal, dropout,
grouped-query heads, shared projections, another dtype, other users of the intermediate tensors)
keep the exporter's translation. Only standard ONNX is written: with ORT_DISABLE_ALL the
Transposes run as nodes. Each site is recorded in the model's metadata (`record`, key
`sparsecomp.attention`), so the file's dense view can write it again on plain heads (`emit_plain`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper
from torch import fx

from sparsecomp.ops import define_op

from .kernels import Emitter

__all__ = ["ATTENTION", "Site", "emit", "emit_plain", "fuse_sites", "record"]

# Tag values of attention sites start here, far above the layers' tags (0, 1, ...), so the
# exporter's initializer de-duplication cannot merge a site's tag with a layer's.
TAG_BASE = 1_000_000


def _ort_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], tag: torch.Tensor,
                       heads: int, scale: Optional[float]) -> torch.Tensor:
    b, s, hd = q.shape

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, t.shape[1], heads, hd // heads).transpose(1, 2)

    ctx = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask, scale=scale)
    return ctx.transpose(1, 2).reshape(b, s, hd)


def _ort_attention_fake(q, k, v, mask, tag, heads, scale):
    return q.new_empty(q.shape)


ort_attention = define_op(
    "ort_attention", "(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor tag, int heads, float? scale) -> Tensor",
    reference=_ort_attention_ref, fake=_ort_attention_fake,
    doc="The ORT export's placeholder for one self-attention site (backends/ort/attention.py): "
        "sdpa over the heads of packed [B, S, H*D] q / k / v, context packed the same way. Never in a user's graph.",
)
ATTENTION = "sparsecomp.ort_attention.default"


@dataclass
class Site:
    """One fused attention's shape: what its lowering needs besides its input tensors."""

    heads: int
    head_dim: int
    scale: float  # as applied to the scores (torch's default 1/sqrt(head_dim) made explicit)
    mask: str | None  # None | "bool" | "float"
    mask_rank: int = 0


_VIEWS = {"aten.view.default", "aten.reshape.default", "aten._unsafe_view.default"}


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _swaps_1_2(node) -> bool:
    """transpose(1, 2) / permute(0, 2, 1, 3) of a 4-D tensor."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    if str(node.target) == "aten.transpose.int":
        return sorted(int(d) % 4 for d in node.args[1:3]) == [1, 2]
    if str(node.target) == "aten.permute.default":
        return [int(d) % 4 for d in node.args[1]] == [0, 2, 1, 3]
    return False


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _head_input(node, chains: dict[str, bool]) -> tuple[fx.Node, int, int] | None:
    """(projection node, heads, head dim) where node = split(proj(x)) and proj chains."""
    if not _swaps_1_2(node) or _only_user(node) is None:
        return None
    view = node.args[0]
    if not isinstance(view, fx.Node) or str(view.target) not in _VIEWS or _only_user(view) is not node:
        return None
    proj = view.args[0]
    if not isinstance(proj, fx.Node) or not chains.get(proj.name) or any(u is not view and not _leading_size(u) for u in proj.users):
        return None
    pv, vv = _val(proj), _val(view)
    if pv is None or vv is None or pv.dim() != 3 or vv.dim() != 4 or pv.dtype != torch.float32:
        return None
    heads, dim = _ints(vv.shape[2:])
    if None in (heads, dim) or not _same_dims(vv, pv, 2) or _ints(pv.shape[2:]) != (heads * dim,):
        return None  # not the split of the last dim into [heads, dim] (e.g. a view(b, heads, s, dim))
    return proj, heads, dim


def _leading_size(node: fx.Node) -> bool:
    """`t.shape[0]` / `t.shape[1]` of a [B, S, F] tensor (`view(b, t.shape[1], H, D)`): the same as
    the input x's, which `fuse_sites` reads instead (the projection's output becomes y^T)."""
    return str(node.target) == "aten.sym_size.int" and int(node.args[1]) in (0, 1, -3, -2)


def _ints(dims) -> tuple:
    """The dims as ints, or (None, ...) where one is symbolic."""
    return tuple(d if isinstance(d, int) else None for d in dims)


def _same_dims(a, b, n: int) -> bool:
    """The first n dims of two fake tensors are the same (symbols compared by name: no guards added)."""
    return [str(d) for d in a.shape[:n]] == [str(d) for d in b.shape[:n]]


def _sdpa_args(node: fx.Node) -> dict:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    return dict(zip(names, node.args)) | dict(node.kwargs)


@dataclass
class _Match:
    """An SDPA node to fuse and the nodes around it that the fusion replaces."""

    site: Site
    projections: list[fx.Node]  # q, k, v: the sparse_linear nodes, kept
    splits: list[fx.Node]  # transpose(view(projection)) of each, erased with their views
    merge: list[fx.Node]  # the context's way to [B, S, H*D], in order; its last node is what the graph reads
    mask: fx.Node | None


def _site(node: fx.Node, chains: dict[str, bool]) -> _Match | None:
    """The match if `node` is an SDPA to fuse, else None."""
    a = _sdpa_args(node)
    if a.get("dropout_p", 0.0) != 0.0 or a.get("is_causal", False) or a.get("enable_gqa", False):
        return None
    splits = [a[n] for n in ("query", "key", "value")]
    if len({id(t) for t in splits}) != 3:
        return None  # one split read as two of q / k / v (shared QK, k = v): not three projections
    heads = [_head_input(t, chains) for t in splits]
    if any(h is None for h in heads):
        return None
    (q, hq, dq), (k, hk, dk), (v, hv, dv) = heads
    if not (hq == hk == hv and dq == dk == dv) or not (q.args[0] is k.args[0] is v.args[0]):
        return None  # one input x (self-attention) and one head shape
    mask = a.get("attn_mask")
    kind, rank = None, 0
    if mask is not None:
        mv = _val(mask)
        if not isinstance(mask, fx.Node) or mv is None or mv.dim() < 2 or mv.dim() > 4 or mv.dtype not in (torch.bool, torch.float32):
            return None
        kind, rank = "bool" if mv.dtype == torch.bool else "float", mv.dim()
    # the merge: transpose(1, 2) -> reshape [B, S, H*D], read by anything; as transformers writes
    # it, also a reshape to the same shape before the transpose and a contiguous() copy after it
    merge = []
    t = _only_user(node)
    tv, sv = _val(t), _val(node)
    if t is not None and str(t.target) in _VIEWS and tv is not None and sv is not None and tv.dim() == 4 and _same_dims(tv, sv, 4):
        merge.append(t)
        t = _only_user(t)
    if t is None or not _swaps_1_2(t):
        return None
    merge.append(t)
    r = _only_user(t)
    if r is not None and str(r.target) == "aten.clone.default" and set(r.kwargs) <= {"memory_format"}:
        merge.append(r)
        r = _only_user(r)
    rv = _val(r)
    if r is None or str(r.target) not in _VIEWS or rv is None or rv.dim() != 3 or _ints(rv.shape[2:]) != (hq * dq,) \
            or not _same_dims(rv, _val(q), 2):
        return None
    merge.append(r)
    scale = a.get("scale")
    scale = float(scale) if scale is not None else 1.0 / float(np.sqrt(dq))
    return _Match(Site(hq, dq, scale, kind, rank), [q, k, v], splits, merge, mask)


def fuse_sites(gm: fx.GraphModule, chains: dict[str, bool]) -> list[Site]:
    """Replace each matching attention in `gm` (the export's own copy) by `ort_attention`.

    `chains`: FX node name of a lowered sparse_linear -> whether its kernel chains (block formats).
    Returns the sites in order; site i's tag holds TAG_BASE + i. Call `gm.recompile()` after.
    """
    graph = gm.graph
    sites: list[Site] = []
    for node in list(graph.nodes):
        if node.op != "call_function" or str(node.target) != "aten.scaled_dot_product_attention.default":
            continue
        m = _site(node, chains)
        if m is None:
            continue
        end = m.merge[-1]  # the reshape to [B, S, H*D]: what the rest of the graph reads
        attr = f"_sparsecomp_attention_tag_{len(sites)}"
        gm.register_buffer(attr, torch.full((1,), float(TAG_BASE + len(sites))))
        with graph.inserting_before(end):
            tag = graph.get_attr(attr)
            fused = graph.call_function(ort_attention.default, (*m.projections, m.mask, tag, m.site.heads, m.site.scale))
        end.replace_all_uses_with(fused)
        for proj in m.projections:  # leading sizes read from a projection: the same from its input
            for u in [u for u in proj.users if _leading_size(u)]:
                u.replace_input_with(proj, proj.args[0])
        # users before what they read, so each has none left when erased; the projections stay
        for d in [*reversed(m.merge), node, *m.splits, *(t.args[0] for t in m.splits)]:
            graph.erase_node(d)
        sites.append(m.site)
    return sites


def emit(e: Emitter, site: Site, q_t: str, k_t: str, v_t: str, mask: str | None, out: str, *, lead: str, y_t: bool,
         batch: int | None = None) -> None:
    """The site's ONNX from q^T, k^T, v^T `[H*D, B*S]`; `lead` holds [B, S]. Output ctx^T
    `[H*D, B*S]` when `y_t` (a block-format out-projection reads it), else ctx `[B, S, H*D]`.

    Batch 1 (the common deployment case) runs on `[H, D, S]` views with no Transpose node at all;
    a larger batch needs the batch axis moved next to the heads, 4 copies more (~30 us each at
    bert-base's 128 tokens), so the two are the branches of an `If` on B == 1 (~50 us of its own
    per call), or, where the export fixes the batch size (`batch`, static shapes), just the one."""
    m = keep = None
    if mask is not None:
        m = _additive(e, mask, site.mask)
        if site.mask_rank < 4:
            m = e.node("Unsqueeze", [m, e.ints("mask_axes", list(range(4 - site.mask_rank)))])
        m, keep = _guard(e, m)
    h, d = site.heads, site.head_dim
    shape = e.ints("ctx_rows", [h * d, -1]) if y_t else e.node("Concat", [lead, e.ints("hidden", [h * d])], axis=0)
    if batch is not None:  # static: the one branch that applies, inline
        ctx = _core(e, site, q_t, k_t, v_t, m, keep, lead=lead, y_t=y_t, batched=batch != 1)
        e.node("Reshape", [ctx, shape], out=out)
        return
    branches = {}
    for name, batched in (("then_branch", False), ("else_branch", True)):
        b = Emitter(f"{e.prefix}/{'batch' if batched else 'batch1'}")
        res = _core(b, site, q_t, k_t, v_t, m, keep, lead=lead, y_t=y_t, batched=batched)
        e.initializers.extend(b.initializers)
        branches[name] = helper.make_graph(b.nodes, name, [], [helper.make_tensor_value_info(res, TensorProto.FLOAT, None)])
    b = e.node("Slice", [lead, e.ints("first", [0]), e.ints("one", [1])])
    ctx = e.node("If", [e.node("Equal", [b, e.ints("batch_one", [1])])], **branches)
    e.node("Reshape", [ctx, shape], out=out)


def _core(e: Emitter, site: Site, q_t: str, k_t: str, v_t: str, m: str | None, keep: str | None, *, lead: str, y_t: bool,
          batched: bool) -> str:
    h, d = site.heads, site.head_dim
    if batched:  # [H*D, B*S] -> [H, B, D, S]: a batch of per-head transposed matrices
        hdbs = e.node("Concat", [e.ints("heads_dims", [h, d]), lead], axis=0)

        def per_head(t: str) -> str:
            return e.node("Transpose", [e.node("Reshape", [t, hdbs])], perm=[0, 2, 1, 3])
    else:  # B = 1: [H*D, S] -> [H, D, S] is a view
        hds = e.ints("heads_dims", [h, d, -1])

        def per_head(t: str) -> str:
            return e.node("Reshape", [t, hds])

    qh, kh, vh = per_head(q_t), per_head(k_t), per_head(v_t)
    swap = [0, 1, 3, 2] if batched else [0, 2, 1]
    scores = e.node("MatMul", [e.node("Transpose", [qh], perm=swap), kh])  # [H, (B,) Sq, Sk]
    scores = e.node("Mul", [scores, e.const("scale", np.array(site.scale, dtype=np.float32), stored=False)])
    if m is not None:  # [B|1, H|1, Sq|1, Sk] -> [H|1, B|1, ...] (B = 1: [H|1, Sq|1, Sk]) as the scores
        m = e.node("Transpose", [m], perm=[1, 0, 2, 3]) if batched else e.node("Squeeze", [m, e.ints("batch_axis", [0])])
        scores = e.node("Add", [scores, m])
    p = e.node("Softmax", [scores], axis=-1)  # (no row all -inf: `_guard`)
    ctx = e.node("MatMul", [vh, e.node("Transpose", [p], perm=swap)])  # [H, (B,) D, S]
    if keep is not None:  # rows whose keys are all masked give zeros: keep [B|1, H|1, Sq|1, 1] as ctx's [H, (B,) 1, Sq]
        k = e.node("Transpose", [keep], perm=[1, 0, 3, 2]) if batched else \
            e.node("Unsqueeze", [e.node("Squeeze", [keep, e.ints("keep_squeeze", [0, 3])]), e.ints("keep_unsqueeze", [1])])
        ctx = e.node("Mul", [ctx, k])
    # (the branches differ in rank; `emit` reshapes either after the If: a Reshape as a branch's
    # last node would cost a copy of the context out of the subgraph, ~25 us at bert-base's size)
    if y_t:
        return e.node("Transpose", [ctx], perm=[0, 2, 1, 3]) if batched else ctx  # [H, D, (B,) S]
    return e.node("Transpose", [ctx], perm=[1, 3, 0, 2] if batched else [2, 0, 1])  # [(B,) S, H, D]


def record(site: Site, prefix: str, qkv, mask: str | None, out: str, y_t: bool) -> dict:
    """What the model's metadata keeps of a lowered site (`sparsecomp.attention`): enough for
    `emit_plain` to write it again from plain inputs (`files.dense_equivalent`)."""
    return {"prefix": prefix, "q": qkv[0], "k": qkv[1], "v": qkv[2], "mask": mask, "output": out,
            "output_layout": "transposed" if y_t else "plain", "heads": site.heads, "head_dim": site.head_dim,
            "scale": site.scale, "mask_kind": site.mask, "mask_rank": site.mask_rank}


def emit_plain(e: Emitter, rec: dict) -> None:
    """A recorded site as a plain export writes attention, from q / k / v `[B, S, H*D]` to a plain
    context (the dense view of an export, `files.dense_equivalent`, where every layer is a plain
    MatMul again): heads split with Transposes, K^T included, and merged back."""
    h, d = rec["heads"], rec["head_dim"]
    split = e.ints("heads_shape", [0, 0, h, d])  # 0: that dim of the input ([B, S, H*D] -> [B, S, H, D])
    qh, kt, vh = (e.node("Transpose", [e.node("Reshape", [rec[n], split])], perm=perm)
                  for n, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])))
    scores = e.node("Mul", [e.node("MatMul", [qh, kt]), e.const("scale", np.array(rec["scale"], dtype=np.float32), stored=False)])
    if rec["mask"] is not None:  # [B|1, H|1, Sq|1, Sk] (or fewer leading dims) broadcasts against [B, H, Sq, Sk]
        scores = e.node("Add", [scores, _additive(e, rec["mask"], rec["mask_kind"])])
    ctx = e.node("MatMul", [_softmax(e, scores), vh])  # [B, H, S, D]
    merged = e.node("Transpose", [ctx], perm=[0, 2, 1, 3])
    e.node("Reshape", [merged, e.ints("merged_shape", [0, 0, h * d])], out=rec["output"])


def _additive(e: Emitter, mask: str, kind: str) -> str:
    """The mask as scores to add: a bool one (True = may attend, as torch) as 0 / -inf."""
    if kind != "bool":
        return mask
    return e.node("Where", [mask, e.const("zero", np.array(0.0, dtype=np.float32), stored=False),
                            e.const("neg_inf", np.array(-np.inf, dtype=np.float32), stored=False)])


def _guard(e: Emitter, m: str) -> tuple[str, str]:
    """torch's SDPA gives zeros for a query whose keys are all masked (its safe softmax), where a
    plain Softmax gives NaN. The exporter guards the probabilities (`_softmax`: IsNaN + Where over
    [B, H, Sq, Sk], ~0.22 ms per bert-base layer); here the guard works on the mask, which has no
    head (and often no query) axis: such rows get a mask of zeros (a finite softmax), and `keep`
    (1 / 0 per query row, [B|1, H|1, Sq|1, 1]) zeroes their context afterwards (x 1 leaves the
    others exact). Returns (the mask to add, keep)."""
    f32 = np.float32
    alive = e.node("Cast", [e.node("Greater", [m, e.const("guard_neg_inf", np.array(-np.inf, dtype=f32), stored=False)])],
                   to=TensorProto.FLOAT)
    count = e.node("ReduceSum", [alive, e.ints("key_axis", [-1])], keepdims=1)  # unmasked keys per query row
    dead = e.node("Less", [count, e.const("half", np.array(0.5, dtype=f32), stored=False)])
    fixed = e.node("Where", [dead, e.const("guard_zero", np.array(0.0, dtype=f32), stored=False), m])
    keep = e.node("Min", [count, e.const("one_f", np.array(1.0, dtype=f32), stored=False)])
    return fixed, keep


def _softmax(e: Emitter, scores: str) -> str:
    """Softmax over the keys; rows whose scores are all -inf (every key masked) give zeros, as torch
    (the exporter's guard, kept where a plain export is rewritten: `emit_plain`)."""
    p = e.node("Softmax", [scores], axis=-1)
    return e.node("Where", [e.node("IsNaN", [p]), e.const("nan_to", np.array(0.0, dtype=np.float32), stored=False), p])
