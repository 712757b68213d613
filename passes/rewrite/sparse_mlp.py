"""`sparse-mlp`: MLP regions found by `find-mlps` become one fused `sparsecomp::sparse_mlp` op
whose inactive hidden neurons the backend's kernels skip (activation sparsity).

Rules (one per region shape; the rule name `<pattern>-<mode>` lands in the node's provenance):
- `plain`:  down(act(up(x)))                 -> sparse_mlp(x, W_up, b_up, -, -, W_down^T, b_down, act, mode, ...)
- `gated`:  down(act(gate(x)) * up(x))       -> sparse_mlp(x, W_up, b_up, W_gate, b_gate, W_down^T, b_down, ...)
The down weight is stored transposed (`<down>_sparsecomp_wdt`, [hidden, out]): an active neuron's
outgoing weights are one contiguous row, which is what a kernel that skips neurons reads.

Modes (what counts as an inactive neuron):
- `exact` (lossless): the activation's exact zeros; ReLU family only (relu, relu6, relu^2, and
  gated MLPs whose gate is one of those). Regions with GELU / SiLU are left alone, with the reason.
- `threshold` (lossy, TEAL / CATS style): keep `|h_j| * s_j > t`. The score weights each neuron by
  the L2 norm of its outgoing weights, s_j = ||W_down[:, j]|| (`score="wina"`, WINA: the size of
  what dropping the neuron changes in the output), or not (`score="magnitude"`); t is calibrated
  per layer on calibration data so that the target fraction (+ `margin`) of scores falls below it
  (`per_channel=True`: one threshold per neuron, each at the target quantile of its own scores).
  With `correct=True` (default) the mean contribution of the skipped neurons on the calibration
  data is folded into the down bias: GELU's and SiLU's small values lean negative, so skipping them
  shifts every output the same way. Measured on MiniLM (128 calibration / 128 disjoint
  evaluation sentences, mean-pooled embedding cosine to dense): plain per-layer quantile 0.983
  (40%) / 0.965 (50%); with the bias correction 0.990 / 0.982 (WINA scores 0.983 at 50%);
  per-channel thresholds were worse (0.968 / 0.946 without correction).
- `predictor` (lossy, Deja Vu style): a rank-r linear predictor of the gate's (plain: the up's)
  pre-activation, `u_hat = (x A^T) B^T + b` (B^T stored as `pred_bt [rank, H]`), fitted on
  calibration inputs by reduced-rank regression (the best rank-r approximation of W in the
  calibration inputs' metric, closed form), its factors rounded to float16-representable values
  (kernels store them in half the bytes); keep `score(u_hat_j) * s_j > t` (score: u_hat itself
  for the ReLU family, which ranks even the neurons predicted negative, else |act(u_hat)|), t
  calibrated like threshold mode. A kernel can then skip the up rows of unselected neurons too.
  The recall of the neurons threshold mode would keep, and each layer's output cosine, are
  measured (with the rounded factors) on the calibration data and reported.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from sparsecomp.passes.analysis.find_mlps import META_KEY as MLP_KEY
from sparsecomp.passes.analysis.find_mlps import MLPRegion, activation_kind
from torch import fx

from sparsecomp import dialect
from sparsecomp.errors import PipelineError, SparsecompError
from sparsecomp.ir import check_batches_fit, describe_inputs, flat_inputs, get_attr_value, linear_sites
from sparsecomp.registry import Bounds, PassResult, register_pass

__all__ = ["META_KEY", "MLPRewrite", "parse_activation_sparsity"]

META_KEY = "sparsecomp.sparse_mlp"
QUALITY_BATCHES = 4  # calibration batches the lossy modes' output quality is measured on
aten = torch.ops.aten


@dataclass
class MLPRewrite:
    """The verdict on one MLP region (or near miss), and what calibration measured."""

    layer: str  # "<up>-><down>"
    rewritten: bool
    reason: str
    pattern: str = ""
    activation: str = ""
    mode: str = ""
    hidden: int = 0
    calibrated_sparsity: float | None = None  # fraction of hidden neurons skipped on the calibration data
    recall: float | None = None  # predictor: recall of the neurons threshold mode keeps
    cosine: float | None = None  # lossy: mean cosine of this MLP's output to dense on the calibration data
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def parse_activation_sparsity(spec) -> tuple[str, float | None]:
    """`"exact"` | `"threshold:S"` | `"predictor:S"` (S in (0, 1)) -> (mode, S or None)."""
    hint = 'write "exact", "threshold:0.5" or "predictor:0.9" (S = fraction of hidden neurons skipped, in (0, 1))'
    if not isinstance(spec, str):
        raise SparsecompError(f"activation_sparsity must be a string, got {type(spec).__name__}", hint=hint)
    mode, _, rest = spec.strip().partition(":")
    if mode == "exact":
        if rest:
            raise SparsecompError(f"activation_sparsity 'exact' takes no target sparsity, got {spec!r}",
                                  hint="exact mode skips the activation's exact zeros, whatever their number")
        return "exact", None
    if mode not in ("threshold", "predictor"):
        raise SparsecompError(f"unknown activation sparsity mode {mode!r} in {spec!r}", hint=hint)
    try:
        s = float(rest)
    except ValueError:
        raise SparsecompError(f"activation_sparsity {spec!r} needs a target sparsity after '{mode}:'", hint=hint) from None
    if not 0.0 < s < 1.0:
        raise SparsecompError(f"target activation sparsity must be in (0, 1), got {s:g} in {spec!r}", hint=hint)
    return mode, s


# ---------------------------------------------------------------------------------------------
# Calibration


class _Recorder(fx.Interpreter):
    """Runs the graph and keeps, per region, the up-projection's input and the hidden activation."""

    def __init__(self, gm, watch: dict[fx.Node, tuple[int, str]], store: dict):
        super().__init__(gm)
        self.watch, self.store = watch, store

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.watch:
            region, what = self.watch[n]
            t = out if what == "h" else self.env[n.args[0]]
            self.store.setdefault((region, what), []).append(t.detach().reshape(-1, t.shape[-1]).float())
        return out


