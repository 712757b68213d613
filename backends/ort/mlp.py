"""Lowering `sparsecomp::sparse_mlp` to standard ONNX: skip the inactive hidden neurons in stock onnxruntime.

Candidates (x flattened to `[M, K]` with Reshape, leading dims restored from `Shape(x)` at the end;
h is the hidden activation `[M, H]`, after the mode's keep-mask in the lossy modes):

    dense      Gemm(x, W_up^T) + b -> act [-> * act(gate)] [-> * keep] -> Gemm(h, W_down^T) + b
               the fallback: the op's reference, written in ONNX
    active     h as in dense, then the union of the active neurons over the M rows:
               idx = NonZero(ReduceSum(|h|, rows)); h's selected columns and
               Gather(W_down^T, idx) [nact, N] (whole contiguous rows: memcpy speed) ->
               Gemm + b_down. Skips the down-projection's inactive rows.
    predictor  (predictor mode) keep = score(u_hat) * scale > t, u_hat = (x A^T) Bt + b (the
               reference's calls, so the masks agree); idx = the union of the kept neurons;
               Gather the kept ROWS of W_up (and W_gate) [nact, K] -> Gemm(., transB) + bias
               (no transposed copy) -> act [* up] -> * keep (gathered: a neuron kept for another
               row is zero in this one, as in the reference) -> Gather rows of W_down^T -> Gemm
               + b_down. Skips both projections' unselected rows.
    pruned     (exact mode, weights pruned: one at most `PRUNED_DENSITY` nonzero) up, gate and down
               each on its own measured sparse-linear lowering (`lowering.choose_linear`, cached
               like any sparse_linear; arrays under the roles `up.*`, `gate.*`, `down.*`, described
               by the record's `parts`), every neuron computed: what a compile without activation
               sparsity runs, so fusing never costs a pruned MLP its weight sparsity or its compact
               storage.

Storage: a pruned weight (`w_up`, `w_gate`, `w_down_t` at most `COMPACT_DENSITY` nonzero) is stored
as the sell arrays of its transpose and rebuilt by the kernels' constant-only subgraph, which
onnxruntime folds once at load (`MLPArrays.compact`), whichever candidate runs; its arrays then
appear in the record as `<role>.cols0`, `<role>.values0`, ... (`files.py` decodes them).

Layout of the selected neurons, fixed per candidate by the rows per call M at the example inputs:
up to `FEW_ROWS` rows `[M, nact]` (Gather along h's last axis, element by element, ~6 ns each in
onnxruntime, see kernels.py: cheap for a few rows; the down Gemm is then onnxruntime's GEMV at
M = 1); more rows `[nact, M]` (Gather whole rows of h^T; Gemm with transA). Both handle nact = 0
(no neuron active: the output is b_down; onnxruntime runs Gather / Gemm on empty tensors, tested). Weights are stored fp32 as the op holds
them: W_up / W_gate `[H, K]`, W_down^T `[H, N]` (the `arrays` roles `w_up`, `w_gate`,
`w_down_t`, ... of the layer's metadata, so `files.py` can read them back).

Choice (per sparse_mlp node, as `lowering.py` does for sparse_linear): the node's real input on the
example inputs, each candidate as a one-MLP ONNX model checked against the op's reference within
1e-4 x max|output|, timed interleaved (p10), a sparse candidate kept only if it beats dense by
`SPARSE_MARGIN`, cached in `DecisionCache("ort")`. In the lossy modes onnxruntime's GEMM rounds
differently from torch's, so a neuron sitting exactly at its threshold can flip: when no candidate
agrees with the reference within 1e-4, the dense lowering is kept if its output still agrees in
direction (cosine >= `LOSSY_MIN_COSINE`), with a note; otherwise it is an error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from onnx import TensorProto
from torch import fx

from sparsecomp.cache import DecisionCache
from sparsecomp.dialect import MLP_ACTIVATIONS, PRUNED_DENSITY, RELU_FAMILY, SPARSE_MLP, mlp_hidden
from sparsecomp.errors import SparsecompError
from sparsecomp.ir import get_attr_value, output_cosine, record_inputs
from sparsecomp.lowering import LOSSY_MIN_COSINE, MLPDecision, speedup_text
from sparsecomp.timing import model_is_cold

from . import kernels as K
from .export import Placement
from .kernels import Candidate, Emitter
from .lowering import cached_decision, run_candidate, time_candidates
from .runner import threads

__all__ = ["CANDIDATE_SET_VERSION", "MLPArrays", "MLPDecision", "candidates", "decide_mlps", "part_records", "plain_dense", "pruned_candidate"]

CANDIDATE_SET_VERSION = 4  # bump when the candidates or their timing change: cached decisions no longer apply (4: timed spinning within a run)
# Up to this many rows per call (at the example inputs) the selected neurons are laid out [M, nact]:
# the down Gemm then takes onnxruntime's GEMV path at M = 1 (MLAS has one for an untransposed A
# only; measured 20 us instead of 72 us for 300 neurons -> 768 at M = 1), and the element-wise
# Gather along the hidden axis stays small. More rows: [nact, M], whole rows gathered.
FEW_ROWS = 4
_ARGS = ("x", "w_up", "b_up", "w_gate", "b_gate", "w_down_t", "b_down", "activation", "mode", "threshold", "scale",
         "pred_a", "pred_bt")
_TENSORS = ("w_up", "b_up", "w_gate", "b_gate", "w_down_t", "b_down", "threshold", "scale", "pred_a", "pred_bt")
COMPACT_ROLES = ("w_up", "w_gate", "w_down_t")
COMPACT_DENSITY = 0.6  # as kernels.storage_choice: denser weights gain too little from sell storage


@dataclass
class MLPArrays:
    """The op's constant arguments as fp32 numpy arrays (None where the op has none)."""

    activation: str
    mode: str
    w_up: np.ndarray  # [H, K]
    w_down_t: np.ndarray  # [H, N]
    b_up: np.ndarray | None = None
    w_gate: np.ndarray | None = None
    b_gate: np.ndarray | None = None
    b_down: np.ndarray | None = None
    threshold: np.ndarray | None = None
    scale: np.ndarray | None = None
    pred_a: np.ndarray | None = None  # [r, K]
    pred_bt: np.ndarray | None = None  # [r, H]

    @property
    def shape(self) -> list[int]:
        return [int(self.w_up.shape[1]), int(self.w_up.shape[0]), int(self.w_down_t.shape[1])]  # K, H, N

    @property
    def gated(self) -> bool:
        return self.w_gate is not None

    def nbytes(self, *roles: str) -> int:
        """Bytes stored for `roles` (all by default), compact where `compact` stores them so."""
        total = 0
        for r in roles or _TENSORS:
            arr = getattr(self, r)
            if arr is not None:
                sell = self.compact(r)
                total += sell["nbytes"] if sell is not None else arr.nbytes
        return int(total)

    def compact(self, role: str) -> dict | None:
        """The sell storage of a pruned weight (`w_up`, `w_gate`, `w_down_t`; at most
        `COMPACT_DENSITY` nonzero, and 10% smaller than fp32), or None to store it plainly. Kept as
        the rows of the array's transpose, so the kernels' rebuild-W^T subgraph gives the array
        itself (onnxruntime folds it once at load): an MLP that runs `dense` or `active` keeps the
        small file of its weight sparsity. Cached per role."""
        if role not in COMPACT_ROLES or getattr(self, role) is None:
            return None
        cache = self.__dict__.setdefault("_compact", {})
        if role not in cache:
            arr = getattr(self, role)
            sell = None
            if arr.size and float((arr != 0).mean()) <= COMPACT_DENSITY:
                sell = K._sell_storage(np.ascontiguousarray(arr.T), 4)
                sell = sell if sell["nbytes"] < 0.9 * arr.nbytes else None
            cache[role] = sell
        return cache[role]

    @classmethod
    def from_values(cls, values: dict) -> MLPArrays:
        def arr(t):
            if t is None:
                return None
            t = t.detach().cpu() if isinstance(t, torch.Tensor) else t
            return np.ascontiguousarray(np.asarray(t, dtype=np.float32))

        return cls(activation=values["activation"], mode=values["mode"], **{k: arr(values.get(k)) for k in _TENSORS})


