"""Candidate lowerings of `sparse_linear` to standard ONNX, and their compact storage.

Every candidate is a recipe for one layer `y = x @ W.T + b` (W `[out, in]`, x `[..., in]`) written
with standard ONNX ops only, so stock onnxruntime runs it with no custom-op library:

    dense        MatMul(x, W^T) + b                       W^T stored dense fp32, or compact (below)
    live         Gather(x, live cols) -> MatMul(., W_live^T) -> Gather(., row map) + b
                 (dead rows / columns removed: a physically smaller dense GEMM)
    ell / sellK  per bucket of rows: GatherElements(x, cols) * values -> ReduceSum(-1);
                 Concat(buckets) -> GatherElements(inverse row order) + b   (constant fan-in)
    bsrRxC[-bK]  per bucket of block-rows: Gather(x^T blocks, axis=0) -> batched MatMul(values, .)
                 -> Concat -> Gather(inverse order) -> Transpose               (R x C blocks;
                 b rides in the MatMul as a column of ones in x^T; `Orientation`: x^T in / y^T out)

Why these shapes (the issue's arithmetic, and measurements with ORT 1.32 on this 2-core VM): a
gather materialises `rows-per-call x stored entries` floats. For an unstructured 768 -> 3072 layer
at 90% and 128 tokens that is ~120 MB, far slower than ORT's dense GEMM (such candidates are not
even built, `MAX_GATHER_BYTES`). At M = 1 the gathered vector stays in cache, but onnxruntime's
element gathers are slow: `Gather` pays a 64-bit div/mod and a memcpy call per element (~6 ns),
`GatherElements` ~0.75 ns, single-threaded, and the product and sum ~0.4 ns more: ~1.2 ns per
stored nonzero against ~0.065 ns per weight for a dense GEMV streaming from memory (one thread).
So at 90% sparsity `ell` / `sell` only reach parity with dense at M = 1; they are timed, and win
only sparser or smaller layers. R x C blocks gather whole rows of x^T once per *block* (16x1:
~8 MB at 128 tokens, at memcpy speed) and keep a real GEMM per block-row: 2.5-3.6x faster than
dense per bert-base layer at M = 128, one thread.

Buckets (`sellK`, `-bK`): rows (block-rows) are sorted by nonzero count and cut into up to K
buckets, each padded only to its own widest row (the cut points minimise the stored size), so an
unstructured 90% layer stores ~3% padding instead of ~35% with one bucket (plain `ell`).

Storage. Indices are stored as narrow as they fit (uint8 < 256, uint16 < 65536, else int32) and
Cast to int32 in the graph, since ONNX Gather / ScatterElements take only int32 / int64. A Cast of
an initializer is constant-folded by onnxruntime at session load (graph optimization level basic
and above), so the narrow form costs nothing at run time; with ORT_DISABLE_ALL the Cast runs on
every call (slower, same result). The `dense` candidate may store W compactly (`compact=True`:
the `sell4` arrays plus ScatterElements / Transpose nodes that rebuild W^T); onnxruntime folds
that constant subgraph once at load, and the MatMul then pre-packs the folded W^T as usual: a
90%-sparse layer that runs dense still takes ~1/5 of the file.

Every emitted graph is rank-agnostic (x may be `[M, in]`, `[B, T, in]`, ...): block kernels flatten
to 2-D and restore the leading dims from `Shape(x)`.

`Layout` (the per-layer metadata stored in the model) says which initializers hold which arrays,
so `decode_weight` can rebuild the dense `[out, in]` weight from a file (used by `analyze`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

__all__ = ["MIN_OPSET", "PLAIN", "Candidate", "Emitter", "Orientation", "block_shapes", "candidates", "decode_weight"]

# ScatterElements(reduction="add") needs opset 16, Shape(start, end) 15, ReduceSum(axes input) 13.
MIN_OPSET = 16

# Gathers that would materialise more than this many bytes per call are not even timed: at that
# size they lose to the dense GEMM by a wide margin (the issue's ~121 MB example); the cost model
# only prunes, timing decides among the rest.
MAX_GATHER_BYTES = 16 * 2**20

# Block shapes tried when a weight's occupancy says they pay (R along out, C along in). R >= 4:
# a block-row with R = 1 degenerates to a batch of GEMVs, which the ell kernels do better.
BLOCK_SHAPES = [(32, 1), (16, 1), (8, 1), (4, 1), (4, 4), (8, 8), (16, 16), (32, 32)]
MAX_BLOCK_OCCUPANCY = 0.25  # 90% unstructured has 4x1 occupancy 0.34: blocks would only add work


# ------------------------------------------------------------------------------------------------
# emitting ONNX nodes


class Emitter:
    """Collects the nodes and initializers one layer's lowering adds, named under `prefix`."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.arrays: dict[str, str] = {}  # role -> initializer name (the Layout)
        self._n = 0

    def const(self, role: str, array: np.ndarray, *, stored: bool = True) -> str:
        """An initializer; `stored` ones are part of the layer's Layout (weights, not shapes)."""
        name = f"{self.prefix}.{role}"
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        if stored:
            self.arrays[role] = name
        return name

    def ints(self, role: str, values) -> str:
        return self.const(role, np.asarray(values, dtype=np.int64), stored=False)

    def node(self, op: str, inputs: list[str], n_out: int = 1, out: str | None = None, **attrs) -> str:
        self._n += 1
        outs = [out] if out is not None else [f"{self.prefix}/{op}_{self._n}" + (f"_{k}" if n_out > 1 else "") for k in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=f"{self.prefix}/{op}_{self._n}", **attrs))
        return outs[0] if n_out == 1 else outs

    def index(self, role: str, idx: np.ndarray) -> str:
        """Store indices narrow, Cast to int32 for Gather (folded by ORT at load)."""
        stored = self.const(role, idx.astype(narrow_index_dtype(int(idx.max()) if idx.size else 0)))
        return self.node("Cast", [stored], to=TensorProto.INT32)


