"""TIR script text for every (format, variant): the kernels themselves.

A kernel is generated as TVMScript *text* (parsed with `tvm.script.from_source`), because the
text is then also the disk-cache key: any change to a template changes the hash and rebuilds.
All sizes (N, K, nnz, M, slices, blocks) are symbolic `T.int32()` vars bound from the arguments,
so one compiled kernel serves every layer of that format and variant.

Two modes per format:
- "mv" (M = 1, memory bound): parallel over rows / slices / block rows; the vector lane runs
  along contiguous stored values; x is read by gather, either LLVM's scalarised gather ("sw") or
  the AVX2 `vgatherdps` intrinsic ("hw"); U independent accumulator sets hide FMA latency.
  Two gather-light M = 1 variants interleave 8 rows into the vector lanes instead (scheme
  param): N:M "perm" (x read as aligned 8-float windows, each slot picked by `vpermps` from
  3-bit positions; no gather at all) and SELL "delta" (uint8 column deltas accumulated per
  lane, then one gather; 5 bytes per entry instead of 6).
- "mm" (M > 1): x is passed transposed, padded and cut into tiles of MT rows of x,
  xt[Mp / MT, Kp, MT], so that for each stored weight the inner loop is one broadcast FMA over
  MT contiguous floats; U independent accumulator sets (consecutive nonzeros go to different
  sets) hide FMA latency. The weights are read once per tile from L1/L2 (the row's entries are
  reused across the M tiles). Why tiles rather than xt[Kp, Mp]: a weight row's nonzeros read
  random rows of xt; with rows Mp floats apart (512 bytes at M = 128, a power of two) an MT-wide
  tile of them maps to 1/8 of L1's sets, so even a tile that fits L1 kept missing it. As one
  block ([Kp, MT], 24 KB at K = 768, MT = 8) it stays in L1 while a block of rows (`rb`) runs
  over it. Measured 3072x768, M = 128, 90% unstructured, one thread, hot: mt 16 rb 32 2.49 ms
  tiled vs 3.02 ms on xt[Kp, Mp]; at 70%: 5.67 vs 8.17 ms (7.3 ms torch dense).
  CSR also comes row-blocked (`rb` rows per block, their outputs written out by 8x8 register
  transposes, `_block_store`) and optionally with `chunks` tasks that each run their blocks
  over one xt tile before the next.

Argument conventions (every kernel): inputs first, then `bias[N]`, then the output.
  mv: x[Kp], <format arrays>, bias[N], y[N]
  mm: xt[Mp / MT, Kp, MT], <format arrays>, bias[N], y[Mp, N]   (Mp a multiple of MT; rows >= M
      ignored)
Kp is K padded to the format's column granularity (BSR: blocks of c; N:M: groups of m).

Why some things look odd:
- Scratch accumulators are `T.alloc_buffer` in the default ("global") scope: inside a parallel
  loop, TVM 0.27 turns "local" scope and `name: T.int32 = ...` scalars into
  TVMBackendAllocWorkspace calls (a heap allocation per row, 3x slower); a small global-scope
  buffer becomes an LLVM stack alloca that SROA promotes to registers. Scalars use `T.Bind`.
- The hardware gather "hw" is the AVX2 intrinsic (8 lanes); it runs on every AVX2 and AVX-512
  CPU. "hw16" (SELL delta only) is the AVX-512 one (16 lanes); `candidates` offers it only where
  the target has avx512f.
"""

from __future__ import annotations

import functools

from sparsecomp.errors import SparsecompError

__all__ = ["kernel_source", "transpose_source"]

_HEAD = '''@T.prim_func
def main({args}):
    T.func_attr({{"global_symbol": "main", "tir.noalias": True}})
'''


def _header(args: list[tuple[str, str, str]], sizes: list[str]) -> str:
    """args: (name, shape expr, dtype). sizes: symbolic size var names."""
    s = _HEAD.format(args=", ".join(f"{a}_h: T.handle" for a, _, _ in args))
    for v in sizes:
        s += f"    {v} = T.int32()\n"
    for a, shape, dt in args:
        s += f'    {a} = T.match_buffer({a}_h, ({shape},), "{dt}")\n'
    return s


def _ind(text: str, n: int) -> str:
    pad = " " * n
    return "\n".join(pad + ln if ln.strip() else ln for ln in text.strip("\n").split("\n")) + "\n"


# The hardware gathers: AVX2's 8 lanes (all-ones float mask, i8 scale) and AVX-512's 16 lanes
# (<16 x i1> mask, i32 scale). Each reads x[idx] for a vector of int32 indices.
_HW_GATHER = {
    8: ("llvm.x86.avx2.gather.d.ps.256", 'T.Broadcast(T.reinterpret("float32", T.int32(-1)), 8)', "T.int8(4)"),
    16: ("llvm.x86.avx512.mask.gather.dps.512", "T.Broadcast(T.bool(True), 16)", "T.int32(4)"),
}


def _hw_gather(lanes: int, idx_vec: str, x: str = "x") -> str:
    """The expression gathering `lanes` floats of `x` at the int32 index vector `idx_vec`."""
    intrin, mask, scale = _HW_GATHER[lanes]
    return (f'T.call_llvm_pure_intrin("float32x{lanes}", "{intrin}", T.Broadcast(T.float32(0), {lanes}), '
            f"T.address_of({x}[0]), {idx_vec}, {mask}, {scale})")


def _prefetch(element: str) -> str:
    """A statement: software prefetch (read, keep in all cache levels) of the line holding
    `element`, a buffer access such as "vals[s + 512]"; an address past the buffer is harmless."""
    return f'T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", T.address_of({element}), T.int32(0), T.int32(3), T.int32(1)))\n'


def _gather(x: str, V: int, gather: str, idx_expr_v: str, ib: str) -> tuple[str, str]:
    """(statements, vector expr) reading x at V indices; idx_expr_v uses loop var `v`.

    "sw": the expression is used inside a T.vectorized loop over v (LLVM scalarises the loads).
    "hw": indices go to a small int32 scratch `ib`, then one vgatherdps (8 lanes).
    """
    if gather == "hw":
        if V != 8:
            raise SparsecompError(f"hw gather is 8 lanes (AVX2), got vec={V}")
        pre = f"for v in T.vectorized({V}):\n    {ib}[v] = {idx_expr_v}\n"
        return pre, _hw_gather(8, f"{ib}[T.Ramp(0, 1, 8)]", x)
    return "", f"{x}[{idx_expr_v}]"