# ------------------------------------------------------------------------------------------------
# emitting ONNX


class _Build:
    """An Emitter with each weight and scalar written once (several nodes read them)."""

    def __init__(self, e: Emitter, a: MLPArrays, opset: int, few_rows: bool):
        self.e, self.a, self.opset, self.few_rows = e, a, opset, few_rows
        self._names: dict[str, str] = {}

    def w(self, role: str) -> str | None:
        if getattr(self.a, role) is None:
            return None
        if role not in self._names:
            sell = self.a.compact(role)
            if sell is not None:  # a pruned weight: stored compactly, rebuilt once at load (folded)
                self._names[role] = K._emit_rebuild_wt(_Part(self.e, role), sell, sell["shape"][1])
            else:
                self._names[role] = self.e.const(role, getattr(self.a, role))
        return self._names[role]

    def scalar(self, value: float) -> str:
        key = f"scalar{value!r}"
        if key not in self._names:
            self._names[key] = self.e.const(f"c{len(self._names)}", np.array(value, dtype=np.float32), stored=False)
        return self._names[key]

    def ints(self, role: str, values) -> str:
        if role not in self._names:
            self._names[role] = self.e.ints(role, values)
        return self._names[role]

    def gemm(self, a: str, b: str, c: str | None, **attrs) -> str:
        return self.e.node("Gemm", [a, b] + ([c] if c is not None else []), **attrs)

    def act(self, t: str) -> str:
        """The activation as `MLP_ACTIVATIONS` defines it (opset 20's Gelu op where the opset has it)."""
        e, name = self.e, self.a.activation
        if name == "relu":
            return e.node("Relu", [t])
        if name == "relu6":
            return e.node("Clip", [t, self.scalar(0.0), self.scalar(6.0)])
        if name == "relu2":
            r = e.node("Relu", [t])
            return e.node("Mul", [r, r])
        if name == "silu":
            return e.node("Mul", [t, e.node("Sigmoid", [t])])
        if name in ("gelu", "gelu_tanh"):
            if self.opset >= 20:
                return e.node("Gelu", [t], approximate="none" if name == "gelu" else "tanh")
            if name == "gelu":  # 0.5 x (1 + erf(x / sqrt(2)))
                inner = e.node("Erf", [e.node("Mul", [t, self.scalar(float(1 / np.sqrt(2.0)))])])
            else:  # 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
                cube = e.node("Mul", [e.node("Mul", [t, t]), t])
                poly = e.node("Add", [t, e.node("Mul", [cube, self.scalar(0.044715)])])
                inner = e.node("Tanh", [e.node("Mul", [poly, self.scalar(float(np.sqrt(2.0 / np.pi)))])])
            half = e.node("Mul", [t, self.scalar(0.5)])
            return e.node("Mul", [half, e.node("Add", [inner, self.scalar(1.0)])])
        raise SparsecompError(f"sparse_mlp activation {name!r} has no ONNX lowering", hint=f"known: {', '.join(MLP_ACTIVATIONS)}")

    def keep(self, score: str) -> str:
        """score [* scale] > threshold (bool), as the reference computes it."""
        if self.a.scale is not None:
            score = self.e.node("Mul", [score, self.w("scale")])
        return self.e.node("Greater", [score, self.w("threshold")])

    def predictor_keep(self, x2: str) -> str:
        """The predictor's keep-mask [M, H]: u_hat = (x A^T) Bt + bias, the reference's calls."""
        e, a = self.e, self.a
        low = self.gemm(x2, self.w("pred_a"), None, transB=1)
        u_hat = self.gemm(low, self.w("pred_bt"), self.w("b_gate" if a.gated else "b_up"))
        score = u_hat if a.activation in RELU_FAMILY else e.node("Abs", [self.act(u_hat)])
        return self.keep(score)

    def hidden(self, x2: str) -> str:
        """h [M, H] with the mode's keep-mask applied (multiplied, as the reference does)."""
        e, a = self.e, self.a
        up = self.gemm(x2, self.w("w_up"), self.w("b_up"), transB=1)
        h = self.act(up) if not a.gated else e.node("Mul", [self.act(self.gemm(x2, self.w("w_gate"), self.w("b_gate"), transB=1)), up])
        if a.mode == "threshold":
            keep = self.keep(e.node("Abs", [h]))
        elif a.mode == "predictor":
            keep = self.predictor_keep(x2)
        else:
            return h
        return e.node("Mul", [h, e.node("Cast", [keep], to=TensorProto.FLOAT)])

    def flat(self, x: str) -> str:
        return self.e.node("Reshape", [x, self.ints("shape_2d", [-1, self.a.shape[0]])])

    def union(self, t: str) -> str:
        """The indices [nact] of the neurons nonzero in any row of t [M, H] (t >= 0)."""
        s = self.e.node("ReduceSum", [t, self.ints("axis0", [0])], keepdims=0)
        return self.e.node("Reshape", [self.e.node("NonZero", [s]), self.ints("flat", [-1])])

    def select(self, t: str, idx: str) -> str:
        """The selected neurons of t [M, H], in this build's layout: [M, nact] or [nact, M]."""
        if self.few_rows:
            return self.e.node("Gather", [t, idx], axis=1)
        return self.e.node("Gather", [self.e.node("Transpose", [t], perm=[1, 0]), idx], axis=0)

    def pre_activation(self, x2: str, w: str, bias: str, idx: str) -> str:
        """x @ W[idx]^T + b[idx] for the selected neurons, in this build's layout (W's rows gathered:
        contiguous, and no transposed copy)."""
        e = self.e
        w_sel = e.node("Gather", [self.w(w), idx], axis=0)  # [nact, K]
        c = e.node("Gather", [self.w(bias), idx], axis=0) if self.w(bias) is not None else None
        if self.few_rows:
            return self.gemm(x2, w_sel, c, transB=1)
        if c is not None:
            c = e.node("Unsqueeze", [c, self.ints("axis1", [1])])
        return self.gemm(w_sel, x2, c, transB=1)

    def down_selected(self, h_sel: str, idx: str) -> str:
        """The selected neurons' hidden values (this build's layout) -> [M, N] (+ b_down)."""
        w_sel = self.e.node("Gather", [self.w("w_down_t"), idx], axis=0)  # [nact, N]: whole rows
        return self.gemm(h_sel, w_sel, self.w("b_down"), **({} if self.few_rows else {"transA": 1}))

    def finish(self, x: str, y2: str, out: str) -> None:
        lead = self.e.node("Shape", [x], end=-1)
        self.e.node("Reshape", [y2, self.e.node("Concat", [lead, self.ints("out_features", [self.a.shape[2]])], axis=0)], out=out)


