"""Packing weights for the kernels, calling them from torch, and the candidate variants.

`prepare` builds the storage a kernel variant reads (from `sparsecomp.formats`, with index
dtypes narrowed and pointers int32); `SparseLinearKernel(prepared, kernel)` is the callable
`y = x @ W^T + b` for any leading dims and any M; `candidates(fmt, N, K, M)` lists a few
variants worth timing on this machine, ranked by a rough cost model.
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass, field

import torch

from sparsecomp import formats as F
from sparsecomp.errors import SparsecompError
from sparsecomp.memory import prefer_huge_pages

from . import _target
from ._build import Kernel, OutputStock, _normalise, bound_args, build_source
from ._codegen import transpose_source

__all__ = ["PreparedWeight", "prepare", "SparseLinearKernel", "candidates", "FORMATS", "begin_transpose_reuse",
           "end_transpose_reuse"]

FORMATS = ("csr", "sell", "bsr", "nm")

# params that change how weights are stored (a kernel and a prepared weight must agree on them)
_STORAGE_KEYS = {
    "csr": ("index_dtype", "kb", "rb"),  # rb only with kb (see `storage_key`)
    "sell": ("index_dtype", "slice_height", "sigma", "perm", "scheme"),
    "bsr": ("index_dtype", "block", "layout"),
    "nm": ("n", "m", "scheme"),
}


@dataclass(eq=False)
class PreparedWeight:
    """A weight packed for one kernel variant: the arrays in kernel argument order."""

    fmt: str
    params: dict
    shape: tuple[int, int]  # (N, K), the true sizes
    kp: int  # K padded to the format's column granularity (x is zero-padded to it)
    arrays: list[torch.Tensor] = field(repr=False)
    zero_bias: torch.Tensor = field(repr=False)
    nbytes: int = 0  # bytes the kernel must read for the weight (values + indices + pointers)

    def storage_key(self) -> tuple:
        return _storage_key(self.fmt, self.params)


def _storage_key(fmt: str, params: dict) -> tuple:
    key = tuple(params.get(k) for k in _STORAGE_KEYS[fmt])
    if fmt == "csr" and not params.get("kb"):  # row blocks change the storage of panelled CSR only
        key = key[:1] + (None, None)
    return key


def _idx(t: torch.Tensor, what: str) -> tuple[torch.Tensor, str]:
    if t.dtype == torch.uint16:
        return t.contiguous(), "uint16"
    if t.dtype == torch.int32:
        return t.contiguous(), "int32"
    if t.dtype == torch.int64 and (t.numel() == 0 or int(t.max()) <= 2**31 - 1):
        return t.to(torch.int32).contiguous(), "int32"
    raise SparsecompError(f"{what} indices of dtype {t.dtype} do not fit int32")


def _ptr(t: torch.Tensor) -> torch.Tensor:
    if t.dtype != torch.int32:
        if int(t[-1]) > 2**31 - 1:
            raise SparsecompError("weight too large for int32 pointers")
        t = t.to(torch.int32)
    return t.contiguous()


def _nonempty(t: torch.Tensor) -> torch.Tensor:
    # a zero-size tensor may come with a null data pointer, which TVM's argument checks reject;
    # one unread element keeps every buffer valid (pointers say there is nothing to read)
    return t if t.numel() else torch.zeros(1, dtype=t.dtype)


def prepare(fmt: str, dense_weight: torch.Tensor, params: dict | None = None) -> PreparedWeight:
    """Pack `dense_weight [N, K]` into the storage of the kernel variant `params` of `fmt`.

    The returned `.params` are complete (index dtype, SELL row permutation, BSR layout added);
    pass them to `build`.
    """
    if fmt not in FORMATS:
        raise SparsecompError(f"no TIR kernel for format {fmt!r}", hint=f"formats: {', '.join(FORMATS)}")
    if not isinstance(dense_weight, torch.Tensor) or dense_weight.dim() != 2:
        raise SparsecompError("prepare needs a 2-D [out_features, in_features] weight tensor")
    w = dense_weight.detach().to("cpu", torch.float32).contiguous()
    N, K = w.shape
    p = _normalise(fmt, params or {})
    kp = K
    if fmt == "csr" and p.get("kb"):
        if not p["mt"] or not p.get("rb"):
            raise SparsecompError(f"column-panel CSR (kb) is an M > 1 kernel and needs mt and rb, got {params}")
        arrays = _pack_csr_panel(w, p["kb"], p["rb"])
        p["index_dtype"] = str(arrays[1].dtype).removeprefix("torch.")  # (uint8 / uint16, as packed)
    elif fmt == "csr":
        f = F.CSR.pack(w)
        col, p["index_dtype"] = _idx(f.col_idx, "column")
        arrays = [f.values, col, _ptr(f.row_ptr)]
    elif fmt == "sell" and p["scheme"] == "delta":
        arrays = _pack_sell_delta(w, p.setdefault("sigma", 1), p["slice_height"])
        p["perm"] = len(arrays) == 4
    elif fmt == "sell":
        f = F.SELL.pack(w, slice_height=p["slice_height"], sigma=p.setdefault("sigma", 1))
        col, p["index_dtype"] = _idx(f.col_idx, "column")
        arrays = [f.values, col, _ptr(f.slice_ptr)]
        p["perm"] = f.row_perm is not None
        if p["perm"]:
            arrays.append(f.row_perm.to(torch.int32))
    elif fmt == "bsr":
        r, c = p["block"]
        p["layout"] = "rc" if (p["scheme"] == "flat" and not p["mt"]) else "cr"
        f = F.BSR.pack(w, (r, c), layout=p["layout"])
        col, p["index_dtype"] = _idx(f.col_idx, "block column")
        arrays = [f.values.reshape(-1), col, _ptr(f.row_ptr)]
        kp = -(-K // c) * c
    elif p["scheme"] in ("perm", "perm4"):  # nm, rows interleaved 8 at a time (see _codegen._nm_perm_mv)
        arrays, kp = _pack_nm_perm(w, p["n"], p["m"], p["scheme"] == "perm4")
        p["index_dtype"] = "uint8"
    else:  # nm
        f = F.NM.pack(w, n=p["n"], m=p["m"])
        arrays = [f.values.reshape(-1), f.idx.reshape(-1).contiguous()]
        kp = (f.values.shape[1] // p["n"]) * p["m"]
        p["index_dtype"] = "uint8"
    nbytes = sum(a.numel() * a.element_size() for a in arrays)
    arrays = [prefer_huge_pages(_nonempty(a.contiguous())) for a in arrays]  # see sparsecomp.memory
    return PreparedWeight(fmt=fmt, params=p, shape=(N, K), kp=kp, arrays=arrays,
                          zero_bias=torch.zeros(N, dtype=torch.float32), nbytes=nbytes)


def _pack_csr_panel(w: torch.Tensor, kb: int, rb: int) -> list[torch.Tensor]:
    """[vals, local columns, ptr] for the column-panel CSR kernel (`_codegen._csr_panel_mm`).

    Entries are ordered by (block of `rb` rows, panel of `kb` columns, row, column), so the kernel
    reads them in one sequential pass; ptr[(block * P + panel) * rb + row_in_block] is the start of
    a row's entries in a panel (P = ceil(K / kb); the last block's missing rows have none), and a
    column is stored as its offset inside its panel (uint8 up to kb = 256, else uint16).
    """
    if not 0 < kb <= 65536 or rb <= 0:
        raise SparsecompError(f"column-panel CSR needs 0 < kb <= 65536 and rb > 0, got kb={kb}, rb={rb}")
    N, K = w.shape
    P, NB = max(-(-K // kb), 1), -(-N // rb)
    r, c = (w != 0).nonzero(as_tuple=True)  # row-major: columns ascending within a row
    key = ((r // rb) * P + c // kb) * rb + r % rb
    order = torch.argsort(key, stable=True)
    ptr = torch.zeros(NB * P * rb + 1, dtype=torch.int64)
    torch.cumsum(torch.bincount(key, minlength=NB * P * rb), 0, out=ptr[1:])
    vals = w[r, c][order]
    col = (c % kb)[order].to(torch.uint8 if kb <= 256 else torch.uint16)
    return [vals, col, _ptr(ptr)]


def _pack_sell_delta(w: torch.Tensor, sigma: int, C: int) -> list[torch.Tensor]:
    """[vals, uint8 column deltas, slice_ptr, (row_perm)] for the SELL-C delta kernel.

    Entry j of a row stores col[j] - col[j-1] (col[-1] = 0). A gap over 255 gets zero-valued
    filler entries every 255 columns after the previous entry (added to the nonzero mask before
    the SELL layout, so slice widths count them); padding entries have delta 0 and value 0.
    """
    N, K = w.shape
    mask = w != 0
    if K > 256 and N:
        j = torch.arange(K)
        last = torch.cummax(torch.where(mask, j, 0), dim=1).values  # last entry at or before j (or col 0)
        later = torch.flip(torch.cumsum(torch.flip(mask, [1]).to(torch.int32), 1), [1]) > mask.to(torch.int32)
        dist = j - last
        mask = mask | ((dist > 0) & (dist % 255 == 0) & later)
    perm, pcounts, widths = F.SELL._layout(mask, C, sigma)
    pw = w if perm is None else w[perm]
    pmask = mask if perm is None else mask[perm]
    sptr = torch.zeros(widths.numel() + 1, dtype=torch.int64)
    torch.cumsum(widths * C, 0, out=sptr[1:])
    total = int(sptr[-1])
    idx = pmask.nonzero()
    prow, col = idx[:, 0], idx[:, 1]
    row_start = torch.cumsum(pcounts, 0) - pcounts
    rank = torch.arange(idx.shape[0]) - row_start[prow]
    prev = torch.where(rank > 0, torch.cat([col.new_zeros(1), col[:-1]]), 0)
    delta = col - prev
    if delta.numel() and int(delta.max()) > 255:
        raise SparsecompError("SELL delta packing left a gap over 255 columns (sparsecomp bug)")
    offset = sptr[prow // C] + rank * C + prow % C
    vals = torch.zeros(total, dtype=torch.float32)
    vals[offset] = pw[pmask]
    deltas = torch.zeros(total, dtype=torch.uint8)
    deltas[offset] = delta.to(torch.uint8)
    arrays = [vals, deltas, _ptr(sptr)]
    if perm is not None:
        arrays.append(perm.to(torch.int32))
    return arrays


def _pack_nm_perm(w: torch.Tensor, n: int, m: int, two_bit: bool = False) -> tuple[list[torch.Tensor], int]:
    """vals [NS, G2, n, 8] and uint8 metadata for the perm / perm4 kernels; returns (arrays, kp).

    Rows are padded to slices of 8 and groups to whole metadata windows (zeros, position 0).
    perm: [NS, G2, n // 2 or n, 8], each value's position inside its 8-column window, two 3-bit
    fields per byte when n is even. perm4 (two_bit): [NS, G2 // (4 // n), 8], one byte per row
    per 4 // n groups, slot k of the window in bits 2k..2k+1 (its position inside its group).
    """
    if two_bit and (m != 4 or n > 2):
        raise SparsecompError(f"the N:M perm4 kernel needs n:4 with n <= 2, got {n}:{m}", hint="use scheme='perm'")
    if 8 % m:
        raise SparsecompError(f"the N:M perm kernel needs m dividing 8, got m={m}", hint="use scheme='row'")
    f = F.NM.pack(w, n=n, m=m)
    N = w.shape[0]
    G = f.values.shape[1] // n
    P = 4 // n if two_bit else 8 // m  # groups per metadata window
    ns, g2 = -(-N // 8), -(-G // P) * P
    vals = torch.zeros(ns * 8, g2, n, dtype=torch.float32)
    pos = torch.zeros(ns * 8, g2, n, dtype=torch.int32)
    vals[:N, :G] = f.values.view(N, G, n)
    pos[:N, :G] = f.idx.view(N, G, n).to(torch.int32)
    vals = vals.view(ns, 8, g2, n).permute(0, 2, 3, 1).contiguous()
    if two_bit:  # [NS, windows, 8]: 2 bits per slot, slot k of the window at bits 2k..2k+1
        pos = pos.view(ns, 8, g2 // P, P * n).permute(0, 2, 1, 3)
        pos = (pos << (2 * torch.arange(P * n, dtype=torch.int32))).sum(-1)
        return [vals.reshape(-1), pos.to(torch.uint8).contiguous().reshape(-1)], g2 * m
    pos += (torch.arange(g2, dtype=torch.int32) % P * m).view(1, g2, 1)
    pos = pos.view(ns, 8, g2, n).permute(0, 2, 3, 1)
    if n % 2 == 0:
        pos = pos[:, :, 0::2] | (pos[:, :, 1::2] << 3)
    meta = pos.to(torch.uint8).contiguous()
    return [vals.reshape(-1), meta.reshape(-1)], g2 * m


def _aligned(t: torch.Tensor) -> torch.Tensor:
    # TVM's buffer arguments assume a contiguous, suitably aligned data pointer
    if not t.is_contiguous() or t.data_ptr() % 64:
        t = t.clone(memory_format=torch.contiguous_format)  # fresh allocations are 64-byte aligned
    return t


class SparseLinearKernel:
    """`y = x @ W^T + b` with a prepared sparse weight and a compiled kernel.

    Any leading dims and any M work with either kind of kernel: an "mv" (M = 1) kernel is
    applied row by row when M > 1, an "mm" kernel pads M to its tile. The output is a new
    float32 tensor `[..., N]`.
    """

    def __init__(self, prepared: PreparedWeight, kernel: Kernel):
        if prepared.fmt != kernel.fmt:
            raise SparsecompError(f"kernel is for {kernel.fmt!r} but the weight is packed as {prepared.fmt!r}")
        want = _storage_key(prepared.fmt, kernel.params)
        if kernel.fmt == "bsr":
            kl = "rc" if (kernel.params["scheme"] == "flat" and not kernel.params["mt"]) else "cr"
            want = want[:2] + (kl,)
        if prepared.storage_key() != want:
            raise SparsecompError(
                f"kernel variant {kernel.params} does not match the weight's storage {prepared.params}",
                hint="build the kernel from prepared.params (build(fmt, prepared.params))",
            )
        self.prepared = prepared
        self.kernel = kernel
        self.mt = int(kernel.params.get("mt", 0))
        self._func = kernel.func
        # the weight's arrays and the zero bias converted once (see `bound_args`); a bias given to
        # calls is converted at its first call and reused while the same tensor comes again
        self._arrays = bound_args(*prepared.arrays)
        self._zero_bias = bound_args(prepared.zero_bias)[0]
        self._bias_pair: tuple = (None, None)  # (bias given, its bound form): one attribute, swapped whole
        n = prepared.shape[0]
        self._out = OutputStock((1, n), view=(n,)) if self.mt == 0 else None  # one-row outputs

    @property
    def out_features(self) -> int:
        return self.prepared.shape[0]

    @property
    def in_features(self) -> int:
        return self.prepared.shape[1]

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        N, K = self.prepared.shape
        if x.shape[-1] != K:
            raise SparsecompError(f"input has {x.shape[-1]} features, the weight expects {K}")
        if x.device.type != "cpu":
            raise SparsecompError("TIR kernels run on CPU tensors", hint="move the input to the CPU")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, K)
        if x2.dtype != torch.float32:
            x2 = x2.float()
        M = x2.shape[0]
        if bias is None:
            b = self._zero_bias
        elif bias is (pair := self._bias_pair)[0]:
            b = pair[1]
        else:
            b = _aligned(bias.detach().to(torch.float32).reshape(N))
            if b.data_ptr() == bias.data_ptr():  # a view of the caller's bias: in-place changes stay visible
                self._bias_pair = (bias, bound_args(b)[0])
        if M == 0:
            return x2.new_empty((*lead, N))
        kp = self.prepared.kp
        arrays = self._arrays
        if self.mt == 0:
            if kp != K:
                x2 = torch.nn.functional.pad(x2, (0, kp - K))
            if M == 1:  # one row: a stocked output and no per-row views (see `OutputStock`)
                y, yt = self._out.take()
                self._func(_aligned(x2.reshape(kp)), *arrays, b, yt)
                return y if len(lead) == 1 else y.reshape(*lead, N)
            y = torch.empty((M, N), dtype=torch.float32)
            for i in range(M):
                self._func(_aligned(x2[i]), *arrays, b, y[i])
            return y.reshape(*lead, N)
        mt = self.mt
        mp = -(-M // mt) * mt
        xt = _transposed(x, x2, kp, mp, mt)
        y = torch.empty((mp, N), dtype=torch.float32)
        self._func(xt, *arrays, b, y)
        return y[:M].reshape(*lead, N)


# The last input transposed for the "mm" kernels, per thread, reused only inside one forward of
# a lowered model (between `begin_transpose_reuse` and `end_transpose_reuse`, which the torch
# backend hooks around it): there, layers that read one tensor in a row (a transformer's query,
# key and value) transpose it once. Never across calls: a caller may refill the same input
# buffer through numpy, which the version counter does not see.
_last_xt = threading.local()


def begin_transpose_reuse(*_hook_args) -> None:
    """Start of a forward: transposes may be reused until `end_transpose_reuse` (forward hooks)."""
    _last_xt.entry, _last_xt.on = None, True


def end_transpose_reuse(*_hook_args) -> None:
    _last_xt.entry, _last_xt.on = None, False


def _transposed(x: torch.Tensor, x2: torch.Tensor, kp: int, mp: int, mt: int) -> torch.Tensor:
    """x2 [M, K] (a view of the caller's input `x`) transposed into a new xt [mp / mt, kp, mt],
    zero padded: xt[m // mt, k, m % mt] = x2[m, k] (the "mm" kernels' layout, `_codegen`).

    Inside a forward (see `begin_transpose_reuse`), reused while the same tensor `x` comes again
    unmodified (same object, same version counter: an in-place change transposes again) with the
    same padding and tile height. Whole 8x8 tiles go through the TIR transpose
    (`_codegen.transpose_source`), the ragged edges through torch.
    """
    reuse = getattr(_last_xt, "on", False)
    last = _last_xt.entry if reuse else None
    if last is not None:
        ref, version, shape, xt = last
        if ref() is x and x._version == version and shape == tuple(x.shape) and tuple(xt.shape) == (mp // mt, kp, mt):
            return xt
    M, K = x2.shape
    m8, k8 = M // 8 * 8, K // 8 * 8
    if not (m8 and k8):  # no whole 8x8 tile: all in torch
        xp = torch.zeros((mp, kp), dtype=torch.float32)
        xp[:M, :K] = x2
        xt = xp.view(mp // mt, mt, kp).transpose(1, 2).contiguous()
    else:
        xt = torch.empty((mp // mt, kp, mt), dtype=torch.float32)
        if mp > M:  # padding rows of x: their outputs are dropped, but keep them finite
            xt[-(-M // mt):].zero_()
            if M % mt:
                xt[M // mt, :, M % mt:].zero_()
        if kp > K:
            xt[:, K:, :].zero_()
        build_source("transpose", {"mt": mt}, transpose_source(mt))(_aligned(x2), xt)
        if m8 < M:  # the last < 8 rows of x lie in one tile (m8 and mt are multiples of 8)
            xt[m8 // mt, :K, m8 % mt:m8 % mt + M - m8].copy_(x2[m8:].t())
        if k8 < K:  # the last < 8 columns of the rows above, tile by tile
            for t in range(0, m8, mt):
                xt[t // mt, k8:K, :min(mt, m8 - t)].copy_(x2[t:min(t + mt, m8), k8:].t())
    if reuse:
        _last_xt.entry = (weakref.ref(x), x._version, tuple(x.shape), xt)
    return xt


def candidates(fmt: str, N: int, K: int, M: int = 1, *, block: tuple[int, int] | None = None,
               n: int = 2, m: int = 4, limit: int = 8, exhaustive: bool = False) -> list[dict]:
    """Kernel variants worth timing for `fmt` on a layer `[N, K]` at batch `M`.

    The list is small and pruned by a rough cost model (more independent FMA chains is better
    up to the register file; less M padding is better); the caller times them on the real
    weight and keeps the fastest. `block` (BSR) and `n`, `m` (N:M) describe the weight.
    `exhaustive` (what `tune=True` asks for) returns the whole grid, unpruned, with the slice
    heights the default list fixes also varied at M > 1.
    """
    if fmt not in FORMATS:
        raise SparsecompError(f"no TIR kernel for format {fmt!r}", hint=f"formats: {', '.join(FORMATS)}")
    V = _target.vector_width()
    hw = _target.has_feature("avx2")
    gathers = (["hw"] if hw else []) + ["sw"]
    hw16 = _target.has_feature("avx512f")  # the 16-lane gather (SELL delta only, so far)
    chunks = _target.get_num_threads() if M > 1 and fmt == "csr" else 0
    out: list[tuple[float, dict]] = []
    if M <= 1:
        if fmt == "csr":
            for g in gathers:
                vv = 8 if g == "hw" else V
                for u in (2, 4):
                    out.append((0.0 if g == "hw" else 0.5, {"vec": vv, "unroll": u, "gather": g}))
        elif fmt == "sell":
            # SELL with uint8 column deltas (5 bytes per entry instead of 6). Measured cold,
            # 4096x4096, interleaved, 2 rounds at load 1.5-1.8: 70%: delta-32 hw 1.33 ms, delta-8
            # hw 1.35, sell-16 hw 1.39-1.40, torch CSR 1.69-1.71, dense 3.2-3.3; 90%: sell-32 sw
            # 0.48-0.50 ms, delta-16 sw 0.49-0.51, delta-8 hw 0.50-0.52, torch CSR 0.72. So the delta
            # variants are timed too, never displacing sell-32 sw (every M = 1 variant is kept).
            # Software prefetch and the AVX-512 gather (16 rows per gather): cold, 4096x4096, Intel
            # Xeon VM, interleaved: 90% hw16 C=16 pf 256-512 405-411 us, hw C=32 pf 256 465, hw C=32
            # 517; 70%: 973, 1129, 1220 (`_codegen._sell_delta_mv`)
            for g, C, pf, cost in (("hw16", 16, 256, 0.02), ("hw16", 16, 512, 0.03), ("hw", 32, 256, 0.04), ("hw", 32, 0, 0.1),
                                   ("sw", 16, 0, 0.6)):
                if (g == "hw" and not hw) or (g == "hw16" and not hw16):
                    continue
                out.append((cost, {"scheme": "delta", "slice_height": C, "unroll": 1, "gather": g, "sigma": 64 if g != "sw" else 1,
                                   **({"prefetch": pf} if pf else {})}))
            for C in (8, 16, 32):
                for g in gathers:
                    vv = 8 if g == "hw" else min(V, C)
                    out.append(((0.0 if g == "hw" else 0.5) + abs(C - 16) / 32, {"slice_height": C, "vec": vv, "unroll": 1, "gather": g}))
            limit = max(limit, len(out))  # all of them: each of these won somewhere (AMD: plain sell-32 sw at 90%)
        elif fmt == "bsr":
            r, c = block or (16, 1)
            if r >= 4:
                for u in (1, 2, 4):
                    out.append((abs(u * r - 4 * V) / (4 * V), {"block": (r, c), "scheme": "col", "unroll": u}))
                if r * c <= 128:
                    # software prefetch ~8 KB ahead (`_codegen._bsr_mv`): 4096x4096, 90% 16x1, cold,
                    # Intel Xeon VM, 2 threads, 40 interleaved rounds, two runs: 306-307 us against
                    # 328-371 without (128 blocks ahead; 64 and 96: 310-313, 256: 326)
                    out.append((-0.1, {"block": (r, c), "scheme": "col", "unroll": 1, "prefetch": max(1, 2048 // (r * c))}))
            if r * c <= 64:
                for u in (1, 2, 4):
                    if u * r * c <= 8 * V:
                        out.append((0.25 + abs(u * r * c - 4 * V) / (4 * V), {"block": (r, c), "scheme": "flat", "unroll": u}))
        else:
            if hw and m == 4 and n <= 2:
                # 2-bit positions + vpermilps (34 instead of 36 MB on 2:4 4096x4096): measured
                # cold, load 3.4, interleaved, best of 4 rounds: perm4 u2 1.48 ms, u4 1.70, u1
                # 1.92; perm u4 2.2, u1 2.6; torch dense 3.0 (medians swing 1.5x at that load)
                for u in (2, 4, 1):
                    out.append((-2.0 + abs(u - 2) / 8, {"n": n, "m": m, "scheme": "perm4", "unroll": u}))
            if hw and 8 % m == 0:
                # gather-free permute kernel (lanes over 8 rows, vpermps picks x): measured 2:4
                # 4096x4096, 2 threads, cold, load 2.2 (interleaved): perm u4 2.0 ms, u1 2.3 ms,
                # row hw-gather u2 4.1 ms, row sw u1 3.8 ms, torch dense 2.9 ms
                for u in (4, 1):
                    out.append((-1.0 + abs(u - 4) / 8, {"n": n, "m": m, "scheme": "perm", "unroll": u}))
            for g in gathers:
                vv = 8 if g == "hw" else V
                for u in (1, 2, 4):
                    out.append(((0.0 if g == "hw" else 0.5) + abs(u - 2) / 4, {"n": n, "m": m, "vec": vv, "unroll": u, "gather": g}))
    else:
        r = (block or (1, 1))[0] if fmt == "bsr" else 1
        for mt in (V, 2 * V, 4 * V, 8 * V):
            if mt > 2 * V and mt > -(-M // V) * V:
                continue
            waste = (-(-M // mt) * mt) / M
            for u in (1, 2, 4):
                if fmt == "bsr" and u > 1:
                    continue
                chains = (mt // V) * u * r
                regs = chains + (mt // V)
                cost = waste + abs(math.log2(max(chains, 1) / 8)) * 0.3 + (1.0 if regs > 14 else 0.0)
                p = {"mt": mt, "unroll": u}
                if fmt == "bsr":
                    p["block"] = tuple(block or (16, 1))
                if fmt == "sell":
                    p["slice_height"] = 8
                    if exhaustive:
                        out.extend((cost + 0.01, {**p, "slice_height": C}) for C in (16, 32))
                if fmt == "nm":
                    p.update(n=n, m=m)
                out.append((cost, p))
                if fmt == "csr":
                    # rows in blocks of 32 whose outputs leave by register transposes, and one
                    # chunk of blocks per thread running all its blocks over one xt tile before
                    # the next (`_codegen._csr_mm`). Measured hot, 2 threads, interleaved, 90%:
                    # M = 128, mt 32 u1: 3072x768 0.87 -> 0.82 ms with chunks (1.46 ms before
                    # the block store), 768x3072 1.13 -> 1.01 ms; M = 16: 3072x768 mt 16 u2
                    # 0.26 ms vs 0.32 ms for the best unblocked variant (mt 16 u4)
                    out.append((cost - 0.05, {**p, "rb": 32, "chunks": chunks}))
                    if mt <= 2 * V and M <= 2 * V:
                        # few rows: the weight's stream is what the kernel waits on, and a software
                        # prefetch 512 entries ahead helps as it did the one-row SELL kernel.
                        # 4096x4096 at 90%, M = 16, mt 16 u4, cold, Intel Xeon VM, interleaved:
                        # 1.05-1.21 ms against 1.22-1.30 without (torch CSR 1.50-1.63); at M = 128
                        # (3072x768, mt 64) it changed nothing (1.158 vs 1.159 ms)
                        out.append((cost - 0.06, {**p, "rb": 32, "chunks": chunks, "prefetch": 512}))
                    if mt == 4 * V and u == 2:
                        # column panels of 256 (`_codegen._csr_panel_mm`): 3072x768 at 90%, M = 128,
                        # hot, interleaved: 451-457 us against 490-503 for the best variant above
                        for rb in (128, 64):
                            out.append((cost - 0.07, {**p, "rb": rb, "chunks": chunks, "kb": 256}))
                        limit += 2  # extra: they displace none of the variants above
    out.sort(key=lambda t: t[0])
    return [p for _, p in (out if exhaustive else out[:limit])]
