"""The sparsification engine: which layers, their calibration statistics, the new weights.

Where it runs: on the captured FX graph (the one IR), not on `nn.Linear` hooks. Why:
- *Layer-sequential in one forward pass.* The graph is executed node by node for all calibration
  batches together ("node-major"). When execution reaches a matmul with a weight to prune, every
  node before it has already run with the *pruned* weights of the layers above, so its input is
  exactly the pruned model's activation; the layer is pruned right there and execution goes on
  with its new weight. Hooks on an eager module see only one forward at a time, so the same
  guarantee costs a full forward per layer (or per transformer block, which needs to know the
  model's block structure).
- *Any model that captures*, with every matmul-like weight the rest of sparsecomp sees
  (`sparsecomp.ir.linear_sites`: `nn.Linear`, `x @ W` parameters, addmm), under the same names the
  analysis report and `--weights` use.
- *Bounded memory.* Statistics exist for one layer input at a time (layers reading the same input,
  such as query/key/value, share them), freed as soon as its last layer is pruned; activations are
  freed after their last use, as in `torch.fx.Interpreter`.
Magnitude pruning reads no activations: given calibration data (or `compile`'s example inputs) it
runs on the capture like the others (with calibration, each layer's output error is measured on
the way); with no input at all it finds the same weights on the module itself (`module_sites`).

Never half-pruned: the engine computes new tensors without writing into the model (the captured
graph shares the user's parameters); `commit` writes them all at the end with Ctrl-C deferred, so
an error or an interrupt leaves the model exactly as it was, and a rerun starts from scratch.

Padding: when a batch has an `attention_mask` keyword of shape [B, T] and a layer input is
[B, T, in], only the unmasked tokens enter the statistics (padding tokens are not text).
"""

from __future__ import annotations

import math
import operator
import signal
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

from sparsecomp.ir import flat_inputs, layer_name, linear_sites, normalize_inputs

from . import allocation as alloc
from .config import SparsifyConfig, SparsifyError, skipped_by
from .masks import check_divides, units, zero_units, zeros_in
from .solvers import (
    HessianError,
    corrected_target,
    magnitude_mask,
    masked_lstsq,
    output_error,
    prepare_hessian,
    relative_error,
    sparsegpt,
    wanda_mask,
    work_dtype,
)

__all__ = ["Site", "LayerResult", "SparsifyResult", "compute", "commit", "Progress"]

Progress = Callable[[int, int, str], None]  # (done, total, what)


@dataclass
class Site:
    """One weight the engine may prune, seen as `[out, in]`."""

    name: str  # qualified layer name
    target: str  # attribute path of the stored weight
    transposed: bool  # stored [in, out] (x @ W)
    kind: str  # linear | matmul | conv
    shape: tuple[int, int]
    bias_target: str | None = None
    node: fx.Node | None = None  # the matmul node (graph sites)
    x_node: fx.Node | None = None  # its activation input


@dataclass
class LayerResult:
    """What happened to one layer."""

    name: str
    shape: list[int]
    status: str  # pruned | skipped
    reason: str = ""
    target: float | None = None  # sparsity asked for this layer (after allocation)
    sparsity: float | None = None  # fraction of zeros after pruning
    error: float | None = None  # relative output error on the calibration inputs, when measured
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": self.shape, "status": self.status, "reason": self.reason,
                "target": self.target, "sparsity": self.sparsity, "error": self.error, "notes": list(self.notes)}