def _dense(b: _Build, x: str, out: str) -> None:
    h = b.hidden(b.flat(x))
    b.finish(x, b.gemm(h, b.w("w_down_t"), b.w("b_down")), out)


def _active(b: _Build, x: str, out: str) -> None:
    h = b.hidden(b.flat(x))
    nonneg = not b.a.gated and b.a.activation in RELU_FAMILY  # masking keeps it >= 0: no Abs needed
    idx = b.union(h if nonneg else b.e.node("Abs", [h]))
    b.finish(x, b.down_selected(b.select(h, idx), idx), out)


def _predictor(b: _Build, x: str, out: str) -> None:
    e, a = b.e, b.a
    x2 = b.flat(x)
    keep = e.node("Cast", [b.predictor_keep(x2)], to=TensorProto.FLOAT)  # [M, H]
    idx = b.union(keep)
    up = b.pre_activation(x2, "w_up", "b_up", idx)
    h = b.act(up) if not a.gated else e.node("Mul", [b.act(b.pre_activation(x2, "w_gate", "b_gate", idx)), up])
    h = e.node("Mul", [h, b.select(keep, idx)])  # zero where this row did not keep the neuron
    b.finish(x, b.down_selected(h, idx), out)


_KERNELS = {"dense": (_dense, "dense"), "active": (_active, "sparse"), "predictor": (_predictor, "sparse")}


