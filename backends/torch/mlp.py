"""Lowering `sparsecomp::sparse_mlp` for the torch backend: skip the inactive hidden neurons.

Lowering table:

    sparsecomp.sparse_mlp(x, ...)  ->  call_module SparseMLP (chosen strategy) | the op's dense reference

A `SparseMLP` runs one of these strategies (`x` flattened to M rows):

- M = 1, exact mode: `tir-up` (the TIR up kernel computes the up-projection and activation and
  compacts the active neurons per block of rows as it goes; in a gated MLP the up row of a
  zero-gate neuron is never read), `tir-screen-up` / `tir-screen8-up` (and `tir-gated-...`: the
  same, but a float16 / int8 copy of the up weight, or of the gate, first proves most neurons
  inactive with a rigorous error bound, and only the other neurons' float32 rows are read:
  lossless, about 0.6x / 0.4x of the bytes at 10% active; `backends/tir/_mlp.py`) or `torch-up` (torch's `F.linear` +
  activation, then `nonzero`), followed by the TIR down kernel that reads only the active rows
  of the transposed down weight (neurons split over tasks, each adding full contiguous rows into
  a partial sum).
- M = 1, threshold mode: the hidden activation and its keep-mask in torch, with the very calls of
  the op's reference (so the mask agrees with verification's reference bit for bit: a neuron near
  the threshold cannot flip), then the TIR down kernel on the kept neurons.
- M = 1, predictor mode: the low-rank predictor and the keep-mask in torch (same calls as the
  reference), then the TIR gather kernel computes the up (and gate) pre-activations of the kept
  neurons only, and the TIR down kernel reads their down rows: both projections skip. For a
  non-gated ReLU-family MLP, also `tir-predictor`: the predictor, the selection, the kept up rows
  and the compaction of the nonzero ones all in TIR (torch's GEMVs and `nonzero` cost more than
  the skipped work saves at this size); its scores round differently from the reference's, so a
  neuron whose score is within rounding of its threshold may be kept by one and not the other.
- Where the kernels run on TVM's own thread pool (`backends/tir/_pool.py`), each M = 1 strategy
  comes twice: with the down kernel on the pool and on the calling thread (`serial-down`): with
  few active rows, or on a busy machine, waking the pool can cost more than the work. The serial
  variant is a candidate only while the down rows it reads are few (`SERIAL_DOWN_MAX_BYTES`): one
  thread cannot draw the machine's read bandwidth from a cold weight. On torch's OpenMP threads
  (the default) a launch inside a model finds the workers awake, and the serial variants, still
  chosen by the isolated timing for some layers, measured slower in the model: opt-125m-like's
  one-token forward 14.3-14.8 ms with them against 13.4-13.9 ms without (interleaved).
- In a model whose weights exceed the last-level cache, one-row MLPs smaller than twice that
  cache are timed cold: a flush before every timed call (`timing.cache_flush`), since inside the
  model their weights come from memory (the cache key records it).
- Pruned MLPs (exact mode, a weight at most `PRUNED_DENSITY` nonzero): both sparsities at once.
  Each projection first gets its own measured sparse-linear kernel (`lowering.choose_kernel`,
  cached like any sparse_linear decision); then `pruned-mv` (M = 1: up on its kernel, the active
  neurons via nonzero, and only their down rows, read sparse by the TIR `down_sparse_mv` kernel
  when W_down is pruned) and `pruned` (any M: up and down on their kernels, every neuron: what
  compiling without activation sparsity would run, so the fusion never costs a pruned MLP its
  weight sparsity) join the candidates.
- M > 1: the union of the active neurons of each chunk of 8 rows (`union-tir`: the TIR kernel
  reads each active down row once per chunk; `union-torch`: `index_select` + GEMM over all rows;
  `union-tir{...,screen=}`: up to 8 rows get their hidden activations (gated or not) from the screened TIR
  kernel, `screen_up_mm`, while the share of neurons its last call let through stays below the
  break-even measured at compile against torch's GEMM; the M = 1 choice's screen carries over),
  or per-row work (`per-row-tir`: each row adds only its own active neurons' rows, for rows whose
  union is dense while the down weight stays in cache). Above the measured crossover density the
  down-projection runs dense instead: a path never runs where it was measured slower than dense.

Per layer the backend measures every candidate that applies against `dense` on the layer's real
input (interleaved medians, `sparsecomp.timing.compare`), checks each against the op's reference
(max abs error <= 1e-4 x max|output|), keeps the fastest, measures the crossover density of the
M > 1 path (dense down vs the union kernel at no and at all neurons active, linear in between),
and caches the decision (`DecisionCache`, keyed by shapes, M, mode and activation density).
"""

from __future__ import annotations

import threading

import torch
from torch import fx

from sparsecomp.cache import DecisionCache
from sparsecomp.dialect import MLP_ACTIVATIONS, PRUNED_DENSITY, RELU_FAMILY, SPARSE_MLP, mlp_hidden, predictor_keep
from sparsecomp.errors import SparsecompError
from sparsecomp.ir import compare_outputs, get_attr_value, record_inputs
from sparsecomp.ir import global_module_hooks as _global_module_hooks
from sparsecomp.lowering import MLPDecision, speedup_text
from sparsecomp.memory import prefer_huge_pages
from sparsecomp.timing import ColdTiming, compare

from .kernels import pool_tag as _pool_tag
from .kernels import flush_pause_s
from .kernels import tir_available

__all__ = ["SPARSE_MLP", "MLPDecision", "SparseMLP", "lower_sparse_mlp"]

CANDIDATE_SET_VERSION = 7  # bump when kernels or strategies change: cached decisions no longer apply
# The sparse down path at M > 1 runs only where its cost, interpolated linearly between one and
# every neuron active, is predicted at most 85% of dense. Without the margin, the quiet bench_mlp
# sweep ran the union at 56% density (crossover 59%) at M = 8 and measured 0.83x of dense.
CROSSOVER_MARGIN = 0.85
# The serial down kernel (one thread) is a candidate only when the down rows a call reads fit in
# this many bytes. Above it the parallel kernel wins cold, yet the back-to-back compile-time timing
# (the rows partly in cache) could not tell them apart: on the bench_mlp FFN (2048 x 8192, 10%
# active: 6.7 MB of rows) the timing picked serial in 2 of 3 compiles, which then measured 1.2x
# slower end to end (pipeline 2.83 vs 2.33 ms, interleaved, pools idle between calls).
SERIAL_DOWN_MAX_BYTES = 2 << 20
EXACT_ACTIVATIONS = RELU_FAMILY  # the TIR up kernel's activations (it skips exact zeros)
_ARGS = ("x", "w_up", "b_up", "w_gate", "b_gate", "w_down_t", "b_down", "activation", "mode", "threshold", "scale",
         "pred_a", "pred_bt")