@dataclass
class SparsifyResult:
    """The report of one sparsification: per layer, and overall."""

    model: str
    spec: str  # config.describe()
    pattern: str
    layers: list[LayerResult] = field(default_factory=list)
    seconds: float = 0.0
    calibration: dict = field(default_factory=dict)  # batches, tokens
    notes: list[str] = field(default_factory=list)
    numel: dict = field(default_factory=dict)  # layer -> numel

    @property
    def pruned(self) -> list[LayerResult]:
        return [r for r in self.layers if r.status == "pruned"]

    @property
    def skipped(self) -> list[LayerResult]:
        return [r for r in self.layers if r.status == "skipped"]

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all pruned layers (each weight once: a second user of a shared
        weight is a skipped entry)."""
        total = sum(r.shape[0] * r.shape[1] for r in self.pruned)
        return sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.pruned) / total if total else 0.0

    def __repr__(self) -> str:
        return f"<SparsifyResult {self.summary()}>"

    def __str__(self) -> str:
        import io

        from rich.console import Console

        buf = io.StringIO()
        Console(width=200, file=buf, color_system=None).print(self)
        return buf.getvalue()

    def summary(self) -> str:
        return (f"{self.spec} on {self.model}: {len(self.pruned)} layers pruned to {self.sparsity:.1%} zeros overall"
                + (f", {len(self.skipped)} left dense" if self.skipped else "") + f" ({self.seconds:.1f} s)")

    def to_dict(self) -> dict:
        return {"model": self.model, "spec": self.spec, "pattern": self.pattern, "sparsity": self.sparsity,
                "seconds": self.seconds, "calibration": self.calibration,
                "layers": [r.to_dict() for r in self.layers], "notes": list(self.notes)}

    def table(self):
        from rich.table import Table

        t = Table(title=f"sparsify {self.spec} on {self.model}", title_justify="left")
        for c in ("layer", "shape", "status", "target", "sparsity", "output error", "reason / notes"):
            t.add_column(c, justify="left" if c in ("layer", "status", "reason / notes") else "right")
        for r in self.layers:
            t.add_row(r.name, "x".join(map(str, r.shape)), r.status,
                      "-" if r.target is None else f"{r.target:.1%}", "-" if r.sparsity is None else f"{r.sparsity:.1%}",
                      "-" if r.error is None else f"{r.error:.4f}", "; ".join([r.reason, *r.notes]).strip("; "),
                      style="dim" if r.status == "skipped" else None)
        return t

    def __rich_console__(self, console, options):
        yield self.table()
        yield self.summary()
        for note in self.notes:
            yield f"note: {note}"


# ---------------------------------------------------------------------------------------------
# Which layers


def _attr(root: torch.nn.Module, target: str) -> torch.Tensor:
    return operator.attrgetter(target)(root)


def _caller_name(gm: fx.GraphModule, site) -> str:
    """The name of the module that makes this call when it holds the weight under another name.

    A capture keeps one attribute path per shared tensor (two Linears tied to one Parameter both
    read `b.weight`), so the first user would be reported under the second's name; the module
    stack torch.export records says which module called.
    """
    stack = site.node.meta.get("nn_module_stack") or {}
    try:
        fqn = list(stack.values())[-1][0]
    except (IndexError, TypeError):
        return site.name
    leaf = site.weight_target.rpartition(".")[2]
    path = f"{fqn}.{leaf}" if fqn else leaf
    if path != site.weight_target and _has_attr(gm, path) and _attr(gm, path) is _attr(gm, site.weight_target):
        return layer_name(path)
    return site.name


def graph_sites(gm: fx.GraphModule) -> list[Site]:
    sites = []
    for s in linear_sites(gm):
        if s.node.op != "call_function":
            continue
        w2 = s.weight_2d(gm)
        x = s.node.args[1] if s.node.target is torch.ops.aten.addmm.default else s.node.args[0]
        sites.append(Site(_caller_name(gm, s), s.weight_target, s.transposed, s.kind, tuple(w2.shape), s.bias_target,
                          s.node, x if isinstance(x, fx.Node) else None))
    return sites


def _module_site(root: torch.nn.Module, target: str, kind: str, bias: str | None, transposed: bool = False) -> Site:
    w = _attr(root, target)
    shape = (w.shape[1], w.shape[0]) if transposed else (w.shape[0], math.prod(w.shape[1:]))
    return Site(layer_name(target), target, transposed, kind, tuple(shape), bias)


def module_sites(model: torch.nn.Module) -> list[Site]:
    """The weights `graph_sites` finds on a capture, found on the module itself (magnitude with no input).

    `nn.Linear` layers, `nn.MultiheadAttention`'s input projections, 1-D / 2-D convolutions (listed,
    then skipped, as on the capture), and the 2-D parameters of the model's own modules that a
    matmul reads (`x @ W`, `F.linear(x, W)`, addmm), seen on a symbolic trace. A parameter whose use
    cannot be traced is listed as kind `unseen` and skipped with that reason: pruning it blind
    could zero a table that is no matmul weight (a positional embedding).
    """
    sites, known, candidates = [], set(), {}
    for name, mod in model.named_modules():
        pre = f"{name}." if name else ""
        if isinstance(mod, torch.nn.Linear):
            sites.append(_module_site(model, pre + "weight", "linear", pre + "bias" if mod.bias is not None else None))
        elif isinstance(mod, torch.nn.MultiheadAttention):
            if mod.in_proj_weight is not None:
                sites.append(_module_site(model, pre + "in_proj_weight", "linear",
                                          pre + "in_proj_bias" if mod.in_proj_bias is not None else None))
            else:  # separate q / k / v projections (kdim / vdim differ from embed_dim)
                sites.extend(_module_site(model, f"{pre}{w}_proj_weight", "linear", None) for w in "qkv")
        elif isinstance(mod, (torch.nn.Conv1d, torch.nn.Conv2d)):  # what a capture lists as conv sites
            sites.append(_module_site(model, pre + "weight", "conv", pre + "bias" if mod.bias is not None else None))
        if isinstance(mod, (torch.nn.Linear, torch.nn.MultiheadAttention, torch.nn.Conv1d, torch.nn.Conv2d)) \
                or type(mod).__module__.startswith("torch."):
            # their weights are the sites above; torch's other modules (embeddings, norms, recurrent
            # cells) hold no sites on a capture either
            known.update(id(t) for t in mod.parameters(recurse=False))
            continue
        for leaf, t in mod.named_parameters(recurse=False):
            if t.dim() == 2 and t.is_floating_point():
                candidates.setdefault(id(t), pre + leaf)
    candidates = {target: _attr(model, target) for i, target in candidates.items() if i not in known}
    if candidates:
        traced = _traced_sites(model, candidates)
        if traced is None:
            sites.extend(_module_site(model, t, "unseen", None) for t in candidates)
        else:
            sites.extend(traced)
    return sites


_MATMULS = {operator.matmul, torch.matmul, torch.mm, torch.Tensor.matmul, torch.Tensor.mm}
_LINEARS = {torch.nn.functional.linear}
_FLIPS = {torch.t, torch.transpose, torch.permute, torch.Tensor.t}


def _traced_sites(model: torch.nn.Module, candidates: dict[str, torch.Tensor]) -> list[Site] | None:
    """Sites among `candidates` (attribute path -> 2-D parameter) that a matmul reads on a symbolic
    trace of `model` (no input needed), with the layout read from the call; None if the trace fails."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - any model code may refuse a symbolic trace; the caller reports it per weight
        return None

    def weight(arg) -> tuple[str, bool] | None:  # (attribute path, read transposed?)
        if not isinstance(arg, fx.Node):
            return None
        if arg.op == "get_attr":
            return arg.target, False
        flip = ((arg.op == "call_method" and arg.target in ("t", "transpose", "permute"))
                or (arg.op == "call_function" and arg.target in _FLIPS)
                or (arg.op == "call_function" and arg.target is getattr and arg.args[1:2] in (("T",), ("mT",))))
        src = arg.args[0] if arg.args else None
        if flip and isinstance(src, fx.Node) and src.op == "get_attr":
            return src.target, True
        return None

    sites = []
    for n in graph.nodes:
        fn = n.target if n.op == "call_function" else None
        meth = n.target if n.op == "call_method" else None
        if fn in _LINEARS:
            kind = "linear"
            w = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
            b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
        elif fn in _MATMULS or meth in ("matmul", "mm", "__matmul__"):
            w, b, kind = n.args[1] if len(n.args) > 1 else None, None, "matmul"
        elif fn is torch.addmm or meth == "addmm":
            w, b, kind = n.args[2] if len(n.args) > 2 else None, n.args[0], "matmul"
        else:
            continue
        found = weight(w)
        if found is None or found[0] not in candidates:
            continue
        target, flipped = found
        # F.linear reads W as [out, in]; a matmul x @ W reads it as [in, out]; a transpose flips either
        transposed = flipped if kind == "linear" else not flipped
        bias = b.target if isinstance(b, fx.Node) and b.op == "get_attr" else None
        sites.append(_module_site(model, target, kind, bias, transposed))
    return sites