class _Part:
    """An Emitter view for one projection of a pruned MLP: its arrays get the role prefix
    (`up.values0`, `down.weight_t`, ...), its nodes keep the MLP's name prefix (so `files.py`
    recognises them as the MLP's), and nodes / initializers land in the MLP's emitter."""

    def __init__(self, parent: Emitter, role: str):
        self.parent, self.role = parent, role
        self.nodes = parent.nodes

    def const(self, role: str, array: np.ndarray, *, stored: bool = True) -> str:
        return self.parent.const(f"{self.role}.{role}", array, stored=stored)

    def ints(self, role: str, values) -> str:
        return self.parent.ints(f"{self.role}.{role}", values)

    def node(self, *args, **kwargs) -> str:
        return self.parent.node(*args, **kwargs)

    index = Emitter.index


def pruned_candidate(a: MLPArrays, parts: dict[str, Candidate], opset: int) -> Candidate:
    """A pruned MLP (exact mode) with each projection on its own measured sparse-linear lowering
    (`parts`: up, gate for gated MLPs, down; `lowering.choose_linear`): every neuron computed, as a
    compile without activation sparsity would run it, so fusing never costs the MLP its weight
    sparsity in onnxruntime (nor its compact storage in the file)."""
    k, _h, n = a.shape

    def emit(e: Emitter, x: str, out: str):
        b = _Build(e, a, opset, few_rows=True)
        u = f"{e.prefix}/up_out"
        parts["up"].emit(_Part(e, "up"), x, u)
        if a.gated:
            g = f"{e.prefix}/gate_out"
            parts["gate"].emit(_Part(e, "gate"), x, g)
            h = e.node("Mul", [b.act(g), u])
        else:
            h = b.act(u)
        parts["down"].emit(_Part(e, "down"), h, out)

    stored = sum(c.stored_bytes for c in parts.values())
    return Candidate("pruned", "pruned", "sparse", emit, stored, shape=(n, k))


