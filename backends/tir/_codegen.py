"""TIR script text for every (format, variant): the kernels themselves.

A kernel is generated as TVMScript *text* (parsed with `tvm.script.from_source`), because the
text is then also the disk-cache key: any change to a template changes the hash and rebuilds.
All sizes (N, K, nnz, M, slices, blocks) are symbolic `T.int32()` vars bound from the arguments,
so one compiled kernel serves every layer of that format and variant.

Two modes per format:
- "mv" (M = 1, memory bound): parallel over rows / slices / block rows; the vector lane runs
  along contiguous stored values; x is read by gather, either LLVM's scalarised gather ("sw") or
  the AVX2 `vgatherdps` intrinsic ("hw"); U independent accumulator sets hide FMA latency.
- "mm" (M > 1): x is passed transposed and padded, xt[Kp, Mp], so that for each stored weight
  the inner loop is one broadcast FMA over a contiguous tile of MT rows of x; U independent
  accumulator sets (consecutive nonzeros go to different sets) hide FMA latency. The weights
  are read once per MT-tile from L1/L2 (the row's entries are reused across the M tiles).

Argument conventions (every kernel): inputs first, then `bias[N]`, then the output.
  mv: x[Kp], <format arrays>, bias[N], y[N]
  mm: xt[Kp, Mp], <format arrays>, bias[N], y[Mp, N]   (Mp a multiple of MT; rows >= M ignored)
Kp is K padded to the format's column granularity (BSR: blocks of c; N:M: groups of m).

Why some things look odd:
- Scratch accumulators are `T.alloc_buffer` in the default ("global") scope: inside a parallel
  loop, TVM 0.27 turns "local" scope and `name: T.int32 = ...` scalars into
  TVMBackendAllocWorkspace calls (a heap allocation per row, 3x slower); a small global-scope
  buffer becomes an LLVM stack alloca that SROA promotes to registers. Scalars use `T.Bind`.
- The hardware gather is the AVX2 intrinsic (8 lanes); it runs on every AVX2 and AVX-512 CPU.
"""

from __future__ import annotations

from sparsecomp.errors import SparsecompError

__all__ = ["kernel_source", "arg_names"]

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


def _gather(x: str, V: int, gather: str, idx_expr_v: str, ib: str) -> tuple[str, str]:
    """(statements, vector expr) reading x at V indices; idx_expr_v uses loop var `v`.

    "sw": the expression is used inside a T.vectorized loop over v (LLVM scalarises the loads).
    "hw": indices go to a small int32 scratch `ib`, then one vgatherdps (8 lanes).
    """
    if gather == "hw":
        if V != 8:
            raise SparsecompError(f"hw gather is 8 lanes (AVX2), got vec={V}")
        pre = f"for v in T.vectorized({V}):\n    {ib}[v] = {idx_expr_v}\n"
        expr = (
            f'T.call_llvm_pure_intrin("float32x8", "llvm.x86.avx2.gather.d.ps.256", '
            f"T.Broadcast(T.float32(0), 8), T.address_of({x}[0]), {ib}[T.Ramp(0, 1, 8)], "
            f'T.Broadcast(T.reinterpret("float32", T.int32(-1)), 8), T.int8(4))'
        )
        return pre, expr
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


def _bsr_mv(p: dict, idt: str) -> str:
    r, c = p["block"]
    U = p["unroll"]
    scheme = p["scheme"]
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


# ------------------------------------------------------------------------------------------------
# M > 1: xt[Kp, Mp], y[Mp, N]


def _mm_row_loop(MT: int, U: int, count: str, val: str, colx: str, dst_row: str, bias: str) -> str:
    """Inner part for one output row: loops over M tiles and the row's `count` entries.

    `val` / `colx` are expressions of the entry number `j` (0-based within the row).
    """
    UM = U * MT
    s = f"""for mt in range(MP // {MT}):
    acc = T.alloc_buffer(({UM},), "float32")
    for q in T.vectorized({UM}):
        acc[q] = T.float32(0)
    for jb in range({count} // {U}):
"""
    for u in range(U):
        j = f"(jb * {U} + {u})"
        s += f"""        c{u} = T.Bind({colx.format(j=j)})
        w{u} = T.Bind({val.format(j=j)})
        for q in T.vectorized({MT}):
            acc[{u * MT} + q] = acc[{u * MT} + q] + w{u} * xt[c{u}, mt * {MT} + q]
"""
    if U > 1:
        s += f"""    for j in range({count} // {U} * {U}, {count}):
        ct = T.Bind({colx.format(j="j")})
        wt = T.Bind({val.format(j="j")})
        for q in T.vectorized({MT}):
            acc[q] = acc[q] + wt * xt[ct, mt * {MT} + q]
    for q in T.vectorized({MT}):
        acc[q] = acc[q] + {" + ".join(f"acc[{u * MT} + q]" for u in range(1, U))}
"""
    s += f"""    for q in range({MT}):
        y[mt * {MT} + q, {dst_row}] = acc[q] + {bias}
"""
    return s