def _embedding_weights(root: torch.nn.Module, gm: fx.GraphModule | None) -> set[int]:
    """ids of tensors used as embedding tables (a Linear tied to one is an output head)."""
    ids = {id(m.weight) for m in root.modules() if isinstance(m, torch.nn.Embedding)}
    if gm is not None:
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target is torch.ops.aten.embedding.default and n.args[0].op == "get_attr":
                ids.add(id(_attr(gm, n.args[0].target)))
    return ids


def plan(root: torch.nn.Module, sites: list[Site], config: SparsifyConfig, gm: fx.GraphModule | None = None
         ) -> tuple[list[Site], dict[int, LayerResult]]:
    """Split sites into those to prune and those left dense (with the reason for each, keyed by
    `id(site)`: a layer called twice is two sites of one name)."""
    prune, skipped, seen = [], {}, {}
    embeds = _embedding_weights(root, gm)
    for s in sites:
        w = _attr(root, s.target)
        why = None
        if s.kind == "conv":
            why = "convolution weights are not sparsified (Linear / matmul weights only)"
        elif s.kind == "unseen":
            why = ("a 2-D parameter whose use a symbolic trace could not show: pass calibration=[batch] "
                   "to prune it if it is a matmul weight (x @ W)")
        elif (g := skipped_by(s.name, config.skip)) is not None:
            why = f"skipped by '{g}'"
        elif id(w) in embeds:
            why = "weight tied to an embedding (an output head)"
        elif id(w) in seen:  # one weight, several users (tied, or a layer called twice): pruned once
            first = seen[id(w)]
            why = f"shares its weight with {first} (pruned there)" if first != s.name else "called again (its weight is pruned at its first call)"
        elif not w.is_floating_point():
            why = f"dtype {str(w.dtype).replace('torch.', '')} is not a float weight"
        elif not torch.isfinite(w).all():
            why = "weight has NaN/Inf values"
        elif min(s.shape) == 0:
            why = "empty weight"
        else:
            why = check_divides(s.shape, config.pattern)
        if why:
            skipped[id(s)] = LayerResult(s.name, list(s.shape), "skipped", why)
        else:
            seen[id(w)] = s.name
            prune.append(s)
    return prune, skipped


# ---------------------------------------------------------------------------------------------
# Node-major execution over all calibration batches


def _token_mask(kwargs: dict) -> torch.Tensor | None:
    m = kwargs.get("attention_mask")
    if isinstance(m, torch.Tensor) and m.dim() == 2:
        return m != 0
    return None