def part_records(parts: dict[str, Candidate]) -> dict:
    """What `files.py` needs to decode each projection's stored weight (its arrays are those of the
    MLP's record whose role starts with `<part>.`)."""
    return {r: {"kernel": c.label, "family": c.family, "shape": list(c.shape), "block": list(c.block) if c.block else None}
            for r, c in parts.items()}


def _candidate(a: MLPArrays, label: str, opset: int, m: int = 1) -> Candidate:
    fn, decision = _KERNELS[label]
    k, _h, n = a.shape

    def emit(e: Emitter, x: str, out: str):
        fn(_Build(e, a, opset, few_rows=m <= FEW_ROWS), x, out)

    # shape (out, in): what `lowering.layer_model` needs to build the one-MLP model
    return Candidate(label, label, decision, emit, a.nbytes(), shape=(n, k))


def candidates(a: MLPArrays, opset: int, *, m: int = 1, only: set[str] | None = None) -> list[Candidate]:
    """The candidate lowerings of one MLP (dense first) for `m` rows per call, or those `only` names."""
    labels = ["dense", "active"] + (["predictor"] if a.mode == "predictor" else [])
    return [_candidate(a, label, opset, m) for label in labels if not only or label in only]


def plain_dense(a: MLPArrays, opset: int) -> Candidate:
    """The MLP with no neuron skipped and no keep-mask (what a plain export of the model runs):
    `files.dense_equivalent`'s baseline."""
    plain = MLPArrays(a.activation, "exact", a.w_up, a.w_down_t, a.b_up, a.w_gate, a.b_gate, a.b_down)
    return _candidate(plain, "dense", opset)


# ------------------------------------------------------------------------------------------------
# the per-MLP decision


def _op_values(gm: fx.GraphModule, node: fx.Node) -> tuple[dict, str | None]:
    """The op's arguments by name (constants read from the module), or a reason it cannot be lowered."""
    values = dict(zip(_ARGS, node.args)) | dict(node.kwargs)
    for name, v in list(values.items()):
        if name == "x" or not isinstance(v, fx.Node):
            continue
        if v.op != "get_attr":
            return values, f"argument {name} is computed ({v.name}), not a constant"
        values[name] = get_attr_value(gm, v.target).detach()
    bad = [k for k in _TENSORS if isinstance(values.get(k), torch.Tensor) and values[k].dtype != torch.float32]
    if bad:
        return values, f"{', '.join(bad)} not float32 (the ort lowering is fp32)"
    return values, None


def _hidden(v: dict, x: torch.Tensor) -> torch.Tensor:
    """The op's hidden activation (after the mode's keep-mask) on x, in plain torch."""
    return mlp_hidden(x, *(v[k] for k in ("w_up", "b_up", "w_gate", "b_gate", "activation", "mode", "threshold", "scale",
                                          "pred_a", "pred_bt")))