def _mm_header(args_mid: list[tuple[str, str, str]], sizes: list[str], kname: str = "KP") -> str:
    s = _header([("xt", f"{kname}, MP", "float32")] + args_mid + [("bias", "N", "float32"), ("y", "MP, N", "float32")], sizes + ["MP"])
    return s


def _csr_mm(p: dict, idt: str) -> str:
    MT, U = p["mt"], p["unroll"]
    s = _mm_header([("vals", "NNZ", "float32"), ("col", "NNZ", idt), ("ptr", "N + 1", "int32")], ["N", "KP", "NNZ"])
    body = """
for r in T.parallel(N):
    s = T.Bind(ptr[r])
    cnt = T.Bind(ptr[r + 1] - s)
""" + _ind(_mm_row_loop(MT, U, "cnt", "vals[s + {j}]", 'T.Cast("int32", col[s + {j}])', "r", "bias[r]"), 4)
    return s + _ind(body, 4)


def _sell_mm(p: dict, idt: str, perm: bool) -> str:
    C, MT, U = p["slice_height"], p["mt"], p["unroll"]
    mid = [("vals", "TOT", "float32"), ("col", "TOT", idt), ("sptr", "NSP", "int32")]
    if perm:
        mid.append(("perm", "N", "int32"))
    s = _mm_header(mid, ["N", "KP", "TOT", "NSP"])
    row = f"sl * {C} + i"
    dst = f"perm[{row}]" if perm else row
    body = f"""
for sl in T.parallel(NSP - 1):
    p0 = T.Bind(sptr[sl])
    w = T.Bind((sptr[sl + 1] - p0) // {C})
    for i in range({C}):
        if {row} < N:
""" + _ind(_mm_row_loop(MT, U, "w", f"vals[p0 + {{j}} * {C} + i]", f'T.Cast("int32", col[p0 + {{j}} * {C} + i])', dst, f"bias[{dst}]"), 12)
    return s + _ind(body, 4)


def _nm_mm(p: dict, idt: str) -> str:
    n, m, MT, U = p["n"], p["m"], p["mt"], p["unroll"]
    s = _mm_header([("vals", "NV", "float32"), ("idx", "NV", "uint8")], ["N", "KP", "NV"])
    body = """
GN = T.Bind(NV // N)
for r in T.parallel(N):
""" + _ind(_mm_row_loop(MT, U, "GN", "vals[r * GN + {j}]", f'{{j}} // {n} * {m} + T.Cast("int32", idx[r * GN + {{j}}])', "r", "bias[r]"), 4)
    return s + _ind(body, 4)


def _bsr_mm(p: dict, idt: str) -> str:
    """values [nnzb, c, r] ("cr"); per block row and M tile, acc[r, MT]."""
    r, c = p["block"]
    MT = p["mt"]
    s = _mm_header([("vals", "NV", "float32"), ("col", "NNZB", idt), ("bptr", "NBP", "int32")], ["N", "KP", "NNZB", "NBP", "NV"])
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
                        acc[i * {MT} + q] = acc[i * {MT} + q] + wv * xt[xb + cc, mt * {MT} + q]
        for i in range({r}):
            if br * {r} + i < N:
                for q in range({MT}):
                    y[mt * {MT} + q, br * {r} + i] = acc[i * {MT} + q] + bias[br * {r} + i]
"""
    return s + _ind(body, 4)


# ------------------------------------------------------------------------------------------------


def kernel_source(fmt: str, params: dict, index_dtype: str = "uint16") -> str:
    """TVMScript text (without the import line; T is the tirx namespace) of one kernel."""
    mode = "mm" if params.get("mt", 0) else "mv"
    perm = bool(params.get("perm", False))
    gen = {
        ("csr", "mv"): lambda: _csr_mv(params, index_dtype),
        ("csr", "mm"): lambda: _csr_mm(params, index_dtype),
        ("sell", "mv"): lambda: _sell_mv(params, index_dtype, perm),
        ("sell", "mm"): lambda: _sell_mm(params, index_dtype, perm),
        ("bsr", "mv"): lambda: _bsr_mv(params, index_dtype),
        ("bsr", "mm"): lambda: _bsr_mm(params, index_dtype),
        ("nm", "mv"): lambda: _nm_mv(params, index_dtype),
        ("nm", "mm"): lambda: _nm_mm(params, index_dtype),
    }.get((fmt, mode))
    if gen is None:
        raise SparsecompError(f"no TIR kernel for format {fmt!r}", hint="formats: csr, sell, bsr, nm")
    return gen()


def arg_names(fmt: str, params: dict) -> list[str]:
    """Names of the format arrays a kernel takes between x and bias, in order."""
    perm = bool(params.get("perm", False))
    return {
        "csr": ["vals", "col", "ptr"],
        "sell": ["vals", "col", "sptr"] + (["perm"] if perm else []),
        "bsr": ["vals", "col", "bptr"],
        "nm": ["vals", "idx"],
    }[fmt]