def _check_calibration(gm, ctx, mode: str) -> None:
    """Calibration batches must exist and look like the example inputs (`ir.check_batches_fit`)."""
    if not ctx.calibration:
        raise SparsecompError(f"sparse-mlp mode '{mode}' calibrates its thresholds on calibration data, and none was given",
                              hint="pass calibration=[batch, ...] (each batch shaped like the example inputs), "
                                   "or --calib N on the command line")
    check_batches_fit(gm, ctx.example_inputs, ctx.calibration)


def _record(gm, ctx, regions: list[tuple[MLPRegion, dict]], max_rows: int) -> dict:
    watch = {}
    for region, nodes in regions:
        hidden = nodes["mul"] if region.pattern == "gated" else nodes["act"]
        watch[hidden] = (region.index, "h")
        watch[nodes["up"]] = (region.index, "x")
    store: dict = {}
    rec = _Recorder(gm, watch, store)
    outputs = []
    with torch.no_grad():
        for i, (args, kwargs) in enumerate(ctx.calibration):
            try:
                result = rec.run(*flat_inputs(gm, args, kwargs))
                if i < QUALITY_BATCHES:
                    outputs.append(result)
            except Exception as err:  # noqa: BLE001 - a shape error deep in an op: name the batch
                raise SparsecompError(f"running calibration batch {i} {describe_inputs((args, kwargs))} failed: "
                                      f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}",
                                      hint="calibration batches must be valid inputs of the model") from None
    out = {}
    for key, parts in store.items():
        t = torch.cat(parts)
        if t.shape[0] > max_rows:  # an even subsample keeps every batch represented
            t = t[torch.linspace(0, t.shape[0] - 1, max_rows).long()]
        out[key] = t
    out["outputs"] = outputs
    return out