def _active_fraction(h: torch.Tensor) -> float:
    """The fraction of hidden neurons active in any row of h (the report's density)."""
    return float((h.reshape(-1, h.shape[-1]) != 0).any(0).float().mean()) if h.numel() else 0.0


def decide_mlps(gm: fx.GraphModule, example, *, cache: DecisionCache | None, max_seconds: float = 0.5, min_runs: int = 20,
                only: set[str] | None = None, progress=None, opset: int = 20, tune: bool = False
                ) -> tuple[dict[str, Placement], list[MLPDecision]]:
    """Measure and choose every sparse_mlp node's lowering (the graph is not modified). A node that
    cannot be lowered (computed weights) gets no placement: export runs its dense reference.
    `tune`: as `lowering.choose_linear` (own cache key, preferred by later compiles)."""
    import onnxruntime

    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and str(n.target) == SPARSE_MLP]
    if not nodes:
        return {}, []
    inputs = record_inputs(gm, nodes, example)
    cold = model_is_cold(gm)
    placements: dict[str, Placement] = {}
    decisions: list[MLPDecision] = []
    linear_shortlists: dict = {}  # pruned MLPs' projections, as decide_layers shares them
    for i, node in enumerate(nodes):
        info = node.meta.get("sparsecomp.sparse_mlp", {})
        layer = info.get("layer", node.name)
        values, why_not = _op_values(gm, node)
        pattern = f"mlp {info.get('pattern', '')} {values.get('activation')} {values.get('mode')}".replace("  ", " ")
        calib = {k: info[k] for k in ("target_sparsity", "calibrated_sparsity", "recall", "cosine", "score") if info.get(k) is not None}
        x = inputs[node]
        m = x.numel() // x.shape[-1] if x.dim() else 1
        if why_not is not None or x.dtype != torch.float32:
            why_not = why_not or f"input dtype {x.dtype} (the ort lowering is fp32)"
            decisions.append(MLPDecision(layer, [], m, float("nan"), "dense", "reference", 0.0, 0.0,
                                         f"exported as the op's dense reference: {why_not}", pattern=pattern, calibration=calib))
            continue
        a = MLPArrays.from_values(values)
        with torch.no_grad():
            reference = node.target(x, *[values.get(k) for k in _ARGS[1:]])
            h = _hidden(values, x)
            density = _active_fraction(h)
        notes: list[str] = []
        cands = candidates(a, opset, m=m, only=only)
        parts = None
        if a.mode == "exact" and _pruned(a) and (not only or "pruned" in only):  # both sparsities
            parts, note = _choose_parts(values, x, h, layer, cache=cache, cold=cold, opset=opset, max_seconds=max_seconds / 2,
                                        min_runs=min_runs, shortlists=linear_shortlists, tune=tune)
            cands.append(pruned_candidate(a, parts, opset))
            notes.append(note)
        if not cands:
            cands = [_candidate(a, "dense", opset, m)]
            notes.append(f"no allowed kernel ({', '.join(sorted(only or []))}) fits this MLP")
        by_label = {c.label: c for c in cands}
        key, entry, chosen, cached, measured, dense_us, chosen_us = None, None, None, False, {}, 0.0, 0.0
        if cache is not None:
            def key_for(tuned: bool):
                return cache.key(op="sparse_mlp", shape=a.shape, m=m, mode=a.mode, activation=a.activation, gated=a.gated,
                                 density=round(density, 2), version=CANDIDATE_SET_VERSION, candidates=sorted(by_label),
                                 ort=onnxruntime.__version__, threads=threads(), opset=opset, cold=cold,
                                 parts={r: c.label for r, c in parts.items()} if parts else None,
                                 **({"tuned": True} if tuned else {}))

            key = key_for(tune)
            entry = cached_decision(cache, key, key_for(True) if not tune and not only else None, by_label, notes)
        if entry is not None:
            fn, why = run_candidate(by_label[entry["kernel"]], x, reference, opset)
            if fn is not None:
                chosen, cached, measured = by_label[entry["kernel"]], True, dict(entry.get("measured", {}))
                dense_us, chosen_us = entry["dense_us"], entry["chosen_us"]
            else:
                notes.append(f"cached choice {entry['kernel']} failed verification ({why}); re-measured")
        if chosen is None:
            measured, best = time_candidates(cands, x, reference, opset=opset, cold=cold, m=m, max_seconds=max_seconds,
                                             min_runs=min_runs, notes=notes)
            if best is None:
                best = _lossy_fallback(a, layer, x, reference, opset, notes)
            chosen = by_label.get(best) or _candidate(a, best, opset, m)
            dense_us, chosen_us = measured.get("dense", float("nan")), measured.get(best, 0.0)
            if cache is not None and measured:
                cache.put(key, {"kernel": best, "dense_us": dense_us, "chosen_us": chosen_us, "measured": measured})
        if chosen.decision == "dense":
            head = "dense is fastest in onnxruntime (measured)" if len(measured) > 1 else "dense: no sparse lowering left to try"
        else:
            head = speedup_text(dense_us, chosen_us, " in onnxruntime")
        reason = "; ".join([f"{head}, {density:.1%} of neurons active", *notes])
        decisions.append(MLPDecision(layer, a.shape, m, density, chosen.decision, chosen.label, dense_us, chosen_us, reason,
                                     cached, measured, pattern=pattern, calibration=calib))
        placements[node.name] = Placement(node.name, layer, chosen, a.shape, {
            "op": "sparse_mlp", "mode": a.mode, "activation": a.activation, "density": density, "m": m,
            "dense_us": dense_us, "chosen_us": chosen_us,
            "linears": {r: info.get(r) for r in ("up", "gate", "down") if info.get(r)},
            **({"parts": part_records(parts)} if chosen.label == "pruned" else {})})
        if progress is not None:
            progress(i + 1, len(nodes), layer)
    return placements, decisions


