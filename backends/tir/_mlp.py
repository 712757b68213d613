"""TIR kernels for the fused sparse MLP (`sparsecomp::sparse_mlp`): skip the inactive neurons.

The down-projection's weight is stored transposed, `wdt[H, NP]` (row j = neuron j's outgoing
weights, contiguous; NP = N padded to the column chunk CB), so an active neuron costs one
contiguous read of its row. Kernels (all float32, sizes symbolic, one build per variant):

- `up_mv` (M = 1, exact mode): dense up-projection (+ ReLU-family activation, + ReLU gate for
  gated MLPs) parallel over blocks of BS rows; each block compacts its active neurons into
  `idx[blk, :cnt[blk]]` and their values into `hc[blk, :]` as it goes, so there is no serial
  compaction pass. In a gated MLP, the up row of a neuron whose gate is zero is never read.
  With `screen="f16"` or `"i8"` (`_screened_up_parts`), the up row of a neuron (in a gated MLP
  its gate row) is first read from a narrow copy made at compile time (`screen_terms`: float16,
  or int8 with one scale per row): its pre-activation plus a rigorous bound on what the rounding
  can change (Cauchy-Schwarz with |x|_2) proves most inactive neurons inactive; only the others'
  float32 rows are read, and their exact pre-activations decide. Lossless. At opt-125m-like's
  10.8% active (768 -> 3072, cold, 2 threads) the MLP measured 237-241 us with float16 (11.0% of
  the neurons past the screen) and 185-193 us with int8 (15.0% past it), against 333 us
  unscreened and 671 us dense: past the 1.82x "up stays dense" bound of skipping down rows alone.
  It costs a narrow copy of the weight in memory (+50% or +25% of it).
- `screen_up_mm` (M = 2..8, exact mode, gated or not): the hidden activations of MT rows of x at
  once through the same screen, the narrow weight read once for all rows (each narrow vector
  widened once, then one multiply-add per row); a neuron is read in float32 where any row's bound
  lets it through. Rows of x held per step: 2 up to 4 rows of x, 1 at 8 (register pressure).
- `gather_up_mv` (M = 1, predictor mode): the pre-activations of the selected neurons only,
  `u[t] = w[idx[t]] . x + b[idx[t]]` (rows of the up weight are contiguous), parallel over
  groups of `rows` selected neurons.
- `pred_up_mv` (M = 1, predictor mode, ReLU family, not gated): per block of neurons, the
  predictor's scores from its rank vector z, the selected neurons' up rows only, and the nonzero
  activations compacted into `hc` / `idx` / `cnt` as `up_mv` writes them. The predictor's factor
  is stored as panels of `panel` neurons (`predictor_panels`): each panel one contiguous stream,
  its scores summed in registers. Against rows of the factor read 4 at a time (512-byte rows,
  a horizontal sum per neuron), the whole `pred_mv` call measured 0.85-0.95 ms against
  1.02-1.16 ms on the bench_mlp FFN (cold, interleaved; scoring was most of the kernel's time).
- `down_mv` (M = 1): `y = b + sum_t hc[t] * wdt[idx[t], :]`. The active neurons are split over P
  tasks; each task streams its neurons' whole rows (R at a time) into a partial sum part[p, :]
  (L1/L2 resident), then a parallel pass adds the partials and the bias. Measured (2048x8192,
  10% active, 2 threads, interleaved): 183-190 us for P = 2-4, R = 2-4, against 250 us for a
  kernel parallel over column chunks of 64 (each neuron read as 256-byte pieces: too little
  memory-level parallelism) and 470-520 us for chunks of 128-256 (register spills on AVX2).
- `down_mm` (M > 1, union of the rows' active neurons): the same split over neurons, each weight
  row read once for all MT rows of x (`y[m] = b + sum_t hc[m, t] * wdt[idx[t], :]`).
- `down_rows` (M > 1, per-row work): parallel over rows, each row compacting and adding only its
  own active neurons (for rows whose union would be dense).
- `down_sparse_mv` (M = 1, pruned down weight): like `down_mv`, but each active neuron's row is
  sparse (CSR per range of output columns, one task per range): only its nonzeros are read.
- `dense_mv` (M = 1): the plain dense product `y = w . x + b`, parallel over blocks of BS rows, R
  rows at a time: `up_mv` without activation or compaction. The torch backend times it against
  torch's GEMV for one-row layers (`backends/torch/dense.py`; on AMD CPUs MKL's GEMV reads at
  about half the bandwidth of these kernels), and bench_mlp's TIR-dense reference runs on it.

- `exact_mv`, `pred_mv` (M = 1): a whole MLP in one call, the kernels above as phases of one
  function (`_assemble`: each generator also returns its parts): `up_mv` + `down_mv`, and
  `dense_mv` (the predictor's rank vector z) + `pred_up_mv` + `down_mv`. One call from Python
  instead of two or three (each parallel phase is still its own pool launch); the down phase
  sums its partials on the calling thread. Parameters are given per phase ("z", "up", "down").

`dense_mv` and `pred_up_mv` take `half=True` to read their weight (the predictor's factors) as
float16, widened to float32 on load.

Argument conventions: inputs, then weights, then outputs (like `_codegen`).
"""

from __future__ import annotations


import torch

from sparsecomp.errors import SparsecompError

from . import _build, _target
from ._codegen import _header, _ind, _prefetch

__all__ = ["ACTIVATIONS", "build_mlp_kernel", "mlp_source", "predictor_panels"]

# A kernel's pieces: its buffer arguments (name, shape expression, dtype), its symbolic sizes and
# its body (at indent 0). `_assemble` joins one or more into one PrimFunc, phases in order;
# an argument or size that several phases share (hc, idx, cnt: up's output is down's input) is
# declared once, with one shape.
_Parts = tuple[list[tuple[str, str, str]], list[str], str]


def _assemble(*parts: _Parts, one_row: tuple[str, ...] = ()) -> str:
    """One PrimFunc from the parts, phases in order. `one_row`: 1-D arguments the function takes
    as one-row matrices [1, n] (the phases still index them as vectors, through a 1-D view of the
    same data), so a caller with an [M = 1, n] tensor passes it as it is: at M = 1, each torch
    reshape on the call path costs tens of microseconds once a kernel has streamed the caches."""
    args: dict[str, tuple[str, str]] = {}
    sizes: list[str] = []
    for a, sz, _ in parts:
        for name, shape, dt in a:
            if args.setdefault(name, (shape, dt)) != (shape, dt):
                raise SparsecompError(f"fused kernel: argument {name} declared as {args[name]} and {(shape, dt)}")
        sizes += [v for v in sz if v not in sizes]
    decl = [(f"{n}_row" if n in one_row else n, f"1, {sh}" if n in one_row else sh, dt) for n, (sh, dt) in args.items()]
    s = _header(decl, sizes)
    s += "".join(f'    {n} = T.decl_buffer(({args[n][0]},), "{args[n][1]}", data={n}_row.data)\n' for n in one_row)
    return s + "".join(_ind(body, 4) for _, _, body in parts)