class _Walk:
    """Runs a captured graph node by node for every calibration batch at once.

    `visit(site, xs, dense_xs)` is called just before a site's node runs, with its input per batch
    (already masked to real tokens and flattened to [tokens, in]); it may set `self.weights[target]`
    (stored layout) and `self.weights[bias_target]`, which every later read of that attribute
    sees. With `twin`, a second copy runs with the original weights (the dense model) in lockstep.
    """

    def __init__(self, gm: fx.GraphModule, batches: list, label: str, twin: bool = False):
        self.gm, self.batches, self.label, self.twin = gm, batches, label, twin
        self.weights: dict[str, torch.Tensor] = {}
        self.masks = [_token_mask(kw) for _, kw in batches]

    def _flat(self) -> list[list]:
        flats = []
        n_ph = sum(1 for n in self.gm.graph.nodes if n.op == "placeholder")
        for b, (args, kwargs) in enumerate(self.batches):
            try:
                flat = flat_inputs(self.gm, args, kwargs)
            except Exception as err:
                raise SparsifyError(f"calibration batch {b} does not match the inputs of {self.label}: {type(err).__name__}: {err}",
                                    hint="every batch must be structured like the model's inputs (same positional args / keyword names)") from None
            if len(flat) != n_ph:
                raise SparsifyError(f"calibration batch {b} has {len(flat)} inputs, {self.label} takes {n_ph}",
                                    hint="every batch must be structured like the model's inputs")
            flats.append(flat)
        return flats

    def _rows(self, x: Any, b: int) -> torch.Tensor | None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return None
        m = self.masks[b]
        if m is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(m.shape):
            x = x[m]
        return x.reshape(-1, x.shape[-1])

    def run(self, sites: dict[fx.Node, Site], visit: Callable[[Site, list, list | None], None]) -> None:
        gm = self.gm
        nodes = list(gm.graph.nodes)
        where = {n: i for i, n in enumerate(nodes)}
        free_after: dict[int, list[fx.Node]] = {}
        for n in nodes:
            if n.users:
                free_after.setdefault(max(where[u] for u in n.users), []).append(n)
        flats = self._flat()
        envs: list[dict] = [{} for _ in self.batches]
        twins: list[dict] | None = [{} for _ in self.batches] if self.twin else None
        attrs: dict[fx.Node, str] = {}
        ph = 0
        for i, node in enumerate(nodes):
            if node.op == "placeholder":
                for b, flat in enumerate(flats):
                    envs[b][node] = flat[ph]
                    if twins is not None:
                        twins[b][node] = flat[ph]
                ph += 1
            elif node.op == "get_attr":
                attrs[node] = node.target
            elif node.op == "output":
                break
            else:
                site = sites.get(node)
                if site is not None and site.x_node is not None:
                    xs = [self._rows(env[site.x_node], b) for b, env in enumerate(envs)]
                    dxs = [self._rows(env[site.x_node], b) for b, env in enumerate(twins)] if twins is not None else None
                    visit(site, xs, dxs)
                for b in range(len(envs)):
                    envs[b][node] = self._exec(node, envs[b], attrs, b, self.weights)
                    if twins is not None:
                        twins[b][node] = self._exec(node, twins[b], attrs, b, {})
            for dead in free_after.get(i, ()):
                for env in envs:
                    env.pop(dead, None)
                for env in twins or ():
                    env.pop(dead, None)

    def _exec(self, node: fx.Node, env: dict, attrs: dict, b: int, weights: dict):
        def load(a: fx.Node):
            if a in attrs:
                t = attrs[a]
                return weights[t] if t in weights else _attr(self.gm, t)
            return env[a]

        args = fx.node.map_arg(node.args, load)
        kwargs = fx.node.map_arg(node.kwargs, load)
        try:
            if node.op == "call_function":
                return node.target(*args, **kwargs)
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            return self.gm.get_submodule(node.target)(*args, **kwargs)
        except Exception as err:
            first = (str(err).strip().splitlines() or [""])[0][:200]
            raise SparsifyError(
                f"calibration batch {b} does not run through {self.label} (at node {node.name}): {type(err).__name__}: {first}",
                hint="calibration batches must have the example inputs' structure, dtypes and ranks; only batch/sequence sizes may differ",
            ) from None


# ---------------------------------------------------------------------------------------------
# Statistics of one layer input


@dataclass
class _Stats:
    n: int
    H: torch.Tensor | None  # [in(+1), in(+1)] mean of x x^T (augmented with a ones column)
    sqnorm: torch.Tensor  # [in] sum of x_j^2
    G: torch.Tensor | None = None  # [in(+1), in(+1)] mean of x x_dense^T
    prep: Any = None  # the damped, factored H (solvers.Prepared), shared by the layers of this input


def _stats(xs: list, dxs: list | None, *, hessian: bool, augment: bool, site: Site) -> _Stats:
    K = site.shape[1]
    n = 0
    # float32 sums over a few dozen batches: the float64 conversion happens once, at the end
    sq = torch.zeros(K, dtype=torch.float64)
    H = torch.zeros(K + augment, K + augment) if hessian else None
    G = torch.zeros_like(H) if (hessian and dxs is not None) else None
    for b, x in enumerate(xs):
        if x is None or x.shape[-1] != K:
            raise SparsifyError(f"layer {site.name}: its input is not a float tensor with {K} features")
        x = x.float()
        if augment:
            x = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)
        n += x.shape[0]
        sq += (x[:, :K] ** 2).sum(0).double()
        if hessian:
            H.addmm_(x.t(), x)
            if G is not None:
                xd = dxs[b].float()
                if augment:
                    xd = torch.cat([xd, torch.ones(xd.shape[0], 1)], dim=1)
                G.addmm_(x.t(), xd)
    if n == 0:
        raise SparsifyError(f"layer {site.name}: the calibration data has no tokens (all padding?)",
                            hint="pass calibration batches with real inputs")
    if not torch.isfinite(sq).all():
        raise SparsifyError(f"layer {site.name}: its input has NaN/Inf values on the calibration data",
                            hint="check the model runs finitely on the calibration batches (NaN/Inf weights in an "
                                 "earlier layer, left dense with a reason, reach this one's input)")
    return _Stats(n, H.double() / n if H is not None else None, sq, G.double() / n if G is not None else None)


# ---------------------------------------------------------------------------------------------
# The per-layer step


def _w2d(root, site: Site) -> torch.Tensor:
    """The weight as `[out, in]`, in its own dtype: magnitude and Wanda only zero entries, so every
    kept weight stays bit-identical (a float32 round trip rounded float64 models)."""
    w = _attr(root, site.target).detach()
    return (w.t() if site.transposed else w).reshape(site.shape)