def narrow_index_dtype(max_value: int):
    if max_value < 256:
        return np.uint8
    if max_value < 65536:
        return np.uint16
    return np.int32


# ------------------------------------------------------------------------------------------------
# packing


def _bucket_cuts(counts: np.ndarray, buckets: int) -> list[int]:
    """Cut points [0, c1, ..., n] of rows sorted by decreasing count into <= `buckets` buckets,
    minimising sum(rows in bucket x widest row of bucket). Small DP over ~64 candidate cuts."""
    n = len(counts)
    if buckets <= 1 or n <= 1:
        return [0, n]
    cand = sorted({round(n * q) for q in np.linspace(0, 1, 65)} | {0, n})
    best = {(0, 0): (0, [0])}  # (buckets used, cut index) -> (cost, cuts)
    for used in range(1, buckets + 1):
        for j, cj in enumerate(cand[1:], 1):
            opts = []
            for i in range(j):
                prev = best.get((used - 1, i))
                if prev is None:
                    continue
                ci = cand[i]
                width = max(int(counts[ci]), 1) if ci < n else 1
                opts.append((prev[0] + (cj - ci) * width, prev[1] + [cj]))
            if opts:
                best[(used, j)] = min(opts, key=lambda o: o[0])
    last = len(cand) - 1
    _cost, cuts = min((best[(u, last)] for u in range(1, buckets + 1) if (u, last) in best), key=lambda o: o[0])
    return cuts


@dataclass
class _Buckets:
    """Rows (or block-rows) in decreasing-count order, cut into buckets of equal padded width."""

    order: np.ndarray  # sorted position -> original row
    cuts: list[int]
    widths: list[int]

    @property
    def permuted(self) -> bool:
        return not np.array_equal(self.order, np.arange(len(self.order)))

    def inverse(self) -> np.ndarray:
        inv = np.empty_like(self.order)
        inv[self.order] = np.arange(len(self.order))
        return inv

    def padded_entries(self) -> int:
        return sum((b - a) * w for a, b, w in zip(self.cuts, self.cuts[1:], self.widths))