class _Weights:
    """The op's constant arguments, packed once for the kernels."""

    def __init__(self, args: dict, cb: int):
        self.act_name = args["activation"]
        self.act = MLP_ACTIVATIONS[self.act_name]
        self.mode = args["mode"]
        self.w_up, self.b_up = args["w_up"], args["b_up"]
        self.w_gate, self.b_gate = args["w_gate"], args["b_gate"]
        self.threshold, self.scale = args["threshold"], args["scale"]
        self.pred_a, self.pred_bt = args["pred_a"], args["pred_bt"]
        wdt = args["w_down_t"].detach().float()
        self.H, self.N = wdt.shape
        self.K = self.w_up.shape[1]
        self.NP = -(-self.N // cb) * cb
        if self.NP != self.N:  # the TIR down kernels read whole column chunks: pad the rows
            padded = torch.zeros(self.H, self.NP)
            padded[:, : self.N] = wdt
            self.wdt_p = padded
        else:
            self.wdt_p = wdt.contiguous()
        self.wdt = self.wdt_p[:, : self.N]  # dense fallback reads the same storage (strided rows)
        # the weights the kernels stream, on huge pages where the system allows (in place)
        for t in (self.w_up, self.w_gate, self.wdt_p):
            if t is not None:
                prefer_huge_pages(t)
        b = args["b_down"]
        self.b_down = b.detach().float().contiguous() if b is not None else torch.zeros(self.N)
        self.gated = self.w_gate is not None

    def up_consts(self) -> tuple:
        """(w_up, b_up) + (w_gate, b_gate) in a gated MLP, as the up kernels take them: float32,
        contiguous (the op's own tensors where they already are), a missing bias as zeros."""
        f32 = lambda t, n: t.detach().float().contiguous() if t is not None else torch.zeros(n)  # noqa: E731
        return (f32(self.w_up, 0), f32(self.b_up, self.H)) + ((f32(self.w_gate, 0), f32(self.b_gate, self.H)) if self.gated else ())

    def screen(self, kind: str) -> tuple:
        """`screen_terms` of the weight whose zeros are the MLP's (the gate in a gated MLP, else
        up), on huge pages; cached per kind and version of the tensors (every screened candidate of
        a compile shares them; an in-place change to the weight or bias makes new ones)."""
        cache = self.__dict__.setdefault("_screens", {})
        w, b = (self.w_gate, self.b_gate) if self.gated else (self.w_up, self.b_up)
        key = (kind, w._version, b._version if b is not None else None)
        if key not in cache:
            from sparsecomp.screen import screen_terms

            terms = screen_terms(w.detach().float(), b.detach().float() if b is not None else None, kind=kind)
            prefer_huge_pages(terms[0])
            for stale in [k for k in cache if k[1:] != key[1:]]:  # (of tensors changed in place since)
                del cache[stale]
            cache[key] = terms
        return cache[key]

    # The hidden activation and keep-mask exactly as the op's reference computes them, on x as the
    # op receives it (its leading dims included: `F.linear` on a 3-D input is not the same GEMM call
    # as on the flattened 2-D one, and may round differently, which would let a neuron near the
    # threshold flip between the reference and the kernel). Both return [M, H].
    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        return mlp_hidden(x, self.w_up, self.b_up, self.w_gate, self.b_gate, self.act_name, self.mode, self.threshold,
                          self.scale, self.pred_a, self.pred_bt).reshape(-1, self.H)

    def _keep(self, x: torch.Tensor) -> torch.Tensor:
        return predictor_keep(x, self.pred_a, self.pred_bt, self.b_up if not self.gated else self.b_gate, self.act_name,
                              self.threshold, self.scale)

    def keep(self, x: torch.Tensor) -> torch.Tensor:
        return self._keep(x).reshape(-1, self.H)

    def dense_down(self, h: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b_down, h, self.wdt)


class _Strategy:
    """A runner: `__call__(x [..., K]) -> y [M, N]`, M = the rows of x (leading dims flattened)."""

    label = "dense"

    def __init__(self, w: _Weights):
        self.w = w

    def __call__(self, x):
        return self.w.dense_down(self.w.hidden(x))


class _FusedMV(_Strategy):
    """An M = 1 strategy whose whole MLP is one kernel `self.k(x [1, K], *self.args, y [1, N])`
    (`_TirUpMV`, `_TirPredictorMV`). `SparseMLP` hands it a one-row input as it comes
    (`try_row`): no reshape, copy or test on that path, where each torch call costs tens of
    microseconds once a kernel has streamed the caches."""

    k = None  # the kernel
    _args: tuple = ()
    _bound: tuple = ()

    def __init__(self, w: _Weights):
        from sparsecomp.backends.tir import OutputStock

        super().__init__(w)
        self._out = OutputStock((1, w.N))  # one-row outputs, each handed out once
        self._lock = threading.Lock()  # see `run_row`

    @property
    def args(self) -> tuple:
        """The kernel's arguments between x and y (torch tensors); setting them also binds them
        (`bound_args`: converted once, not on every call)."""
        return self._args

    @args.setter
    def args(self, value) -> None:
        from sparsecomp.backends.tir import bound_args

        self._args = tuple(value)
        self._bound = bound_args(*self._args)

    def run_row(self, x):
        y, yt = self._out.take()
        # TVM releases the GIL while a kernel runs, and the kernel's scratch (compacted activations,
        # partial sums) is this strategy's: two threads calling one compiled MLP at once got each
        # other's results before this lock (tests/backends/torch/test_mlp.py)
        with self._lock:
            self.k(x, *self._bound, yt)
        return y

    def try_row(self, x):
        """y [1, N], or None where the kernel's own argument check (before it runs) refused x:
        another dtype, device, rank or layout."""
        try:
            return self.run_row(x)
        except (ValueError, TypeError):  # tvm-ffi's argument check (shape / layout, dtype)
            return None

    def __call__(self, x):
        """One float32 CPU row of any layout (made a contiguous [1, K] where the kernel refuses it
        as it is; any other refusal raises)."""
        y = self.try_row(x)
        return y if y is not None else self.run_row(x.reshape(1, -1).contiguous())


class _DownMV:
    """TIR down kernel at M = 1 over a compact list of neurons (idx, values)."""

    def __init__(self, w: _Weights, parts: int, rows: int, serial: bool = False):
        self.w = w
        # as a phase of a fused kernel (`exact_mv`, `pred_mv`) the partials are summed on the
        # calling thread: a second launch for N * P adds cost more than the adds
        self.params = {"rows": rows, "cb": _CB, "serial": serial, "serial_sum": True}
        self._k = self._bound = None  # the standalone kernel (`blocks`) and its constant arguments:
        # made on first use, never for a fused phase
        self.part = torch.empty(1 if serial else parts, w.NP)  # scratch: calls hold `_lock` (see _FusedMV.run_row)
        self._lock = threading.Lock()
        self.tag = "serial-down" if serial else "tir-down"

    def args(self) -> tuple:
        """The down phase's arguments after hc / idx / cnt, but y (a fused kernel's tail)."""
        return self.w.wdt_p, self.w.b_down, self.part

    def blocks(self, hc, idx, cnt) -> torch.Tensor:
        if self._k is None:
            from sparsecomp.backends.tir import bound_args, build_mlp_kernel

            self._k = build_mlp_kernel("down_mv", {k: v for k, v in self.params.items() if k != "serial_sum"})
            self._bound = bound_args(*self.args())
        y = torch.empty(self.w.N)
        with self._lock:
            self._k(hc, idx, cnt, *self._bound, y)
        return y

    def flat(self, values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        n = idx.numel()
        if n == 0:
            return self.w.b_down.clone()
        return self.blocks(values.reshape(1, n), idx.reshape(1, n), torch.tensor([n], dtype=torch.int32))


_CB = 64  # column chunk of the TIR down kernels (the padded width NP is a multiple of it)


class _TorchUpMV(_Strategy):
    """M = 1: hidden (and mask) in torch as the reference computes it, kept neurons via nonzero,
    TIR down over them."""

    def __init__(self, w, parts=4, rows=4, serial=False):
        super().__init__(w)
        self.down = _DownMV(w, parts, rows, serial)
        self.label = f"torch-up+{self.down.tag}{{rows={rows}}}"

    def __call__(self, x):
        h = self.w.hidden(x)[0]
        idx = h.nonzero().reshape(-1)
        return self.down.flat(h[idx].contiguous(), idx.to(torch.int32)).reshape(1, -1)


class _TirUpMV(_FusedMV):
    """M = 1, exact mode: the TIR up kernel (activation + per-block compaction), then the TIR down
    kernel, both phases of one fused kernel (`exact_mv`): one call from Python."""

    def __init__(self, w, rows=4, unroll=1, parts=4, down_rows=4, bs=64, serial=False, screen: str | None = None, crows=2):
        """`screen`: None, "f16" or "i8": first read a float16 / int8 copy of the up weight (the
        gate in a gated MLP) that proves most inactive neurons inactive (`_screened_up_parts`)."""
        from sparsecomp.backends.tir import build_mlp_kernel

        super().__init__(w)
        if w.act_name not in EXACT_ACTIVATIONS or w.mode != "exact":
            raise SparsecompError(f"the TIR up kernel computes ReLU-family exact mode only, not {w.act_name} {w.mode}")
        # (a gated MLP reads its gate one row at a time, unless screened: its narrow rows R at a time)
        up = {"bs": bs, "rows": 1 if w.gated and not screen else rows, "unroll": unroll, "act": w.act_name, "gated": w.gated}
        if screen:
            up.update(screen=screen, crows=crows)
        self.screen = screen  # (the M > 1 path takes the same screen)
        self.down = _DownMV(w, parts, down_rows, serial)
        self.k = build_mlp_kernel("exact_mv", {"up": up, "down": self.down.params})
        nb = -(-w.H // bs)
        self.hc = torch.empty(nb, bs)
        self.idx = torch.empty(nb, bs, dtype=torch.int32)
        self.cnt = torch.empty(nb, dtype=torch.int32)
        d = self.down.tag
        dr = f",down_rows={down_rows}" if down_rows != 4 else ""
        scr = {None: "", "f16": "screen-", "i8": "screen8-"}[screen]
        up_tag = f"tir-gated-{scr}up" if w.gated else f"tir-{scr}up"
        cr = f",crows={crows}" if screen else ""
        shape = f"rows={rows}," if not w.gated or screen else ""
        self.label = f"{up_tag}+{d}{{{shape}unroll={unroll}{cr}{dr}}}"
        # the screen reads a narrow copy of the weight whose zeros are the MLP's: up, or the gate
        screen_args = w.screen(screen) if screen else ()
        self.screen_note = ""
        if screen:
            copy = {"f16": "float16", "i8": "int8"}[screen]
            self.screen_note = (f"{copy} screen: a {copy} copy of the {'gate' if w.gated else 'up'} weight "
                                f"({screen_args[0].numel() * screen_args[0].element_size() / 1e6:.1f} MB) is kept beside it "
                                f"(lossless: see {up_tag})")
        self.args = w.up_consts() + screen_args + (self.hc, self.idx, self.cnt) + self.down.args()


class _PredictorMV(_Strategy):
    """M = 1, predictor mode: the keep-mask from the low-rank predictor (torch, as the reference),
    then the up (and gate) pre-activations of the kept neurons only (TIR gather kernel), the
    activation on that compact vector, and the TIR down kernel: both projections skip."""

    def __init__(self, w, parts=4, rows=4, serial=False, gather_rows=1):
        from sparsecomp.backends.tir import bound_args, build_mlp_kernel

        super().__init__(w)
        self.gather = build_mlp_kernel("gather_up_mv", {"unroll": 4 if gather_rows == 1 else 1, "rows": gather_rows})
        self.down = _DownMV(w, parts, rows, serial)
        consts = w.up_consts()
        self._up = bound_args(*consts[:2])
        self._gate = bound_args(*consts[2:]) if w.gated else None
        self.label = f"predictor+tir-gather+{self.down.tag}{{rows={rows}" + (f",gather_rows={gather_rows}}}" if gather_rows > 1 else "}")

    def __call__(self, x):
        idx = self.w.keep(x)[0].nonzero().reshape(-1).to(torch.int32)
        x = x.reshape(-1).contiguous()
        n = idx.numel()
        if n == 0:
            return self.w.b_down.clone().reshape(1, -1)
        u = torch.empty(n)
        self.gather(x, *self._up, idx, u)
        if self.w.gated:
            g = torch.empty(n)
            self.gather(x, *self._gate, idx, g)
            h = self.w.act(g) * u
        else:
            h = self.w.act(u)
        return self.down.flat(h, idx).reshape(1, -1)


def _half_exact(t: torch.Tensor) -> bool:
    """t's values are exactly float16 values (so storing it as float16 loses nothing)."""
    h = t.half()
    return bool(torch.isfinite(h).all()) and torch.equal(h.float(), t)


class _TirPredictorMV(_FusedMV):
    """M = 1, predictor mode, ReLU family, not gated: the whole selection in TIR, one fused kernel
    (`pred_mv`) in three phases. `dense_mv` makes the predictor's rank vector z = pred_a . x;
    `pred_up_mv` scores each neuron from z, computes the up rows of the selected ones only and
    keeps those that come out nonzero (compacted per block); the down phase reads only those
    rows. The predictor's factors are read as float16 when their values allow it (see
    `_half_exact`). Against `_PredictorMV` (mask in torch) it
    saves torch's slow GEMVs and `nonzero`, and the down rows of selected neurons that are not
    active. Its scores round differently from the reference's torch calls, so a neuron whose score
    lies within float rounding of its threshold can be kept by one and dropped by the other: the
    mask is the predictor's, not the reference's bit for bit (verification on the example input
    still applies, and drops the candidate if it disagrees there)."""

    def __init__(self, w, rows=4, down_rows=4, parts=4, bs=64, serial=False, panel=32):
        from sparsecomp.backends.tir import build_mlp_kernel, predictor_panels

        super().__init__(w)
        if w.mode != "predictor" or w.gated or w.act_name not in EXACT_ACTIVATIONS:
            raise SparsecompError(f"the TIR predictor kernel scores ReLU-family, non-gated MLPs only, not {w.act_name}")
        rk = w.pred_a.shape[0]
        f32 = lambda t: t.detach().float().contiguous()  # noqa: E731
        self.pred_a, self.bp = f32(w.pred_a), f32(w.pred_bt.t())
        # the pass rounds the predictor's factors to float16-representable values
        # (`sparse_mlp._half_storable`): stored as float16 they are read in half the bytes and
        # widen back to the very same float32 values, so the kernel computes what the reference does
        half = _half_exact(self.pred_a) and _half_exact(self.bp)
        if half:
            self.pred_a, self.bp = self.pred_a.half(), self.bp.half()
        self.bp = prefer_huge_pages(predictor_panels(self.bp, panel))
        self.down = _DownMV(w, parts, down_rows, serial)
        self.k = build_mlp_kernel("pred_mv", {"z": {"half": half}, "up": {"bs": bs, "rows": rows, "act": w.act_name, "half": half,
                                                                               "panel": panel},
                                                   "down": self.down.params})
        self.w_up = f32(w.w_up)
        self.b_up = f32(w.b_up) if w.b_up is not None else torch.zeros(w.H)
        self.scale = f32(w.scale.expand(w.H)) if w.scale is not None else torch.ones(w.H)
        self.thr = f32(w.threshold.expand(w.H))
        self.zero_rk, self.z = torch.zeros(rk), torch.empty(rk)
        nb = -(-w.H // bs)
        self.hc, self.idx, self.cnt = torch.empty(nb, bs), torch.empty(nb, bs, dtype=torch.int32), torch.empty(nb, dtype=torch.int32)
        self.label = f"tir-predictor+{self.down.tag}{{rows={rows},bs={bs}{',f16' if half else ''}}}"
        self.args = (self.pred_a, self.zero_rk, self.z, self.bp, self.b_up, self.scale, self.thr, self.w_up, self.b_up,
                     self.hc, self.idx, self.cnt) + self.down.args()


class _Union(_Strategy):
    """M > 1: the union of the active neurons of each chunk of up to 8 rows (`tir`: the TIR
    kernel, each down row read once per chunk) or of all rows (`torch`: index_select + GEMM).
    When the union is denser than the measured crossover, the down-projection runs dense."""

    CHUNK = 8

    def __init__(self, w, kind: str = "tir", parts: int = 4, rows: int = 2, screen: str | None = None):
        """`screen` ("f16" / "i8", TIR only, exact mode): up to CHUNK rows get their hidden
        activations from the screened kernel (`screen_up_mm`: the narrow copy of the up weight, or
        of the gate, read once for all rows, float32 rows only for the neurons it cannot rule out)
        instead of torch's GEMM, while the share of neurons the screen let through in the last
        call stays below the measured break-even (`screen_cost`)."""
        super().__init__(w)
        self.kind = kind
        # measured by `calibrate_crossover` (us, on one chunk): dense down, union down with one
        # neuron and with every neuron active. Until measured, the union path never runs.
        self.cost = {"dense": 0.0, "one": 1.0, "all": 1.0}
        self.screen_k = None
        if kind == "tir":
            from sparsecomp.backends.tir import bound_args, build_mlp_kernel

            self.kernels = {mt: build_mlp_kernel("down_mm", {"mt": mt, "rows": rows, "cb": _CB}) for mt in (4, 8)}
            self.parts = {mt: torch.empty(parts, mt, w.NP) for mt in (4, 8)}
            self._bound = {mt: bound_args(w.wdt_p, w.b_down, self.parts[mt]) for mt in (4, 8)}
            self._lock = threading.Lock()  # the partial sums are scratch (see _FusedMV.run_row)
            self.label = f"union-tir{{rows={rows}{f',screen={screen}' if screen else ''}}}"
            if screen:
                if w.mode != "exact" or w.act_name not in EXACT_ACTIVATIONS:
                    raise SparsecompError("the screened M > 1 kernel is for ReLU-family exact mode")
                # screened rows per step: 2 up to 4 rows of x, 1 at 8 (16 accumulators spilled: the
                # 2048 -> 8192 FFN's screen alone at 8 rows, 1.46 against 2.00 ms; at 2 and 4 rows
                # 0.40 / 0.54 ms with 2 against 0.62 / 0.69 with 1)
                self.screen_k = {mt: build_mlp_kernel("screen_up_mm", {"mt": mt, "screen": screen, "act": w.act_name,
                                                                            "rows": 2 if mt <= 4 else 1, "gated": w.gated})
                                 for mt in (2, 4, 8)}
                self.consts = w.up_consts()
                self.terms = w.screen(screen)
                self.h_out = {mt: torch.empty(mt, w.H) for mt in (2, 4, 8)}
                self.cnt = torch.empty(-(-w.H // 64), dtype=torch.int32)
                self._screen_bound = bound_args(*self.consts, *self.terms)
                # measured (us, one chunk of 8 rows; fewer rows cost the screen less and the GEMM
                # about as much, so the break-even holds for them too): torch's GEMM, the screen
                # letting no neuron and every neuron through. Until measured, the screen runs.
                self.screen_cost = {"gemm": 1.0, "none": 0.0, "all": 1.0}
                self.frac = 0.0  # the share of neurons the screen let through (last call, or estimated)
                self.ratio = 1.0  # let through / active in some row, at the last screened call
                self._passed: int | None = None  # let through by this call's screen (None: h from the GEMM)
        else:
            self.label = "union-torch"

    def screen_max(self) -> float:
        """The share of neurons let through above which torch's GEMM computes h faster."""
        c = self.screen_cost
        if c["all"] <= c["none"]:
            return 1.0 if c["gemm"] >= c["all"] else 0.0
        return max(0.0, min(1.0, (c["gemm"] - c["none"]) / (c["all"] - c["none"])))

    def screened(self, x2: torch.Tensor, bound=None) -> tuple[torch.Tensor, int]:
        """(h [m, H], the neurons let through) of 2 <= m <= CHUNK float32 rows through
        `screen_up_mm` (rows padded by repeating the last one, which lets no other neuron through)."""
        m = x2.shape[0]
        mt = 2 if m <= 2 else 4 if m <= 4 else 8
        xp = (x2 if m == mt else torch.cat([x2, x2[-1:].expand(mt - m, -1)])).contiguous()
        with self._lock:
            self.screen_k[mt](xp, *(bound or self._screen_bound), self.h_out[mt], self.cnt)
            return self.h_out[mt][:m].clone(), int(self.cnt.sum())

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """h as the reference computes it, or through the screen (`screen_k`) for up to CHUNK rows
        while the share it lets through stays below its break-even (`track` keeps that share)."""
        self._passed = None
        if self.screen_k is not None:
            x2 = x.reshape(-1, x.shape[-1])
            if 1 < x2.shape[0] <= self.CHUNK and x2.dtype == torch.float32 and x2.is_cpu and self.frac < self.screen_max():
                h, self._passed = self.screened(x2)
                return h
        return self.w.hidden(x)

    def track(self, active: int) -> None:
        """After a call of at most CHUNK rows, with `active` neurons nonzero in some row: the share
        the screen let through, or, where h came from the GEMM, what it would have let through
        (the active neurons scaled as at the last screened call: the raw active share alone is
        lower, and calls would alternate between the two paths)."""
        if self._passed is not None:
            self.frac, self.ratio = self._passed / self.w.H, self._passed / max(1, active)
        else:
            self.frac = min(1.0, active / self.w.H * self.ratio)

    def _chunk(self, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        w = self.w
        m = h.shape[0]
        if idx.numel() == 0:  # no neuron active in any row: only the bias is left
            return w.b_down.expand(m, w.N).clone()
        if self.kind == "torch":
            return torch.addmm(w.b_down, h[:, idx], w.wdt.index_select(0, idx))
        mt = 4 if m <= 4 else 8
        hc = torch.zeros(mt, idx.numel())
        hc[:m] = h[:, idx]
        y = torch.empty(mt, w.N)
        idx32 = idx.to(torch.int32)
        with self._lock:
            self.kernels[mt](hc, idx32, *self._bound[mt], y)
        return y[:m]

    def chunks(self, h: torch.Tensor) -> tuple[int, torch.Tensor]:
        """(rows per chunk, [chunks, H] bool: which neurons each chunk's union holds), in one pass
        over h (zero rows pad the last chunk; a zero activates nothing). One `nonzero` per chunk
        cost 2.1 ms at M = 64 here, paid even when the union then fell back to dense; and
        `(h != 0).any(1)` over the chunks 1.27 ms, against 0.12 ms for `abs().amax(1) != 0`
        (the same answer, NaN included: it propagates through amax and is != 0)."""
        step = self.CHUNK if self.kind == "tir" else h.shape[0]
        pad = -h.shape[0] % step
        hp = torch.nn.functional.pad(h, (0, 0, 0, pad)) if pad else h
        return step, hp.reshape(-1, step, h.shape[1]).abs().amax(1) != 0

    def down(self, h: torch.Tensor, parts: list) -> torch.Tensor:
        ys = [self._chunk(c, idx) for c, idx in parts]
        return ys[0] if len(ys) == 1 else torch.cat(ys)

    def crossover(self, n_chunks: int = 1) -> float:
        """Mean union density per chunk above which the dense down is faster for n chunks. The
        dense cost is taken as that of one chunk whatever the row count (a GEMM reads the weight
        once; its compute grows, but on the memory-bound sizes this path serves that is the
        smaller part), so for many chunks the bound is conservative: never slower than dense."""
        c = self.cost
        dense = c["dense"] * CROSSOVER_MARGIN
        if c["all"] <= c["one"]:
            return 1.0 if dense >= c["all"] * n_chunks else 0.0
        return max(0.0, min(1.0, (dense / n_chunks - c["one"]) / (c["all"] - c["one"])))

    def __call__(self, x):
        h = self.hidden(x)
        step, union = self.chunks(h)
        if self.screen_k is not None and 1 < h.shape[0] <= self.CHUNK:  # one chunk: union[0] is the rows' union
            self.track(int(union[0].sum()))
        if union.shape[0] == 0 or float(union.sum()) / union.numel() > self.crossover(union.shape[0]):
            return self.w.dense_down(h)  # no rows, or a mean union density past the crossover
        return self.down(h, [(h[i * step:(i + 1) * step], u.nonzero().reshape(-1)) for i, u in enumerate(union)])


class _PerRow(_Strategy):
    """M > 1: every row adds only its own active neurons' down rows (TIR `down_rows`), for rows
    whose union is dense but whose own activations are sparse while the down weight stays in
    cache (encoders, small MLPs). Above the measured crossover density (mean over rows) the
    down-projection runs dense."""

    def __init__(self, w, rows: int = 2):
        from sparsecomp.backends.tir import bound_args, build_mlp_kernel

        super().__init__(w)
        self.kind = "per-row"
        self.k = build_mlp_kernel("down_rows", {"rows": rows, "cb": _CB})
        self.bias_p = torch.zeros(w.NP)
        self.bias_p[: w.N] = w.b_down
        self._bound = bound_args(w.wdt_p, self.bias_p)
        self.label = f"per-row-tir{{rows={rows}}}"
        self.cost = {"dense": 0.0, "one": 1.0, "all": 1.0}  # measured by `_calibrate_crossover`

    def crossover(self, n_chunks: int = 1) -> float:
        c = self.cost  # both paths scale with the rows, so the crossover does not depend on them
        dense = c["dense"] * CROSSOVER_MARGIN
        if c["all"] <= c["one"]:
            return 1.0 if dense >= c["all"] else 0.0
        return max(0.0, min(1.0, (dense - c["one"]) / (c["all"] - c["one"])))

    def down(self, h: torch.Tensor) -> torch.Tensor:
        if not h.is_contiguous():
            h = h.contiguous()
        m = h.shape[0]
        sidx = torch.empty(m, self.w.H, dtype=torch.int32)
        y = torch.empty(m, self.w.NP)
        self.k(h, sidx, *self._bound, y)
        return y[:, : self.w.N] if self.w.NP != self.w.N else y

    def __call__(self, x):
        h = self.w.hidden(x)
        if float(torch.count_nonzero(h)) / max(h.numel(), 1) > self.crossover():  # (not `(h != 0).float().mean()`: 3 ops)
            return self.w.dense_down(h)
        return self.down(h)


class SparseMLP(torch.nn.Module):
    """A lowered sparse_mlp: the M = 1 strategy for one row, the union strategy for more rows."""

    def __init__(self, layer: str, w: _Weights, mv: _Strategy | None, mm: _Strategy | None, kernel: str):
        super().__init__()
        self.layer, self.kernel = layer, kernel
        self._w, self._mv, self._mm = w, mv, mm
        self._fused_mv = mv if isinstance(mv, _FusedMV) else None

    def __call__(self, *args, **kwargs):
        # nn.Module's fast path without its two frames when nothing is hooked (~30 us a call after
        # a kernel has streamed the caches); hooks, tracing and compile still go through nn.Module
        if (self._forward_pre_hooks or self._forward_hooks or self._compiled_call_impl is not None
                or _global_module_hooks() or torch._C._get_tracing_state()):
            return super().__call__(*args, **kwargs)
        return self.forward(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (kept lean: at one row per call, each torch call here costs tens of us once a kernel
        # has streamed the caches, a visible share of the whole MLP)
        if self._fused_mv is not None:
            # one row: the kernel checks dtype, device and layout itself, and the checks below run
            # only where it refused the row
            sh = x.shape
            if len(sh) == 2 and sh[0] == 1:
                y = self._fused_mv.try_row(x)
                if y is not None:
                    return y
            elif len(sh) > 2 and all(d == 1 for d in sh[:-1]):  # [1, 1, K]: a decoder's one token
                y = self._fused_mv.try_row(x.reshape(1, sh[-1]))
                if y is not None:
                    return y.reshape(*sh[:-1], self._w.N)
        if x.dtype is not torch.float32 or not x.is_cpu:
            raise SparsecompError(
                f"MLP {self.layer} was compiled for float32 CPU inputs, got {str(x.dtype).replace('torch.', '')} on {x.device}",
                hint="cast the inputs to float32 on the CPU, or compile the model again for this dtype/device",
            )
        k = x.shape[-1]
        m = x.numel() // k if k else 0
        if m == 1 and self._mv is not None:
            if x.dim() == 2:
                return self._mv(x)  # [1, N]
            return self._mv(x.reshape(1, k)).reshape(*x.shape[:-1], self._w.N)
        lead = x.shape[:-1]
        if m == 0:
            return x.new_empty((*lead, self._w.N))
        if m > 1 and self._mm is not None:
            y = self._mm(x)
        else:
            y = self._w.dense_down(self._w.hidden(x))
        return y.reshape(*lead, self._w.N)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, kernel={self.kernel}"


# A pruned MLP (exact mode): below this weight density the projections are also given to the
# sparse-linear kernels (measured against dense like any sparse_linear; see `_Pruned`).
_DOWN_PARTS = 4  # column ranges of the sparse-row down kernel (tasks over TVM's pool)


def _pruned(w: _Weights) -> bool:
    ws = [w.w_up, w.wdt] + ([w.w_gate] if w.gated else [])
    return any(float((t != 0).float().mean()) <= PRUNED_DENSITY for t in ws)


class _Pruned:
    """The measured sparse-linear kernels of a pruned MLP's projections (`choose_kernel`, cached
    like any sparse_linear decision): up (and gate) on x, down on the hidden activation; and the
    down weight's rows packed sparse for `down_sparse_mv` when they are sparse enough."""

    def __init__(self, w: _Weights, x: torch.Tensor, h: torch.Tensor, layer: str, **choose):
        from .lowering import choose_kernel

        self.up = choose_kernel(w.w_up.detach(), w.b_up, x, layer=f"{layer} up", **choose)
        self.gate = choose_kernel(w.w_gate.detach(), w.b_gate, x, layer=f"{layer} gate", **choose) if w.gated else None
        self.down = choose_kernel(w.wdt.t().contiguous(), w.b_down, h, layer=f"{layer} down", **choose)
        self.down_density = float((w.wdt != 0).float().mean())
        self.rows = _pack_sparse_rows(w.wdt, _DOWN_PARTS) if self.down_density <= PRUNED_DENSITY else None

    def hidden(self, w: _Weights, x: torch.Tensor) -> torch.Tensor:
        up = self.up.runner(x)
        return (w.act(up) if not w.gated else w.act(self.gate.runner(x)) * up).reshape(-1, w.H)

    def labels(self) -> str:
        gate = f",gate={self.gate.candidate.label}" if self.gate is not None else ""
        return f"up={self.up.candidate.label}{gate}"

    def note(self, w: _Weights) -> str:
        dens = f"W_up {float((w.w_up != 0).float().mean()):.0%}" + (f", W_gate {float((w.w_gate != 0).float().mean()):.0%}" if w.gated else "")
        return (f"pruned weights ({dens}, W_down {self.down_density:.0%} nonzero): up {self.up.candidate.label} "
                f"({_speedup(self.up)}), down {self.down.candidate.label} ({_speedup(self.down)})")


def _speedup(c) -> str:
    return f"{c.dense_us / c.chosen_us:.2f}x vs dense" if c.chosen_us else "not timed"


def _pack_sparse_rows(wdt: torch.Tensor, parts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W_down^T [H, N] as `down_sparse_mv` reads it: the N columns cut into `parts` ranges; per
    range, a CSR over neurons (rowptr [parts, H + 1] into one col / val array, ranges one after
    the other; columns absolute)."""
    H, N = wdt.shape
    ptr = torch.zeros(parts, H + 1, dtype=torch.int32)
    cols, vals, off = [], [], 0
    for p in range(parts):
        lo, hi = p * N // parts, (p + 1) * N // parts
        nz = wdt[:, lo:hi].nonzero()  # row-major: grouped by neuron, columns ascending
        ptr[p, 0] = off
        ptr[p, 1:] = off + torch.cumsum(torch.bincount(nz[:, 0], minlength=H), 0)
        cols.append((nz[:, 1] + lo).to(torch.int32))
        vals.append(wdt[nz[:, 0], nz[:, 1] + lo])
        off += nz.shape[0]
    col, val = torch.cat(cols), torch.cat(vals).float()
    if col.numel() == 0:  # the kernel's buffers must not be empty
        col, val = torch.zeros(1, dtype=torch.int32), torch.zeros(1)
    return ptr, col.contiguous(), val.contiguous()


class _PrunedLinear(_Strategy):
    """Any M, pruned MLP: up (and gate) and down through their measured sparse-linear kernels,
    every neuron computed: what compiling without activation sparsity would run (so a pruned MLP
    never loses its weight sparsity to the fusion)."""

    def __init__(self, w, pruned: _Pruned):
        super().__init__(w)
        self.p = pruned
        self.label = f"pruned{{{pruned.labels()},down={pruned.down.candidate.label}}}"

    def __call__(self, x):
        return self.p.down.runner(self.p.hidden(self.w, x))


class _PrunedMV(_Strategy):
    """M = 1, pruned ReLU-family MLP (exact mode): up (and gate) through the measured sparse-linear
    kernel, the active neurons via nonzero, then only their down rows: sparse rows
    (`down_sparse_mv`, each active neuron's nonzeros only) when W_down is pruned, else the dense-row
    TIR down kernel. Both sparsities at once: a pruned weight's zeros and an inactive neuron's row
    are both skipped."""

    def __init__(self, w, pruned: _Pruned, serial: bool = False):
        from sparsecomp.backends.tir import bound_args, build_mlp_kernel

        super().__init__(w)
        self.p = pruned
        if pruned.rows is not None:
            self.k = build_mlp_kernel("down_sparse_mv", {"serial": serial})
            self.ptr, self.col, self.val = pruned.rows if not serial else _pack_sparse_rows(w.wdt, 1)
            self._bound = bound_args(self.ptr, self.col, self.val, w.b_down)
            tag = "sparse-down" if not serial else "serial-sparse-down"
            self.down = None
        else:
            self.down = _DownMV(w, 4, 4, serial)
            tag = self.down.tag
        self.label = f"pruned-mv{{{pruned.labels()},{tag}}}"

    def __call__(self, x):
        h = self.p.hidden(self.w, x)[0]
        idx = h.nonzero().reshape(-1).to(torch.int32)
        n = idx.numel()
        if self.down is not None:
            return self.down.flat(h[idx].contiguous(), idx).reshape(1, -1)
        if n == 0:
            return self.w.b_down.clone().reshape(1, -1)
        y = torch.empty(self.w.N)
        self.k(h[idx].reshape(1, n).contiguous(), idx.reshape(1, n), torch.tensor([n], dtype=torch.int32), *self._bound, y)
        return y.reshape(1, -1)


def _op_args(gm: fx.GraphModule, node: fx.Node) -> dict:
    vals = {}
    for name, a in zip(_ARGS, node.args):
        if isinstance(a, fx.Node):
            if a.op != "get_attr":
                if name == "x":
                    vals[name] = a
                    continue
                raise SparsecompError(f"sparse_mlp {node.name}: argument {name} is computed ({a.name}), expected a constant",
                                      hint="run sparse-mlp on a captured graph (its weights are attributes)")
            vals[name] = get_attr_value(gm, a.target).detach()
        else:
            vals[name] = a
    return vals


def _mv_candidates(w: _Weights, use_tir: bool, pruned: _Pruned | None = None, down_fraction: float = 1.0) -> list:
    """The M = 1 strategies; `down_fraction`: the share of down rows a call reads (active or
    selected neurons), which decides whether the serial down kernel is worth timing."""
    out = [lambda: _PrunedLinear(w, pruned)] if pruned is not None else []
    if not use_tir:
        return out
    # each with the down kernel on the thread pool and, for few rows, on the calling thread (see `_down_mv`)
    row_bytes = w.NP * 4 * (float((w.wdt != 0).float().mean()) if pruned is not None else 1.0)  # pruned: nonzeros only
    serial_ok = down_fraction * w.H * row_bytes <= SERIAL_DOWN_MAX_BYTES and _pool_tag() != "openmp"
    for serial in (False, True) if serial_ok else (False,):
        if w.mode == "exact" and w.act_name in EXACT_ACTIVATIONS:
            variants = [(4, 1), (2, 2)] if not w.gated else [(1, 4), (1, 2)]
            # the down phase 4 or 8 rows at a time (8 streams in flight): opt-125m-like's MLP shape
            # (768 -> 3072, 10% active), cold, back to back, Intel Xeon VM: 385-436 us with 8
            # against 401-477 us with 4 (the up phase alone took 367-427)
            out += [lambda r=r, u=u, se=serial, dr=dr: _TirUpMV(w, rows=r, unroll=u, serial=se, down_rows=dr)
                    for r, u in variants for dr in (4, 8)]
            # the float16 and int8 screens (lossless: see `_screened_up_parts`): opt-125m-like's MLP
            # shape, 10.8% of neurons active, cold, 2 threads: 237-241 us with float16 (11.0% of
            # the neurons past the screen), 185-193 us with int8 (15.0% past it, a quarter of the
            # bytes), against 333 us for tir-up (rows=4, down_rows=8) and 671 us dense. The
            # measurement picks: a wide band of pre-activations near 0 favours float16.
            out += [lambda se=serial, dr=dr, sc=sc: _TirUpMV(w, rows=4, unroll=2, serial=se, down_rows=dr, screen=sc, crows=4)
                    for sc in ("f16", "i8") for dr in (4, 8)]
        if w.mode == "predictor":  # the gather one selected row at a time, or 4 (more streams in flight)
            out += [lambda se=serial, g=g: _PredictorMV(w, serial=se, gather_rows=g) for g in (1, 4)]
            if not w.gated and w.act_name in EXACT_ACTIVATIONS:  # the selection itself in TIR
                # blocks of 64-256 neurons: on the bench_mlp FFN, cold, 256 measured 0.82-0.88 ms against
                # 0.88-0.98 for 128 and 0.91-1.07 for 64 (interleaved; equal when hot)
                out += [lambda se=serial, bs=bs: _TirPredictorMV(w, bs=bs, serial=se) for bs in (64, 128, 256)]
        out.append(lambda se=serial: _TorchUpMV(w, serial=se))
        if pruned is not None:
            out.append(lambda se=serial: _PrunedMV(w, pruned, serial=se))
    return out


def _mm_candidates(w: _Weights, use_tir: bool, pruned: _Pruned | None = None, m: int = 2) -> list:
    out = [lambda: _Union(w, "torch")] + ([lambda: _PrunedLinear(w, pruned)] if pruned is not None else [])
    if use_tir:
        out += [lambda r=r: _Union(w, "tir", rows=r) for r in (2, 1)]
        out += [lambda: _PerRow(w, rows=2)]
        if m <= _Union.CHUNK and w.mode == "exact" and w.act_name in EXACT_ACTIVATIONS:
            out += [lambda: _Union(w, "tir", rows=2, screen="i8")]  # (more rows never take the screen)
    return out


def _calibrate_crossover(strategy, x2: torch.Tensor, max_seconds: float, flush=None) -> None:
    """Measure, on one chunk of rows of x2 (all of them for `union-torch` and `per-row`, up to 8 for
    `union-tir`), the dense down-projection against the strategy's down with a single neuron and
    with every neuron active: its cost is linear in the active neurons between the two. A
    screened union also gets its screen's break-even (`_Union.screen_cost`: torch's GEMM against
    the screen letting no neuron and every neuron through), timed with `flush` before each call
    (the model's weights are cold)."""
    w = strategy.w
    if isinstance(strategy, _PerRow):
        with torch.no_grad():
            h = w.hidden(x2)
        full, single = torch.ones_like(h), torch.zeros_like(h)
        single[:, 0] = 1.0
        t = compare({"dense": lambda: w.dense_down(h), "all": lambda: strategy.down(full), "one": lambda: strategy.down(single)},
                    min_runs=10, max_seconds=max_seconds)
        strategy.cost = {k: t[k].median * 1e6 for k in ("dense", "all", "one")}
        return
    rows = x2 if strategy.kind == "torch" else x2[: _Union.CHUNK]
    if getattr(strategy, "screen_k", None) is not None and rows.shape[0] > 1:
        # the screen's break-even: torch's GEMM against the screen letting no neuron and every
        # neuron through (margins of -1e30 / +1e30), cold where the model's weights are (`flush`)
        from sparsecomp.backends.tir import bound_args

        *narrow, sb, sm = strategy.terms
        ends = {k: bound_args(*strategy.consts, *narrow, sb, torch.full_like(sm, v))
                for k, v in (("none", -1e30), ("all", 1e30))}
        with torch.no_grad():
            t = compare({"gemm": lambda: w.hidden(rows), "none": lambda: strategy.screened(rows, ends["none"]),
                         "all": lambda: strategy.screened(rows, ends["all"])}, min_runs=10, max_seconds=max_seconds, between=flush)
        strategy.screen_cost = {k: t[k].median * 1e6 for k in ("gemm", "none", "all")}
    with torch.no_grad():
        h = w.hidden(rows)
    full = [(h, torch.arange(w.H))]
    single = [(h, torch.zeros(1, dtype=torch.long))]
    t = compare({"dense": lambda: w.dense_down(h), "all": lambda: strategy.down(h, full),
                 "one": lambda: strategy.down(h, single)}, min_runs=10, max_seconds=max_seconds)
    strategy.cost = {k: t[k].median * 1e6 for k in ("dense", "all", "one")}


def _time_strategies(strategies: dict, x: torch.Tensor, min_runs: int, max_seconds: float, flush) -> dict[str, float]:
    """Median microseconds per call of each strategy on x (interleaved; `flush` before each call)."""
    with torch.no_grad():
        times = compare({k: (lambda s=s: s(x)) for k, s in strategies.items()}, min_runs=min_runs, max_seconds=max_seconds,
                        between=flush)
    return {k: v.median * 1e6 for k, v in times.items()}


def _rows_like(x2: torch.Tensor, m: int) -> torch.Tensor:
    """m rows of inputs like x2's (its rows repeated, slightly perturbed), to measure another M."""
    reps = x2[torch.arange(m) % x2.shape[0]]
    return reps + 0.01 * reps.std() * torch.randn(reps.shape, generator=torch.Generator().manual_seed(0))


def lower_sparse_mlp(gm: fx.GraphModule, example: tuple[tuple, dict], *, cache: DecisionCache | None,
                     max_seconds: float = 0.5, min_runs: int = 20, use_tir: bool = True, rtol: float = 1e-4,
                     only: set[str] | None = None, progress=None) -> list[MLPDecision]:
    """Replace every sparse_mlp node of `gm` by its measured strategy; returns the decisions."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and str(n.target) == SPARSE_MLP]
    if not nodes:
        return []
    use_tir = use_tir and tir_available()
    inputs = record_inputs(gm, nodes, example)
    decisions = []
    family_choice: dict[tuple, list[str]] = {}  # family -> the previous layer's two fastest candidates
    linear_shortlists: dict[tuple, list[str]] = {}  # pruned MLPs' projections, as in lower_sparse_linear
    cold = ColdTiming(gm, pause_s=flush_pause_s())
    for i, node in enumerate(nodes):
        info = node.meta.get("sparsecomp.sparse_mlp", {})
        layer = info.get("layer", node.name)
        args = _op_args(gm, node)
        w = _Weights(args, _CB)
        x = inputs[node].float()
        x2 = x.reshape(-1, x.shape[-1])
        m = x2.shape[0]
        with torch.no_grad():
            h = w.hidden(x)
            reference = w.dense_down(h)
        density = float((h != 0).any(0).float().mean())
        notes: list[str] = []
        pruned = None
        # One row per call in a model whose weights exceed the cache: inside it the MLP reads its
        # weights from memory, but timed alone, call after call, an MLP smaller than the cache keeps
        # them there, which favours the strategies with the least fixed cost (the single-threaded
        # down kernel, for opt-125m-like's 19 MB MLPs). Each timed call then starts after a flush.
        flush = cold.flush(m, sum(t.numel() * t.element_size() for t in (w.w_up, w.w_gate, w.wdt_p) if t is not None))
        if w.mode == "exact" and _pruned(w):  # both sparsities: the weights' zeros and the inactive neurons
            pruned = _Pruned(w, x, h, layer, cache=cache, max_seconds=max_seconds / 2, min_runs=min_runs, use_tir=use_tir,
                             rtol=rtol, shortlists=linear_shortlists, flush=flush)
            notes.append(pruned.note(w))
        if m == 1:
            with torch.no_grad():  # predictor mode reads every selected neuron's row, active or not
                read = density if w.mode != "predictor" else float(w.keep(x).any(0).float().mean())
            makers = _mv_candidates(w, use_tir, pruned, read)
        else:
            makers = _mm_candidates(w, use_tir, pruned, m)
        strategies = {"dense": _Strategy(w)}
        for make in makers:
            try:
                s = make()
            except Exception as err:  # noqa: BLE001 - a kernel that cannot build is dropped, with the reason
                notes.append(f"candidate dropped: {type(err).__name__}: {str(err).splitlines()[0][:100] if str(err) else ''}")
                continue
            strategies[s.label] = s
        eligible = set(strategies)
        if only is not None:  # forced candidates (debugging, tests): dense is still timed, chosen only when named
            eligible = {k for k in strategies if k.split("{")[0] in only or k in only} or {"dense"}
            strategies = {k: v for k, v in strategies.items() if k in eligible or k == "dense"}
        if m > 1:  # each union candidate gets its crossover before it is timed (so it is timed as it will run)
            for s in strategies.values():
                if isinstance(s, (_Union, _PerRow)):
                    _calibrate_crossover(s, x2 if m >= _Union.CHUNK or s.kind != "tir" else _rows_like(x2, _Union.CHUNK),
                                         max_seconds / 4, flush)
        key, cached, entry = None, False, None
        if cache is not None:
            key = cache.key(op="sparse_mlp", shape=[w.K, w.H, w.N], m=m, mode=w.mode, activation=w.act_name, gated=w.gated,
                            density=round(density, 2), version=CANDIDATE_SET_VERSION, candidates=sorted(strategies), cold=flush is not None, pool=_pool_tag(),
                            weights=[round(float((t != 0).float().mean()), 2) for t in (w.w_up, w.wdt)] if pruned else None)
            labels = set(strategies)
            entry, _ = cache.decision([(key, labels)])
        checked = {}
        for label, s in strategies.items():
            if entry is not None and label not in (entry["kernel"], "dense"):
                continue
            try:
                with torch.no_grad():
                    out = s(x)
                ok, err, allowed = compare_outputs(out, reference, rtol=rtol)
                why = "" if ok else f"max abs error {err:.3g} > {allowed:.3g}"
            except Exception as exc:  # noqa: BLE001
                ok, why = False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"
            if ok:
                checked[label] = s
            else:
                notes.append(f"{label} dropped: {why}")
        if entry is not None and entry["kernel"] in checked:
            best, cached = entry["kernel"], True
            measured = dict(entry.get("measured", {}))
            dense_us, chosen_us = entry["dense_us"], entry["chosen_us"]
            for s in checked.values():
                if isinstance(s, (_Union, _PerRow)) and isinstance(entry.get("cost"), dict):
                    s.cost = dict(entry["cost"])
        else:
            family = (w.K, w.H, w.N, m, w.mode, w.gated, round(density, 1), pruned is not None)
            trial, family_note = checked, None
            # A later MLP of a family times only the two fastest of the previous one against dense:
            # with the earlier choice alone, one noisy first timing (torch-up+tir-down at 1.07x,
            # where tir-up+tir-down measured 1.42x in other compiles) held all 12 MLPs of
            # opt-125m-like; with its runner-up in every later timing, the next layer corrects it.
            fam = [k for k in family_choice.get(family, ()) if k in checked]
            if fam:
                trial = {k: v for k, v in checked.items() if k in fam or k == "dense"}
                family_note = (f"timed only the {'two fastest candidates' if len(fam) > 1 else 'choice'} of the previous "
                               f"layer of this shape and density ({', '.join(fam)}) against dense")
            def fastest(measured: dict) -> str:
                return min((k for k in measured if k in eligible), key=measured.get, default="dense")

            measured = _time_strategies(trial, x, min_runs, max_seconds, flush)
            best = fastest(measured)
            if trial is not checked and best == "dense":
                # The earlier layers of this family measured the opposite. One noisy timing (a slow
                # phase of the VM) once sent 4 of opt-125m-like's 12 MLPs, 10-11% active, to dense at
                # a cached 1.0x where the other 8 measured 1.55x; a second, full timing decides.
                measured = _time_strategies(checked, x, 2 * min_runs, 2 * max_seconds, flush)
                best = fastest(measured)
                family_note = (f"the choice of the previous layer of this shape and density ({', '.join(fam)}) lost to dense "
                               f"in a first timing; every candidate was timed again")
            if family_note:
                notes.append(family_note)
            ranked = sorted((k for k in measured if k in eligible and k != "dense"), key=measured.get)[:2]
            if ranked:
                family_choice[family] = ranked
            dense_us, chosen_us = measured["dense"], measured[best]
            if cache is not None:
                cs = checked[best]
                cache.put(key, {"kernel": best, "dense_us": dense_us, "chosen_us": chosen_us, "measured": measured,
                                **({"cost": cs.cost} if isinstance(cs, (_Union, _PerRow)) else {})})
        chosen = checked[best]
        mv, mm = (chosen, None) if m == 1 else (None, chosen)
        if best == "dense":
            mv = mm = None
        elif m == 1 and pruned is not None:  # another M at run time: every projection on its sparse kernel
            mm = _PrunedLinear(w, pruned)
        elif m == 1 and use_tir:
            # another M at run time: the TIR union path, its crossover measured on 8 rows
            try:
                # (with the M = 1 choice's screen, if it has one)
                mm = _Union(w, "tir", screen=getattr(chosen, "screen", None))
                _calibrate_crossover(mm, _rows_like(x2, _Union.CHUNK), max_seconds / 4, flush)
            except Exception as exc:  # noqa: BLE001
                mm = None
                notes.append(f"no M > 1 kernel ({type(exc).__name__}); more rows run dense")
        crossover = {}
        if mm is not None and not isinstance(mm, _PrunedLinear):
            crossover = {"path": mm.label, "rows<=8": round(mm.crossover(1), 3), "rows=64": round(mm.crossover(8), 3),
                         "cost_us": mm.cost}
            if getattr(mm, "screen_k", None) is not None:  # the M <= 8 screen's break-even (share of neurons let through)
                crossover.update(screen_max=round(mm.screen_max(), 3), screen_cost_us=mm.screen_cost)
        pattern = f"mlp {info.get('pattern', '')} {w.act_name} {w.mode}".replace("  ", " ")
        calib = {k: info[k] for k in ("target_sparsity", "calibrated_sparsity", "recall", "cosine", "score") if info.get(k) is not None}
        if best == "dense":
            reason = "; ".join(["dense is fastest (measured)", *notes])
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(node.target, tuple(node.args))  # the op's reference: plain aten ops
        else:
            if getattr(chosen, "screen_note", ""):
                notes.append(chosen.screen_note)
            if isinstance(chosen, _TirPredictorMV):
                notes.append("the predictor's scores are computed in TIR: a neuron scored within float rounding of its "
                             "threshold may be kept or dropped unlike the reference op")
            reason = "; ".join([f"{speedup_text(dense_us, chosen_us)}, {density:.1%} of neurons active",
                                *([(f"M > 1 ({crossover['path']}): dense down above {crossover['rows<=8']:.0%} active neurons "
                                     f"(up to 8 rows), {crossover['rows=64']:.0%} at 64 rows (measured)")] if crossover else []), *notes])
            name = f"sparse_mlp_{i}_{layer.replace('.', '_').replace('->', '__')}"
            gm.add_submodule(name, SparseMLP(layer, w, mv, mm, best))
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(name, (node.args[0],))
        new.meta.update(node.meta)
        new.meta["sparsecomp.rule"] = f"sparse_mlp->{best}"
        new.meta["sparsecomp.decision"] = {"kernel": best, "speedup": round(dense_us / chosen_us, 2) if chosen_us else None}
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        for a in node.args:  # constants the module now holds (packed) and the graph no longer reads
            if isinstance(a, fx.Node) and a.op == "get_attr" and not a.users:
                gm.graph.erase_node(a)
        decisions.append(MLPDecision(layer, [w.K, w.H, w.N], m, density, "dense" if best == "dense" else "sparse", best,
                                     dense_us, chosen_us, reason, cached=cached, measured=measured, pattern=pattern,
                                     crossover=crossover, calibration=calib))
        if progress is not None:
            progress(i + 1, len(nodes), layer)
    gm.graph.lint()
    gm.recompile()
    return decisions