def _bias(root, site: Site) -> torch.Tensor | None:
    return _attr(root, site.bias_target).detach() if site.bias_target else None


def _prune_layer(W: torch.Tensor, bias: torch.Tensor | None, st: _Stats | None, cfg: SparsifyConfig, k: int,
                 notes: list[str]) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
    """New (weight, bias, relative error) for one layer; k units of cfg.pattern zeroed.

    The error is measured here when the statistics hold the Hessian (SparseGPT, sensitivity);
    otherwise None (the caller measures it on the activations)."""
    p = cfg.pattern
    if cfg.method == "magnitude":
        zero = magnitude_mask(W, p, k)
        Wn = W.masked_fill(zero, 0.0)
        return Wn, None, (relative_error(W, Wn, st.H) if st is not None and st.H is not None else None)
    if cfg.method == "wanda":
        dead = int((st.sqnorm == 0).sum())
        if dead:
            notes.append(f"{dead} inputs were zero on all calibration tokens: their weights ranked by |w|")
        zero = wanda_mask(W, st.sqnorm, p, k)
        Wn = W.masked_fill(zero, 0.0)
        return Wn, None, (relative_error(W, Wn, st.H) if st.H is not None else None)
    # SparseGPT updates kept weights: computed in float32, or float64 for a float64 model
    W = W.to(work_dtype(W))
    if st.n < W.shape[1]:  # fewer tokens than inputs: the fit holds on these tokens only
        notes.append(f"calibrated on {st.n} tokens for {W.shape[1]} inputs: the Hessian is rank-deficient (only damping "
                     f"holds it), so the reconstruction fits these tokens and may generalise worse than magnitude; "
                     f"give at least {W.shape[1]} tokens of calibration data")
    augment = st.H.shape[0] == W.shape[1] + 1
    Wa = torch.cat([W, bias.to(W.dtype)[:, None]], dim=1) if augment else W
    try:
        prep = st.prep = st.prep or prepare_hessian(st.H, cfg.damp, dtype=W.dtype)
    except HessianError as err:
        notes.append(f"{err}: pruned by magnitude")
        zero = magnitude_mask(W, p, k)
        return W.masked_fill(zero, 0.0), None, None
    notes.extend(prep.notes)
    T = corrected_target(Wa, prep, st.G) if st.G is not None else Wa
    Wn, zero = sparsegpt(T, prep, p, k, blocksize=cfg.blocksize, free=1 if augment else 0)
    if cfg.refine:
        keep = torch.ones_like(Wn, dtype=torch.bool)
        keep[:, : W.shape[1]] = ~zero
        Wn = masked_lstsq(Wn, T, prep.H, keep, cfg.refine)
    if not torch.isfinite(Wn).all():
        notes.append("SparseGPT gave non-finite values: pruned by magnitude instead")
        zero = magnitude_mask(W, p, k)
        return W.masked_fill(zero, 0.0), None, None
    Wn[:, : W.shape[1]].masked_fill_(zero, 0.0)
    # error of the layer's own output on the pruned model's inputs, against the dense weight
    err = relative_error(Wa, Wn, st.H)
    if augment:
        return Wn[:, :-1].contiguous(), Wn[:, -1].contiguous(), err
    return Wn, None, err


# ---------------------------------------------------------------------------------------------
# The whole model


def _counts(sites: list[Site], cfg: SparsifyConfig, fractions: list[float] | None) -> list[int]:
    p = cfg.pattern
    if p.kind == "nm":
        return [zero_units(s.shape, p) for s in sites]
    if fractions is None:
        return [zero_units(s.shape, p) for s in sites]
    return alloc.exact_counts(fractions, [units(s.shape, p) for s in sites], p.sparsity)


def _output_gains(gm: fx.GraphModule, batches: list, prune: list[Site], probes: int = 1) -> dict[str, float]:
    """How much each layer's output moves the model's output: ||J_l||_F^2 per token.

    Hutchinson's estimator: for a random direction v at the outputs, the gradient g_l = J_l^T v
    at layer l's output has E||g_l||^2 = ||J_l||_F^2, so one backward pass per batch measures every
    layer at once. The graph runs with detached weights, so no parameter gets a `.grad`.
    """
    nodes = {s.node: s.name for s in prune}
    gen = torch.Generator().manual_seed(0)
    sums = dict.fromkeys(nodes.values(), 0.0)
    tokens = dict.fromkeys(nodes.values(), 0)

    class Probe(fx.Interpreter):
        def fetch_attr(self, target):
            value = super().fetch_attr(target)
            return value.detach() if isinstance(value, torch.Tensor) else value

        def run_node(self, n):
            out = super().run_node(n)
            if n in nodes and isinstance(out, torch.Tensor) and out.is_floating_point():
                delta = torch.zeros_like(out, requires_grad=True)  # a leaf whose grad is dLoss/d(output)
                deltas.append((nodes[n], delta))
                out = out + delta
            return out

    with torch.enable_grad():
        for args, kwargs in batches:
            mask = _token_mask(kwargs)
            for _ in range(probes):
                deltas: list = []
                outs = Probe(gm).run(*flat_inputs(gm, args, kwargs))
                loss = None
                for o in torch.utils._pytree.tree_leaves(outs):
                    if isinstance(o, torch.Tensor) and o.requires_grad:
                        v = torch.randn(o.shape, generator=gen)
                        if mask is not None and o.dim() >= 2 and tuple(o.shape[:2]) == tuple(mask.shape):
                            v = v * mask.view(*mask.shape, *([1] * (o.dim() - 2)))
                        term = (o * v).sum()
                        loss = term if loss is None else loss + term
                if loss is None:
                    continue
                loss.backward()
                for name, delta in deltas:
                    g = delta.grad
                    if g is None:
                        continue
                    if mask is not None and g.dim() == 3 and tuple(g.shape[:2]) == tuple(mask.shape):
                        g = g[mask]
                    g = g.reshape(-1, g.shape[-1])
                    sums[name] += float((g.double() ** 2).sum())
                    tokens[name] += g.shape[0]
    return {n: sums[n] / max(tokens[n], 1) for n in sums}