def _output_quality(gm, ctx, reference: list) -> dict:
    """How far the rewritten model's outputs moved on the first calibration batches: the mean
    cosine of each output row (last dimension) to the original's, and the largest error relative
    to the original's largest magnitude (the lossy modes' quality loss, as the report shows it)."""
    from torch.utils import _pytree as pytree

    cos, rel = [], 0.0
    with torch.no_grad():
        for (args, kwargs), ref in zip(ctx.calibration[:len(reference)], reference, strict=False):
            out = gm(*args, **kwargs)
            for a, r in zip(pytree.tree_leaves(out), pytree.tree_leaves(ref), strict=False):
                if isinstance(a, torch.Tensor) and a.is_floating_point() and a.shape == r.shape and a.numel():
                    a2, r2 = a.reshape(-1, a.shape[-1]).double(), r.reshape(-1, r.shape[-1]).double()
                    cos.append(F.cosine_similarity(a2, r2, dim=-1))
                    rel = max(rel, float((a2 - r2).abs().max() / r2.abs().max().clamp_min(1e-30)))
    if not cos:
        return {}
    c = torch.cat(cos)
    return {"batches": len(reference), "output_cosine_mean": float(c.mean()), "output_cosine_min": float(c.min()),
            "max_error_relative": rel}


def _quantile(t: torch.Tensor, q: float, dim=None) -> torch.Tensor:
    """torch.quantile without its input-size limit (sorts; the k-th value, k = floor(q * n))."""
    if dim is None:
        t = t.flatten()
        k = min(int(q * t.numel()), t.numel() - 1)
        return t.kthvalue(k + 1).values.reshape(1)
    n = t.shape[dim]
    k = min(int(q * n), n - 1)
    return t.kthvalue(k + 1, dim=dim).values