def _make_buckets(counts: np.ndarray, buckets: int) -> _Buckets:
    if buckets <= 1:
        order = np.arange(len(counts))
        return _Buckets(order, [0, len(counts)], [max(int(counts.max()) if len(counts) else 1, 1)])
    order = np.argsort(-counts, kind="stable")
    sc = counts[order]
    cuts = _bucket_cuts(sc, buckets)
    widths = [max(int(sc[a]), 1) for a in cuts[:-1]]
    return _Buckets(order, cuts, widths)


def _ell_arrays(mask: np.ndarray, values: np.ndarray, rows: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """[len(rows), width] column indices and values of the given rows (padding: column 0, value 0)."""
    sub_mask = mask[rows]
    cols = np.zeros((len(rows), width), dtype=np.int64)
    vals = np.zeros((len(rows), width), dtype=values.dtype)
    r, c = np.nonzero(sub_mask)
    if len(r):
        start = np.concatenate([[0], np.cumsum(sub_mask.sum(1))[:-1]])
        j = np.arange(len(r)) - start[r]
        cols[r, j] = c
        vals[r, j] = values[rows][r, c]
    return cols, vals


# ------------------------------------------------------------------------------------------------
# candidates


@dataclass
class Candidate:
    """One way to run a layer in ONNX: `emit` writes it, the rest is for pruning and reporting."""

    label: str
    family: str  # dense | live | ell | bsr
    decision: str  # "dense" | "sparse" (what the report shows)
    emit: Callable[..., None] = field(repr=False)  # (emitter, x name, y name[, Orientation if `chains`])
    stored_bytes: int = 0
    shape: tuple[int, int] = (0, 0)  # the layer's [out, in]
    block: tuple[int, int] | None = None  # (R, C) of block formats
    chains: bool = False  # emit takes an Orientation: it can read x^T / leave y^T for a neighbouring block layer


@dataclass(frozen=True)
class Orientation:
    """How a layer's input and output are laid out in the exported graph (`export.chain_orientations`).

    A block kernel gathers rows of x^T [in, M] and computes y^T [out, M], so alone it pays a
    Transpose on each side (with its Reshapes, ~0.25 ms per bert-base MLP at 128 tokens). Where
    one block layer feeds another through elementwise ops only (`Linear -> GELU -> Linear`), the
    activation stays transposed in between: the first leaves y^T (bias added as [out, 1]), the
    elementwise ops run on it as they are, the second gathers from it directly.
    """

    x_t: bool = False  # x arrives transposed: a 2-D [in, M] tensor
    y_t: bool = False  # leave y transposed: a 2-D [out, M] tensor
    lead: str | None = None  # with x_t (and not y_t): the tensor holding the original input's leading dims


PLAIN = Orientation()


def _finish(e: Emitter, y: str, out: str, bias: np.ndarray | None) -> None:
    if bias is not None:
        e.node("Add", [y, e.const("bias", bias)], out=out)
        return
    last = e.nodes[-1]
    assert last.output[0] == y  # every emitter ends with the node producing y: rename its output
    last.output[0] = out


def _dense(weight: np.ndarray, bias, *, compact: bool) -> Candidate:
    in_f = weight.shape[1]
    sell = _sell_storage(weight, 4) if compact else None

    def emit(e: Emitter, x: str, out: str):
        if sell is None:
            wt = e.const("weight_t", np.ascontiguousarray(weight.T))
        else:
            wt = _emit_rebuild_wt(e, sell, in_f)
        _finish(e, e.node("MatMul", [x, wt]), out, bias)

    stored = sell["nbytes"] if sell else weight.nbytes
    return Candidate("dense" + ("-compact" if compact else ""), "dense", "dense", emit, stored, shape=weight.shape)


def _sell_storage(weight: np.ndarray, buckets: int) -> dict:
    mask = weight != 0
    counts = mask.sum(1)
    b = _make_buckets(counts, buckets)
    parts = []
    nbytes = 0
    for k, (a, z, w) in enumerate(zip(b.cuts, b.cuts[1:], b.widths)):
        rows = b.order[a:z]
        cols, vals = _ell_arrays(mask, weight, rows, w)
        parts.append((cols, vals))
        nbytes += vals.nbytes + cols.size * np.dtype(narrow_index_dtype(weight.shape[1] - 1)).itemsize
    if b.permuted:
        nbytes += len(b.order) * np.dtype(narrow_index_dtype(len(b.order) - 1)).itemsize
    return {"buckets": b, "parts": parts, "nbytes": nbytes, "shape": weight.shape}


def _emit_perm(e: Emitter, b: _Buckets, role: str) -> str | None:
    return e.index(role, b.inverse()) if b.permuted else None


def _emit_rebuild_wt(e: Emitter, sell: dict, in_f: int) -> str:
    """W^T [in, out] from sell arrays, with constant-only nodes (ORT folds them at load)."""
    b: _Buckets = sell["buckets"]
    rows = []
    for k, (cols, vals) in enumerate(sell["parts"]):
        ci = e.index(f"cols{k}", cols)
        v = e.const(f"values{k}", vals)
        zeros = e.node("ConstantOfShape", [e.ints(f"shape{k}", [cols.shape[0], in_f])],
                       value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
        rows.append(e.node("ScatterElements", [zeros, ci, v], axis=1, reduction="add"))
    w = rows[0] if len(rows) == 1 else e.node("Concat", rows, axis=0)
    inv = _emit_perm(e, b, "row_order")
    if inv is not None:
        w = e.node("Gather", [w, inv], axis=0)
    return e.node("Transpose", [w], perm=[1, 0])


def _ell(weight: np.ndarray, bias, buckets: int) -> Candidate:
    sell = _sell_storage(weight, buckets)
    b: _Buckets = sell["buckets"]
    out_f, in_f = weight.shape

    def emit(e: Emitter, x: str, out: str):
        # GatherElements, not Gather: onnxruntime's Gather pays a 64-bit div/mod and a memcpy call
        # per element (~6 ns; 1.5 ms for a 3072 x 768 layer at 90%), GatherElements' inner-axis loop
        # ~1.5 ns (measured, ORT 1.32). Its indices must have x's rank and rows, hence the Expand
        # to [M, nnz] (a copy of the index row at M = 1, which is where this kernel is chosen).
        x2 = e.node("Reshape", [x, e.ints("shape_2d", [-1, in_f])])
        m = e.node("Shape", [x2], start=0, end=1)
        ys = []
        for k, (cols, vals) in enumerate(sell["parts"]):
            n, w = cols.shape
            flat = e.node("Reshape", [e.index(f"cols{k}", cols), e.ints(f"flat{k}", [1, n * w])])  # folded at load
            idx = e.node("Expand", [flat, e.node("Concat", [m, e.ints(f"nnz{k}", [n * w])], axis=0)])
            g = e.node("GatherElements", [x2, idx], axis=1)  # [M, n * w]
            g = e.node("Reshape", [g, e.ints(f"shape_g{k}", [-1, n, w])])
            p = e.node("Mul", [g, e.const(f"values{k}", vals)])
            ys.append(e.node("ReduceSum", [p, e.ints(f"axes{k}", [-1])], keepdims=0))  # [M, n]
        y = ys[0] if len(ys) == 1 else e.node("Concat", ys, axis=-1)
        if b.permuted:
            inv = e.node("Expand", [e.node("Unsqueeze", [e.index("row_order", b.inverse()), e.ints("axis0", [0])]),
                                    e.node("Concat", [m, e.ints("out_n", [out_f])], axis=0)])
            y = e.node("GatherElements", [y, inv], axis=1)
        lead = e.node("Shape", [x], end=-1)
        y = e.node("Reshape", [y, e.node("Concat", [lead, e.ints("out_features", [out_f])], axis=0)])
        _finish(e, y, out, bias)

    label = "ell" if buckets <= 1 else f"sell{buckets}"
    return Candidate(label, "ell", "sparse", emit, sell["nbytes"], shape=weight.shape)


def _bsr(weight: np.ndarray, bias, r: int, c: int, buckets: int) -> Candidate:
    out_f, in_f = weight.shape
    rb, cb = -(-out_f // r), -(-in_f // c)
    padded = np.zeros((rb * r, cb * c), dtype=weight.dtype)
    padded[:out_f, :in_f] = weight
    grid = padded.reshape(rb, r, cb, c)
    occ = _occupancy(weight != 0, r, c)  # [rb, cb]
    b = _make_buckets(occ.sum(1), buckets)
    parts = []
    nbytes = 0
    for a, z, w in zip(b.cuts, b.cuts[1:], b.widths):
        brows = b.order[a:z]
        bcols, _ = _ell_arrays(occ, occ.astype(np.float32), brows, w)  # [n, w] block columns
        valid = np.zeros_like(bcols, dtype=bool)
        cnt = occ[brows].sum(1)
        valid[np.arange(w)[None, :] < cnt[:, None]] = True
        # values[i, rr, k*c + j] = W[brow_i*r + rr, bcol[i,k]*c + j], zero in padding slots
        blocks = grid[brows[:, None], :, bcols, :]  # [n, w, r, c]
        blocks = np.where(valid[:, :, None, None], blocks, 0).astype(weight.dtype)
        vt = np.ascontiguousarray(blocks.transpose(0, 2, 1, 3).reshape(len(brows), r, w * c))
        parts.append((bcols, vt, brows))
        nbytes += vt.nbytes + bcols.size * np.dtype(narrow_index_dtype(cb - 1)).itemsize
    if b.permuted:
        nbytes += rb * np.dtype(narrow_index_dtype(rb - 1)).itemsize

    def emit(e: Emitter, x: str, out: str, layout: Orientation = PLAIN):
        # The bias rides in the GEMM where this layer transposes x itself: x gets a block column of
        # ones (the Pad that also fills the last partial block), every block-row one more slot
        # pointing at it, holding its bias. That replaces an Add over [M, out] (25-80 us per
        # bert-base layer at 128 tokens) by ~1% more gather and GEMM. The stored arrays stay as
        # they are (decoders read them); the widened ones are Concats ORT folds at load.
        fold = bias is not None and not layout.x_t
        if layout.x_t:  # x^T [in, M] from the previous block layer
            xt = x
            if cb * c != in_f:
                xt = e.node("Pad", [xt, e.ints("pads", [0, 0, cb * c - in_f, 0])])
        else:
            x2 = e.node("Reshape", [x, e.ints("shape_2d", [-1, in_f])])
            extra = cb * c - in_f + (c if fold else 0)
            if extra:  # padded columns meet zero weights, so they may hold ones
                one = [e.const("pad_one", np.array(1.0, dtype=np.float32), stored=False)] if fold else []
                x2 = e.node("Pad", [x2, e.ints("pads", [0, 0, 0, extra]), *one])
            xt = e.node("Transpose", [x2], perm=[1, 0])  # [in, M]: each gathered block is contiguous
        # [cb, c*M]; with C = 1 that is x^T itself (no node: each costs a few us in onnxruntime)
        xr = xt if c == 1 else e.node("Reshape", [xt, e.ints("shape_blocks", [cb + (1 if fold else 0), -1])])
        if fold:  # the bias as [rb, r], one row per block-row (constant: folded at load)
            b2 = e.const("bias", bias)
            if rb * r != out_f:
                b2 = e.node("Pad", [b2, e.ints("bias_pads", [0, rb * r - out_f])])
            b2 = e.node("Reshape", [b2, e.ints("bias_rows", [rb, r])])
            slot_axes = e.ints("slot_axes", [2])
            slot_pads = e.ints("slot_pads", [0, 0, 0, 0, 0, c - 1]) if c != 1 else None
        ys = []
        for k, (bcols, vt, brows) in enumerate(parts):
            idx = e.index(f"block_cols{k}", bcols)
            values = e.const(f"values{k}", vt)
            if fold:
                ones_col = e.const(f"ones_col{k}", np.full((len(brows), 1), cb, dtype=np.int32), stored=False)
                idx = e.node("Concat", [idx, ones_col], axis=1)  # [n, w + 1]
                slot = b2 if np.array_equal(brows, np.arange(rb)) else e.node("Gather", [b2, e.const(f"bias_rows{k}", brows.astype(np.int32), stored=False)], axis=0)
                slot = e.node("Unsqueeze", [slot, slot_axes])  # [n, r, 1]
                if slot_pads is not None:
                    slot = e.node("Pad", [slot, slot_pads])
                values = e.node("Concat", [values, slot], axis=2)  # [n, r, (w + 1) * c]
            g = e.node("Gather", [xr, idx], axis=0)  # [n, w(+1), c*M]
            if c != 1:
                g = e.node("Reshape", [g, e.ints(f"shape_g{k}", [len(bcols), (bcols.shape[1] + (1 if fold else 0)) * c, -1])])
            ys.append(e.node("MatMul", [values, g]))  # [n, r, M]
        y = ys[0] if len(ys) == 1 else e.node("Concat", ys, axis=0)
        inv = _emit_perm(e, b, "block_row_order")
        if inv is not None:
            y = e.node("Gather", [y, inv], axis=0)
        y = e.node("Reshape", [y, e.ints("shape_rows", [rb * r, -1])])  # y^T [out (padded), M]
        add_bias = None if fold else bias
        if layout.y_t:  # the next block layer takes y^T as it is
            if rb * r != out_f:
                y = e.node("Slice", [y, e.ints("slice_start", [0]), e.ints("slice_end", [out_f]), e.ints("slice_axes", [0])])
            if add_bias is None:
                _finish(e, y, out, None)
            else:  # bias stored [out] as usual (decoders read it so); [out, 1] folded at load
                e.node("Add", [y, e.node("Unsqueeze", [e.const("bias", add_bias), e.ints("bias_axes", [1])])], out=out)
            return
        y = e.node("Transpose", [y], perm=[1, 0])  # [M, out]
        if rb * r != out_f:
            y = e.node("Slice", [y, e.ints("slice_start", [0]), e.ints("slice_end", [out_f]), e.ints("slice_axes", [1])])
        lead = layout.lead if layout.x_t else e.node("Shape", [x], end=-1)
        if lead is None:
            raise ValueError("a block layer fed x^T needs the tensor holding its input's leading dims (Orientation.lead)")
        y = e.node("Reshape", [y, e.node("Concat", [lead, e.ints("out_features", [out_f])], axis=0)])
        _finish(e, y, out, add_bias)

    label = f"bsr{r}x{c}" + (f"-b{buckets}" if buckets > 1 else "")
    return Candidate(label, "bsr", "sparse", emit, nbytes, shape=weight.shape, block=(r, c), chains=True)


def _live(weight: np.ndarray, bias) -> Candidate | None:
    """Dead rows (outputs = bias) and dead columns (inputs never read) cut out of a dense GEMM."""
    out_f, in_f = weight.shape
    nz = weight != 0
    live_rows, live_cols = np.nonzero(nz.any(1))[0], np.nonzero(nz.any(0))[0]
    dead_rows, dead_cols = out_f - len(live_rows), in_f - len(live_cols)
    if dead_rows == 0 and dead_cols == 0:
        return None
    # One extra all-zero output column: dead rows gather it, so no Pad / ConstantOfShape is needed.
    wt = np.zeros((max(len(live_cols), 1), len(live_rows) + (1 if dead_rows else 0)), dtype=weight.dtype)
    wt[: len(live_cols), : len(live_rows)] = weight[np.ix_(live_rows, live_cols)].T
    row_map = np.full(out_f, len(live_rows), dtype=np.int64)
    row_map[live_rows] = np.arange(len(live_rows))
    cols = live_cols if len(live_cols) else np.zeros(1, dtype=np.int64)

    def emit(e: Emitter, x: str, out: str):
        xl = e.node("Gather", [x, e.index("live_cols", cols)], axis=-1) if dead_cols else x
        y = e.node("MatMul", [xl, e.const("weight_t_live", wt)])
        if dead_rows:
            y = e.node("Gather", [y, e.index("row_map", row_map)], axis=-1)
        _finish(e, y, out, bias)

    stored = wt.nbytes + (cols.size * 2 if dead_cols else 0) + (out_f * 2 if dead_rows else 0)
    return Candidate(f"live{len(live_rows)}x{len(live_cols)}", "live", "sparse", emit, stored,
                     shape=weight.shape)


def _occupancy(nz: np.ndarray, r: int, c: int) -> np.ndarray:
    out_f, in_f = nz.shape
    rb, cb = -(-out_f // r), -(-in_f // c)
    p = np.zeros((rb * r, cb * c), dtype=bool)
    p[:out_f, :in_f] = nz
    return p.reshape(rb, r, cb, c).any(axis=(1, 3))


def block_shapes(weight: np.ndarray, limit: int = 2) -> list[tuple[int, int, float]]:
    """Block shapes whose occupancy (fraction of R x C tiles with a nonzero) is low enough to try,
    best first: lowest occupancy, then larger blocks (a bigger GEMM per block-row)."""
    out_f, in_f = weight.shape
    nz = weight != 0
    found = []
    for r, c in BLOCK_SHAPES:
        if r > out_f or c > in_f:
            continue
        occ = float(_occupancy(nz, r, c).mean())
        if occ <= MAX_BLOCK_OCCUPANCY:
            found.append((r, c, occ))
    found.sort(key=lambda t: (round(t[2], 2), -t[0] * t[1]))
    return found[:limit]


def candidates(weight: torch.Tensor, bias: torch.Tensor | None, *, only: set[str] | None = None,
               m: int | None = None, pruned: list[str] | None = None) -> list[Candidate]:
    """Every candidate lowering worth timing for this weight (dense first), or those `only` names.

    With `m` (rows per call), gather kernels that would materialise more than `MAX_GATHER_BYTES`
    per call are not built at all (their labels go to `pruned`): packing costs compile time too.
    """
    w = weight.detach().cpu().float().numpy()
    b = None if bias is None else bias.detach().cpu().float().numpy()
    nz = w != 0
    density = float(nz.mean()) if w.size else 0.0
    wanted = (lambda label, family: label in only or family in only) if only else (lambda label, family: True)
    out: list[Candidate] = []
    if wanted("dense", "dense"):
        out.append(_dense(w, b, compact=False))
    live = _live(w, b)
    if live is not None and wanted(live.label, "live"):
        out.append(live)

    def too_big(label: str, entries: int, c: int = 1) -> bool:
        if m is not None and 4.0 * c * entries * m > MAX_GATHER_BYTES:
            if pruned is not None:
                pruned.append(label)
            return True
        return False

    if density <= 0.5:  # 2:4 is exactly 0.5
        counts = nz.sum(1)
        for nb in (1, 4):
            label = "ell" if nb == 1 else f"sell{nb}"
            if wanted(label, "ell") and not too_big(label, _make_buckets(counts, nb).padded_entries()):
                out.append(_ell(w, b, nb))
        for r, c, _occ in block_shapes(w):
            bcounts = _occupancy(nz, r, c).sum(1)
            for nb in (1, 4):
                label = f"bsr{r}x{c}" + (f"-b{nb}" if nb > 1 else "")
                if wanted(label, "bsr") and not too_big(label, _make_buckets(bcounts, nb).padded_entries(), c):
                    out.append(_bsr(w, b, r, c, nb))
    return out


def storage_choice(weight: torch.Tensor, bias: torch.Tensor | None) -> Candidate:
    """The smaller of plain and compact storage for a layer that runs dense (same run time)."""
    w = weight.detach().cpu().float().numpy()
    b = None if bias is None else bias.detach().cpu().float().numpy()
    plain = _dense(w, b, compact=False)
    if (w != 0).mean() > 0.6:
        return plain
    compact = _dense(w, b, compact=True)
    return compact if compact.stored_bytes < 0.9 * plain.stored_bytes else plain


def by_label(weight: torch.Tensor, bias: torch.Tensor | None, label: str) -> Candidate:
    """Rebuild one candidate from its label (a cached decision)."""
    if label in ("dense", "dense-compact"):
        w = weight.detach().cpu().float().numpy()
        return _dense(w, None if bias is None else bias.detach().cpu().float().numpy(), compact=label == "dense-compact")
    for c in candidates(weight, bias):
        if c.label == label:
            return c
    raise KeyError(label)


# ------------------------------------------------------------------------------------------------
# reading stored weights back (analysis of an exported file)


def decode_weight(layout: dict, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """The dense `[out, in]` weight of one layer from its Layout and the stored initializers."""
    out_f, in_f = layout["shape"]
    fam, roles = layout["family"], layout["arrays"]
    get = {role: arrays[name] for role, name in roles.items()}
    if fam == "dense" and "weight_t" in get:
        return np.ascontiguousarray(get["weight_t"].T)
    if fam in ("dense", "ell"):  # sell arrays (compact dense storage or the ell kernels)
        rows = []
        k = 0
        while f"cols{k}" in get:
            cols, vals = get[f"cols{k}"].astype(np.int64), get[f"values{k}"]
            m = np.zeros((cols.shape[0], in_f), dtype=vals.dtype)
            np.add.at(m, (np.repeat(np.arange(cols.shape[0]), cols.shape[1]), cols.reshape(-1)), vals.reshape(-1))
            rows.append(m)
            k += 1
        w = np.concatenate(rows, axis=0)
        if "row_order" in get:
            w = w[get["row_order"].astype(np.int64)]
        return w
    if fam == "live":
        wt = get["weight_t_live"]
        live_rows = np.arange(out_f) if "row_map" not in get else None
        w = np.zeros((out_f, in_f), dtype=wt.dtype)
        cols = get["live_cols"].astype(np.int64) if "live_cols" in get else np.arange(in_f)
        if live_rows is None:
            rmap = get["row_map"].astype(np.int64)
            live_rows = np.nonzero(rmap < wt.shape[1] - 1)[0]  # the last column is the zero one
            src = rmap[live_rows]
        else:
            src = np.arange(out_f)
        w[np.ix_(live_rows, cols)] = wt[: len(cols)][:, src].T
        return w
    if fam == "bsr":
        r, c = layout["block"]
        rb, cb = -(-out_f // r), -(-in_f // c)
        grid = np.zeros((rb, cb, r, c), dtype=np.float32)
        order = np.arange(rb)
        if "block_row_order" in get:
            order = np.argsort(get["block_row_order"].astype(np.int64))  # inverse of the stored inverse
        pos, k = 0, 0
        while f"block_cols{k}" in get:
            bcols, vt = get[f"block_cols{k}"].astype(np.int64), get[f"values{k}"]
            n, w = bcols.shape
            blocks = vt.reshape(n, r, w, c).transpose(0, 2, 1, 3)  # [n, w, r, c]
            brows = np.broadcast_to(order[pos:pos + n, None], (n, w))
            np.add.at(grid, (brows, bcols), blocks)  # padding slots add zeros
            pos, k = pos + n, k + 1
        grid = grid.transpose(0, 2, 1, 3)
        return grid.reshape(rb * r, cb * c)[:out_f, :in_f]
    raise ValueError(f"unknown stored format {fam!r}")