def _allocate(gm, root, prune: list[Site], cfg: SparsifyConfig, batches, label, progress, result) -> list[float] | None:
    """Per-layer sparsities from a dense pre-pass (owl, sensitivity), or None for uniform."""
    if cfg.allocation == "uniform":
        return None
    p = cfg.pattern
    sizes = [units(s.shape, p) for s in prune]
    by_node = {s.node: s for s in prune}
    ratios: dict[str, float] = {}
    curves: dict[str, tuple[list[float], list[float]]] = {}
    grid = alloc.sweep_grid(p.sparsity)
    cache: dict[fx.Node, _Stats] = {}
    done = [0]

    def visit(site: Site, xs, _dxs):
        st = cache.get(site.x_node)
        if st is None:
            cache.clear()  # one input's statistics at a time
            st = cache[site.x_node] = _stats(xs, None, hessian=cfg.allocation == "sensitivity", augment=False, site=site)
        W = _w2d(root, site)
        if cfg.allocation == "owl":
            score = W.abs().double() * st.sqnorm.sqrt()[None, :]
            ratios[site.name] = float((score > cfg.owl_m * score.mean()).double().mean())
        else:
            # the layer's output error in absolute terms (per token), weighted by how strongly that
            # output moves the model's output: an estimate of the error each choice adds at the output
            ref = float(((W.double() @ st.H) * W.double()).sum())
            errs = []
            for s in grid:
                k = round(s * units(site.shape, p))
                _, _, e = _prune_layer(W, None, st, cfg.with_options(correct=False, update_bias=False, refine=0), k, [])
                errs.append((e or 0.0) * ref * gains.get(site.name, 0.0))
            curves[site.name] = (grid, errs)
        done[0] += 1
        if progress:
            progress(done[0], len(prune), f"{cfg.allocation} allocation: {site.name}")

    gains = _output_gains(gm, batches, prune) if cfg.allocation == "sensitivity" else {}
    _Walk(gm, batches, label).run(by_node, visit)
    if cfg.allocation == "owl":
        fr = alloc.owl_sparsities([ratios[s.name] for s in prune], sizes, p.sparsity, cfg.owl_lambda)
        result.notes.append(f"owl allocation (M={cfg.owl_m:g}, lambda={cfg.owl_lambda:g}): per-layer sparsity "
                            f"{min(fr):.1%} to {max(fr):.1%}")
    else:
        fr = alloc.sensitivity_sparsities([curves[s.name] for s in prune], sizes, p.sparsity)
        result.notes.append(f"sensitivity allocation (swept {', '.join(f'{g:g}' for g in grid)}): per-layer sparsity "
                            f"{min(fr):.1%} to {max(fr):.1%}")
    return fr