def _fit_predictor(x: torch.Tensor, w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduced-rank regression: rank-r (A [r, K], B [H, r]) minimising E||W x - B A x||^2 over the
    calibration inputs x. With C = E[x x^T] = L L^T, the optimum is the best rank-r approximation
    of W L (truncated SVD), mapped back by L^-1 (Izenman 1975)."""
    xd = x.double()
    k = xd.shape[1]
    c = xd.T @ xd / max(xd.shape[0], 1)
    c += torch.eye(k, dtype=torch.float64) * (1e-6 * float(c.diagonal().mean()) + 1e-12)
    evals, evecs = torch.linalg.eigh(c)
    evals = evals.clamp_min(1e-12)
    sqrt_c = (evecs * evals.sqrt()) @ evecs.T
    inv_sqrt_c = (evecs / evals.sqrt()) @ evecs.T
    u, s, vh = torch.linalg.svd(w.double() @ sqrt_c, full_matrices=False)
    r = min(rank, s.numel())
    a = (s[:r, None] * vh[:r]) @ inv_sqrt_c  # [r, K]
    b = u[:, :r]  # [H, r]
    return _half_storable(a, b)


def _half_storable(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors rounded to float16-representable values (kept as float32 tensors), so a kernel
    may store them as float16 and read half the bytes (at 90% sparsity the predictor is most of
    what a call reads) while computing exactly what the reference op computes with them. Each rank
    component is first balanced (A's row scaled by c, B's column by 1/c: the product is the same)
    so both sit well inside float16's range. Factors that would still overflow stay float32
    (the kernels then read float32)."""
    amax = a.abs().amax(dim=1).clamp_min(1e-30)
    bmax = b.abs().amax(dim=0).clamp_min(1e-30)
    c = (bmax / amax).sqrt()
    a, b = (a * c[:, None]).float(), (b / c[None, :]).float()
    ah, bh = a.half(), b.half()
    if not (torch.isfinite(ah).all() and torch.isfinite(bh).all()):
        return a.contiguous(), b.contiguous()
    return ah.float().contiguous(), bh.float().contiguous()


def _calibrate(region: MLPRegion, rec: dict, mode: str, sparsity: float, score: str, per_channel: bool, rank: int,
               correct: bool, margin: float, w_up, b_up, w_gate, b_gate, w_down, b_down) -> dict:
    """Thresholds (and predictor) for one region; also its calibration-data sparsity, recall, cosine."""
    h = rec[(region.index, "h")]
    x = rec[(region.index, "x")]
    scale = w_down.norm(dim=0).float().contiguous() if score == "wina" else None  # ||W_down[:, j]||
    true_score = h.abs() * scale if scale is not None else h.abs()
    # A threshold at the target quantile of the calibration scores; the smallest margin above it
    # keeps the skipped fraction at least the target on data like the calibration data.
    t_true = _quantile(true_score, min(sparsity + margin, 0.999), dim=0 if per_channel else None)
    keep_true = true_score > t_true
    out: dict = {"scale": scale}
    if mode == "threshold":
        out["threshold"], keep = t_true.contiguous(), keep_true
    else:
        w_sel = w_up if w_gate is None else w_gate
        b_sel = b_up if w_gate is None else b_gate
        # Fit on 4 rows in 5 and measure on the 5th: with few calibration rows (rows <= rank) the
        # fit is exact on them and says nothing about new inputs. Thresholds come from the held-out
        # rows' predictions when there are enough of them (their scores are what new inputs see).
        rows = x.shape[0]
        hold = (torch.arange(rows) % 5 == 4) if rows >= 10 else torch.ones(rows, dtype=torch.bool)
        fit = ~hold if rows >= 10 else hold
        a, b = _fit_predictor(x[fit], w_sel.float(), rank)
        bt = b.t().contiguous()  # stored [rank, H]: see dialect.predictor_scores
        with torch.no_grad():
            pred_score = dialect.predictor_scores(x, a, bt, b_sel, region.activation, scale)
        basis = pred_score[hold] if int(hold.sum()) >= 256 else pred_score
        t_pred = _quantile(basis, min(sparsity + margin, 0.999), dim=0 if per_channel else None)
        keep = pred_score > t_pred
        out.update(threshold=t_pred.contiguous(), pred_a=a, pred_bt=bt)
        kept = keep_true[hold].sum().item()
        out["recall"] = float((keep[hold] & keep_true[hold]).sum().item() / kept) if kept else 1.0
        with torch.no_grad():
            u_true = F.linear(x[hold], w_sel, b_sel)
            u_hat = torch.matmul(F.linear(x[hold], a), bt) + (b_sel if b_sel is not None else 0.0)
            ss_res = (u_true - u_hat).pow(2).sum().item()
            ss_tot = (u_true - u_true.mean(0)).pow(2).sum().item()
        out["explained_variance"] = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
        out["fit_rows"], out["held_out_rows"] = int(fit.sum()), int(hold.sum())
    with torch.no_grad():
        dense = F.linear(h, w_down, b_down)
        if correct:
            # What the skipped neurons contributed on average (GELU / SiLU's small values lean
            # negative, so dropping them shifts every output the same way): fold it into the bias.
            shift = F.linear((h * ~keep).mean(0), w_down)
            out["b_down"] = shift if b_down is None else b_down + shift
        sparse = F.linear(h * keep, w_down, out.get("b_down", b_down))
        out["cosine"] = float(F.cosine_similarity(dense, sparse, dim=-1).mean())
    out["sparsity"] = float(1.0 - keep.float().mean())
    return out


# ---------------------------------------------------------------------------------------------
# Rewrite


def _region_nodes(gm, region: MLPRegion) -> dict[str, fx.Node]:
    by_name = {n.name: n for n in gm.graph.nodes}
    nodes = {}
    for name in region.nodes:
        n = by_name.get(name)
        if n is None:
            raise SparsecompError(f"sparse-mlp: region {region.summary()} refers to node {name}, which is gone",
                                  hint="run find-mlps right before sparse-mlp (a pass in between changed the graph)")
        nodes[n.meta[MLP_KEY]["role"]] = n
    return nodes


def _bias(site) -> fx.Node | None:
    node = site.node
    if node.target is aten.addmm.default:
        return node.args[0]
    if site.kind == "linear":
        return node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    return None


def _weight(gm, site) -> fx.Node:
    """A get_attr node of the site's weight as [out, in]: the stored one when it already is, else a
    contiguous copy (`<weight>_sparsecomp_w`)."""
    w_arg = site.node.args[2] if site.node.target is aten.addmm.default else site.node.args[1]
    if isinstance(w_arg, fx.Node) and w_arg.op == "get_attr" and not site.transposed:
        return w_arg
    attr = site.weight_target.replace(".", "_") + "_sparsecomp_w"
    if not hasattr(gm, attr):
        gm.register_buffer(attr, site.weight_2d(gm).contiguous())
    w = gm.graph.get_attr(attr)
    w.meta["val"] = get_attr_value(gm, attr)
    return w


def _value(gm, node) -> torch.Tensor | None:
    return get_attr_value(gm, node.target) if isinstance(node, fx.Node) and node.op == "get_attr" else None


def _const(gm, name: str, value: torch.Tensor) -> fx.Node:
    gm.register_buffer(name, value.detach().contiguous())
    n = gm.graph.get_attr(name)
    n.meta["val"] = value
    return n


def _near_misses(gm, regions: list[MLPRegion], sites: dict) -> list[MLPRewrite]:
    """MLP-shaped code that find-mlps did not take: an activation between two constant-weight
    matmuls whose hidden tensor has another consumer (skipping neurons would change that consumer)."""
    claimed = {name for r in regions for name in r.nodes}
    misses = []
    for node, site in sites.items():
        hidden = node.args[0] if node.args else None
        if node.name in claimed or not isinstance(hidden, fx.Node):
            continue
        act = activation_kind(hidden)
        if act is None or act[2] not in sites:
            continue
        others = [u.name for u in hidden.users if u is not node]
        up = sites[act[2]].name
        reason = (f"hidden activation {hidden.name} has other consumers ({', '.join(others)}): skipping neurons would change them"
                  if others else "not matched by find-mlps")
        misses.append(MLPRewrite(f"{up}->{site.name}", False, reason, pattern="plain", activation=act[0]))
    return misses


@register_pass("sparse-mlp", kind="rewrite", lossy=lambda options: options["mode"] != "exact")
def sparse_mlp(gm, ctx, *, mode: Literal["exact", "threshold", "predictor"] = "exact",
               sparsity: Annotated[float, Bounds(0, 1, lo_open=True, hi_open=True)] = 0.5,
               score: Literal["wina", "magnitude"] = "wina", per_channel: bool = False, rank: Annotated[int, Bounds(lo=0)] = 0,
               correct: bool = True, margin: Annotated[float, Bounds(0, 0.5, hi_open=True)] = 0.01,
               min_hidden: Annotated[int, Bounds(lo=0)] = 16, max_rows: Annotated[int, Bounds(lo=1)] = 16384) -> PassResult:
    """Fuse each MLP region into `sparsecomp::sparse_mlp` so kernels skip inactive hidden neurons.

    Requires: `find-mlps` earlier in the pipeline, with nothing in between that changed the
      regions' nodes (reads `ctx.results["find-mlps"]` and `node.meta["sparsecomp.mlp"]`); for
      `threshold` / `predictor`, calibration batches shaped like the example inputs in
      `ctx.calibration`.
    Ensures: every region with constant fp32 up/gate/down weights and hidden size >= min_hidden
      (and, in exact mode, a ReLU-family activation) is replaced by one
      `sparse_mlp(x, W_up, b_up, W_gate, b_gate, W_down^T, b_down, act, mode, threshold, scale,
      pred_a, pred_bt)` node computing the same values (exact) or the calibrated lossy ones;
      the transposed down weight is a new buffer `<down>_sparsecomp_wdt` and the original down
      weight is freed when nothing else reads it. The node carries `sparsecomp.sparse_mlp` (layer,
      mode, activation, calibrated sparsity, recall, cosine). `ctx.results["sparse-mlp"]` lists an
      `MLPRewrite` per region and near miss (an activation with another consumer) with the reason;
      lossy modes add `ctx.results["sparse-mlp-quality"]` (the model outputs' cosine and relative
      error to the original on the first calibration batches).
    Options:
      mode: exact (lossless, ReLU family) | threshold | predictor (lossy, calibrated).
      sparsity: target fraction of hidden neurons skipped (threshold / predictor), in (0, 1).
      score: neuron score for thresholds: wina (|h| x ||W_down column||) | magnitude (|h|).
      per_channel: one threshold per neuron (else one per layer).
      rank: predictor rank (0: `auto_rank`, the largest whose weights cost no more to read than
        the selected neurons' rows, at most 256).
      margin: calibrate at sparsity + margin, so that data unlike the calibration batches still
        skips at least the target fraction.
      correct: fold the mean contribution of the skipped neurons (on the calibration data) into
        the down bias (lossy modes).
      min_hidden: leave MLPs with fewer hidden neurons than this alone.
      max_rows: calibration rows (tokens) kept per layer (an even subsample beyond it).
    """
    if "find-mlps" not in ctx.results:
        raise PipelineError("sparse-mlp needs the MLP regions of find-mlps, which did not run before it",
                            hint='put find-mlps right before it, e.g. "find-mlps,sparse-mlp"')
    regions: list[MLPRegion] = ctx.results["find-mlps"]
    sites = {s.node: s for s in linear_sites(gm)}
    verdicts: list[MLPRewrite] = _near_misses(gm, regions, sites)
    todo: list[tuple[MLPRegion, dict]] = []
    for region in regions:
        layer = f"{region.up}->{region.down}"
        base = {"pattern": region.pattern, "activation": region.activation, "mode": mode, "hidden": region.hidden}
        nodes = _region_nodes(gm, region)
        why = None
        if mode == "exact" and not region.exact_zeros:
            why = f"activation {region.activation} has no exact zeros (exact mode needs the ReLU family; threshold or predictor modes apply)"
        elif region.hidden < min_hidden:
            why = f"hidden size {region.hidden} below min_hidden={min_hidden}"
        else:
            for role in ("up", "gate", "down"):
                if role in nodes:
                    site = sites.get(nodes[role])
                    if site is None or site.kind == "conv" or nodes[role].op != "call_function":
                        why = f"{role} projection is not a linear/matmul with a constant weight"
                        break
                    if site.weight(gm).dtype != torch.float32:
                        why = f"{role} weight dtype {str(site.weight(gm).dtype).replace('torch.', '')} (fp32 kernels only)"
                        break
        if why:
            verdicts.append(MLPRewrite(layer, False, why, **base))
            continue
        todo.append((region, nodes))
    rec = {}
    if mode != "exact" and todo:
        _check_calibration(gm, ctx, mode)
        rec = _record(gm, ctx, todo, max_rows)
    graph = gm.graph
    rewritten = 0
    freed: set[str] = set()
    for region, nodes in todo:
        layer = f"{region.up}->{region.down}"
        up_site, down_site = sites[nodes["up"]], sites[nodes["down"]]
        gate_site = sites.get(nodes.get("gate"))
        x = nodes["up"].args[1] if nodes["up"].target is aten.addmm.default else nodes["up"].args[0]
        down = nodes["down"]
        prefix = down_site.weight_target.replace(".", "_")
        w_down = down_site.weight_2d(gm)
        with graph.inserting_before(down):
            w_up, b_up = _weight(gm, up_site), _bias(up_site)
            w_gate, b_gate = (_weight(gm, gate_site), _bias(gate_site)) if gate_site else (None, None)
            b_down = _bias(down_site)
            wdt = _const(gm, prefix + "_sparsecomp_wdt", w_down.t().contiguous())
            info = {"layer": layer, "region": region.index, "pattern": region.pattern, "activation": region.activation,
                    "mode": mode, "hidden": region.hidden, "up": region.up, "gate": region.gate, "down": region.down}
            thr = scale = pa = pb = None
            verdict = MLPRewrite(layer, True, "exact zeros of " + region.activation if mode == "exact" else "", pattern=region.pattern,
                                 activation=region.activation, mode=mode, hidden=region.hidden)
            if mode != "exact":
                k_in = int(get_attr_value(gm, w_up.target).shape[1])
                cal = _calibrate(region, rec, mode, sparsity, score, per_channel, rank or auto_rank(k_in, region.hidden, sparsity),
                                 correct and (b_down is None or _value(gm, b_down) is not None), margin,
                                 get_attr_value(gm, w_up.target), _value(gm, b_up),
                                 _value(gm, w_gate), _value(gm, b_gate), w_down, _value(gm, b_down))
                thr = _const(gm, prefix + "_sparsecomp_threshold", cal["threshold"])
                if "b_down" in cal:
                    b_down = _const(gm, prefix + "_sparsecomp_bias", cal["b_down"])
                if cal["scale"] is not None:
                    scale = _const(gm, prefix + "_sparsecomp_scale", cal["scale"])
                if mode == "predictor":
                    pa = _const(gm, prefix + "_sparsecomp_pred_a", cal["pred_a"])
                    pb = _const(gm, prefix + "_sparsecomp_pred_bt", cal["pred_bt"])
                    verdict.recall = cal["recall"]
                    verdict.extra["rank"] = int(cal["pred_a"].shape[0])
                    verdict.extra["explained_variance"] = cal["explained_variance"]
                    verdict.extra["fit_rows"], verdict.extra["held_out_rows"] = cal["fit_rows"], cal["held_out_rows"]
                verdict.calibrated_sparsity, verdict.cosine = cal["sparsity"], cal["cosine"]
                verdict.reason = (f"{mode} at {sparsity:.0%} ({score}{', per channel' if per_channel else ''}): "
                                  f"{cal['sparsity']:.1%} skipped on calibration data, MLP output cosine {cal['cosine']:.4f}"
                                  + (f", predictor recall {cal['recall']:.3f} on held-out calibration rows" if mode == "predictor" else "")
                                  + (f" (only {cal['fit_rows']} calibration rows to fit {k_in} inputs: give more calibration data)"
                                     if mode == "predictor" and cal["fit_rows"] < 2 * k_in else ""))
                info.update(calibrated_sparsity=cal["sparsity"], cosine=cal["cosine"], recall=cal.get("recall"),
                            target_sparsity=sparsity, score=score, per_channel=per_channel)
            new = graph.call_function(dialect.sparse_mlp.default,
                                      (x, w_up, b_up, w_gate, b_gate, wdt, b_down, region.activation, mode, thr, scale, pa, pb))
        new.meta.update({k: v for k, v in down.meta.items() if k in ("val", "tensor_meta", "nn_module_stack", "stack_trace")})
        new.meta[META_KEY] = info
        new.meta["sparsecomp.rule"] = f"{region.pattern}-{mode}"
        down.replace_all_uses_with(new)
        _erase_dead([nodes[r] for r in ("down", "mul", "act", "gate", "up") if r in nodes], stop=x)
        freed |= {site.weight_target for site in (up_site, gate_site, down_site) if site is not None}
        verdicts.append(verdict)
        rewritten += 1
    if rewritten:
        _erase_dead_weights(gm, freed)
    ctx.results["sparse-mlp"] = verdicts
    if rewritten and rec.get("outputs"):
        gm.recompile()  # the quality check runs the rewritten graph (the op's reference implementation)
        ctx.results["sparse-mlp-quality"] = _output_quality(gm, ctx, rec["outputs"])
    return PassResult(rewritten > 0, {"rewritten": rewritten, "kept": len(verdicts) - rewritten})


def auto_rank(k: int, hidden: int, sparsity: float) -> int:
    """The predictor's default rank: as large as its weights may be while reading them costs no
    more than the up and down rows of the neurons it selects (r (K + H) <= 2 (1 - S) H K), in
    multiples of 16, between 16 and min(256, K). Its recall grows with the rank (MiniLM at 50%:
    0.81 at rank 96, 0.90 at 192), its cost is paid on every row."""
    r = int(2 * (1 - sparsity) * hidden * k / (k + hidden)) // 16 * 16
    return max(16, min(r, 256, k))


def _erase_dead(roots: list[fx.Node], stop: fx.Node) -> None:
    """Erase the region's nodes and what only they read (e.g. the relu inside relu^2), users before
    producers, never past the region's input `stop`."""
    pending, erased = list(roots), set()
    while pending:
        n = pending.pop(0)
        if n in erased or n.users or n is stop or n.op != "call_function":
            continue
        inputs = [a for a in n.all_input_nodes if a is not stop]
        n.graph.erase_node(n)
        erased.add(n)
        pending.extend(inputs)


def _erase_dead_weights(gm, targets: set[str]) -> None:
    """Erase get_attr / transpose nodes nothing reads any more, and free the original down weights
    (the transposed copy replaces them) when no node reads them."""
    for node in reversed(list(gm.graph.nodes)):
        if node.users or node.op not in ("get_attr", "call_function"):
            continue
        if node.op == "get_attr" or (node.target in (aten.t.default, aten.transpose.int, aten.permute.default)
                                     and isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr"):
            gm.graph.erase_node(node)
    still_read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for target in targets - still_read:
        owner, _, attr = target.rpartition(".")
        try:
            delattr(gm.get_submodule(owner) if owner else gm, attr)
        except AttributeError:
            pass