def _acc_update(V: int, gather: str, acc_off: str, val_base: str, idx_expr_v: str) -> str:
    """acc[acc_off:+V] += vals[val_base:+V] * x[idx(v)] (one vector step)."""
    pre, g = _gather("x", V, gather, idx_expr_v, "ib")
    if gather == "hw":
        return pre + (
            f"acc[T.Ramp({acc_off}, 1, {V})] = acc[T.Ramp({acc_off}, 1, {V})] + "
            f"vals[T.Ramp({val_base}, 1, {V})] * {g}\n"
        )
    return f"for v in T.vectorized({V}):\n    acc[{acc_off} + v] = acc[{acc_off} + v] + vals[{val_base} + v] * {g}\n"


def _hsum_store(UV: int, V: int, target: str, extra: str) -> str:
    """Fold UV accumulators into V, then sum the V lanes into `target` (+ extra)."""
    s = ""
    if UV > V:
        terms = " + ".join(f"acc[{u * V} + v]" for u in range(1, UV // V))
        s += f"for v in T.vectorized({V}):\n    acc[v] = acc[v] + {terms}\n"
    s += f"{target} = " + " + ".join(f"acc[{i}]" for i in range(V)) + f" + {extra}\n"
    return s


# ------------------------------------------------------------------------------------------------
# M = 1


def _csr_mv(p: dict, idt: str) -> str:
    V, U, g = p["vec"], p["unroll"], p["gather"]
    UV = U * V
    s = _header(
        [("x", "K", "float32"), ("vals", "NNZ", "float32"), ("col", "NNZ", idt), ("ptr", "N + 1", "int32"),
         ("bias", "N", "float32"), ("y", "N", "float32")],
        ["N", "K", "NNZ"],
    )
    ci = 'T.Cast("int32", col[{o} + v])'
    body = f"""
for r in T.parallel(N):
    acc = T.alloc_buffer(({UV},), "float32")
    ib = T.alloc_buffer(({V},), "int32")
    s = T.Bind(ptr[r])
    e = T.Bind(ptr[r + 1])
    nb = T.Bind((e - s) // {UV})
    nv = T.Bind((e - s - nb * {UV}) // {V})
    for v in T.vectorized({UV}):
        acc[v] = T.float32(0)
    for j in range(nb):
"""
    for u in range(U):
        o = f"s + j * {UV} + {u * V}"
        body += _ind(_acc_update(V, g, str(u * V), o, ci.format(o=o)), 8)
    o = f"s + nb * {UV} + j * {V}"
    body += "    for j in range(nv):\n" + _ind(_acc_update(V, g, "0", o, ci.format(o=o)), 8)
    body += f"""    for j in range(s + nb * {UV} + nv * {V}, e):
        acc[0] = acc[0] + vals[j] * x[T.Cast("int32", col[j])]
"""
    body += _ind(_hsum_store(UV, V, "y[r]", "bias[r]"), 4)
    return s + _ind(body, 4)


def _sell_mv(p: dict, idt: str, perm: bool) -> str:
    C, V, U, g = p["slice_height"], p["vec"], p["unroll"], p["gather"]
    V = min(V, C)
    if C % V:
        raise SparsecompError(f"SELL kernel: slice_height {C} must be a multiple of vec {V}")
    if g == "hw" and V != 8:
        g = "sw"
    args = [("x", "K", "float32"), ("vals", "TOT", "float32"), ("col", "TOT", idt), ("sptr", "NSP", "int32")]
    if perm:
        args.append(("perm", "N", "int32"))
    args += [("bias", "N", "float32"), ("y", "N", "float32")]
    s = _header(args, ["N", "K", "TOT", "NSP"])
    UC = U * C
    body = f"""
for sl in T.parallel(NSP - 1):
    acc = T.alloc_buffer(({UC},), "float32")
    ib = T.alloc_buffer(({V},), "int32")
    p0 = T.Bind(sptr[sl])
    w = T.Bind((sptr[sl + 1] - p0) // {C})
    for v in T.vectorized({UC}):
        acc[v] = T.float32(0)
    for j in range(w // {U}):
"""
    for u in range(U):
        for q in range(C // V):
            o = f"p0 + (j * {U} + {u}) * {C} + {q * V}"
            body += _ind(_acc_update(V, g, str(u * C + q * V), o, f'T.Cast("int32", col[{o} + v])'), 8)
    if U > 1:
        body += f"    for j in range(w // {U} * {U}, w):\n"
        for q in range(C // V):
            o = f"p0 + j * {C} + {q * V}"
            body += _ind(_acc_update(V, g, str(q * V), o, f'T.Cast("int32", col[{o} + v])'), 8)
        terms = " + ".join(f"acc[{u * C} + v]" for u in range(1, U))
        body += f"    for v in T.vectorized({C}):\n        acc[v] = acc[v] + {terms}\n"
    row = f"sl * {C} + i"
    dst = f"perm[{row}]" if perm else row
    body += f"""    for i in range({C}):
        if {row} < N:
            y[{dst}] = acc[i] + bias[{dst}]
"""
    return s + _ind(body, 4)


def _sell_delta_mv(p: dict, perm: bool) -> str:
    """SELL-C (C = 8/16/32) at M = 1 with uint8 column *deltas*: 5 bytes per stored entry.

    Lanes run over rows; each row keeps its running column in a vector lane (cb += zext(delta):
    vpmovzxbd + vpaddd, no prefix sum since every lane is its own row), then x is read at cb
    with the AVX2 gather ("hw", 8 rows per vector), the AVX-512 one ("hw16", 16 rows per vector:
    half the gather instructions) or LLVM's scalarised loads ("sw", 8 rows), C / lanes vectors
    per step. Gaps over 255 columns are bridged at pack time by zero-valued filler entries;
    padding entries have delta 0 (they re-read the row's last x). `prefetch` (entries ahead, 0 =
    none) adds software prefetches (see `prefetch` below).
    """
    U, g, C, pf = p["unroll"], p["gather"], p["slice_height"], p.get("prefetch", 0)
    L = 16 if g == "hw16" else 8  # rows per vector
    if C % L:
        raise SparsecompError(f"SELL delta kernel: slice_height {C} must be a multiple of {L} (gather {g})")
    args = [("x", "K", "float32"), ("vals", "TOT", "float32"), ("col", "TOT", "uint8"), ("sptr", "NSP", "int32")]
    if perm:
        args.append(("perm", "N", "int32"))
    args += [("bias", "N", "float32"), ("y", "N", "float32")]
    s = _header(args, ["N", "K", "TOT", "NSP"])

    def step(o: str, a: int, q: int) -> str:
        t = f"for v in T.vectorized({L}):\n    cb[{q * L} + v] = cb[{q * L} + v] + T.Cast(\"int32\", col[{o} + v])\n"
        if g in ("hw", "hw16"):
            xg = _hw_gather(L, f"cb[T.Ramp({q * L}, 1, {L})]")
            return t + f"acc[T.Ramp({a}, 1, {L})] = acc[T.Ramp({a}, 1, {L})] + vals[T.Ramp({o}, 1, {L})] * {xg}\n"
        return t + f"for v in T.vectorized({L}):\n    acc[{a} + v] = acc[{a} + v] + vals[{o} + v] * x[cb[{q * L} + v]]\n"

    def prefetch(o: str) -> str:
        # `pf` > 0: software prefetch of the values `pf` entries ahead (one per 64-byte line the
        # step reads) and of the deltas as many bytes ahead. Cold, 4096x4096 at 90% (Intel Xeon
        # VM, 2 threads, interleaved): hw16 C=16 429-411 us with pf 256 vs 512-519 without;
        # at 70%: 973-1024 vs 1283. The hardware prefetchers alone left the loop waiting on memory.
        lines = [f"vals[{o} + {pf + 16 * i}]" for i in range(max(1, U * C // 16))]
        return "".join(_prefetch(e) for e in lines + [f"col[{o} + {4 * pf}]"])

    body = f"""
for sl in T.parallel(NSP - 1):
    acc = T.alloc_buffer(({U * C},), "float32")
    cb = T.alloc_buffer(({C},), "int32")
    p0 = T.Bind(sptr[sl])
    w = T.Bind((sptr[sl + 1] - p0) // {C})
    for v in T.vectorized({U * C}):
        acc[v] = T.float32(0)
    for v in T.vectorized({C}):
        cb[v] = 0
    for j in range(w // {U}):
"""
    if pf:
        body += _ind(prefetch(f"p0 + j * {U * C}"), 8)
    for u in range(U):
        for q in range(C // L):
            body += _ind(step(f"p0 + (j * {U} + {u}) * {C} + {q * L}", u * C + q * L, q), 8)
    if U > 1:
        body += f"    for j in range(w // {U} * {U}, w):\n"
        for q in range(C // L):
            body += _ind(step(f"p0 + j * {C} + {q * L}", q * L, q), 8)
        terms = " + ".join(f"acc[{u * C} + v]" for u in range(1, U))
        body += f"    for v in T.vectorized({C}):\n        acc[v] = acc[v] + {terms}\n"
    row = f"sl * {C} + i"
    dst = f"perm[{row}]" if perm else row
    body += f"""    for i in range({C}):
        if {row} < N:
            y[{dst}] = acc[i] + bias[{dst}]
"""
    return s + _ind(body, 4)

def _bsr_mv(p: dict, idt: str) -> str:
    r, c = p["block"]
    U = p["unroll"]
    scheme = p["scheme"]
    pf = p.get("prefetch", 0)
    s = _header(
        [("x", "KP", "float32"), ("vals", "NV", "float32"), ("col", "NNZB", idt),
         ("bptr", "NBP", "int32"), ("bias", "N", "float32"), ("y", "N", "float32")],
        ["N", "KP", "NNZB", "NBP", "NV"],
    )
    cl = f"T.unroll({c})" if c <= 16 else f"T.serial({c})"
    if scheme == "col":  # values [nnzb, c, r]: lanes along the block's r rows
        A = r

        def step(k: str, a: int, t: str) -> str:
            return f"""xb{t} = T.Bind(T.Cast("int32", col[{k}]) * {c})
for cc in {cl}:
    xv{t} = T.Bind(x[xb{t} + cc])
    for v in T.vectorized({r}):
        acc[{a} + v] = acc[{a} + v] + vals[({k} * {c} + cc) * {r} + v] * xv{t}
"""

        fin = f"""for i in range({r}):
    if br * {r} + i < N:
        y[br * {r} + i] = acc[i] + bias[br * {r} + i]
"""
    elif scheme == "flat":  # values [nnzb, r, c]: lanes along all r*c entries of a block
        A = r * c

        def step(k: str, a: int, t: str) -> str:
            xi = f"xb{t} + v" if r == 1 else (f"xb{t}" if c == 1 else f"xb{t} + v % {c}")
            return f"""xb{t} = T.Bind(T.Cast("int32", col[{k}]) * {c})
for v in T.vectorized({r * c}):
    acc[{a} + v] = acc[{a} + v] + vals[{k} * {r * c} + v] * x[{xi}]
"""

        red = " + ".join(f"acc[i * {c} + {cc}]" for cc in range(c))
        fin = f"""for i in range({r}):
    if br * {r} + i < N:
        y[br * {r} + i] = {red} + bias[br * {r} + i]
"""
    else:
        raise SparsecompError(f"BSR kernel: unknown scheme {scheme!r}", hint="'col' or 'flat'")
    body = f"""
for br in T.parallel(NBP - 1):
    acc = T.alloc_buffer(({U * A},), "float32")
    k0 = T.Bind(bptr[br])
    k1 = T.Bind(bptr[br + 1])
    for v in T.vectorized({U * A}):
        acc[v] = T.float32(0)
    for kk in range((k1 - k0) // {U}):
"""
    if pf:
        # software prefetch `pf` blocks ahead: the values' lines of the U blocks the step reads
        # and the block columns (past this block row's end they are the next rows' blocks)
        k = f"(k0 + kk * {U} + {pf})"
        lines = range(max(1, U * r * c // 16))
        body += _ind("".join(_prefetch(f"vals[{k} * {r * c} + {16 * i}]") for i in lines) + _prefetch(f"col[{k}]"), 8)
    for u in range(U):
        body += _ind(step(f"(k0 + kk * {U} + {u})", u * A, str(u)), 8)
    if U > 1:
        body += f"    for k in range(k0 + (k1 - k0) // {U} * {U}, k1):\n" + _ind(step("k", 0, "t"), 8)
        terms = " + ".join(f"acc[{u * A} + v]" for u in range(1, U))
        body += f"    for v in T.vectorized({A}):\n        acc[v] = acc[v] + {terms}\n"
    body += _ind(fin, 4)
    return s + _ind(body, 4)


def _nm_mv(p: dict, idt: str) -> str:
    n, m, V, U, g = p["n"], p["m"], p["vec"], p["unroll"], p["gather"]
    UV = U * V
    s = _header(
        [("x", "KP", "float32"), ("vals", "NV", "float32"), ("idx", "NV", "uint8"),
         ("bias", "N", "float32"), ("y", "N", "float32")],
        ["N", "KP", "NV"],
    )

    def col(jj: str) -> str:  # absolute column of stored entry jj + v of row r
        if V % n == 0:
            return f'({jj}) // {n} * {m} + v // {n} * {m} + T.Cast("int32", idx[r * GN + {jj} + v])'
        return f'({jj} + v) // {n} * {m} + T.Cast("int32", idx[r * GN + {jj} + v])'

    body = f"""
GN = T.Bind(NV // N)
for r in T.parallel(N):
    acc = T.alloc_buffer(({UV},), "float32")
    ib = T.alloc_buffer(({V},), "int32")
    for v in T.vectorized({UV}):
        acc[v] = T.float32(0)
    for j in range(GN // {UV}):
"""
    for u in range(U):
        jj = f"j * {UV} + {u * V}"
        body += _ind(_acc_update(V, g, str(u * V), f"r * GN + {jj}", col(jj)), 8)
    jj = f"GN // {UV} * {UV} + j * {V}"
    body += f"    for j in range((GN - GN // {UV} * {UV}) // {V}):\n" + _ind(_acc_update(V, g, "0", f"r * GN + {jj}", col(jj)), 8)
    body += f"""    for j in range(GN // {V} * {V}, GN):
        acc[0] = acc[0] + vals[r * GN + j] * x[j // {n} * {m} + T.Cast("int32", idx[r * GN + j])]
"""
    body += _ind(_hsum_store(UV, V, "y[r]", "bias[r]"), 4)
    return s + _ind(body, 4)


def _nm_perm_mv(p: dict) -> str:
    """N:M at M = 1 without gathers: lanes run over 8 rows (a slice), values [slice, group, n, 8].

    For each window of 8 consecutive x values (8 // m groups) one aligned vector load; each
    stored slot then picks its x value with one `vpermps` (AVX2 cross-lane permute) driven by
    the 3-bit in-window position, loaded as 8 bytes (one per row) and zero-extended. With n even
    two slots share a byte (bits 0-2 and 3-5; vpermps reads only bits 0-2, so the second slot is
    a shift). Measured on 2:4 4096x4096 (2 threads, cold): see `candidates`.
    """
    n, m, U = p["n"], p["m"], p["unroll"]
    if 8 % m:
        raise SparsecompError(f"N:M perm kernel needs m dividing 8, got m={m}")
    P = 8 // m  # groups per x window
    spb = 2 if n % 2 == 0 else 1  # slots per metadata byte
    NB = n // spb
    A = U * P * n  # independent accumulator vectors
    s = _header(
        [("x", "KP", "float32"), ("vals", "NV", "float32"), ("meta", "NMB", "uint8"),
         ("bias", "N", "float32"), ("y", "N", "float32")],
        ["N", "KP", "NV", "NMB"],
    )

    def window(w: str, chain0: int, t: str) -> str:
        out = f"xv{t} = T.Bind(x[T.Ramp(({w}) * 8, 1, 8)])\n"
        for gg in range(P):
            g = f"(({w}) * {P} + {gg})"
            for b in range(NB):
                out += f'mv{t}_{gg}_{b} = T.Bind(T.Cast("int32x8", meta[T.Ramp(((sl * G2 + {g}) * {NB} + {b}) * 8, 1, 8)]))\n'
                for tt in range(spb):
                    slot = b * spb + tt
                    a = (chain0 + gg * n + slot) * 8
                    pi = f"mv{t}_{gg}_{b}" if tt == 0 else f"T.shift_right(mv{t}_{gg}_{b}, T.Broadcast(T.int32(3), 8))"
                    xp = f'T.call_llvm_pure_intrin("float32x8", "llvm.x86.avx2.permps", xv{t}, {pi})'
                    out += (f"acc[T.Ramp({a}, 1, 8)] = acc[T.Ramp({a}, 1, 8)] + "
                            f"vals[T.Ramp(((sl * G2 + {g}) * {n} + {slot}) * 8, 1, 8)] * {xp}\n")
        return out

    return s + _lane_slice_body(f"G2 = T.Bind(KP // {m})\nNW = T.Bind(KP // 8)", A, U, window, P * n)


def _nm_perm4_mv(p: dict) -> str:
    """N:4 (n <= 2) at M = 1, like `_nm_perm_mv` but with 2-bit positions: n = 2 packs two
    groups in a byte per row (4 instead of 8 bits per group, 34 MB instead of 36 MB on 2:4
    4096x4096). Each group's 4 x values are broadcast to both 128-bit halves and picked with
    `vpermilps`, which reads only bits 0-1 of each control lane (so a shift, no mask).
    Software prefetch of vals 1-4 KiB ahead was measured 1-8% slower (the stream is sequential).
    """
    n, U = p["n"], p["unroll"]
    if p["m"] != 4 or n > 2:
        raise SparsecompError("the perm4 N:M kernel is for n:4 with n <= 2")
    GPB = 4 // n  # groups per metadata byte (one byte per row per GPB groups)
    A = U * GPB * n
    s = _header(
        [("x", "KP", "float32"), ("vals", "NV", "float32"), ("meta", "NMB", "uint8"),
         ("bias", "N", "float32"), ("y", "N", "float32")],
        ["N", "KP", "NV", "NMB"],
    )

    def window(w: str, chain0: int, t: str) -> str:
        out = f'mv{t} = T.Bind(T.Cast("int32x8", meta[T.Ramp((sl * NW + {w}) * 8, 1, 8)]))\n'
        for gg in range(GPB):
            g = f"(({w}) * {GPB} + {gg})"
            xq = f"x[T.Ramp({g} * 4, 1, 4)]"
            out += f"xg{t}_{gg} = T.Bind(T.Shuffle([{xq}, {xq}], [0, 1, 2, 3, 4, 5, 6, 7]))\n"
            for sl_ in range(n):
                k = gg * n + sl_
                a = (chain0 + k) * 8
                ctl = f"mv{t}" if k == 0 else f"T.shift_right(mv{t}, T.Broadcast(T.int32({2 * k}), 8))"
                xp = f'T.call_llvm_pure_intrin("float32x8", "llvm.x86.avx.vpermilvar.ps.256", xg{t}_{gg}, {ctl})'
                out += (f"acc[T.Ramp({a}, 1, 8)] = acc[T.Ramp({a}, 1, 8)] + "
                        f"vals[T.Ramp(((sl * G2 + {g}) * {n} + {sl_}) * 8, 1, 8)] * {xp}\n")
        return out

    return s + _lane_slice_body(f"G2 = T.Bind(KP // 4)\nNW = T.Bind(G2 // {GPB})", A, U, window, GPB * n)


def _lane_slice_body(prelude: str, A: int, U: int, window, chains_per_window: int) -> str:
    """The loop skeleton shared by the gather-free N:M kernels (one output row per vector lane,
    8 rows per slice): zero A accumulators, run `window` U times unrolled over the NW x windows
    (then the remainder), add the accumulators up, store the slice's rows with their bias."""
    body = f"""
{prelude}
for sl in T.parallel((N + 7) // 8):
    acc = T.alloc_buffer(({A * 8},), "float32")
    for v in T.vectorized({A * 8}):
        acc[v] = T.float32(0)
    for h in range(NW // {U}):
"""
    for u in range(U):
        body += _ind(window(f"h * {U} + {u}", u * chains_per_window, str(u)), 8)
    if U > 1:
        body += f"    for h in range(NW // {U} * {U}, NW):\n" + _ind(window("h", 0, "t"), 8)
    if A > 1:
        terms = " + ".join(f"acc[{a * 8} + v]" for a in range(1, A))
        body += f"    for v in T.vectorized(8):\n        acc[v] = acc[v] + {terms}\n"
    body += """    for i in range(8):
        if sl * 8 + i < N:
            y[sl * 8 + i] = acc[i] + bias[sl * 8 + i]
"""
    return _ind(body, 4)


# ------------------------------------------------------------------------------------------------
# M > 1: xt[Mp / MT, Kp, MT] (tile mt holds rows mt * MT .. of x, transposed), y[Mp, N]


# GELU (erf form, torch's default) as erf(z) ~ z * P(z^2) / Q(z^2) on z clamped to [-4, 4]
# (|erf(4)| is 1 - 1.5e-8, so 1 in float32). The coefficients are our own weighted least-squares
# rational fit on [0, 4] (iterated until Q has no root there: Q >= 1). Measured against torch's
# F.gelu over [-12, 12]: max abs error 9.5e-7 (torch's own erf GELU is 3.7e-7 from the float64
# value). Vectorised, it runs 2x faster than torch's F.gelu (188 vs 384 us for 128 x 3072, one
# thread), and inside a kernel's epilogue it costs no pass over memory.
_GELU_P = (1.12837918, 0.184642239, 0.0543295196, 0.00383755202, 0.00038289576, 4.787239e-06, -1.36946172e-08)
_GELU_Q = (1.0, 0.496968478, 0.11380343, 0.0154502321, 0.00130945772, 6.40740294e-05)
ACTIVATIONS = ("gelu",)


def _horner(coefs: tuple[float, ...], t: str) -> str:
    e = f"T.float32({coefs[-1]!r})"
    for c in reversed(coefs[:-1]):
        e = f"({e} * {t} + T.float32({c!r}))"
    return e


def _epilogue(dst: str, value: str, act: str | None) -> str:
    """Lines storing `value` (an expression) to `dst`, through the activation `act` if any."""
    if act is None:
        return f"{dst} = {value}\n"
    if act != "gelu":
        raise SparsecompError(f"no kernel epilogue for activation {act!r}", hint=f"epilogues: {', '.join(ACTIVATIONS)}")
    return f"""ev = T.Bind({value})
ez = T.Bind(T.max(T.min(ev * T.float32(0.70710678118654752), T.float32(4)), T.float32(-4)))
et = T.Bind(ez * ez)
{dst} = T.float32(0.5) * ev * (T.float32(1) + ez * {_horner(_GELU_P, "et")} / {_horner(_GELU_Q, "et")})
"""


def _mm_row_loop(MT: int, U: int, count: str, val: str, colx: str, dst_row: str, bias: str,
                 mt_loop: bool = True, blk_row: str | None = None, act: str | None = None,
                 prefetch: tuple[int, list[str]] = (0, [])) -> str:
    """Inner part for one output row: loops over M tiles and the row's `count` entries.

    `val` / `colx` are expressions of the entry number `j` (0-based within the row). With
    mt_loop=False the caller's loop binds `mt` (row blocking, see `_csr_mm`). With `blk_row`, the
    row's MT outputs go to row `blk_row` of the caller's block buffer `blk` (one vector store)
    instead of MT scalar stores down a column of y (`_block_store` writes the block out). `act`:
    an activation applied to each output on its way out (`_epilogue`). `prefetch` = (entries
    ahead, element templates of `j` such as "vals[s + {j}]"): each step prefetches those elements
    that many entries ahead (past the row's end they are the next rows' entries).
    """
    UM = U * MT
    pf, pf_targets = prefetch
    s = f"""for mt in range({"MP // " + str(MT) if mt_loop else "mt, mt + 1"}):
    acc = T.alloc_buffer(({UM},), "float32")
    for q in T.vectorized({UM}):
        acc[q] = T.float32(0)
    for jb in range({count} // {U}):
"""
    for t in pf_targets if pf else ():
        s += "        " + _prefetch(t.format(j=f"(jb * {U} + {pf})"))
    for u in range(U):
        j = f"(jb * {U} + {u})"
        s += f"""        c{u} = T.Bind({colx.format(j=j)})
        w{u} = T.Bind({val.format(j=j)})
        for q in T.vectorized({MT}):
            acc[{u * MT} + q] = acc[{u * MT} + q] + w{u} * xt[mt, c{u}, q]
"""
    if U > 1:
        s += f"""    for j in range({count} // {U} * {U}, {count}):
        ct = T.Bind({colx.format(j="j")})
        wt = T.Bind({val.format(j="j")})
        for q in T.vectorized({MT}):
            acc[q] = acc[q] + wt * xt[mt, ct, q]
    for q in T.vectorized({MT}):
        acc[q] = acc[q] + {" + ".join(f"acc[{u * MT} + q]" for u in range(1, U))}
"""
    if blk_row is not None:
        s += f"    for q in T.vectorized({MT}):\n" + _ind(_epilogue(f"blk[{blk_row} * {MT} + q]", f"acc[q] + {bias}", act), 8)
    else:
        s += f"    for q in range({MT}):\n" + _ind(_epilogue(f"y[mt * {MT} + q, {dst_row}]", f"acc[q] + {bias}", act), 8)
    return s


def _transpose8(rows: list[str]) -> list[str]:
    """The 8x8 register transpose both the input transpose and `_block_store` use: given 8
    expressions of 8 floats each (rows j), the 8 expressions whose lane j is rows[j][i] (column
    i), one `shufflevector` each (a 3-stage unpack/shuffle network measured no faster here)."""
    joined = ", ".join(rows)
    return [f"T.Shuffle([{joined}], [{', '.join(str(j * 8 + i) for j in range(8))}])" for i in range(8)]


def _block_store(MT: int, RB: int, row0: str) -> str:
    """Write the block buffer blk[RB, MT] (rows row0 .. row0 + RB of the output, M tile `mt`) to
    y[mt * MT + q, row0 + rr]. A whole block of a multiple of 8 rows goes as 8x8 register
    transposes (8-float stores along y's rows); the last, partial block element by element.

    Why: storing each output row's MT values straight down a column of y hits MT lines whose
    addresses differ by N floats, often a multiple of 4 KB (N = 3072: 12 KB), so they share one
    L1 set and evict each other. Measured 3072x768, M = 128, 90%, 2 threads, mt 32 rb 32:
    1.46 -> 0.84 ms; 768x768: 0.28 -> 0.23 ms; 768x3072: 1.11 -> 1.07 ms.
    """
    scalar = f"""for rr in range({RB}):
    if {row0} + rr < N:
        for q in range({MT}):
            y[mt * {MT} + q, {row0} + rr] = blk[rr * {MT} + q]
"""
    if RB % 8:
        return scalar
    s = f"""if {row0} + {RB} <= N:
    for q8 in range({MT // 8}):
        for r8 in range({RB // 8}):
"""
    cols = _transpose8([f"blk[T.Ramp((r8 * 8 + {j}) * {MT} + q8 * 8, 1, 8)]" for j in range(8)])
    for i, col in enumerate(cols):
        s += f"            y[mt * {MT} + q8 * 8 + {i}, T.Ramp({row0} + r8 * 8, 1, 8)] = {col}\n"
    return s + "else:\n" + _ind(scalar, 4)


def _mm_header(args_mid: list[tuple[str, str, str]], sizes: list[str], MT: int) -> str:
    return _header([("xt", f"NT, KP, {MT}", "float32")] + args_mid + [("bias", "N", "float32"), ("y", "MP, N", "float32")],
                   sizes + ["MP", "NT"])


def _csr_mm(p: dict, idt: str) -> str:
    if p.get("kb"):
        return _csr_panel_mm(p, idt)
    MT, U = p["mt"], p["unroll"]
    s = _mm_header([("vals", "NNZ", "float32"), ("col", "NNZ", idt), ("ptr", "N + 1", "int32")], ["N", "KP", "NNZ"], MT)
    RB = p.get("rb", 0)
    if RB:
        # row blocking: each task takes RB rows and runs M tiles outermost, so that only one
        # [KP, MT] tile of xt is live at a time (the block's weights are re-read from L1/L2); the
        # block's outputs for a tile collect in blk[RB, MT] and go out together (`_block_store`)
        rows = (_ind(_mm_row_loop(MT, U, "cnt", "vals[s + {j}]", 'T.Cast("int32", col[s + {j}])', f"rb * {RB} + rr",
                                  f"bias[rb * {RB} + rr]", mt_loop=False, blk_row="rr", act=p.get("act"),
                                  prefetch=(p.get("prefetch", 0), ["vals[s + {j}]", "col[s + {j}]"])), 8))
        block = f"""for rr in range({RB}):
    if rb * {RB} + rr < N:
        s = T.Bind(ptr[rb * {RB} + rr])
        cnt = T.Bind(ptr[rb * {RB} + rr + 1] - s)
""" + rows + _block_store(MT, RB, f"rb * {RB}")
        return s + _ind(_row_block_tasks(p.get("chunks", 0), RB, MT, block), 4)
    body = """
for r in T.parallel(N):
    s = T.Bind(ptr[r])
    cnt = T.Bind(ptr[r + 1] - s)
""" + _ind(_mm_row_loop(MT, U, "cnt", "vals[s + {j}]", 'T.Cast("int32", col[s + {j}])', "r", "bias[r]", act=p.get("act")), 4)
    return s + _ind(body, 4)


def _row_block_tasks(CH: int, RB: int, MT: int, block: str, scratch: tuple[tuple[str, int], ...] = ()) -> str:
    """The parallel loops around `block` (the text for row block `rb` and M tile `mt`, which uses
    the task's buffer `blk[RB * MT]` and the (name, size) `scratch` float buffers).

    Without chunks (CH = 0) a task per row block, running its M tiles. With CH chunks, M tiles
    outermost within a task: each task takes a chunk of row blocks and runs all of them over one
    tile of xt before the next, so one tile (not all MP / MT) is live."""
    allocs = "".join(f'    {name} = T.alloc_buffer(({size},), "float32")\n' for name, size in (("blk", RB * MT), *scratch))
    if not CH:
        return f"""
for rb in T.parallel((N + {RB - 1}) // {RB}):
{allocs}    for mt in range(MP // {MT}):
""" + _ind(block, 8)
    return f"""
for ch in T.parallel({CH}):
{allocs}    bpc = T.Bind(((N + {RB - 1}) // {RB} + {CH - 1}) // {CH})
    for mt in range(MP // {MT}):
        for b in range(bpc):
            rb = T.Bind(ch * bpc + b)
            if rb * {RB} < N:
""" + _ind(block, 16)


def _csr_panel_mm(p: dict, idt: str) -> str:
    """CSR cut into column panels of KB (`kb`) columns, for M > 1: each task runs its row blocks
    (RB = `rb` rows) one M tile at a time, and within a block panel by panel, so the rows of a
    block read only a [KB, MT] slice of xt (KB * MT * 4 bytes) while the block's partial sums wait
    in blk[RB, MT] (L1).

    Why: unpanelled, every stored weight reads an MT-wide row of xt from anywhere in [KP, MT]
    (192 KB at K = 768, MT = 64: L2), and the kernel waits on L2: 3072x768 at 90%, M = 128, hot,
    2 threads, kernel alone 400 us; with every column index set to 0 (one xt row, in L1) 276 us.
    Panels narrow what a block reads, but each row now runs one short loop per panel (a
    mispredicted exit each, and blk loaded and stored): measured (interleaved, whole calls)
    KB = 256, RB = 128, U = 2: 451-457 us against 490-503 for the best unpanelled variant;
    KB = 128 (a 32 KB slice): no faster than unpanelled; at M = 16 (4096x4096) panels lost
    (610 against 572 us). U > 2 is not offered: LLVM's SLP vectoriser merges the U column loads
    into one vector and shuffles the accumulators through memory (3.9 ms instead of 0.6).
    Storage (`_linear._pack_csr_panel`) is ordered (row block, panel, row), so the weight stream
    stays one sequential read; ptr[(rb * P + pn) * RB + rr] starts row rr of block rb in panel pn,
    and columns are local to the panel (uint8 up to KB = 256: 5 bytes per entry instead of 6).
    """
    MT, U, RB, KB = p["mt"], p["unroll"], p["rb"], p["kb"]
    pf = p.get("prefetch", 0)
    s = _mm_header([("vals", "NNZ", "float32"), ("col", "NNZ", idt), ("ptr", "NPTR", "int32")], ["N", "KP", "NNZ", "NPTR"], MT)
    step = ""
    for u in range(U):
        j = f"(jb * {U} + {u})"
        step += f"""c{u} = T.Bind(x0 + T.Cast("int32", col[s + {j}]))
w{u} = T.Bind(vals[s + {j}])
for q in T.vectorized({MT}):
    acc[{u * MT} + q] = acc[{u * MT} + q] + w{u} * xt[mt, c{u}, q]
"""
    pre = "".join(_prefetch(f"{a}[s + jb * {U} + {pf}]") for a in ("vals", "col")) if pf else ""
    row = f"""s = T.Bind(ptr[(rb * NP + pn) * {RB} + rr])
cnt = T.Bind(ptr[(rb * NP + pn) * {RB} + rr + 1] - s)
if cnt > 0:
    for q in T.vectorized({MT}):
        acc[q] = blk[rr * {MT} + q]
"""
    if U > 1:
        row += f"    for q in T.vectorized({(U - 1) * MT}):\n        acc[{MT} + q] = T.float32(0)\n"
    row += f"    for jb in range(cnt // {U}):\n" + _ind(pre + step, 8)
    if U > 1:
        row += f"""    for j in range(cnt // {U} * {U}, cnt):
        ct = T.Bind(x0 + T.Cast("int32", col[s + j]))
        wt = T.Bind(vals[s + j])
        for q in T.vectorized({MT}):
            acc[q] = acc[q] + wt * xt[mt, ct, q]
    for q in T.vectorized({MT}):
        blk[rr * {MT} + q] = acc[q] + {" + ".join(f"acc[{u * MT} + q]" for u in range(1, U))}
"""
    else:
        row += f"    for q in T.vectorized({MT}):\n        blk[rr * {MT} + q] = acc[q]\n"
    block = f"""for i in range({RB}):
    for q in T.vectorized({MT}):
        blk[i * {MT} + q] = T.float32(0)
for pn in range(NP):
    x0 = T.Bind(pn * {KB})
    for rr in range({RB}):
""" + _ind(row, 8) + f"""for rr in range({RB}):
    if rb * {RB} + rr < N:
        for q in T.vectorized({MT}):
""" + _ind(_epilogue(f"blk[rr * {MT} + q]", f"blk[rr * {MT} + q] + bias[rb * {RB} + rr]", p.get("act")), 12) \
        + _block_store(MT, RB, f"rb * {RB}")
    body = f"\nNP = T.Bind((KP + {KB - 1}) // {KB})" + _row_block_tasks(p.get("chunks", 0), RB, MT, block, (("acc", U * MT),))
    return s + _ind(body, 4)


def _sell_mm(p: dict, idt: str, perm: bool) -> str:
    C, MT, U = p["slice_height"], p["mt"], p["unroll"]
    mid = [("vals", "TOT", "float32"), ("col", "TOT", idt), ("sptr", "NSP", "int32")]
    if perm:
        mid.append(("perm", "N", "int32"))
    s = _mm_header(mid, ["N", "KP", "TOT", "NSP"], MT)
    row = f"sl * {C} + i"
    dst = f"perm[{row}]" if perm else row
    body = f"""
for sl in T.parallel(NSP - 1):
    p0 = T.Bind(sptr[sl])
    w = T.Bind((sptr[sl + 1] - p0) // {C})
    for i in range({C}):
        if {row} < N:
""" + _ind(_mm_row_loop(MT, U, "w", f"vals[p0 + {{j}} * {C} + i]", f'T.Cast("int32", col[p0 + {{j}} * {C} + i])', dst, f"bias[{dst}]", act=p.get("act")), 12)
    return s + _ind(body, 4)


def _nm_mm(p: dict, idt: str) -> str:
    n, m, MT, U = p["n"], p["m"], p["mt"], p["unroll"]
    s = _mm_header([("vals", "NV", "float32"), ("idx", "NV", "uint8")], ["N", "KP", "NV"], MT)
    body = """
GN = T.Bind(NV // N)
for r in T.parallel(N):
""" + _ind(_mm_row_loop(MT, U, "GN", "vals[r * GN + {j}]", f'{{j}} // {n} * {m} + T.Cast("int32", idx[r * GN + {{j}}])', "r", "bias[r]", act=p.get("act")), 4)
    return s + _ind(body, 4)


def _bsr_mm(p: dict, idt: str) -> str:
    """values [nnzb, c, r] ("cr"); per block row and M tile, acc[r, MT]."""
    r, c = p["block"]
    MT = p["mt"]
    s = _mm_header([("vals", "NV", "float32"), ("col", "NNZB", idt), ("bptr", "NBP", "int32")], ["N", "KP", "NNZB", "NBP", "NV"], MT)
    rl = f"T.unroll({r})" if r <= 16 else f"T.serial({r})"
    cl = f"T.unroll({c})" if c <= 4 else f"T.serial({c})"
    body = f"""
for br in T.parallel(NBP - 1):
    k0 = T.Bind(bptr[br])
    k1 = T.Bind(bptr[br + 1])
    for mt in range(MP // {MT}):
        acc = T.alloc_buffer(({r * MT},), "float32")
        for q in T.vectorized({r * MT}):
            acc[q] = T.float32(0)
        for k in range(k0, k1):
            xb = T.Bind(T.Cast("int32", col[k]) * {c})
            for cc in {cl}:
                for i in {rl}:
                    wv = T.Bind(vals[(k * {c} + cc) * {r} + i])
                    for q in T.vectorized({MT}):
                        acc[i * {MT} + q] = acc[i * {MT} + q] + wv * xt[mt, xb + cc, q]
        for i in range({r}):
            if br * {r} + i < N:
                for q in range({MT}):
""" + _ind(_epilogue(f"y[mt * {MT} + q, br * {r} + i]", f"acc[i * {MT} + q] + bias[br * {r} + i]", p.get("act")), 20)
    return s + _ind(body, 4)


# ------------------------------------------------------------------------------------------------


@functools.cache
def transpose_source(MT: int) -> str:
    """The "mm" kernels' input: xt[m // MT, k, m % MT] = x[m, k] over the whole 8x8 tiles of
    x [M, K] (xt is [MP / MT, KP, MT], KP >= K, MP >= M, MT a multiple of 8).

    torch's strided copy moves one element at a time (~5 GB/s here: 72 us for 128x768, 270 us
    for 128x3072); this reads 8 rows of 8 floats as vectors, transposes them in registers (one
    `shufflevector` per output row) and stores 8-float rows, with tasks over blocks of 8 rows of
    x so that each reads 8 sequential streams (43 and 150 us). Rows and columns past the last
    whole tile are left to the caller.
    """
    if MT % 8:
        raise SparsecompError(f"the transposed input's tile height must be a multiple of 8, got {MT}")
    s = _header([("x", "M, K", "float32"), ("xt", f"NT, KP, {MT}", "float32")], ["M", "K", "KP", "NT"])
    s += """    for mb in T.parallel(M // 8):
        for kb in range(K // 8):
"""
    cols = _transpose8([f"x[mb * 8 + {j}, T.Ramp(kb * 8, 1, 8)]" for j in range(8)])
    for i, col in enumerate(cols):
        s += f"            xt[mb // {MT // 8}, kb * 8 + {i}, T.Ramp(mb % {MT // 8} * 8, 1, 8)] = {col}\n"
    return s


def kernel_source(fmt: str, params: dict, index_dtype: str = "uint16") -> str:
    """TVMScript text (without the import line; T is the tirx namespace) of one kernel."""
    mode = "mm" if params.get("mt", 0) else "mv"
    perm = bool(params.get("perm", False))
    if params.get("act") is not None and mode == "mv":
        raise SparsecompError(f"activation epilogues exist for the M > 1 kernels only (params {params})")
    gen = {
        ("csr", "mv"): lambda: _csr_mv(params, index_dtype),
        ("csr", "mm"): lambda: _csr_mm(params, index_dtype),
        ("sell", "mv"): lambda: (_sell_delta_mv(params, perm) if params.get("scheme") == "delta"
                                 else _sell_mv(params, index_dtype, perm)),
        ("sell", "mm"): lambda: _sell_mm(params, index_dtype, perm),
        ("bsr", "mv"): lambda: _bsr_mv(params, index_dtype),
        ("bsr", "mm"): lambda: _bsr_mm(params, index_dtype),
        ("nm", "mv"): lambda: {"perm": _nm_perm_mv, "perm4": _nm_perm4_mv}.get(
            params.get("scheme"), lambda q: _nm_mv(q, index_dtype))(params),
        ("nm", "mm"): lambda: _nm_mm(params, index_dtype),
    }.get((fmt, mode))
    if gen is None:
        raise SparsecompError(f"no TIR kernel for format {fmt!r}", hint="formats: csr, sell, bsr, nm")
    return gen()