@torch.no_grad()
def compute(model: torch.nn.Module, cfg: SparsifyConfig, batches: list | None, *, gm: fx.GraphModule | None = None,
            label: str | None = None, progress: Progress | None = None) -> tuple[dict[str, torch.Tensor], SparsifyResult]:
    """New tensors (stored layout, keyed by attribute path) for every pruned layer, and the report.

    `gm` is the captured graph of `model` (needed when calibration data is used); attribute paths
    are the graph's, which are the model's own qualified names. Nothing is written anywhere.
    """
    t0 = time.perf_counter()
    label = label or type(model).__name__
    result = SparsifyResult(label, cfg.describe(), str(cfg.pattern))
    if cfg.needs_calibration and not batches:
        what = cfg.method if cfg.method != "magnitude" else f"allocation '{cfg.allocation}'"
        raise SparsifyError(f"{what} needs calibration data to sparsify {label}, and none was given",
                            hint="pass calibration=[batch, ...] (each batch like the model's inputs); on the CLI, --calib N")
    root = gm if gm is not None else model
    sites = graph_sites(gm) if gm is not None else module_sites(model)
    if not sites:
        raise SparsifyError(f"{label} has no Linear (or x @ W) layer to sparsify",
                            hint="sparsify prunes the weights of Linear layers and constant-weight matmuls")
    prune, skipped = plan(root, sites, cfg, gm)
    if not prune:
        reasons = "; ".join(f"{r.name}: {r.reason}" for r in list(skipped.values())[:4])
        raise SparsifyError(f"no layer of {label} can be sparsified with {cfg}: {reasons}" + (" ..." if len(skipped) > 4 else ""),
                            hint="check skip= (defaults skip output heads) and that the pattern divides the layers' shapes")
    if batches:
        tokens = sum(int(m.sum()) if m is not None else 0 for m in (_token_mask(kw) for _, kw in batches))
        result.calibration = {"batches": len(batches), **({"tokens": tokens} if tokens else {})}
    fractions = _allocate(gm, root, prune, cfg, batches, label, progress, result)
    counts = _counts(prune, cfg, fractions)
    if fractions is not None:
        _note_unmet_budget(prune, cfg, counts, result)
    k_of = {id(s): k for s, k in zip(prune, counts)}
    out: dict[str, torch.Tensor] = {}
    results: dict[int, LayerResult] = {}  # by id(site): a layer called twice is two sites of one name
    done = [0]

    def finish(site: Site, st: _Stats | None, xs: list | None = None):
        W = _w2d(root, site)
        notes: list[str] = []
        bias = _bias(root, site) if (cfg.update_bias and cfg.method == "sparsegpt") else None
        k = k_of[id(site)]
        Wn, bn, err = _prune_layer(W, bias, st, cfg, k, notes)
        if err is None and xs is not None:  # lossy: every method says what it cost, when there is data to say it
            err = output_error(W, Wn, xs)
        have = zeros_in(Wn, cfg.pattern)
        if have != k:  # zeros the layer already had beyond what was asked stay zero
            what = "tiles" if cfg.pattern.kind == "block" else "weights"
            notes.append(f"{have} zero {what} where {k} were asked: {zeros_in(W, cfg.pattern)} were zero before pruning")
        stored = _attr(root, site.target)
        new = (Wn.t() if site.transposed else Wn).reshape(stored.shape).to(stored.dtype).contiguous()
        out[site.target] = new
        if bn is not None:
            out[site.bias_target] = bn.to(_attr(root, site.bias_target).dtype)
        n_units = units(site.shape, cfg.pattern)
        target = k / n_units if cfg.pattern.kind != "nm" else 1 - cfg.pattern.n / cfg.pattern.m
        results[id(site)] = LayerResult(site.name, list(site.shape), "pruned", "", target,
                                        1.0 - int(torch.count_nonzero(Wn)) / Wn.numel(), err, notes)
        done[0] += 1
        if progress:
            progress(done[0], len(prune), f"{cfg.method}: {site.name}")
        return new

    if not batches:  # magnitude with no data: nothing to walk
        for site in prune:
            finish(site, None)
    else:
        hessian = cfg.method == "sparsegpt"
        augment = hessian and cfg.update_bias
        walk = _Walk(gm, batches, label, twin=hessian and cfg.correct)
        by_node = {s.node: s for s in prune}
        remaining: dict[fx.Node, int] = {}
        for s in prune:
            remaining[s.x_node] = remaining.get(s.x_node, 0) + 1
        cache: dict[fx.Node, _Stats] = {}

        def visit(site: Site, xs, dxs):
            st = None
            if cfg.method != "magnitude":  # magnitude reads its input only for the output error
                aug = augment and site.bias_target is not None
                key = (site.x_node, aug)
                st = cache.get(key)
                if st is None:
                    st = cache[key] = _stats(xs, dxs, hessian=hessian, augment=aug, site=site)
            elif any(x is None or x.shape[-1] != site.shape[1] for x in xs):
                raise SparsifyError(f"layer {site.name}: its input is not a float tensor with {site.shape[1]} features")
            walk.weights[site.target] = finish(site, st, xs)
            if site.bias_target in out:
                walk.weights[site.bias_target] = out[site.bias_target]
            remaining[site.x_node] -= 1
            if remaining[site.x_node] == 0:  # free the statistics with the input's last layer
                for k in [k for k in cache if k[0] is site.x_node]:
                    del cache[k]

        walk.run(by_node, visit)
        missing = [s.name for s in prune if id(s) not in results]
        if missing:
            raise SparsifyError(f"{label}: layers {missing[:3]} were never reached by the calibration data",
                                hint="their inputs may not depend on the model inputs")
    result.layers = [results.get(id(s)) or skipped[id(s)] for s in sites]
    result.numel = {s.name: s.shape[0] * s.shape[1] for s in sites}
    result.seconds = time.perf_counter() - t0
    return out, result


def _note_unmet_budget(prune: list[Site], cfg: SparsifyConfig, counts: list[int], result: SparsifyResult) -> None:
    """Say so when an allocation cannot reach the global target: no layer goes past MAX_SPARSITY."""
    sizes = [units(s.shape, cfg.pattern) for s in prune]
    asked = round(cfg.pattern.sparsity * sum(sizes))
    if sum(counts) != asked:
        result.notes.append(f"the global target {cfg.pattern.sparsity:g} cannot be met exactly with allocation "
                            f"'{cfg.allocation}': it keeps at least {1 - alloc.MAX_SPARSITY:.0%} of every layer, "
                            f"so {sum(counts) / sum(sizes):.2%} was reached (allocation='uniform' prunes exactly)")


# ---------------------------------------------------------------------------------------------
# Writing the result


