"""TIR sparse linear kernels (sparsecomp.backends.tir) against `x @ W.T + b`.

Every format x a few variants, at M = 1 and at M > 1 (not a multiple of the M tile), on odd
shapes (not divisible by blocks, slice heights or N:M groups), with all-zero rows, a fully
dense and a fully zero weight, no bias, and leading batch dims. Kernels are small and shared
across tests through the in-process cache; the disk cache goes to a temporary folder.
"""

from __future__ import annotations

import pytest

pytest.importorskip("tvm")

import torch  # noqa: E402

from sparsecomp.errors import PatternError, SparsecompError  # noqa: E402
from sparsecomp.patterns import impose_pattern  # noqa: E402


@pytest.fixture(scope="module")
def tir(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("SPARSECOMP_CACHE_DIR", str(tmp_path_factory.mktemp("sccache")))
    from sparsecomp.backends import tir as mod

    if not mod.available():
        pytest.skip("TVM does not import")
    yield mod
    mp.undo()


N, K = 37, 53  # odd on purpose: no block, slice height or N:M group divides them


def _weights(kind: str, pattern: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(hash((kind, pattern)) % 2**31)
    w = torch.randn(N, K, generator=g)
    if kind == "zero":
        return torch.zeros(N, K)
    if kind == "dense":
        return w
    w = impose_pattern(w, pattern)
    w[[0, 5, 6, 36]] = 0  # all-zero rows, including the first and the last
    return w


def _check(tir, fmt, params, w, M, bias=True, lead=()):
    g = torch.Generator().manual_seed(M)
    x = torch.randn(*lead, M, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    lin = tir.make_linear(fmt, w, params)
    y = lin(x, b)
    ref = torch.nn.functional.linear(x, w, b)
    if params.get("act") == "gelu":
        ref = torch.nn.functional.gelu(ref)
    assert y.shape == ref.shape and y.dtype == torch.float32 and y.is_contiguous()
    scale = max(ref.abs().max().item(), 1e-6)
    err = (y - ref).abs().max().item()
    assert err <= 1e-4 * scale, f"{fmt} {params} M={M}: max err {err:.3e} (scale {scale:.3e})"


MV = {
    "csr": [{"vec": 8, "unroll": 2, "gather": "hw"}, {"vec": 4, "unroll": 4, "gather": "sw"}],
    "sell": [{"slice_height": 8, "vec": 8, "gather": "hw"}, {"slice_height": 16, "vec": 8, "unroll": 2, "gather": "sw"},
             {"slice_height": 32, "vec": 8, "sigma": 64, "gather": "sw"},
             # uint8 column deltas, lanes over 8 rows
             {"scheme": "delta", "slice_height": 8, "unroll": 2, "gather": "hw", "sigma": 16},
             {"scheme": "delta", "slice_height": 16, "unroll": 3, "gather": "sw"},
             {"scheme": "delta", "slice_height": 32, "unroll": 1, "gather": "hw", "sigma": 64},
             # software prefetch; the AVX-512 gather, 16 rows per vector
             {"scheme": "delta", "slice_height": 32, "unroll": 1, "gather": "hw", "sigma": 64, "prefetch": 256},
             {"scheme": "delta", "slice_height": 16, "unroll": 1, "gather": "hw16", "sigma": 64, "prefetch": 256},
             {"scheme": "delta", "slice_height": 32, "unroll": 2, "gather": "hw16", "prefetch": 16}],
    "nm": [{"n": 2, "m": 4, "vec": 8, "unroll": 2, "gather": "hw"}, {"n": 2, "m": 4, "vec": 8, "unroll": 1, "gather": "sw"},
           {"n": 4, "m": 8, "vec": 4, "unroll": 2, "gather": "sw"}, {"n": 3, "m": 8, "vec": 8, "unroll": 1, "gather": "sw"},
           # gather-free permute kernel (AVX2): packed metadata (n even), one slot per byte (n odd), m = 2/4/8
           {"n": 2, "m": 4, "scheme": "perm", "unroll": 1, "gather": "hw"}, {"n": 2, "m": 4, "scheme": "perm", "unroll": 4, "gather": "hw"},
           {"n": 3, "m": 8, "scheme": "perm", "unroll": 2, "gather": "hw"}, {"n": 1, "m": 2, "scheme": "perm", "unroll": 3, "gather": "hw"},
           # 2-bit positions, vpermilps: two groups per byte (2:4), four (1:4)
           {"n": 2, "m": 4, "scheme": "perm4", "unroll": 2, "gather": "hw"}, {"n": 1, "m": 4, "scheme": "perm4", "unroll": 3, "gather": "hw"}],
    "bsr": [{"block": (16, 1), "scheme": "col", "unroll": 2}, {"block": (1, 16), "scheme": "flat", "unroll": 2},
            {"block": (4, 4), "scheme": "flat", "unroll": 1}, {"block": (4, 4), "scheme": "col", "unroll": 4},
            {"block": (32, 32), "scheme": "col", "unroll": 1}, {"block": (3, 5), "scheme": "flat", "unroll": 2},
            {"block": (3, 5), "scheme": "col", "unroll": 1},
            # software prefetch of the blocks ahead (all lines of a step's blocks, and the columns)
            {"block": (16, 1), "scheme": "col", "unroll": 1, "prefetch": 128}, {"block": (4, 4), "scheme": "col", "unroll": 2, "prefetch": 3},
            {"block": (3, 5), "scheme": "col", "unroll": 1, "prefetch": 7}],
}
MM = {
    "csr": [{"mt": 8, "unroll": 4}, {"mt": 16, "unroll": 1}, {"mt": 8, "unroll": 2, "rb": 8}, {"mt": 16, "unroll": 1, "rb": 5},
            {"mt": 16, "unroll": 2, "rb": 16, "chunks": 3}, {"mt": 8, "unroll": 1, "rb": 8, "chunks": 2},
            # software prefetch of values and columns ahead (past a row's end: the next rows')
            {"mt": 16, "unroll": 4, "rb": 32, "chunks": 2, "prefetch": 512}, {"mt": 8, "unroll": 3, "rb": 8, "prefetch": 16},
            # column panels (K = 53: several panels, the last partial; one panel; uint16 columns past 256)
            {"mt": 16, "unroll": 2, "rb": 8, "kb": 16, "chunks": 2}, {"mt": 8, "unroll": 1, "rb": 5, "kb": 20},
            {"mt": 16, "unroll": 2, "rb": 16, "kb": 300, "chunks": 3, "prefetch": 16}],
    "sell": [{"slice_height": 8, "mt": 8, "unroll": 2}, {"slice_height": 16, "sigma": 32, "mt": 8, "unroll": 1}],
    "nm": [{"n": 2, "m": 4, "mt": 8, "unroll": 2}, {"n": 4, "m": 8, "mt": 16, "unroll": 1}],
    "bsr": [{"block": (16, 1), "mt": 8}, {"block": (4, 4), "mt": 16}, {"block": (3, 5), "mt": 8}],
}


def _pattern(fmt, params):
    if fmt == "nm":
        return f"{params['n']}:{params['m']}"
    if fmt == "bsr":
        r, c = params["block"]
        return f"block:{r}x{c}:0.6"
    return "unstructured:0.7"


def _hw_ok(tir, params):
    need = {"hw": "avx2", "hw16": "avx512f"}.get(params.get("gather"))
    return need is None or tir._target.has_feature(need)


@pytest.mark.parametrize("fmt,params", [(f, p) for f, ps in MV.items() for p in ps], ids=str)
def test_mv(tir, fmt, params):
    if not _hw_ok(tir, params):
        pytest.skip(f"this CPU has no {'AVX-512' if params['gather'] == 'hw16' else 'AVX2'} gather")
    w = _weights("sparse", _pattern(fmt, params))
    _check(tir, fmt, params, w, 1)
    _check(tir, fmt, params, w, 1, bias=False, lead=(2,))  # leading dims, M = 1 per row
    _check(tir, fmt, params, _weights("zero", ""), 1)  # output = bias
    if fmt != "nm":  # a dense weight is not N:M
        _check(tir, fmt, params, _weights("dense", ""), 1)


@pytest.mark.parametrize("fmt,params", [(f, p) for f, ps in MM.items() for p in ps], ids=str)
def test_mm(tir, fmt, params):
    w = _weights("sparse", _pattern(fmt, params))
    _check(tir, fmt, params, w, 19)  # not a multiple of the M tile
    _check(tir, fmt, params, w, 1)
    _check(tir, fmt, params, w, 5, bias=False, lead=(3,))
    _check(tir, fmt, params, _weights("zero", ""), 9)
    if fmt != "nm":
        _check(tir, fmt, params, _weights("dense", ""), 9)


@pytest.mark.parametrize("fmt,params", [(f, ps[-1]) for f, ps in MM.items()] + [("csr", MM["csr"][0]), ("csr", MM["csr"][-3])], ids=str)
def test_mm_gelu_epilogue(tir, fmt, params):
    """An M > 1 kernel with `act="gelu"` computes gelu(x @ W.T + b) (erf form), with the same
    edge cases as test_mm; without the epilogue the same kernel output does not match."""
    params = {**params, "act": "gelu"}
    w = _weights("sparse", _pattern(fmt, params))
    _check(tir, fmt, params, w, 19)
    _check(tir, fmt, params, w, 1)
    _check(tir, fmt, params, _weights("zero", ""), 9)  # gelu(bias)
    x = torch.randn(19, K) * 4  # wide range: both tails of erf
    plain = tir.make_linear(fmt, w, {k: v for k, v in params.items() if k != "act"})(x)
    fused = tir.make_linear(fmt, w, params)(x)
    ref = torch.nn.functional.gelu(torch.nn.functional.linear(x, w))
    assert (fused - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert (plain - ref).abs().max() > 1e-2 * ref.abs().max()  # the epilogue is really applied


def test_epilogue_errors(tir):
    from sparsecomp.backends.tir import _codegen

    with pytest.raises(SparsecompError, match="M > 1 kernels only"):
        _codegen.kernel_source("csr", {"mt": 0, "act": "gelu", "vec": 8, "unroll": 1, "gather": "sw"})
    with pytest.raises(SparsecompError, match="no kernel epilogue for activation 'silu'"):
        _codegen.kernel_source("csr", {"mt": 8, "unroll": 1, "act": "silu"})


def _logical(xt: torch.Tensor) -> torch.Tensor:
    """xt [mp / mt, kp, mt] (the mm kernels' tiles) as the plain transpose [kp, mp]."""
    nt, kp, mt = xt.shape
    return xt.permute(1, 0, 2).reshape(kp, nt * mt)


@pytest.mark.parametrize("M,K,kp,mp,mt", [(16, 24, 24, 16, 8), (16, 24, 24, 16, 16), (19, 53, 56, 32, 16), (19, 53, 56, 32, 8),
                                          (7, 53, 53, 8, 8), (9, 5, 8, 16, 8), (20, 5, 5, 24, 8), (30, 16, 16, 64, 32),
                                          (128, 768, 768, 128, 32), (128, 768, 768, 128, 8)])
def test_transpose_for_mm_kernels(tir, M, K, kp, mp, mt):
    """x [M, K] -> xt [mp / mt, kp, mt] (xt[m // mt, k, m % mt] = x[m, k]): whole 8x8 tiles by the
    TIR kernel, ragged edges by torch, zero padding."""
    from sparsecomp.backends.tir._linear import _transposed

    x = torch.randn(M, K)
    xt = _transposed(x, x, kp, mp, mt)
    assert tuple(xt.shape) == (mp // mt, kp, mt) and xt.is_contiguous()
    want = torch.zeros(kp, mp)
    want[:K, :M] = x.t()
    assert torch.equal(_logical(xt), want)
    if mp > mt:  # read as one [kp, mp] block (the layout before tiles), the same memory is wrong
        assert not torch.equal(xt.reshape(kp, mp), want)
    strided = torch.randn(K, M).t()  # a non-contiguous input is copied, not misread
    assert torch.equal(_logical(_transposed(strided, strided, kp, mp, mt))[:K, :M], strided.t())


def test_transpose_rejects_tiles_that_are_not_multiples_of_8(tir):
    from sparsecomp.backends.tir._codegen import transpose_source

    with pytest.raises(SparsecompError, match="multiple of 8"):
        transpose_source(12)


def test_transposed_input_is_reused_only_while_unchanged(tir):
    """Inside a forward, layers reading one tensor in a row (query, key, value) share its transpose;
    a changed tensor (in place, or another one) is transposed again."""
    from sparsecomp.backends.tir._linear import _transposed

    x = torch.randn(16, 32)
    tir.begin_transpose_reuse()
    try:
        first = _transposed(x, x, 32, 16, 8)
        assert _transposed(x, x.reshape(-1, 32), 32, 16, 8) is first  # same tensor, untouched: reused
        assert _transposed(x, x, 32, 32, 8) is not first  # other padding: not reused
        assert _transposed(x, x, 32, 16, 16) is not first  # other tile height: not reused
        again = _transposed(x, x, 32, 16, 8)
        x.mul_(2)  # in place: the version counter moves
        assert not torch.equal(_transposed(x, x, 32, 16, 8), again)
        assert torch.equal(_logical(_transposed(x, x, 32, 16, 8)), x.t())
        y = x.clone()
        assert _transposed(y, y, 32, 16, 8) is not _transposed(x, x, 32, 16, 8)
    finally:
        tir.end_transpose_reuse()
    assert _transposed(x, x, 32, 16, 8) is not _transposed(x, x, 32, 16, 8)  # outside a forward: never


def test_input_refilled_through_numpy_between_calls(tir):
    """A caller refilling one input buffer through numpy (the version counter does not move) gets
    the new values' result: transposes are never reused across calls of a lowered model."""
    import torch.nn as nn

    import sparsecomp as sc
    from sparsecomp import patterns

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 48)).eval()
    patterns.impose(m, "unstructured:0.9")
    buf = torch.randn(16, 64)
    cm = sc.compile(m, (buf,), kernels="tir-csr", max_seconds_per_layer=0.02)
    assert "mt=" in cm.report.rows[0]["kernel"]  # an mm kernel: it reads x transposed
    with torch.no_grad():
        first = cm.gm(buf)
        buf.numpy()[:] = torch.randn(16, 64).numpy()
        second = cm.gm(buf)
        assert not torch.allclose(first, second)
        assert torch.allclose(second, m(buf), atol=1e-4)


def test_sell_delta_long_gaps(tir):
    # gaps over 255 columns need zero-valued filler entries (and the first entry's gap from
    # column 0 too); a wide, very sparse weight has many, some several fillers long
    g = torch.Generator().manual_seed(7)
    w = torch.randn(21, 2000, generator=g)
    w[torch.rand(21, 2000, generator=g) > 0.004] = 0
    w[3] = 0
    w[4, 1999] = 1.5  # only the very last column: 7 fillers before it
    w[5, :] = 0
    w[5, 0] = 2.0  # only column 0 (delta 0)
    x = torch.randn(2, 2000, generator=g)
    for params in ({"scheme": "delta", "slice_height": 8, "unroll": 1, "gather": "hw"},
                   {"scheme": "delta", "slice_height": 16, "unroll": 2, "gather": "sw", "sigma": 8},
                   {"scheme": "delta", "slice_height": 16, "unroll": 1, "gather": "hw16", "prefetch": 64}):
        if not _hw_ok(tir, params):
            continue
        y = tir.make_linear("sell", w, params)(x)
        ref = x @ w.t()
        assert (y - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


def test_mv_kernel_many_rows(tir):
    w = _weights("sparse", "unstructured:0.7")
    _check(tir, "csr", MV["csr"][0], w, 7)  # an M = 1 kernel applied row by row


def test_candidates_are_valid(tir):
    cases = [("csr", {}), ("sell", {}), ("bsr", {"block": (16, 1)}), ("bsr", {"block": (4, 4)}), ("nm", {"n": 2, "m": 4})]
    for M in (1, 16, 128):
        for fmt, kw in cases:
            cands = tir.candidates(fmt, 4096, 4096, M, **kw)
            # M = 1 SELL: every variant is kept; CSR at M > 32: two column-panel variants on top
            assert 1 <= len(cands) <= {("sell", 1): 11, ("csr", 128): 10}.get((fmt, M), 8)
            assert any(p.get("gather") == "hw16" for p in cands) == ((fmt, M) == ("sell", 1) and tir._target.has_feature("avx512f"))
            for p in cands:
                tir._codegen.kernel_source(fmt, tir._build._normalise(fmt, p))  # generates
    # one of each actually runs on a matching weight
    w = _weights("sparse", "block:16x1:0.6")
    _check(tir, "bsr", tir.candidates("bsr", N, K, 1, block=(16, 1))[0], w, 1)


def test_sell_delta_prefetch_and_gather_width_in_the_source(tir):
    base = {"scheme": "delta", "slice_height": 32, "unroll": 1, "gather": "hw"}
    src = lambda p: tir._codegen.kernel_source("sell", tir._build._normalise("sell", p))  # noqa: E731
    assert "llvm.prefetch" not in src(base)
    assert src({**base, "prefetch": 256}).count("llvm.prefetch") == 32 * 4 // 64 + 1  # one per 64-byte line of values, one for deltas
    wide = src({**base, "gather": "hw16"})
    assert "avx512.mask.gather.dps.512" in wide and "avx2.gather" not in wide
    with pytest.raises(SparsecompError, match="multiple of 16"):
        src({**base, "slice_height": 8, "gather": "hw16"})


def test_bsr_prefetch_in_the_source(tir):
    src = lambda p: tir._codegen.kernel_source("bsr", tir._build._normalise("bsr", p))  # noqa: E731
    base = {"block": (16, 1), "scheme": "col", "unroll": 1}
    assert "llvm.prefetch" not in src(base)
    assert src({**base, "prefetch": 128}).count("llvm.prefetch") == 2  # the block's one line of values, its column
    assert src({**base, "block": (8, 8), "unroll": 2, "prefetch": 4}).count("llvm.prefetch") == 2 * 64 // 16 + 1


def test_csr_panel_storage_order(tir):
    """Entries ordered (block of rb rows, panel of kb columns, row, column), columns local to the
    panel, one pointer per (block, panel, row) with the last block's missing rows empty."""
    w = torch.tensor([[1.0, 0, 2, 3, 0], [0, 4, 0, 0, 5], [6, 0, 0, 7, 0]])
    prep = tir.prepare("csr", w, {"mt": 8, "rb": 2, "kb": 2})
    vals, col, ptr = prep.arrays
    # block 0 (rows 0-1): panel 0 -> row 0: (0, 1.0), row 1: (1, 4.0); panel 1 -> row 0: (2, 2.0), (3, 3.0);
    # panel 2 -> row 1: (4, 5.0). Block 1 (row 2, and a missing row): panel 0 -> 6.0; panel 1 -> 7.0
    assert vals.tolist() == [1.0, 4.0, 2.0, 3.0, 5.0, 6.0, 7.0]
    assert col.dtype == torch.uint8 and col.tolist() == [0, 1, 0, 1, 0, 0, 1]
    assert ptr.tolist() == [0, 1, 2, 4, 4, 4, 5, 6, 6, 7, 7, 7, 7]
    assert prep.params["index_dtype"] == "uint8"
    assert tir.prepare("csr", w, {"mt": 8, "rb": 2, "kb": 257}).params["index_dtype"] == "uint16"
    with pytest.raises(SparsecompError, match="M > 1 kernel"):
        tir.prepare("csr", w, {"rb": 2, "kb": 2})  # no M tile: the one-row CSR kernel reads plain CSR


def test_csr_panel_kernel_needs_its_own_storage(tir):
    """A panelled weight and a kernel of another panel width or row block (or none) do not mix:
    the same entries in another order would give wrong sums, so it is an error."""
    w = _weights("sparse", "unstructured:0.7")
    prep = tir.prepare("csr", w, {"mt": 8, "rb": 8, "kb": 16})
    for other in ({"kb": 32}, {"rb": 16}, {"kb": None}):
        with pytest.raises(SparsecompError, match="does not match"):
            tir.SparseLinearKernel(prep, tir.build("csr", {**prep.params, **other}))
    plain = tir.prepare("csr", w, {"mt": 8, "rb": 8})
    tir.SparseLinearKernel(plain, tir.build("csr", {**plain.params, "rb": 32}))  # rb alone changes no storage


def test_mismatched_kernel_and_storage(tir):
    w = _weights("sparse", "unstructured:0.7")
    prep = tir.prepare("sell", w, {"slice_height": 8, "vec": 8})
    other = tir.build("sell", {**prep.params, "slice_height": 16})
    with pytest.raises(SparsecompError, match="does not match"):
        tir.SparseLinearKernel(prep, other)
    with pytest.raises(SparsecompError, match="features"):
        tir.make_linear("csr", w, MV["csr"][1])(torch.randn(2, K + 1))


def test_nm_rejects_nonconforming_weight(tir):
    with pytest.raises(PatternError):
        tir.prepare("nm", torch.randn(N, K), {"n": 2, "m": 4})


def test_unknown_format(tir):
    with pytest.raises(SparsecompError, match="no TIR kernel"):
        tir.prepare("coo", torch.randn(4, 4), {})


def test_corrupt_disk_cache_is_rebuilt(tir, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSECOMP_CACHE_DIR", str(tmp_path))
    params = {"vec": 4, "unroll": 1, "gather": "sw", "index_dtype": "uint16"}
    tir.clear_memory_cache()
    k = tir.build("csr", params)
    assert k.path is not None and k.path.startswith(str(tmp_path))
    so = tmp_path / "kernels" / f"{k.key}.so"
    good = so.read_bytes()
    # damage it through a new inode: the old one is still mapped by this process (dlopen), and
    # writing into a mapped library in place would crash us rather than the code under test
    bad = tmp_path / "bad.so"
    bad.write_bytes(b"\x7fELF garbage" + good[100:200])
    bad.replace(so)
    tir.clear_memory_cache()
    k2 = tir.build("csr", params)
    assert k2.key == k.key and so.read_bytes() != b"\x7fELF garbage" + good[100:200]
    w = _weights("sparse", "unstructured:0.7")
    prep = tir.prepare("csr", w, params)
    x = torch.randn(K)
    torch.testing.assert_close(tir.SparseLinearKernel(prep, k2)(x), w @ x, rtol=1e-4, atol=1e-4)
    # a missing metadata file is a miss too
    (tmp_path / "kernels" / f"{k.key}.json").unlink()
    tir.clear_memory_cache()
    assert tir.build("csr", params).path == str(so)
    tir.clear_memory_cache()  # later tests rebuild in their own cache dir


def test_threads(tir):
    n = tir.get_num_threads()
    tir.set_num_threads(1)
    assert tir.get_num_threads() == 1
    w = _weights("sparse", "unstructured:0.7")
    _check(tir, "csr", MV["csr"][1], w, 1)
    tir.set_num_threads(n)
    assert tir.get_num_threads() == n
    with pytest.raises(SparsecompError):
        tir.set_num_threads(0)


def test_target_is_detected(tir):
    t = tir.host_target()
    assert t.kind.name == "llvm" and "mcpu" in t.attrs
    assert tir.vector_width() in (4, 8, 16)


@pytest.mark.parametrize("order,env,want", [
    ("sparsecomp, torch", {"SPARSECOMP_TIR_POOL": "tvm"}, "30000"),  # torch's spin shortened by sparsecomp: TVM's yielding spin pays
    ("torch, sparsecomp", {}, "0"),  # torch spins 300,000 pause loops: TVM's workers sleep at once
    ("torch, sparsecomp", {"GOMP_SPINCOUNT": "5000"}, "30000"),  # a user's short spin counts too
    ("sparsecomp, torch", {"GOMP_SPINCOUNT": "300000"}, "0"),
    ("sparsecomp, torch", {"TVM_THREAD_POOL_SPIN_COUNT": "7"}, "7"),  # a user's own setting is kept
])
def test_tvm_spin_follows_torchs_openmp_spin(tir, order, env, want):
    import os
    import subprocess
    import sys

    drop = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "TVM_THREAD_POOL_SPIN_COUNT")
    code = (f"import {order}, os; from sparsecomp.backends import tir; tir.available(); "
            "print(os.environ['TVM_THREAD_POOL_SPIN_COUNT'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**{k: v for k, v in os.environ.items() if k not in drop}, **env})
    assert out.stdout.strip() == want


def test_one_row_outputs_are_never_reused(tir):
    """The M = 1 path hands out stocked outputs (`OutputStock`): each call returns a tensor no
    earlier call returned, so results a caller keeps are never overwritten, past a refill too;
    and a bias given to calls is bound once but in-place changes to it are still seen."""
    w = _weights("sparse", "unstructured:0.8")
    b = torch.randn(N)
    lin = tir.make_linear("sell", w, tir.candidates("sell", N, K, 1)[0])
    xs = [torch.randn(1, K, generator=torch.Generator().manual_seed(i)) for i in range(20)]
    ys = [lin(x, b) for x in xs]  # 20 calls: more than one stock batch (8)
    assert len({y.data_ptr() for y in ys}) == len(ys)
    for x, y in zip(xs, ys):
        assert y.shape == (1, N) and torch.allclose(y, torch.nn.functional.linear(x, w, b), atol=1e-5)
    y3 = lin(xs[0].reshape(1, 1, K), b)  # leading dims: same values, shaped like the input
    assert y3.shape == (1, 1, N) and torch.allclose(y3[0], ys[0], atol=1e-6)
    with torch.no_grad():
        b.add_(1.0)  # in place: the bound bias is the same memory
    assert torch.allclose(lin(xs[1], b), ys[1] + 1.0, atol=1e-5)
    b2 = torch.randn(N)  # another bias tensor: converted for it, not the first one's
    assert torch.allclose(lin(xs[1], b2), torch.nn.functional.linear(xs[1], w, b2), atol=1e-5)


def test_bound_args_and_output_stock(tir):
    """`bound_args` wraps tensors once, sharing their memory (in-place writes are seen), passes
    anything else through, and keeps a tensor TVM refuses (not 64-byte aligned) as it is;
    `OutputStock` hands out distinct tensors, its TVM side being the same memory in `view`."""
    t = torch.zeros(64)
    odd = torch.zeros(65)[1:]  # 4 bytes past an aligned allocation
    bt, bodd, three = tir.bound_args(t, odd, 3)
    assert not isinstance(bt, torch.Tensor) and bodd is odd and three == 3
    t[5] = 7.0
    assert torch.from_dlpack(bt)[5].item() == 7.0
    stock = tir.OutputStock((1, 6), batch=3, view=(6,))
    pairs = [stock.take() for _ in range(7)]
    assert len({y.data_ptr() for y, _ in pairs}) == 7
    for y, yt in pairs:
        assert y.shape == (1, 6) and tuple(yt.shape) == (6,) and torch.from_dlpack(yt).data_ptr() == y.data_ptr()