# A pruned MLP (exact mode): below this weight density its projections also get their own measured
# sparse-linear lowerings (`pruned_candidate`), as in the torch backend.


def _pruned(a: MLPArrays) -> bool:
    return any(float((w != 0).mean()) <= PRUNED_DENSITY for w in (a.w_up, a.w_down_t, a.w_gate) if w is not None)


def _choose_parts(values: dict, x: torch.Tensor, h: torch.Tensor, layer: str, **choose) -> tuple[dict[str, Candidate], str]:
    """Each projection's measured lowering (`choose_linear`, cached like any sparse_linear), and a
    note for the report."""
    from .lowering import choose_linear

    ch = {"up": choose_linear(values["w_up"], values["b_up"], x, layer=f"{layer} up", **choose)}
    if values["w_gate"] is not None:
        ch["gate"] = choose_linear(values["w_gate"], values["b_gate"], x, layer=f"{layer} gate", **choose)
    ch["down"] = choose_linear(values["w_down_t"].t().contiguous(), values["b_down"], h, layer=f"{layer} down", **choose)
    note = "pruned weights: " + ", ".join(
        f"{r} {c.density:.0%} nonzero -> {c.candidate.label}"
        + (f" ({c.dense_us / c.chosen_us:.2f}x vs dense)" if c.chosen_us and c.candidate.decision == "sparse" else "")
        for r, c in ch.items())
    return {r: c.candidate for r, c in ch.items()}, note


def _lossy_fallback(a: MLPArrays, layer: str, x: torch.Tensor, reference: torch.Tensor, opset: int, notes: list[str]) -> str:
    """No candidate agreed with the reference within 1e-4. In a lossy mode that is onnxruntime's
    rounding flipping neurons at the threshold (the same would happen to the reference's own
    export): keep dense if it agrees in direction. Otherwise it is a bug: an error."""
    from .lowering import layer_model
    from .runner import session

    if a.mode != "exact":
        try:
            out = torch.from_numpy(session(layer_model(_candidate(a, "dense", opset), list(x.shape), opset)).run(["y"], {"x": x.numpy()})[0])
            cos = output_cosine(out, reference)
        except Exception:  # noqa: BLE001 - reported below
            cos = float("nan")
        if cos >= LOSSY_MIN_COSINE:
            notes.append(f"onnxruntime's rounding flips neurons at the {a.mode} threshold: no lowering within 1e-4 of the "
                         f"reference; dense kept (output cosine {cos:.6f})")
            return "dense"
    raise SparsecompError(f"MLP {layer}: no candidate lowering runs in onnxruntime ({'; '.join(notes)})",
                          hint="please report it; --debug shows the trace")