@contextmanager
def _no_interrupt():
    """Defer Ctrl-C while the new weights are written, so a model is never half-committed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    old = signal.signal(signal.SIGINT, lambda *a: caught.append(a))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if caught:
            raise KeyboardInterrupt


def commit(root: torch.nn.Module, tensors: dict[str, torch.Tensor], *, replace: bool = False) -> None:
    """Write `tensors` (attribute path -> value) into `root`, all or nothing.

    `replace=False` copies into the existing parameters (the user's model: the same Parameter
    objects stay, optimisers and tied references keep working); `replace=True` swaps in new
    Parameters (a captured graph, whose parameters are shared with the user's model).
    """
    for path, value in tensors.items():  # check every target first: fail before writing anything
        cur = _attr(root, path)
        if tuple(cur.shape) != tuple(value.shape):
            raise SparsifyError(f"cannot write {path}: shape {tuple(value.shape)} != {tuple(cur.shape)}")
    with _no_interrupt(), torch.no_grad():
        for path, value in tensors.items():
            owner_path, _, leaf = path.rpartition(".")
            owner = root.get_submodule(owner_path) if owner_path else root
            cur = getattr(owner, leaf)
            if replace:
                new = torch.nn.Parameter(value.clone(), requires_grad=cur.requires_grad) if isinstance(cur, torch.nn.Parameter) else value.clone()
                setattr(owner, leaf, new)
            else:
                cur.copy_(value)


def _shapes(batch) -> list:
    args, kwargs = batch
    return [tuple(v.shape) if isinstance(v, torch.Tensor) else v for v in [*args, *kwargs.values()]]


def capture_for(model: torch.nn.Module, batches: list, label: str) -> fx.GraphModule:
    """Capture `model` on its first calibration batch.

    Dynamic batch/sequence dims only when the batches' shapes differ (text of varying length):
    a static trace is several times faster and equally valid when every batch has one shape.
    """
    from sparsecomp.frontend import capture

    args, kwargs = batches[0]
    same = all(_shapes(b) == _shapes(batches[0]) for b in batches[1:])
    return capture(model, (args, kwargs) if kwargs else args, name=label, dynamic=not same)


def normalize_batches(calibration, label: str) -> list:
    """Calibration as a list of (args, kwargs), with a clear error for anything else."""
    if calibration is None:
        return []
    if isinstance(calibration, (torch.Tensor, dict)):
        raise SparsifyError(f"calibration for {label} must be a list of batches, got a single {type(calibration).__name__}",
                            hint="wrap it: calibration=[batch]")
    try:
        raw = list(calibration)
    except TypeError:
        raise SparsifyError(f"calibration for {label} must be an iterable of input batches, got {type(calibration).__name__}",
                            hint="pass a list of batches, each a tensor, a tuple of args or a dict of keyword args") from None
    out = []
    for i, b in enumerate(raw):
        try:
            out.append(normalize_inputs(b))
        except TypeError as err:
            raise SparsifyError(f"calibration batch {i} for {label}: {err}") from None
    return out


def _check_weights(model: torch.nn.Module, cfg: SparsifyConfig, label: str) -> None:
    """Weights sparsify cannot read or write, as one clear error before any work (as `impose` does)."""
    from torch.nn.utils import parametrize

    for name, t in model.named_parameters():
        if isinstance(t, torch.nn.parameter.UninitializedParameter):
            raise SparsifyError(f"{label}: {name} is an uninitialized (lazy) parameter",
                                hint="run one forward pass to materialize lazy layers before sparsifying")
        if t.is_meta:
            raise SparsifyError(f"{label}: {name} is on the meta device (no values to prune)",
                                hint="load real weights first, e.g. model.to_empty(device='cpu') then load_state_dict")
    for name, mod in model.named_modules():
        site = layer_name(f"{name}.weight" if name else "weight")
        if isinstance(mod, torch.nn.Linear) and parametrize.is_parametrized(mod, "weight") and skipped_by(site, cfg.skip) is None:
            # mod.weight is recomputed from the parametrization's own tensors on every access:
            # zeros written into it would not stick (and a capture does not see it as a weight)
            raise SparsifyError(f"{label}: layer {site!r} has a parametrized weight (e.g. weight_norm): pruning written into it would not stick",
                                hint="remove the parametrization first (torch.nn.utils.parametrize.remove_parametrizations(layer, "
                                     f"'weight')) or leave the layer dense: skip=[{site!r}, ...]")


def sparsify_module(model: torch.nn.Module, cfg: SparsifyConfig, calibration=None, *,
                    label: str | None = None, progress: Progress | None = None, example=None) -> SparsifyResult:
    """Sparsify `model` in place (all weights written at the end, or none); returns the report.

    Captures the model on its first calibration batch when there is one (every method then
    reports each layer's output error); magnitude without calibration captures on `example`
    (compile's example inputs) when given, so it finds the weights a pipeline's sparsify pass
    finds, and otherwise on the module itself (`module_sites`).
    """
    label = label or type(model).__name__
    if not isinstance(model, torch.nn.Module):
        raise SparsifyError(f"sparsify expects a torch.nn.Module, got {type(model).__name__}")
    batches = normalize_batches(calibration, label)
    _check_weights(model, cfg, label)
    if cfg.needs_calibration and not batches:
        compute(model, cfg, None, label=label)  # raises the "needs calibration" error
    on = batches
    if not on and example is not None:
        try:
            on = [normalize_inputs(example)]
        except TypeError as err:
            raise SparsifyError(f"example inputs for {label}: {err}") from None
    gm = None
    if on:
        gm = capture_for(model, on, label)
        sites = {s.target for s in graph_sites(gm)}
        missing = [t for t in sites if not _has_attr(model, t)]
        if missing:
            raise SparsifyError(f"{label}: captured weights {missing[:3]} are not attributes of the model",
                                hint="sparsify needs the model's own parameters in the captured graph")
    tensors, result = compute(model, cfg, batches or None, gm=gm, label=label, progress=progress)
    commit(model, tensors)
    return result


def _has_attr(root: torch.nn.Module, path: str) -> bool:
    try:
        _attr(root, path)
        return True
    except AttributeError:
        return False