# Activations the exact-mode up kernel applies in TIR (the ReLU family: exact zeros).
ACTIVATIONS = {
    "relu": "T.max({s}, T.float32(0))",
    "relu6": "T.min(T.max({s}, T.float32(0)), T.float32(6))",
    "relu2": "T.max({s}, T.float32(0)) * T.max({s}, T.float32(0))",
}

def _dot_rows(V: int, U: int, R: int, rows: list[str], w: str, x: str, acc: str, K: str = "K", half: bool = False,
              ahead: list | None = None, ebytes: int | None = None) -> str:
    """acc[r*U*V:(r+1)*U*V] = partial sums of w[rows[r], :] . x for R rows at once (x loaded once
    per step for all R rows: R streams in flight, R*U independent FMA chains); then each row's
    partials folded into acc[r*U*V : r*U*V + V]. `K`: the name of the row length. `half`: w is
    narrower than float32, widened as it is loaded: float16 (one vcvtph2ps per vector with F16C),
    or int8 with `ebytes=1` (vpmovsxbd + vcvtdq2ps). `ahead`: rows to software-prefetch at each
    step's columns, rows of w or (buffer, row) of a float32 weight of the same width."""
    UV = U * V
    eb = ebytes or (2 if half else 4)
    wl = (lambda e: f'T.Cast("float32", {w}[{e}])') if eb < 4 else (lambda e: f"{w}[{e}]")
    s = f"for v in T.vectorized({R * UV}):\n    {acc}[v] = T.float32(0)\n"
    s += f"for kb in range({K} // {UV}):\n"
    if ahead:  # software prefetch of rows read later, at this step's columns (one per 64-byte line)
        for r in ahead:
            buf, row, b = (w, r, eb) if isinstance(r, str) else (*r, 4)  # (buffer, row): another float32 weight
            for o in range(0, UV, 64 // b):
                s += "    " + _prefetch(f"{buf}[{row}, kb * {UV} + {o}]")
    for u in range(U):
        for r in range(R):
            o = r * UV + u * V
            s += (f"    for v in T.vectorized({V}):\n"
                  f"        {acc}[{o} + v] = {acc}[{o} + v] + {wl(f'{rows[r]}, kb * {UV} + {u * V} + v')} * {x}[kb * {UV} + {u * V} + v]\n")
    s += f"for k in range({K} // {UV} * {UV}, {K}):\n"
    for r in range(R):
        s += f"    {acc}[{r * UV}] = {acc}[{r * UV}] + {wl(f'{rows[r]}, k')} * {x}[k]\n"
    if U > 1:
        for r in range(R):
            terms = " + ".join(f"{acc}[{r * UV + u * V} + v]" for u in range(1, U))
            s += f"for v in T.vectorized({V}):\n    {acc}[{r * UV} + v] = {acc}[{r * UV} + v] + {terms}\n"
    return s


def _dot(V: int, U: int, row: str, w: str, x: str, acc: str, K: str = "K", half: bool = False, ebytes: int | None = None) -> str:
    return _dot_rows(V, U, 1, [row], w, x, acc, K, half, ebytes=ebytes)


def _sum(V: int, acc: str, base: int = 0) -> str:
    return " + ".join(f"{acc}[{base + i}]" for i in range(V))


def _up_mv(p: dict) -> str:
    return _assemble(_up_mv_parts(p))


def _up_mv_parts(p: dict) -> _Parts:
    V, U, BS, act, gated, R = p["vec"], p["unroll"], p["bs"], p["act"], p["gated"], p["rows"]
    if act not in ACTIVATIONS:
        raise SparsecompError(f"the exact-mode up kernel has no activation {act!r}", hint=f"one of {', '.join(ACTIVATIONS)}")
    if BS % R:
        raise SparsecompError(f"up kernel: block size {BS} must be a multiple of rows {R}")
    args = [("x", "K", "float32"), ("w", "H, K", "float32"), ("b", "H", "float32")]
    if gated:
        args += [("wg", "H, K", "float32"), ("bg", "H", "float32")]
    args += [("hc", "NB, BS", "float32"), ("idx", "NB, BS", "int32"), ("cnt", "NB", "int32")]
    a = ACTIVATIONS[act]
    UV = U * V

    def emit(row: str, base: int, val: str) -> str:
        return (f"hv{base} = T.Bind({a.format(s='(' + val + ')')})\n"
                f"if hv{base} != T.float32(0):\n    hc[blk, c[0]] = hv{base}\n    idx[blk, c[0]] = {row}\n"
                f"    c[0] = c[0] + 1\n")

    if p.get("screen"):
        return _screened_up_parts(p, args, emit)
    body = f"""
for blk in T.parallel(NB):
    acc = T.alloc_buffer(({R * UV},), "float32")
    c = T.alloc_buffer((1,), "int32")
    c[0] = 0
"""
    if gated:  # gate first: a zero gate means the up row is never read
        inner = _dot(V, U, "r", "wg", "x", "acc")
        inner += f"g = T.Bind({a.format(s='(' + _sum(V, 'acc') + ' + bg[r])')})\n"
        up = _dot(V, U, "r", "w", "x", "acc")
        up += f"hc[blk, c[0]] = g * ({_sum(V, 'acc')} + b[r])\nidx[blk, c[0]] = r\nc[0] = c[0] + 1\n"
        inner += "if g != T.float32(0):\n" + _ind(up, 4)
        body += f"    for rr in range({BS}):\n        if blk * {BS} + rr < H:\n            r = T.Bind(blk * {BS} + rr)\n"
        body += _ind(inner, 12)
    else:
        # full groups of R rows, then (last block only) the rows left over, one at a time
        rows = [f"r0 + {q}" for q in range(R)]
        inner = _dot_rows(V, U, R, rows, "w", "x", "acc")
        for q in range(R):
            inner += emit(rows[q], q, f"{_sum(V, 'acc', q * UV)} + b[{rows[q]}]")
        body += f"    for rq in range({BS // R}):\n        if blk * {BS} + rq * {R} + {R} <= H:\n"
        body += f"            r0 = T.Bind(blk * {BS} + rq * {R})\n" + _ind(inner, 12)
        if R > 1:
            tail = _dot(V, U, "r", "w", "x", "acc") + emit("r", 0, f"{_sum(V, 'acc')} + b[r]")
            body += (f"        elif blk * {BS} + rq * {R} < H:\n"
                     f"            for q in range({R}):\n"
                     f"                if blk * {BS} + rq * {R} + q < H:\n"
                     f"                    r = T.Bind(blk * {BS} + rq * {R} + q)\n" + _ind(tail, 20))
    body += "    cnt[blk] = c[0]\n"
    return args, ["K", "H", "NB", "BS"], body


def _narrow(screen) -> tuple[str, int]:
    """A screen's narrow copy: (its dtype, bytes per weight); `sparsecomp.screen.screen_terms` makes it."""
    if screen in (True, "f16"):
        return "float16", 2
    if screen == "i8":
        return "int8", 1
    raise SparsecompError(f"screened up kernel: no screen {screen!r}", hint='"f16" or "i8"')


def _xnorm(V: int, xk: str, out: str) -> str:
    """Statements setting `out` to an upper bound of |x|_2 (K values, `xk` the access of x[k] with
    the index spelt `{k}`), safe against overflow and underflow of the squares: m = max|x_k|, then
    m * sqrt(sum (x_k / m)^2); below m = 2^-100 the bound sqrt(K) * 2^-100 (the ratios' own
    rounding stays far inside the screen's 1e-3 slack, `screen_terms`)."""
    ax = xk.format(k="k")
    av = xk.format(k=f"kb * {V} + v")
    return f"""xm[0] = T.float32(0)
for k in range(K):
    xm[0] = T.max(xm[0], T.abs({ax}))
if xm[0] < T.float32(2.0 ** -100):
    {out} = T.sqrt(T.Cast("float32", K)) * T.float32(2.0 ** -100)
else:
    xm[1] = T.float32(1) / xm[0]
    for v in T.vectorized({V}):
        xq[v] = T.float32(0)
    for kb in range(K // {V}):
        for v in T.vectorized({V}):
            xq[v] = xq[v] + ({av} * xm[1]) * ({av} * xm[1])
    for k in range(K // {V} * {V}, K):
        xq[0] = xq[0] + ({ax} * xm[1]) * ({ax} * xm[1])
    {out} = xm[0] * T.sqrt({_sum(V, 'xq')})
"""


def _screened_up_parts(p: dict, args: list, emit) -> _Parts:
    """`up_mv` with a screen (`screen="f16"` or `"i8"`): per block of BS neurons, (1) each
    neuron's pre-activation from a narrow copy of its row (the up row, or in a gated MLP the gate
    row: the gate's zeros are the MLP's), `s = wh[r] . x` (float16) or `ss[r] * (wq[r] . x)`
    (int8, one scale per row), R rows at a time (a half or a quarter of the float32 row's bytes),
    and an upper bound on the exact one, `s + sb[r] + sm[r] * |x|_2` (`screen_terms`: sm[r]
    bounds the rounding of the weights and of both sums by Cauchy-Schwarz); a neuron whose bound
    is <= 0 is inactive for certain; (2) the exact float32 pre-activation of every other neuron
    (its float32 row, CR candidates at a time; gated: the gate and up rows of each candidate),
    activation and compaction as in `up_mv`. Lossless: a neuron is dropped only where its exact
    pre-activation is provably <= 0 (|x|_2 bounded by `_xnorm`; on NaN inputs, as the
    unscreened kernel, no promise: see README, "What `compile` guarantees"). Reads 2 (float16)
    or 1 (int8) bytes per screened weight plus 4 per weight of the candidates, against 4 per
    weight: int8's wider margin lets more candidates through (15% against 11% at 10.8% active on
    opt-125m-like's shape), float16 wins where many pre-activations lie near 0; the backend
    measures both."""
    V, U, BS, R, CR, gated = p["vec"], p["unroll"], p["bs"], p["rows"], p.get("crows", 2), p["gated"]
    UV = U * V
    dt, eb = _narrow(p["screen"])
    i8 = eb == 1  # int8 rows, one scale per row (`screen_terms`), instead of float16
    sw = "wgh" if gated else "wh"  # the screened weight's narrow copy
    args = args + [(sw, "H, K", dt)] + ([("ss", "H", "float32")] if i8 else [])
    args += [("sb", "H", "float32"), ("sm", "H", "float32")]
    # (outputs last, as everywhere: hc / idx / cnt after the screen's constants)
    args = [a for a in args if a[0] not in ("hc", "idx", "cnt")] + [a for a in args if a[0] in ("hc", "idx", "cnt")]
    nacc = max(R, CR) * UV
    # |x|_2 (an upper bound) once, on the calling thread
    body = f"""
xq = T.alloc_buffer(({V},), "float32")
xm = T.alloc_buffer((2,), "float32")
xsb = T.alloc_buffer((1,), "float32")
""" + _xnorm(V, "x[{k}]", "xsb[0]") + f"""xs = T.Bind(xsb[0])
for blk in T.parallel(NB):
    acc = T.alloc_buffer(({nacc},), "float32")
    c = T.alloc_buffer((1,), "int32")
    cand = T.alloc_buffer(({BS},), "int32")
    nc = T.alloc_buffer((1,), "int32")
""" + (f"    acc2 = T.alloc_buffer(({CR * UV},), \"float32\")\n" if gated else "") + """    c[0] = 0
    nc[0] = 0
"""

    def keep(row: str, val: str) -> str:
        # kept unless the bound is <= 0
        if i8:
            val = f"ss[{row}] * ({val})"
        return (f"if not ({val} + sb[{row}] + sm[{row}] * xs <= T.float32(0)):\n"
                f"    cand[nc[0]] = {row}\n    nc[0] = nc[0] + 1\n")

    rows = [f"r0 + {q}" for q in range(R)]
    # the narrow rows need software prefetch (of the next group of rows) to stream at the float32
    # kernel's rate: with half the bytes per instruction, the out-of-order window alone keeps half
    # as many lines in flight (3072x768 float16, cold, 2 threads: 278 us without, 182 with,
    # against 338-351 us for the float32 rows)
    inner = _dot_rows(V, U, R, rows, sw, "x", "acc", half=True, ahead=[f"r0 + {R + q}" for q in range(R)], ebytes=eb)
    for q in range(R):
        inner += keep(rows[q], _sum(V, "acc", q * UV))
    body += f"    for rq in range({BS // R}):\n        if blk * {BS} + rq * {R} + {R} <= H:\n"
    body += f"            r0 = T.Bind(blk * {BS} + rq * {R})\n" + _ind(inner, 12)
    tail = _dot(V, U, "r", sw, "x", "acc", half=True, ebytes=eb) + keep("r", _sum(V, "acc"))
    body += (f"        elif blk * {BS} + rq * {R} < H:\n"
             f"            for q in range({R}):\n"
             f"                if blk * {BS} + rq * {R} + q < H:\n"
             f"                    r = T.Bind(blk * {BS} + rq * {R} + q)\n" + _ind(tail, 20))

    def exact(row: str, q: int) -> str:
        # the candidate's exact value from acc[q*UV : q*UV + V] (the sums of its float32 screened
        # row); gated: its up row's sums in acc2 at the same place
        val = f"{_sum(V, 'acc', q * UV)} + {'bg' if gated else 'b'}[{row}]"
        if not gated:
            return emit(row, q, val)
        a = ACTIVATIONS[p["act"]]
        return (f"g{q} = T.Bind({a.format(s='(' + val + ')')})\nif g{q} != T.float32(0):\n"
                f"    hc[blk, c[0]] = g{q} * ({_sum(V, 'acc2', q * UV)} + b[{row}])\n"
                f"    idx[blk, c[0]] = {row}\n    c[0] = c[0] + 1\n")

    def exact_dots(rows: list[str], ahead: list) -> str:
        # gated: the up rows too, unconditionally (nearly every candidate's gate is nonzero, and
        # read after its gate, one at a time, the up rows left the loop waiting on memory)
        s = _dot_rows(V, U, len(rows), rows, "wg" if gated else "w", "x", "acc", ahead=ahead)
        return s + (_dot_rows(V, U, len(rows), rows, "w", "x", "acc2") if gated else "")

    # the candidates' exact pre-activations, CR float32 rows in flight at a time
    crows = [f"j{q}" for q in range(CR)]
    inner = "".join(f"j{q} = T.Bind(cand[tq * {CR} + {q}])\n" for q in range(CR))
    # (the next candidates' rows prefetched; past the last one, the last one again)
    inner += "".join(f"n{q} = T.Bind(cand[T.min(tq * {CR} + {CR + q}, nc[0] - 1)])\n" for q in range(CR))
    inner += exact_dots(crows, [f"n{q}" for q in range(CR)] + ([("w", f"j{q}") for q in range(CR)] if gated else []))
    for q in range(CR):
        inner += exact(crows[q], q)
    body += f"    for tq in range(nc[0] // {CR}):\n" + _ind(inner, 8)
    tail = "jt = T.Bind(cand[t])\n" + exact_dots(["jt"], []) + exact("jt", 0)
    body += f"    for t in range(nc[0] // {CR} * {CR}, nc[0]):\n" + _ind(tail, 8)
    body += "    cnt[blk] = c[0]\n"
    return args, ["K", "H", "NB", "BS"], body


def _dense_mv(p: dict) -> str:
    """`y = w . x + b` for every row: blocks of BS rows in parallel, R rows per step (the tail of
    the last block one row at a time)."""
    return _assemble(_dense_mv_parts(p))


def _dense_mv_parts(p: dict, x: str = "x", w: str = "w", b: str = "b", y: str = "y", K: str = "K", H: str = "H") -> _Parts:
    """`_dense_mv`'s pieces; the names let a fused kernel embed it (the predictor's z = pred_a . x)."""
    V, U, R, BS = p["vec"], p["unroll"], p["rows"], p["bs"]
    if BS % R:
        raise SparsecompError(f"dense_mv kernel: block size {BS} must be a multiple of rows {R}")
    half = p.get("half", False)
    args = [(x, K, "float32"), (w, f"{H}, {K}", "float16" if half else "float32"), (b, H, "float32"), (y, H, "float32")]
    UV = U * V
    rows = [f"r0 + {q}" for q in range(R)]
    inner = _dot_rows(V, U, R, rows, w, x, "acc", K, half)
    for q in range(R):
        inner += f"{y}[{rows[q]}] = {_sum(V, 'acc', q * UV)} + {b}[{rows[q]}]\n"
    tail = _dot(V, U, "r", w, x, "acc", K, half) + f"{y}[r] = {_sum(V, 'acc')} + {b}[r]\n"
    body = f"""
for blk in T.parallel(({H} + {BS - 1}) // {BS}):
    acc = T.alloc_buffer(({R * UV},), "float32")
    for rq in range({BS // R}):
        if blk * {BS} + rq * {R} + {R} <= {H}:
            r0 = T.Bind(blk * {BS} + rq * {R})
""" + _ind(inner, 12) + f"""        elif blk * {BS} + rq * {R} < {H}:
            for q in range({R}):
                if blk * {BS} + rq * {R} + q < {H}:
                    r = T.Bind(blk * {BS} + rq * {R} + q)
""" + _ind(tail, 20)
    return args, [K, H], body


def _gather_up_mv(p: dict) -> str:
    """`u[t] = w[idx[t]] . x + b[idx[t]]`, parallel over groups of R selected rows: R rows read at
    once keep R streams in flight per thread (the rows are scattered through a weight that is cold
    in a real model, so one stream at a time leaves the memory system idle between rows)."""
    V, U, R = p["vec"], p["unroll"], p.get("rows", 1)
    s = _header([("x", "K", "float32"), ("w", "H, K", "float32"), ("b", "H", "float32"), ("idx", "L", "int32"),
                 ("u", "L", "float32")], ["K", "H", "L"])
    UV = U * V
    rows = [f"j{r}" for r in range(R)]
    body = f"""
for tb in T.parallel((L + {R - 1}) // {R}):
    acc = T.alloc_buffer(({R * UV},), "float32")
    if tb * {R} + {R} <= L:
"""
    for r in range(R):
        body += f"        j{r} = T.Bind(idx[tb * {R} + {r}])\n"
    inner = _dot_rows(V, U, R, rows, "w", "x", "acc")
    for r in range(R):
        inner += f"u[tb * {R} + {r}] = {_sum(V, 'acc', r * UV)} + b[j{r}]\n"
    body += _ind(inner, 8)
    if R > 1:
        tail = _dot(V, U, "jt", "w", "x", "acc") + f"u[t] = {_sum(V, 'acc')} + b[jt]\n"
        body += (f"    else:\n        for t in range(tb * {R}, L):\n            jt = T.Bind(idx[t])\n" + _ind(tail, 12))
    return s + _ind(body, 4)


def _pred_up_mv(p: dict) -> str:
    """M = 1, predictor mode (ReLU family, not gated), one kernel from the predictor's rank vector
    to the compact active list: parallel over blocks of BS neurons, each block (1) scores its
    neurons, `s[r] = (bp[r] . z + pb[r]) * scale[r]` (bp = the predictor's [H, RK] factor, stored
    as panels of PW neurons by `predictor_panels`; z = pred_a . x, RK long), and lists those with
    `s > thr` in `idx[blk, :]`; then
    (2) computes the up rows of the listed neurons only, R at a time (R streams in flight), and
    keeps those whose activation is nonzero, compacted in place into `hc` / `idx` / `cnt`, so the
    down kernel never reads the row of a selected neuron that came out zero. In place is safe:
    step t reads its R indices before it writes, and the write position never passes t * R."""
    return _assemble(_pred_up_mv_parts(p))


def _pred_up_mv_parts(p: dict) -> _Parts:
    V, U, BS, act, R, PW = p["vec"], p["unroll"], p["bs"], p["act"], p["rows"], p["panel"]
    if act not in ACTIVATIONS:
        raise SparsecompError(f"the predictor up kernel has no activation {act!r}", hint=f"one of {', '.join(ACTIVATIONS)}")
    if PW % V or BS % PW:
        raise SparsecompError(f"predictor up kernel: panel width {PW} must be a multiple of the vector width {V} "
                              f"and divide the block size {BS}")
    half = p.get("half", False)
    args = [("z", "RK", "float32"), ("bp", f"NPAN, RK, {PW}", "float16" if half else "float32"),
            ("pb", "H", "float32"), ("scale", "H", "float32"),
            ("thr", "H", "float32"), ("x", "K", "float32"), ("w", "H, K", "float32"), ("b", "H", "float32"),
            ("hc", "NB, BS", "float32"), ("idx", "NB, BS", "int32"), ("cnt", "NB", "int32")]
    a = ACTIVATIONS[act]
    UV = U * V
    bpl = 'T.Cast("float32", bp[gp, k, v])' if half else "bp[gp, k, v]"
    # Scores, one panel of PW neurons at a time: the predictor's factor is stored as panels
    # bp[H / PW, RK, PW] (`predictor_panels`), so each panel is one contiguous stream and its PW
    # scores build up in registers, z[k] broadcast. Rows of bp (RK = 256 float16: 512 bytes) read
    # 4 at a time streamed at about half the bandwidth, and each row needed a horizontal sum.
    # `sv` takes the finished sums: `sacc` is then only read and written as whole vectors, which
    # lets LLVM keep it in registers across the k loop.
    body = f"""
for blk in T.parallel(NB):
    sacc = T.alloc_buffer(({PW},), "float32")
    sv = T.alloc_buffer(({PW},), "float32")
    acc = T.alloc_buffer(({R * UV},), "float32")
    c = T.alloc_buffer((2,), "int32")
    c[0] = 0
    for pq in range({BS // PW}):
        if blk * {BS} + pq * {PW} < H:
            gp = T.Bind(blk * {BS // PW} + pq)
            for v in T.vectorized({PW}):
                sacc[v] = T.float32(0)
            for k in range(RK):
                zk = T.Bind(z[k])
                for v in T.vectorized({PW}):
                    sacc[v] = sacc[v] + {bpl} * zk
            for v in T.vectorized({PW}):
                sv[v] = sacc[v]
            for q in range({PW}):
                if gp * {PW} + q < H:
                    r = T.Bind(gp * {PW} + q)
                    if (sv[q] + pb[r]) * scale[r] > thr[r]:
                        idx[blk, c[0]] = r
                        c[0] = c[0] + 1
"""
    js = [f"j{q}" for q in range(R)]

    def keep(j: str, q: int, base: int) -> str:
        return (f"hv{q} = T.Bind({a.format(s='(' + _sum(V, 'acc', base) + ' + b[' + j + '])')})\n"
                f"if hv{q} != T.float32(0):\n    hc[blk, c[1]] = hv{q}\n    idx[blk, c[1]] = {j}\n    c[1] = c[1] + 1\n")

    up = "".join(f"j{q} = T.Bind(idx[blk, tb * {R} + {q}])\n" for q in range(R))
    up += _dot_rows(V, U, R, js, "w", "x", "acc") + "".join(keep(js[q], q, q * UV) for q in range(R))
    up_tail = "jt = T.Bind(idx[blk, t])\n" + _dot(V, U, "jt", "w", "x", "acc") + keep("jt", 0, 0)
    body += f"""    n = T.Bind(c[0])
    c[1] = 0
    for tb in range(n // {R}):
""" + _ind(up, 8) + f"""    for t in range(n // {R} * {R}, n):
""" + _ind(up_tail, 8) + "    cnt[blk] = c[1]\n"
    return args, ["RK", "H", "K", "NB", "BS", "NPAN"], body


def predictor_panels(bp: torch.Tensor, panel: int) -> torch.Tensor:
    """The predictor's [H, RK] factor (row r: neuron r's weights on the rank vector) in the layout
    `pred_up_mv` reads: panels of `panel` neurons, [ceil(H / panel), RK, panel], contiguous, the
    last panel zero-padded; same dtype."""
    h, rk = bp.shape
    npan = -(-h // panel)
    out = torch.zeros(npan * panel, rk, dtype=bp.dtype)
    out[:h] = bp
    return out.reshape(npan, panel, rk).transpose(1, 2).contiguous()


def _down_mv(p: dict) -> str:
    """M = 1, neurons split over P tasks: task p adds its neurons' full rows into part[p, :]
    (contiguous 4*NP-byte streams, R rows at a time), then a parallel sum over p adds the bias.
    `serial=True`: the same loops on the calling thread, no thread-pool launch (two per call
    otherwise): for small active sets, and on a busy machine, where waking the pool's sleeping
    workers costs more than the work."""
    return _assemble(_down_mv_parts(p))


def _down_mv_parts(p: dict) -> _Parts:
    V, R, CB = p["vec"], p["rows"], p["cb"]
    par = "range" if p.get("serial") else "T.parallel"
    # the final sum of the P partials: on the pool (a second launch), or on the calling thread
    # (`serial_sum`: N * P adds, a few us, where the launch would cost more)
    red = "range" if p.get("serial") or p.get("serial_sum") else "T.parallel"
    args = [("hc", "NB, BS", "float32"), ("idx", "NB, BS", "int32"), ("cnt", "NB", "int32"),
            ("wdt", "H, NP", "float32"), ("bias", "N", "float32"), ("part", "P, NP", "float32"), ("y", "N", "float32")]
    body = f"""
for pp in {par}(P):
    for c in range(NP // {V}):
        for v in T.vectorized({V}):
            part[pp, c * {V} + v] = T.float32(0)
    for blk in range(pp * NB // P, (pp + 1) * NB // P):
        n = T.Bind(cnt[blk])
        for tb in range(n // {R}):
"""
    for r in range(R):
        body += f"            j{r} = T.Bind(idx[blk, tb * {R} + {r}])\n            hv{r} = T.Bind(hc[blk, tb * {R} + {r}])\n"
    terms = " + ".join(f"hv{r} * wdt[j{r}, c * {V} + v]" for r in range(R))
    body += f"""            for c in range(NP // {V}):
                for v in T.vectorized({V}):
                    part[pp, c * {V} + v] = part[pp, c * {V} + v] + {terms}
        for t in range(n // {R} * {R}, n):
            jt = T.Bind(idx[blk, t])
            hvt = T.Bind(hc[blk, t])
            for c in range(NP // {V}):
                for v in T.vectorized({V}):
                    part[pp, c * {V} + v] = part[pp, c * {V} + v] + hvt * wdt[jt, c * {V} + v]
for cb in {red}(NP // {CB}):
    for v in T.vectorized({CB}):
        if cb * {CB} + v < N:
            y[cb * {CB} + v] = bias[cb * {CB} + v]
    for pp in range(P):
        for v in T.vectorized({CB}):
            if cb * {CB} + v < N:
                y[cb * {CB} + v] = y[cb * {CB} + v] + part[pp, cb * {CB} + v]
"""
    return args, ["NB", "BS", "H", "NP", "N", "P"], body


def _screen_up_mm(p: dict) -> str:
    """M > 1 (MT rows of x; the caller pads a short chunk by repeating a row), exact mode: the
    hidden activations h[MT, H] of all rows, through the screen of `_screened_up_parts` (of the
    gate in a gated MLP: `gated=True`, then h = act(gate) * up) read once for all MT rows. Per
    block of BS neurons, R screened rows at a time (each narrow vector loaded and widened once,
    then one multiply-add per row of x); a neuron is a candidate where the bound of any row of x
    is not <= 0, and only the candidates' float32 rows are read (one at a time, the next one
    prefetched), for all MT rows at once. h is exact for every candidate and 0 elsewhere;
    cnt[blk] = the block's candidates (the caller's measure of how much of the weight the screen
    let through)."""
    V, R, BS, MT, act = p["vec"], p["rows"], p["bs"], p["mt"], p["act"]
    if act not in ACTIVATIONS:
        raise SparsecompError(f"the screened up kernel has no activation {act!r}", hint=f"one of {', '.join(ACTIVATIONS)}")
    if BS % R:
        raise SparsecompError(f"screened up kernel: block size {BS} must be a multiple of rows {R}")
    dt, eb = _narrow(p["screen"])
    i8 = eb == 1
    gated = p.get("gated", False)
    args = [("x", f"{MT}, K", "float32"), ("w", "H, K", "float32"), ("b", "H", "float32")]
    args += [("wg", "H, K", "float32"), ("bg", "H", "float32")] if gated else []
    args += [("wq", "H, K", dt)] + ([("ss", "H", "float32")] if i8 else [])
    args += [("sb", "H", "float32"), ("sm", "H", "float32"), ("h", f"{MT}, H", "float32"), ("cnt", "NB", "int32")]
    s = _header(args, ["K", "H", "NB"])

    def vsum(base: str) -> str:
        return " + ".join(f"acc[{base} + {i}]" for i in range(V))

    every = max(1, 64 // (V * eb))  # steps per 64-byte line of a narrow row

    def screen(rows: list[str]) -> str:
        n = len(rows)
        t = f"for v in T.vectorized({n * MT * V}):\n    acc[v] = T.float32(0)\n"
        t += f"for kb in range(K // {V}):\n"
        t += f"    if kb % {every} == 0:\n" + "".join("        " + _prefetch(f"wq[{r} + {n}, kb * {V}]") for r in rows)
        for q, r in enumerate(rows):
            t += f'    wv{q} = T.Bind(T.Cast("float32x{V}", wq[{r}, T.Ramp(kb * {V}, 1, {V})]))\n'
        t += f"    for m in T.unroll({MT}):\n"
        for q in range(n):
            o = f"({q * MT} + m) * {V}"
            t += f"        acc[T.Ramp({o}, 1, {V})] = acc[T.Ramp({o}, 1, {V})] + wv{q} * x[m, T.Ramp(kb * {V}, 1, {V})]\n"
        t += f"for k in range(K // {V} * {V}, K):\n    for m in range({MT}):\n"
        for q, r in enumerate(rows):
            t += f'        acc[({q * MT} + m) * {V}] = acc[({q * MT} + m) * {V}] + T.Cast("float32", wq[{r}, k]) * x[m, k]\n'
        for q, r in enumerate(rows):
            val = vsum(f"({q * MT} + m) * {V}")
            val = f"ss[{r}] * ({val})" if i8 else val
            # kept unless every row's bound is <= 0
            t += (f"kf[0] = 0\nfor m in range({MT}):\n    if not ({val} + sb[{r}] + sm[{r}] * xs[m] <= T.float32(0)):\n"
                  f"        kf[0] = 1\nif kf[0] == 1:\n    cand[nc[0]] = {r}\n    nc[0] = nc[0] + 1\n")
        return t

    a = ACTIVATIONS[act]
    body = f"""
xs = T.alloc_buffer(({MT},), "float32")
xq = T.alloc_buffer(({V},), "float32")
xm = T.alloc_buffer((2,), "float32")
for m in range({MT}):
""" + _ind(_xnorm(V, "x[m, {k}]", "xs[m]"), 4) + f"""for blk in T.parallel(NB):
    acc = T.alloc_buffer(({R * MT * V},), "float32")
    cand = T.alloc_buffer(({BS},), "int32")
    nc = T.alloc_buffer((1,), "int32")
    kf = T.alloc_buffer((1,), "int32")
""" + (f"    gv = T.alloc_buffer(({MT},), \"float32\")\n" if gated else "") + f"""    nc[0] = 0
    for m in range({MT}):
        for rr in range({BS}):
            if blk * {BS} + rr < H:
                h[m, blk * {BS} + rr] = T.float32(0)
    for rq in range({BS // R}):
        if blk * {BS} + rq * {R} + {R} <= H:
            r0 = T.Bind(blk * {BS} + rq * {R})
""" + _ind(screen([f"r0 + {q}" for q in range(R)]), 12) + f"""        elif blk * {BS} + rq * {R} < H:
            for q in range({R}):
                if blk * {BS} + rq * {R} + q < H:
                    r = T.Bind(blk * {BS} + rq * {R} + q)
""" + _ind(screen(["r"]), 20) + "    for t in range(nc[0]):\n        j = T.Bind(cand[t])\n"
    body += "        jn = T.Bind(cand[T.min(t + 1, nc[0] - 1)])\n"

    def dot(wname: str) -> str:  # acc[m*V : m*V + V] = the sums of wname[j] . x[m], the next candidate's row prefetched
        return f"""for v in T.vectorized({MT * V}):
    acc[v] = T.float32(0)
for kb in range(K // {V}):
    {_prefetch(f"{wname}[jn, kb * {V}]").strip()}
    wv = T.Bind({wname}[j, T.Ramp(kb * {V}, 1, {V})])
    for m in T.unroll({MT}):
        acc[T.Ramp(m * {V}, 1, {V})] = acc[T.Ramp(m * {V}, 1, {V})] + wv * x[m, T.Ramp(kb * {V}, 1, {V})]
for k in range(K // {V} * {V}, K):
    for m in range({MT}):
        acc[m * {V}] = acc[m * {V}] + {wname}[j, k] * x[m, k]
"""

    if gated:  # the gate's exact values first (kept in gv), then the up row's
        body += _ind(dot("wg"), 8) + f"        for m in range({MT}):\n"
        body += f"            gv[m] = {a.format(s='(' + vsum(f'm * {V}') + ' + bg[j])')}\n"
        body += _ind(dot("w"), 8) + f"        for m in range({MT}):\n            h[m, j] = gv[m] * ({vsum(f'm * {V}')} + b[j])\n"
    else:
        body += _ind(dot("w"), 8) + f"        for m in range({MT}):\n"
        body += f"            h[m, j] = {a.format(s='(' + vsum(f'm * {V}') + ' + b[j])')}\n"
    body += "    cnt[blk] = nc[0]\n"
    return s + _ind(body, 4)


def _down_mm(p: dict) -> str:
    """M > 1 (MT rows, padded), neurons split over P tasks like `down_mv_split`: each task streams
    its neurons' full rows once (R at a time) and adds them, scaled per row of x, into its partial
    part[p, m, :]; then a parallel sum over p adds the bias."""
    V, R, CB, MT = p["vec"], p["rows"], p["cb"], p["mt"]
    s = _header([("hc", "MT_, L", "float32"), ("idx", "L", "int32"),
                 ("wdt", "H, NP", "float32"), ("bias", "N", "float32"), ("part", "P, MT_, NP", "float32"),
                 ("y", "MT_, N", "float32")],
                ["MT_", "L", "H", "NP", "N", "P"])
    body = f"""
for pp in T.parallel(P):
    for m in range({MT}):
        for c in range(NP // {V}):
            for v in T.vectorized({V}):
                part[pp, m, c * {V} + v] = T.float32(0)
    t0 = T.Bind(pp * L // P)
    t1 = T.Bind((pp + 1) * L // P)
    for tb in range((t1 - t0) // {R}):
"""
    for r in range(R):
        body += f"        j{r} = T.Bind(idx[t0 + tb * {R} + {r}])\n"
    body += f"        for c in range(NP // {V}):\n"
    for r in range(R):
        body += f"            w{r} = T.Bind(wdt[j{r}, T.Ramp(c * {V}, 1, {V})])\n"
    body += f"            for m in T.unroll({MT}):\n"
    terms = " + ".join(f"T.Broadcast(hc[m, t0 + tb * {R} + {r}], {V}) * w{r}" for r in range(R))
    body += (f"                part[pp, m, T.Ramp(c * {V}, 1, {V})] = part[pp, m, T.Ramp(c * {V}, 1, {V})] + {terms}\n")
    body += f"""    for t in range(t0 + (t1 - t0) // {R} * {R}, t1):
        jt = T.Bind(idx[t])
        for c in range(NP // {V}):
            wt = T.Bind(wdt[jt, T.Ramp(c * {V}, 1, {V})])
            for m in T.unroll({MT}):
                part[pp, m, T.Ramp(c * {V}, 1, {V})] = part[pp, m, T.Ramp(c * {V}, 1, {V})] + T.Broadcast(hc[m, t], {V}) * wt
for task in T.parallel(NP // {CB} * {MT}):
    cb = T.Bind(task % (NP // {CB}))
    m = T.Bind(task // (NP // {CB}))
    for v in T.vectorized({CB}):
        if cb * {CB} + v < N:
            y[m, cb * {CB} + v] = bias[cb * {CB} + v]
    for pp in range(P):
        for v in T.vectorized({CB}):
            if cb * {CB} + v < N:
                y[m, cb * {CB} + v] = y[m, cb * {CB} + v] + part[pp, m, cb * {CB} + v]
"""
    return s + _ind(body, 4)


def _down_rows(p: dict) -> str:
    """M > 1, per-row work: each row of h (parallel over rows) compacts its own nonzero neurons
    (branch-free: the index is always written, the count advances by h != 0) into scratch
    `sidx[m, :]`, then adds their down rows (R at a time) into y[m, :]. Pays when rows share few
    active neurons (a union would be dense) and the down weight stays in cache (an encoder's
    tokens, a small MLP)."""
    V, R = p["vec"], p["rows"]
    s = _header([("h", "M, H", "float32"), ("sidx", "M, H", "int32"), ("wdt", "H, NP", "float32"),
                 ("bias", "NP", "float32"), ("y", "M, NP", "float32")], ["M", "H", "NP"])
    body = f"""
for m in T.parallel(M):
    c = T.alloc_buffer((1,), "int32")
    c[0] = 0
    for j in range(H):
        sidx[m, c[0]] = j
        c[0] = c[0] + T.Cast("int32", h[m, j] != T.float32(0))
    for cc in range(NP // {V}):
        y[m, T.Ramp(cc * {V}, 1, {V})] = bias[T.Ramp(cc * {V}, 1, {V})]
    n = T.Bind(c[0])
    for tb in range(n // {R}):
"""
    for r in range(R):
        body += f"        j{r} = T.Bind(sidx[m, tb * {R} + {r}])\n        hv{r} = T.Bind(h[m, j{r}])\n"
    terms = " + ".join(f"T.Broadcast(hv{r}, {V}) * wdt[j{r}, T.Ramp(cc * {V}, 1, {V})]" for r in range(R))
    body += f"""        for cc in range(NP // {V}):
            y[m, T.Ramp(cc * {V}, 1, {V})] = y[m, T.Ramp(cc * {V}, 1, {V})] + {terms}
    for t in range(n // {R} * {R}, n):
        jt = T.Bind(sidx[m, t])
        hvt = T.Bind(h[m, jt])
        for cc in range(NP // {V}):
            y[m, T.Ramp(cc * {V}, 1, {V})] = y[m, T.Ramp(cc * {V}, 1, {V})] + T.Broadcast(hvt, {V}) * wdt[jt, T.Ramp(cc * {V}, 1, {V})]
"""
    return s + _ind(body, 4)


def _down_sparse_mv(p: dict) -> str:
    """M = 1 with a pruned down weight (exact mode on a sparse MLP): `y = b + sum_t hc[t] *
    W_down^T[idx[t], :]` where the rows of W_down^T are sparse. The output columns are cut into P
    ranges, each a task; per range, each neuron's nonzeros form one CSR row (`rowptr[p, j]` ..
    `rowptr[p, j + 1]` into `col` / `val`), so a task scatters into its own columns only (no
    atomics) and a pruned neuron's zeros are never read. Scalar scatter: AVX2 has no scatter
    instruction, and the few nonzeros left (active neurons x row density) make it cheap.
    `serial=True`: the same loops on the calling thread."""
    par = "range" if p.get("serial") else "T.parallel"
    s = _header([("hc", "NB, BS", "float32"), ("idx", "NB, BS", "int32"), ("cnt", "NB", "int32"),
                 ("rowptr", "P, H1", "int32"), ("col", "NNZ", "int32"), ("val", "NNZ", "float32"),
                 ("bias", "N", "float32"), ("y", "N", "float32")],
                ["NB", "BS", "P", "H1", "NNZ", "N"])
    body = f"""
for pp in {par}(P):
    for c in range(pp * N // P, (pp + 1) * N // P):
        y[c] = bias[c]
    for blk in range(NB):
        for t in range(cnt[blk]):
            j = T.Bind(idx[blk, t])
            hv = T.Bind(hc[blk, t])
            for k in range(rowptr[pp, j], rowptr[pp, j + 1]):
                y[col[k]] = y[col[k]] + hv * val[k]
"""
    return s + _ind(body, 4)


def _exact_mv(p: dict) -> str:
    """M = 1, exact mode, the whole MLP in one call: `up_mv` then `down_mv` (parameters under
    "up" and "down"), one after the other in one function. Against two calls it saves a return to
    Python, the argument conversions of a second call and the pool's wake-up between them (each
    parallel loop is still its own launch, but the workers are still spinning at the second).
    x and y are one-row matrices, [1, K] and [1, N]."""
    return _assemble(_up_mv_parts(p["up"]), _down_mv_parts(p["down"]), one_row=("x", "y"))


def _pred_mv(p: dict) -> str:
    """M = 1, predictor mode, the whole MLP in one call: z = pred_a . x (`dense_mv`, "z"),
    `pred_up_mv` ("up") and `down_mv` ("down"). x and y are one-row matrices, [1, K] and [1, N]."""
    z = _dense_mv_parts(p["z"], x="x", w="pa", b="pzero", y="z", K="K", H="RK")
    return _assemble(z, _pred_up_mv_parts(p["up"]), _down_mv_parts(p["down"]), one_row=("x", "y"))


_GEN = {"up_mv": _up_mv, "screen_up_mm": _screen_up_mm, "dense_mv": _dense_mv, "gather_up_mv": _gather_up_mv, "pred_up_mv": _pred_up_mv, "down_mv": _down_mv, "down_mm": _down_mm, "down_rows": _down_rows,
        "down_sparse_mv": _down_sparse_mv, "exact_mv": _exact_mv, "pred_mv": _pred_mv}
_FUSED = {"exact_mv": {"up": "up_mv", "down": "down_mv"}, "pred_mv": {"z": "dense_mv", "up": "pred_up_mv", "down": "down_mv"}}


def _normalise(kind: str, params: dict) -> dict:
    p = dict(params)
    p.setdefault("vec", _target.vector_width())
    p.setdefault("unroll", {"up_mv": 4, "gather_up_mv": 4, "dense_mv": 2}.get(kind, 1))
    if kind == "dense_mv":
        p.setdefault("rows", 4)
        p.setdefault("bs", 32)
    if kind == "gather_up_mv":
        p.setdefault("rows", 1)
    if kind == "pred_up_mv":
        p.setdefault("bs", 64)
        p.setdefault("act", "relu")
        p.setdefault("rows", 4)
        p.setdefault("unroll", 1)
        p.setdefault("panel", 32)
    if kind == "up_mv":
        p.setdefault("bs", 64)
        p.setdefault("gated", False)
        p.setdefault("act", "relu")
        p.setdefault("rows", 1)
        if p.get("screen"):
            p.setdefault("crows", 2)
    if kind == "screen_up_mm":
        p.setdefault("bs", 64)
        p.setdefault("rows", 2)
        p.setdefault("mt", 4)
        p.setdefault("act", "relu")
        p.setdefault("screen", "i8")
        p.setdefault("gated", False)
    if kind in ("down_mv", "down_mm", "down_rows"):
        p.setdefault("cb", 64)
        p.setdefault("rows", 2)
    if kind in ("down_mv", "down_sparse_mv"):
        p.setdefault("serial", False)
    if kind == "down_mm":
        p.setdefault("mt", 4)
    if kind in _FUSED:
        p = {phase: _normalise(k, p.get(phase, {})) for phase, k in _FUSED[kind].items()}
    return p


def mlp_source(kind: str, params: dict) -> str:
    """TVMScript text of one sparse-MLP kernel (`kind`: one of `_GEN`'s keys)."""
    if kind not in _GEN:
        raise SparsecompError(f"no sparse-MLP kernel {kind!r}", hint=f"kinds: {', '.join(_GEN)}")
    return _GEN[kind](_normalise(kind, params))


def build_mlp_kernel(kind: str, params: dict | None = None) -> _build.Kernel:
    """Compile (or fetch from the in-memory / on-disk kernel caches) one sparse-MLP kernel."""
    params = _normalise(kind, params or {})
    return _build.build_source(f"mlp-{kind}", params, mlp_source(kind, params), key_prefix="mlp-")
