"""sparse_mlp on the torch backend: the TIR kernels against plain torch, and compile end to end.

Kernels on odd shapes (no block, chunk or row group divides them), with blocks that have no
active neuron, all neurons active, none active. Compile: exact mode (forced onto the kernels
with `kernels=`, so the test checks them whatever the timing) at batch 1, 3, 64 after compiling
at batch 1, an MLP with no zeros and one whose activations are all zero, gated and non-gated;
threshold and predictor modes against the rewritten graph on the reference op; the cache.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("tvm")

import sparsecomp as sc  # noqa: E402
from sparsecomp.api import CompiledModel  # noqa: E402
from sparsecomp.backends.torch import SparseMLP  # noqa: E402
from sparsecomp.ir import compare_outputs  # noqa: E402
from sparsecomp.screen import screen_terms  # noqa: E402

K, H, N = 37, 203, 29  # odd on purpose


@pytest.fixture(scope="module")
def mlp_kernels(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("SPARSECOMP_CACHE_DIR", str(tmp_path_factory.mktemp("sccache")))
    from sparsecomp.backends.tir import _mlp

    yield _mlp
    mp.undo()


def _close(a, b):
    ok, err, allowed = compare_outputs(a, b)
    assert ok, (err, allowed)


@pytest.mark.parametrize("act", ["relu", "relu6", "relu2"])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("bias", [-0.3, -50.0, 50.0], ids=["some", "none-active", "all-active"])
def test_up_kernel(mlp_kernels, act, gated, bias):
    from sparsecomp.dialect import MLP_ACTIVATIONS

    g = torch.Generator().manual_seed(0)
    x, w, wg = torch.randn(K, generator=g), torch.randn(H, K, generator=g), torch.randn(H, K, generator=g)
    b, bg = torch.randn(H, generator=g) + bias, torch.randn(H, generator=g) + bias
    f = MLP_ACTIVATIONS[act]
    want = f(wg @ x + bg) * (w @ x + b) if gated else f(w @ x + b)
    for rows, unroll, bs in ((1, 4, 64), (4, 1, 64), (2, 2, 16)):
        k = mlp_kernels.build_mlp_kernel("up_mv", {"act": act, "gated": gated, "rows": 1 if gated else rows, "unroll": unroll, "bs": bs})
        nb = -(-H // bs)
        hc, idx, cnt = torch.zeros(nb, bs), torch.zeros(nb, bs, dtype=torch.int32), torch.zeros(nb, dtype=torch.int32)
        k(x, w, b, *((wg, bg) if gated else ()), hc, idx, cnt)
        got = torch.zeros(H)
        for i in range(nb):
            got[idx[i, : cnt[i]].long()] = hc[i, : cnt[i]]
            assert (idx[i, : cnt[i]] // bs == i).all()  # each block lists its own rows
        assert int(cnt.sum()) == int((want != 0).sum())
        _close(got, want)


def _screened_up(mlp_kernels, x, w, b, act="relu", rows=4, unroll=2, bs=16, crows=3, terms=None, gate=None, kind="f16", vec=None):
    """Run the screened up kernel (`kind`: float16 or int8 copy; gated where `gate` = (wg, bg): the
    gate is screened; `vec`: lanes, the host's by default); returns (hidden [H] rebuilt from the
    compact lists, cnt)."""
    h = w.shape[0]
    k = mlp_kernels.build_mlp_kernel("up_mv", {"act": act, "rows": rows, "unroll": unroll, "bs": bs, "screen": kind, "crows": crows,
                                               "gated": gate is not None, **({"vec": vec} if vec else {})})
    nb = -(-h // bs)
    hc, idx, cnt = torch.zeros(nb, bs), torch.zeros(nb, bs, dtype=torch.int32), torch.zeros(nb, dtype=torch.int32)
    k(x, w, b, *(gate or ()), *(terms or screen_terms(*(gate or (w, b)), kind=kind)), hc, idx, cnt)
    got = torch.zeros(h)
    for i in range(nb):
        got[idx[i, : cnt[i]].long()] = hc[i, : cnt[i]]
        assert (idx[i, : cnt[i]] // bs == i).all()  # each block lists its own rows
    return got, cnt


@pytest.mark.parametrize("kind", ["f16", "i8"])
@pytest.mark.parametrize("act", ["relu", "relu6", "relu2"])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("bias", [-0.3, -50.0, 50.0], ids=["some", "none-active", "all-active"])
def test_screened_up_kernel(mlp_kernels, kind, act, gated, bias):
    """The float16 and int8 screens are lossless: the same active neurons and values as the plain up kernel's
    reference, on odd shapes (K below and above a vector step, H not a multiple of the rows per
    step, of the candidates per step or of the block) and group sizes; gated: the gate screened."""
    from sparsecomp.dialect import MLP_ACTIVATIONS

    g = torch.Generator().manual_seed(3)
    f = MLP_ACTIVATIONS[act]
    for k_in, h in ((K, H), (5, 3), (129, 70)):
        x, w, wg = torch.randn(k_in, generator=g), torch.randn(h, k_in, generator=g), torch.randn(h, k_in, generator=g)
        b, bg = torch.randn(h, generator=g) + (0.0 if gated else bias), torch.randn(h, generator=g) + bias
        want = f(wg @ x + bg) * (w @ x + b) if gated else f(w @ x + b)
        # (the last with 8 lanes: AVX2 hosts generate it)
        for rows, unroll, bs, crows, vec in ((4, 2, 16, 3, None), (1, 1, 8, 1, None), (2, 4, 64, 4, None), (4, 2, 16, 2, 8)):
            got, cnt = _screened_up(mlp_kernels, x, w, b, act, rows, unroll, bs, crows, gate=(wg, bg) if gated else None, kind=kind,
                                    vec=vec)
            assert int(cnt.sum()) == int(((f(wg @ x + bg) if gated else want) != 0).sum())
            _close(got, want)


@pytest.mark.parametrize("kind", ["f16", "i8"])
def test_screen_margin_is_what_keeps_a_neuron(mlp_kernels, kind):
    """A neuron whose narrow row rounds its pre-activation from just above 0 to 0 (1 + 2^-12 is
    1 in float16; in int8 both weights are +-127 steps of the row's scale): the screen's margin
    keeps it; with the margin zeroed the same kernel drops it, and the output no longer matches
    (the input that must not match)."""
    x = torch.ones(K)
    w = torch.zeros(H, K)
    w[:, 0], w[:, 1] = -1.0, -1.0  # every other neuron: -2 + 0 < 0, dropped by the screen
    w[7, 0], w[7, 1] = 1.0 + 2.0 ** -12, -1.0  # pre-activation 2^-12 > 0, float16 sum exactly 0
    b = torch.zeros(H)
    want = torch.relu(w @ x + b)
    assert int((want != 0).sum()) == 1
    got, cnt = _screened_up(mlp_kernels, x, w, b, kind=kind)
    assert int(cnt.sum()) == 1
    _close(got, want)
    *narrow, sb, sm = screen_terms(w, b, kind=kind)
    assert float(sm[7]) > 0 and float(narrow[0][7].float() @ x) == 0.0
    got, cnt = _screened_up(mlp_kernels, x, w, b, terms=(*narrow, b.clone(), torch.zeros_like(sm)), kind=kind)  # no margin at all
    assert int(cnt.sum()) == 0
    assert not compare_outputs(got, want)[0]


@pytest.mark.parametrize("kind", ["f16", "i8"])
@pytest.mark.parametrize("bias", [-0.3, -50.0, 50.0], ids=["some", "none-active", "all-active"])
def test_screen_up_mm_gated_kernel(mlp_kernels, kind, bias):
    """The M > 1 screened kernel of a gated MLP (the gate screened): h = act(x wg^T + bg) *
    (x w^T + b) for MT rows at once, on odd shapes."""
    g = torch.Generator().manual_seed(8)
    for mt in (2, 4, 8):
        k = mlp_kernels.build_mlp_kernel("screen_up_mm", {"mt": mt, "screen": kind, "gated": True})
        for k_in, h in ((K, H), (5, 3), (129, 70)):
            x, w, wg = torch.randn(mt, k_in, generator=g), torch.randn(h, k_in, generator=g), torch.randn(h, k_in, generator=g)
            b, bg = torch.randn(h, generator=g), torch.randn(h, generator=g) + bias
            gate = torch.relu(x @ wg.t() + bg)
            out, cnt = torch.full((mt, h), float("nan")), torch.zeros(-(-h // 64), dtype=torch.int32)
            k(x, w, b, wg, bg, *screen_terms(wg, bg, kind=kind), out, cnt)
            _close(out, gate * (x @ w.t() + b))
            assert int((gate != 0).any(0).sum()) <= int(cnt.sum()) <= h


@pytest.mark.parametrize("kind", ["f16", "i8"])
@pytest.mark.parametrize("bias", [-0.3, -50.0, 50.0], ids=["some", "none-active", "all-active"])
def test_screen_up_mm_kernel(mlp_kernels, kind, bias):
    """The M > 1 screened kernel: h of MT rows at once equals relu(x w^T + b) on odd shapes (zeros
    where no row's neuron is active), and cnt counts at least the neurons active in some row;
    a row with a huge value (its squares would overflow) is screened exactly too."""
    g = torch.Generator().manual_seed(6)
    for mt, vec in ((2, None), (4, None), (8, None), (4, 8)):  # (8 lanes: what AVX2 hosts generate)
        k = mlp_kernels.build_mlp_kernel("screen_up_mm", {"mt": mt, "screen": kind, **({"vec": vec} if vec else {})})
        for k_in, h in ((K, H), (5, 3), (129, 70)):
            x, w = torch.randn(mt, k_in, generator=g), torch.randn(h, k_in, generator=g)
            b = torch.randn(h, generator=g) + bias
            want = torch.relu(x @ w.t() + b)
            out, cnt = torch.full((mt, h), float("nan")), torch.zeros(-(-h // 64), dtype=torch.int32)
            k(x, w, b, *screen_terms(w, b, kind=kind), out, cnt)
            _close(out, want)
            assert int((want != 0).any(0).sum()) <= int(cnt.sum()) <= h
    x[1, 0] = 1e30  # a huge input in one row (its squares would overflow): still screened exactly
    want = torch.relu(x.double() @ w.t().double() + b.double()).float()
    k(x, w, b, *screen_terms(w, b, kind=kind), out, cnt)
    assert int((want != 0).any(0).sum()) <= int(cnt.sum())
    _close(out[0], want[0])
    _close(out[1], want[1])


@pytest.mark.parametrize("kind", ["f16", "i8"])
def test_union_with_screen_any_batch(kind, tmp_path):
    """The M > 1 union path with the screen: batches 2..8 through the screened kernel (padded to
    2 / 4 / 8 rows) or, past the measured break-even, through torch's GEMM: both equal the model;
    after a GEMM call the share the screen would let through is estimated from the active share
    and the last screened call's ratio (not the raw active share, which made calls alternate);
    more than 8 rows never take the screen; a break-even of 0 never runs it; a gated MLP's gate is
    screened."""
    from sparsecomp.backends.torch.mlp import _calibrate_crossover, _Union

    torch.manual_seed(0)
    model = Plain(-0.5).eval()
    cm = sc.compile(model, (torch.randn(1, K),), activation_sparsity="exact", kernels="tir-up+tir-down",
                    cache_dir=str(tmp_path), max_seconds_per_layer=0.05)
    (mod,) = _mlp_modules(cm)
    u = _Union(mod._w, "tir", screen=kind)
    assert u.label == f"union-tir{{rows=2,screen={kind}}}"
    _calibrate_crossover(u, torch.randn(8, K), 0.05)
    assert set(u.screen_cost) == {"gemm", "none", "all"} and 0.0 <= u.screen_max() <= 1.0
    u.cost = {"dense": 1e9, "one": 0.0, "all": 1.0}  # the union down path, whatever was measured
    calls = []
    screened = u.screened
    u.screened = lambda x2, bound=None: calls.append(x2.shape[0]) or screened(x2, bound)
    always, never = {"gemm": 1.0, "none": 0.0, "all": 1.0}, {"gemm": 0.0, "none": 1.0, "all": 2.0}
    for cost in (always, never):
        u.screen_cost = cost
        for batch in (2, 3, 5, 8, 13):
            calls.clear()
            u.frac = 0.0
            xb = torch.randn(batch, K)
            _close(u(xb), model(xb))
            assert calls == ([batch] if cost is always and batch <= 8 else [])
            if cost is always and batch <= 8:
                assert u.frac > 0.0 and u.ratio >= 1.0
    u.screen_cost = always
    u(torch.randn(4, K))  # screened: sets the ratio
    ratio, u.frac = u.ratio, 1.0  # the next call takes the GEMM
    xb = torch.randn(4, K)
    active = float((model.fc1(xb) > 0).any(0).float().mean())
    _close(u(xb), model(xb))
    assert u.frac == pytest.approx(min(1.0, active * ratio))
    gated = Gated().eval()  # the gate screened, h = act(gate) * up
    gm = sc.compile(gated, (torch.randn(1, K),), activation_sparsity="exact", kernels="tir-gated-up+tir-down",
                    cache_dir=str(tmp_path), max_seconds_per_layer=0.05)
    ug = _Union(_mlp_modules(gm)[0]._w, "tir", screen=kind)
    ug.cost, ug.screen_cost = {"dense": 1e9, "one": 0.0, "all": 1.0}, always
    for batch in (2, 3, 5, 8):
        xb = torch.randn(batch, K)
        _close(ug(xb), gated(xb))
        assert ug.frac > 0.0


@pytest.mark.parametrize("kind", ["f16", "i8"])
def test_screen_keeps_a_neuron_of_a_tiny_input(mlp_kernels, kind):
    """Inputs so small that their squares underflow (|x| ~ 1e-23): the margin still covers the
    rounding (|x|_2 is bounded from max|x| and scaled squares), in the M = 1 and M > 1 kernels: a
    pre-activation of 2.4e-27 > 0 is kept."""
    w = torch.zeros(H, K)
    w[:, 0], w[:, 1] = -1.0, -1.0
    w[7, 0], w[7, 1] = 1.0 + 2.0 ** -12, -1.0
    b = torch.zeros(H)
    x = torch.zeros(K)
    x[0], x[1] = 1e-23, 1e-23
    want = torch.relu(w.double() @ x.double()).float()
    assert want[7] > 0 and int((want != 0).sum()) == 1
    got, cnt = _screened_up(mlp_kernels, x, w, b, kind=kind)
    assert int(cnt.sum()) == 1 and got[7] > 0
    k = mlp_kernels.build_mlp_kernel("screen_up_mm", {"mt": 2, "screen": kind})
    out, cnt = torch.zeros(2, H), torch.zeros(-(-H // 64), dtype=torch.int32)
    k(torch.stack([x, x]), w, b, *screen_terms(w, b, kind=kind), out, cnt)
    assert (out[:, 7] > 0).all() and int((out != 0).sum()) == 2


@pytest.mark.parametrize("kind", ["f16", "i8"])
def test_screen_terms_bound_the_gap(mlp_kernels, kind):
    """sm[r] * |x| bounds the gap between the float32 and the narrow rows' pre-activations on
    random inputs; rows beyond float16's range (f16) or not finite are never screened out (a
    finite bound of 3e38), and the kernel stays exact on them, active or not; an all-zero row
    (an int8 row that is all residual: scale 1, wq 0) is screened like any other."""
    g = torch.Generator().manual_seed(4)
    w, b = torch.randn(H, K, generator=g) * 3, torch.randn(H, generator=g)
    w[11] = 0.0
    *narrow, sb, sm = screen_terms(w, b, kind=kind)
    assert narrow[0].dtype == {"f16": torch.float16, "i8": torch.int8}[kind] and sb.dtype == sm.dtype == torch.float32
    approx = narrow[0].double() * (narrow[1].double()[:, None] if kind == "i8" else 1.0)
    assert (sb >= b).all() and torch.isfinite(sm).all()
    for _ in range(20):
        x = torch.randn(K, generator=g) * 10
        gap = ((w.double() - approx) @ x.double()).abs()
        assert (gap <= sm.double() * x.double().norm()).all()
    w[3, 5], w[9, 0] = 1e6, float("inf")  # past float16's 65504; not finite
    *narrow, sb, sm = screen_terms(w, b, kind=kind)
    never = (sb > 1e38) & (sm == 0) & (narrow[0] == 0).all(1)
    assert never[9] and bool(never[3]) == (kind == "f16") and not never[[0, 1, 2, 4]].any()
    assert torch.isfinite(sb).all() and torch.isfinite(sm).all()
    w[9, 0] = 0.0
    x = torch.randn(K, generator=g)
    for sign in (-1.0, 1.0):  # a hugely negative pre-activation (inactive), then a hugely positive one
        w[3, 5] = sign * 1e6 * torch.sign(x[5])
        want = torch.relu(w @ x + b)
        got, cnt = _screened_up(mlp_kernels, x, w, b, kind=kind)
        assert int(cnt.sum()) == int((want != 0).sum())
        _close(got, want)


@pytest.mark.parametrize("act", ["relu", "relu6", "relu2"])
@pytest.mark.parametrize("bias", [-0.3, -50.0, 50.0], ids=["some", "none-active", "all-active"])
def test_predictor_up_kernel(mlp_kernels, act, bias):
    """pred_up_mv: the neurons the predictor selects (score > threshold), their activations, and
    only the nonzero ones listed: against the same computation in torch, on odd shapes (rank 1
    and a rank below one vector, K and H not multiples of anything), all or no neurons selected."""
    from sparsecomp.dialect import MLP_ACTIVATIONS

    g = torch.Generator().manual_seed(3)
    for k_in, h, rk in ((K, H, 11), (64, 130, 16), (5, 3, 1)):
        x, w, b = torch.randn(k_in, generator=g), torch.randn(h, k_in, generator=g), torch.randn(h, generator=g) + bias
        a, bt = torch.randn(rk, k_in, generator=g), torch.randn(rk, h, generator=g)
        scale, thr = torch.rand(h, generator=g) + 0.5, torch.randn(h, generator=g) * 0.5
        z = a @ x
        keep = (z @ bt + b) * scale > thr
        want = MLP_ACTIVATIONS[act](w @ x + b) * keep
        # panels narrower than the block and as wide as it; H not a multiple of the panel
        for bs, rows, panel, unroll in ((64, 4, 32, 1), (16, 3, 16, 2), (8, 1, 8, 1)):
            k = mlp_kernels.build_mlp_kernel("pred_up_mv", {"bs": bs, "rows": rows, "panel": panel, "unroll": unroll,
                                                            "vec": 8, "act": act})
            nb = -(-h // bs)
            hc, idx, cnt = torch.zeros(nb, bs), torch.zeros(nb, bs, dtype=torch.int32), torch.zeros(nb, dtype=torch.int32)
            k(z, mlp_kernels.predictor_panels(bt.t(), panel), b, scale, thr, x, w, b, hc, idx, cnt)
            got = torch.zeros(h)
            for i in range(nb):
                got[idx[i, : cnt[i]].long()] = hc[i, : cnt[i]]
                assert (hc[i, : cnt[i]] != 0).all()  # selected neurons that came out zero are not listed
            assert int(cnt.sum()) == int((want != 0).sum())
            _close(got, want)
    with pytest.raises(Exception, match="panel width"):
        mlp_kernels.build_mlp_kernel("pred_up_mv", {"bs": 48, "panel": 32, "vec": 8})
    with pytest.raises(Exception, match="panel width"):
        mlp_kernels.build_mlp_kernel("pred_up_mv", {"bs": 64, "panel": 12, "vec": 8})


def test_predictor_panels(mlp_kernels):
    """The panel layout the predictor kernel reads: panel p, row k, lane q holds bp[p * W + q, k];
    the padding of the last panel is zero; the dtype is kept."""
    bp = torch.arange(7 * 3, dtype=torch.float32).reshape(7, 3)
    pan = mlp_kernels.predictor_panels(bp.half(), 4)
    assert pan.shape == (2, 3, 4) and pan.dtype == torch.float16 and pan.is_contiguous()
    for r in range(7):
        assert torch.equal(pan[r // 4, :, r % 4].float(), bp[r])
    assert (pan[1, :, 3] == 0).all()
    assert not torch.equal(pan.reshape(-1).float(), bp.t().reshape(-1))  # not merely the transpose


@pytest.mark.parametrize("bias", [-0.3, -50.0, 50.0], ids=["some", "none-active", "all-active"])
def test_fused_kernels(mlp_kernels, bias):
    """exact_mv (up then down) and pred_mv (z, scores + selected up rows, down) in one call: the
    whole MLP against torch on odd shapes, both ways of summing the partials, and pred_mv with its
    predictor stored as float16 (values exactly representable: the same result as float32)."""
    from sparsecomp.dialect import MLP_ACTIVATIONS

    g = torch.Generator().manual_seed(5)
    cb = 64
    for k_in, h, n_out, rk in ((K, H, N, 11), (5, 3, 1, 1), (64, 130, 70, 16)):
        x, w, b = torch.randn(k_in, generator=g), torch.randn(h, k_in, generator=g), torch.randn(h, generator=g) + bias
        np_ = -(-n_out // cb) * cb
        wdt = torch.zeros(h, np_)
        wdt[:, :n_out] = torch.randn(h, n_out, generator=g)
        bd = torch.randn(n_out, generator=g)
        a = torch.randn(rk, k_in, generator=g).half().float()
        bp = torch.randn(h, rk, generator=g).half().float()
        scale, thr = torch.rand(h, generator=g) + 0.5, torch.randn(h, generator=g) * 0.5
        hid = MLP_ACTIVATIONS["relu"](w @ x + b)
        keep = ((bp @ (a @ x)) + b) * scale > thr
        for bs, rows, serial_sum, parts in ((64, 4, True, 4), (16, 2, False, 3), (8, 1, True, 1)):
            nb = -(-h // bs)
            hc, idx, cnt = torch.zeros(nb, bs), torch.zeros(nb, bs, dtype=torch.int32), torch.zeros(nb, dtype=torch.int32)
            down = {"rows": rows, "cb": cb, "serial_sum": serial_sum}
            # the fused kernels take x and y as one-row matrices
            part, y = torch.empty(parts, np_), torch.full((1, n_out), float("nan"))
            k = mlp_kernels.build_mlp_kernel("exact_mv", {"up": {"bs": bs, "rows": rows}, "down": down})
            k(x.reshape(1, -1), w, b, hc, idx, cnt, wdt, bd, part, y)
            _close(y[0], bd + hid @ wdt[:, :n_out])
            with pytest.raises(ValueError, match="ndim"):  # what the strategies' fallback catches
                k(x, w, b, hc, idx, cnt, wdt, bd, part, y)
            for half in (False, True):
                kp = mlp_kernels.build_mlp_kernel("pred_mv", {"z": {"half": half}, "up": {"bs": bs, "rows": rows, "half": half,
                                                                                         "panel": 8, "vec": 8}, "down": down})
                dt = torch.float16 if half else torch.float32
                y.fill_(float("nan"))
                kp(x.reshape(1, -1), a.to(dt), torch.zeros(rk), torch.empty(rk), mlp_kernels.predictor_panels(bp.to(dt), 8), b,
                   scale, thr, w, b, hc, idx, cnt, wdt, bd, part, y)
                _close(y[0], bd + (hid * keep) @ wdt[:, :n_out])
                assert int(cnt.sum()) == int(((hid * keep) != 0).sum())


def test_assemble_rejects_conflicting_arguments(mlp_kernels):
    up = mlp_kernels._up_mv_parts(mlp_kernels._normalise("up_mv", {}))
    bad = ([("hc", "NB", "float32")], ["NB"], "pass\n")
    with pytest.raises(Exception, match="fused kernel: argument hc"):
        mlp_kernels._assemble(up, bad)


def test_dense_mv_kernel(mlp_kernels):
    """The plain dense GEMV (bench_mlp's TIR-dense reference) on odd shapes: K below and above one
    unrolled vector step, H not a multiple of the rows per step nor of the block, a zero weight."""
    g = torch.Generator().manual_seed(2)
    for k_in, h in ((K, H), (5, 3), (64, 1), (129, 65)):
        x, w, b = torch.randn(k_in, generator=g), torch.randn(h, k_in, generator=g), torch.randn(h, generator=g)
        for rows, unroll, bs in ((4, 2, 32), (1, 1, 8), (3, 4, 6)):
            k = mlp_kernels.build_mlp_kernel("dense_mv", {"rows": rows, "unroll": unroll, "bs": bs})
            y = torch.full((h,), float("nan"))
            k(x, w, b, y)
            _close(y, w @ x + b)
            k(x, torch.zeros_like(w), b, y)
            assert torch.equal(y, b)  # a zero weight leaves exactly the bias
    with pytest.raises(Exception, match="multiple of rows"):
        mlp_kernels.build_mlp_kernel("dense_mv", {"rows": 3, "bs": 32})


def test_gather_and_down_kernels(mlp_kernels):
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(K, generator=g), torch.randn(H, K, generator=g), torch.randn(H, generator=g)
    cb = 64
    np_ = -(-N // cb) * cb
    wdt = torch.zeros(H, np_)
    wdt[:, :N] = torch.randn(H, N, generator=g)
    bd = torch.randn(N, generator=g)
    for n in (0, 1, 7, H):  # no neuron, one, a few (a tail for every row unroll), all
        idx = torch.randperm(H, generator=g)[:n].sort().values.to(torch.int32)
        u = torch.empty(max(n, 1))
        if n:
            for rows, unroll in ((1, 4), (4, 1), (3, 2)):  # tails: n not a multiple of rows
                u.zero_()
                mlp_kernels.build_mlp_kernel("gather_up_mv", {"rows": rows, "unroll": unroll})(x, w, b, idx, u[:n])
                _close(u[:n], w[idx.long()] @ x + b[idx.long()])
        vals = torch.randn(n, generator=g)
        want = bd + vals @ wdt[idx.long(), :N]
        for rows, serial in ((1, False), (2, False), (4, False), (2, True)):
            k = mlp_kernels.build_mlp_kernel("down_mv", {"rows": rows, "cb": cb, "serial": serial})
            for parts in (1, 3):
                y = torch.empty(N)
                # blocks of 4 entries (the last partly used), as the up kernel writes them
                nb = max(1, -(-n // 4))
                hc, ii, cnt = torch.zeros(nb, 4), torch.zeros(nb, 4, dtype=torch.int32), torch.zeros(nb, dtype=torch.int32)
                for t in range(n):
                    hc[t // 4, t % 4], ii[t // 4, t % 4] = vals[t], idx[t]
                    cnt[t // 4] += 1
                k(hc, ii, cnt, wdt, bd, torch.empty(parts, np_), y)
                _close(y, want)
        for m, mt in ((1, 4), (3, 4), (8, 8)):
            hm = torch.randn(mt, n, generator=g)
            hm[m:] = 0
            k = mlp_kernels.build_mlp_kernel("down_mm", {"mt": mt, "rows": 2, "cb": cb})
            y = torch.empty(mt, N)
            if n:
                k(hm, idx, wdt, bd, torch.empty(3, mt, np_), y)
                _close(y[:m], bd + hm[:m] @ wdt[idx.long(), :N])


class Plain(nn.Module):
    def __init__(self, bias=0.0, act="relu"):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(K, H), nn.Linear(H, N), act
        with torch.no_grad():
            self.fc1.bias += bias

    def forward(self, x):
        return self.fc2({"relu": F.relu, "gelu": F.gelu}[self.act](self.fc1(x)))


class Gated(nn.Module):
    def __init__(self, act="relu"):
        super().__init__()
        self.gate, self.up, self.down, self.act = nn.Linear(K, H), nn.Linear(K, H), nn.Linear(H, N), act

    def forward(self, x):
        g = F.relu(self.gate(x)) if self.act == "relu" else F.silu(self.gate(x))
        return self.down(g * self.up(x))


def _mlp_modules(cm):
    return [m for m in cm.gm.modules() if isinstance(m, SparseMLP)]


@pytest.mark.parametrize("make,kernels", [
    (lambda: Plain(-0.5), "tir-up+tir-down"),
    (lambda: Plain(-0.5), "tir-screen-up+tir-down"),
    (lambda: Plain(-0.5), "tir-screen8-up+tir-down"),
    (lambda: Plain(-0.5), "torch-up+serial-down"),
    (lambda: Plain(50.0), "tir-up+tir-down"),  # no zeros at all
    (lambda: Plain(-50.0), "tir-up+serial-down"),  # every activation zero
    (lambda: Gated(), "tir-gated-up+tir-down"),
    (lambda: Gated(), "tir-gated-screen-up+tir-down"),
    (lambda: Gated(), "tir-gated-screen8-up+tir-down"),
], ids=["plain-tir-up", "plain-tir-screen-up", "plain-tir-screen8-up", "plain-torch-up", "no-zeros", "all-zero", "gated",
        "gated-screen", "gated-screen8"])
def test_exact_compile_any_batch(make, kernels, tmp_path, monkeypatch):
    if "serial-down" in kernels:  # candidates only where the kernels run on TVM's pool (`_mv_candidates`)
        monkeypatch.setattr("sparsecomp.backends.torch.mlp._pool_tag", lambda: "tvm")
    _model, _cm, mod, row = _compile_exact_at_batch_1(make, kernels, tmp_path)
    assert mod.kernel.startswith(kernels)
    assert row["decision"] == "sparse" and row["m"] == 1
    # the report names the float16 copy a screened kernel keeps (its memory), and only then
    assert ("screen: a " in row["reason"]) == ("screen" in kernels)
    assert ("int8 copy" in row["reason"]) == ("screen8" in kernels)


def _compile_exact_at_batch_1(make, kernels, tmp_path):
    """Compile exact mode at batch 1 forced onto `kernels`; check the lowered graph (not the
    end-to-end choice) against eager at batch 1, 3 and 64. Returns (model, cm, module, mlp row)."""
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(1, K)
    cm = sc.compile(model, (x,), activation_sparsity="exact", kernels=kernels, cache_dir=str(tmp_path),
                    max_seconds_per_layer=0.05)
    assert cm.report.verify["ok"]
    (mod,) = _mlp_modules(cm)
    row = next(r for r in cm.report.rows if r["layer"].endswith("->" + ("fc2" if isinstance(model, Plain) else "down")))
    assert row["pattern"].startswith("mlp")
    lowered = CompiledModel(cm.gm, cm.report, "torch")
    for batch in (1, 3, 64):
        xb = torch.randn(batch, K)
        _close(lowered(xb), model(xb))
    # one-row outputs kept by the caller are never written by later calls (the fused kernels'
    # outputs come from a stock: `OutputStock`), past a refill of it too
    xs = [torch.randn(1, K) for _ in range(12)]
    ys = [lowered(xi) for xi in xs]
    for xi, yi in zip(xs, ys):
        _close(yi, model(xi))
    return model, cm, mod, row


@pytest.mark.parametrize("kernel,rows,batches", [("union-tir", 5, (2, 5, 8, 19, 0)), ("per-row-tir", 6, (2, 6, 33)),
                                                 ("union-tir{rows=2,screen=i8}", 5, (2, 5, 8, 19, 0))])
def test_many_rows_path_and_crossover(kernel, rows, batches, tmp_path):
    """M > 1 paths (union of active neurons, per-row work), forced onto the kernel whatever was
    measured, then onto dense: both agree with eager at every batch."""
    torch.manual_seed(0)
    model = Plain(-0.5).eval()
    x = torch.randn(rows, K)
    cm = sc.compile(model, (x,), activation_sparsity="exact", kernels=kernel, cache_dir=str(tmp_path),
                    max_seconds_per_layer=0.05)
    (mod,) = _mlp_modules(cm)
    assert mod.kernel.startswith(kernel)
    for cost in ({"dense": 1e9, "one": 0.0, "all": 1.0}, {"dense": 0.0, "one": 1.0, "all": 2.0}):  # kernel, then dense
        mod._mm.cost = cost
        for batch in batches:
            xb = torch.randn(batch, K)
            _close(mod(xb), model(xb))
    assert mod._mm.crossover(1) == 0.0  # dense costs nothing: the kernel path never runs


@pytest.mark.parametrize("mode", ["threshold", "predictor"])
@pytest.mark.parametrize("batch", [1, 3])
def test_lossy_compile_matches_reference(mode, batch, tmp_path):
    torch.manual_seed(0)
    model = Gated("silu").eval() if mode == "predictor" else Plain(act="gelu").eval()
    x = torch.randn(batch, K)
    cal = [(torch.randn(8, K),) for _ in range(4)]
    cm = sc.compile(model, (x,), activation_sparsity=f"{mode}:0.5", calibration=cal, cache_dir=str(tmp_path),
                    max_seconds_per_layer=0.05)
    assert cm.report.verify["ok"] and cm.report.verify["reference"] == "rewritten graph on reference ops"
    # the lossy step as it runs: asked for and applied, or not applied where calls go to the model
    applied = cm.report.end_to_end["runs"] == "compiled"
    start = "lossy (asked for): " if applied else "not applied (calls go to the model without it): "
    assert any(n.startswith(start + "activation sparsity") for n in cm.report.notes), cm.report.notes
    row = next(r for r in cm.report.rows if r["pattern"].startswith("mlp"))
    assert row["calibration"]["calibrated_sparsity"] >= 0.5
    if mode == "predictor":
        assert 0 <= row["calibration"]["recall"] <= 1
    # every candidate the lowering could pick agrees with the reference op at other batches too
    (mod,) = _mlp_modules(cm) or [None]
    if mod is not None:
        for xb in (torch.randn(1, K), torch.randn(4, K)):
            want = mod._w.dense_down(mod._w.hidden(xb))
            _close(mod(xb), want)


def test_tir_predictor_strategy(tmp_path):
    """predictor mode on a plain ReLU MLP forced onto the all-TIR selection: equal to the reference
    op at batch 1 (its mask may differ only for a score within rounding of the threshold, and these
    inputs have none), and more rows still take the union path. A gated MLP never gets it."""
    torch.manual_seed(0)
    model = Plain(-0.2).eval()
    cal = [(torch.randn(8, K),) for _ in range(4)]
    cm = sc.compile(model, (torch.randn(1, K),), activation_sparsity="predictor:0.5", calibration=cal,
                    kernels="tir-predictor+tir-down", cache_dir=str(tmp_path), max_seconds_per_layer=0.05)
    assert cm.report.verify["ok"]
    (mod,) = _mlp_modules(cm)
    assert mod.kernel.startswith("tir-predictor+tir-down")
    row = next(r for r in cm.report.rows if r["pattern"].startswith("mlp"))
    assert "within float rounding of its threshold" in row["reason"]  # the report says how its mask may differ
    s = mod._mv
    for seed in range(5):
        x = torch.randn(1, K, generator=torch.Generator().manual_seed(seed))
        want = mod._w.dense_down(mod._w.hidden(x))
        _close(mod(x), want)
        s(x)  # the kernel's list holds exactly the reference's nonzero hidden neurons
        listed = sorted(int(j) for i in range(s.cnt.numel()) for j in s.idx[i, : s.cnt[i]])
        assert listed == mod._w.hidden(x)[0].nonzero().reshape(-1).tolist()
    xb = torch.randn(5, K)
    _close(mod(xb), mod._w.dense_down(mod._w.hidden(xb)))
    # the fused kernel takes the row as it comes ([1, K], contiguous); any other layout of one row
    # goes through the strategy's fallback (a strided row, a 1-D or 3-D one) with the same result
    x = torch.randn(1, K, generator=torch.Generator().manual_seed(7))
    want = mod._w.dense_down(mod._w.hidden(x))
    strided = torch.randn(1, 2 * K)[:, ::2].copy_(x)
    assert not strided.is_contiguous()
    for other in (strided, x.reshape(K), x.reshape(1, 1, K)):
        _close(s(other), want)
    _close(mod(x.reshape(1, 1, K)), want.reshape(1, 1, N))
    assert mod(x.reshape(1, 1, K)).shape == (1, 1, N)
    assert not torch.allclose(s(strided), mod._w.dense_down(mod._w.hidden(strided * 0.5)))  # the row's values count
    _close(mod(strided), want)  # the module's fast path hands a refused row to the checked path
    # the fast path leaves dtype checks to the kernel: a float64 row still gets the clear error
    for bad in (x.double(), x.double().reshape(1, 1, K)):
        with pytest.raises(sc.SparsecompError, match="float32 CPU inputs"):
            mod(bad)
    with pytest.raises(Exception, match="Mismatched"):  # a wrong width is refused, never computed
        s(torch.randn(1, K + 1))
    # the pass left the predictor float16-representable: the kernel reads it as float16; a
    # predictor that is not (set by hand here) runs the float32 variant, with the same result
    assert mod.kernel.endswith(",f16}")
    from sparsecomp.backends.torch.mlp import _TirPredictorMV

    w = mod._w
    w.pred_a = w.pred_a + 1e-4 * torch.rand(w.pred_a.shape, generator=torch.Generator().manual_seed(9))
    s32 = _TirPredictorMV(w, bs=64)
    assert not s32.label.endswith(",f16}") and s32.pred_a.dtype == torch.float32
    x = torch.randn(1, K, generator=torch.Generator().manual_seed(11))
    _close(s32(x), w.dense_down(w.hidden(x)))
    # hooks on the lowered module still run (its call skips nn.Module's frames only when none exist)
    seen = []
    h = mod.register_forward_hook(lambda m, a, o: seen.append(o.shape))
    mod(x)
    h.remove()
    mod(x)
    assert seen == [torch.Size([1, N])]
    gated = sc.compile(Gated().eval(), (torch.randn(1, K),), activation_sparsity="predictor:0.5", calibration=cal,
                       cache_dir=str(tmp_path), max_seconds_per_layer=0.05)
    (row,) = [r for r in gated.report.rows if r["pattern"].startswith("mlp")]
    assert any(k.startswith("predictor+") for k in row["measured"])  # the torch-mask strategies were timed
    assert not any(k.startswith("tir-predictor") for k in row["measured"]) and not row["kernel"].startswith("tir-predictor")


@pytest.mark.parametrize("mode", ["threshold", "predictor"])
def test_lossy_3d_inputs_keep_the_reference_mask(mode, tmp_path):
    # [batch, seq, K] inputs: the backend computes the keep-mask on x as the op receives it, so no
    # neuron near the threshold can flip against the reference (a flip costs a whole neuron)
    torch.manual_seed(0)
    model = Plain(act="gelu").eval()
    x = torch.randn(2, 7, K)
    cal = [(torch.randn(2, 7, K),) for _ in range(8)]
    cm = sc.compile(model, (x,), activation_sparsity=f"{mode}:0.5", calibration=cal, cache_dir=str(tmp_path),
                    max_seconds_per_layer=0.05)
    assert cm.report.verify["ok"] and not any("fell back" in n for n in cm.report.notes)
    assert any(r["pattern"].startswith("mlp") for r in cm.report.rows)


def test_decision_is_cached(tmp_path):
    model = Plain(-0.5).eval()
    x = torch.randn(1, K)
    first = sc.compile(model, (x,), activation_sparsity="exact", cache_dir=str(tmp_path), max_seconds_per_layer=0.05)
    second = sc.compile(model, (x,), activation_sparsity="exact", cache_dir=str(tmp_path), max_seconds_per_layer=0.05)
    r1 = next(r for r in first.report.rows if r["layer"] == "fc1->fc2")
    r2 = next(r for r in second.report.rows if r["layer"] == "fc1->fc2")
    assert not r1["cached"] and r2["cached"] and r1["kernel"] == r2["kernel"]


class TwinMLPs(nn.Module):
    """Two MLPs of one shape on the same input: the second is of the first one's family."""

    def __init__(self):
        super().__init__()
        self.a, self.b = Plain(-0.5), Plain(-0.5)
        self.b.load_state_dict(self.a.state_dict())

    def forward(self, x):
        return self.a(x) + self.b(x)


@pytest.mark.parametrize("second_timing", ["sparse", "runner-up", "dense"])
def test_family_choice_is_checked_by_later_layers(tmp_path, monkeypatch, second_timing):
    """A later MLP of the same family times only the previous layer's two fastest candidates
    against dense. Where the runner-up wins there, it is taken without timing everything again
    (a noisy first timing once held all 12 MLPs of opt-125m-like on a 1.07x kernel); where dense
    wins (one noisy timing did so, and was cached for 4 of opt-125m-like's MLPs), every candidate
    is timed again and that second timing decides, either way."""
    from sparsecomp.backends.torch import mlp
    from sparsecomp.cache import DecisionCache

    monkeypatch.setattr(DecisionCache, "get", lambda self, key, validate=None: None)  # the twin is not a cache hit
    calls = []

    def fake(strategies, x, min_runs, max_seconds, flush):
        labels = sorted(strategies)
        calls.append(labels)
        if len(calls) == 2 and second_timing == "runner-up":  # the second fastest of the first timing wins
            return {k: 5.0 if k == "dense" else 3.0 - labels.index(k) for k in labels}
        dense_wins = (len(calls) == 2 and second_timing != "runner-up") or (len(calls) == 3 and second_timing == "dense")
        return {k: (1.0 if k == "dense" else 2.0 + labels.index(k)) if dense_wins else (5.0 if k == "dense" else 1.0 + labels.index(k))
                for k in labels}

    monkeypatch.setattr(mlp, "_time_strategies", fake)
    model = TwinMLPs().eval()
    x = torch.randn(1, K)
    cm = sc.compile(model, (x,), activation_sparsity="exact", cache_dir=str(tmp_path), max_seconds_per_layer=0.05)
    rows = [r for r in cm.report.rows if str(r.get("pattern", "")).startswith("mlp")]
    first = [k for k in calls[0] if k != "dense"]
    assert len(rows) == 2 and len(first) >= 2
    assert calls[1] == sorted(first[:2] + ["dense"])  # the first layer's two fastest, and dense
    assert rows[0]["decision"] == "sparse" and rows[0]["kernel"] == first[0]
    if second_timing == "runner-up":
        assert len(calls) == 2 and rows[1]["kernel"] == first[1] and "two fastest" in rows[1]["reason"]
    else:
        assert len(calls) == 3 and calls[2] == calls[0] and "timed again" in rows[1]["reason"]  # full timing again
        assert rows[1]["decision"] == ("sparse" if second_timing == "sparse" else "dense")
    assert len(_mlp_modules(cm)) == (1 if second_timing == "dense" else 2)
    _close(cm(x), model(x))


def test_one_row_mlp_of_a_cold_model_is_timed_cold(tmp_path, monkeypatch):
    """In a model whose weights exceed the last-level cache, a one-row MLP small enough to stay in
    cache between timed calls is timed with a flush before every call, and the decision is cached
    under its own key (a hot decision is not reused cold); more rows, or a warm model, no flush."""
    from sparsecomp import timing

    flushes = []
    monkeypatch.setattr(timing, "cache_flush", lambda pause_s=0.001: (lambda: flushes.append(1)))
    model = Plain(-0.5).eval()
    x = torch.randn(1, K)
    warm = sc.compile(model, (x,), activation_sparsity="exact", cache_dir=str(tmp_path), max_seconds_per_layer=0.05)
    assert not flushes  # these few KB fit any cache: timed call after call
    monkeypatch.setattr(timing, "model_is_cold", lambda gm: True)
    cold = sc.compile(model, (x,), activation_sparsity="exact", cache_dir=str(tmp_path), max_seconds_per_layer=0.05)
    row = next(r for r in cold.report.rows if r["layer"] == "fc1->fc2")
    assert flushes and not row["cached"]  # measured again, cold: the warm decision was under another key
    _close(cold(x), model(x))
    n = len(flushes)
    sc.compile(model, (torch.randn(5, K),), activation_sparsity="exact", cache_dir=str(tmp_path), max_seconds_per_layer=0.05)
    assert len(flushes) == n  # more rows per call: not this path
    assert warm.report.verify["ok"] and cold.report.verify["ok"]


def test_cli_activation_sparsity(tmp_path, capsys, monkeypatch):
    from sparsecomp.cli import main

    factory = tmp_path / "mlp.py"
    factory.write_text(
        "import torch\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    m = torch.nn.Sequential(torch.nn.Linear(32, 96), torch.nn.GELU(), torch.nn.Linear(96, 16)).eval()\n"
        "    return m, (torch.randn(2, 32),)\n")
    monkeypatch.setenv("SPARSECOMP_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["compile", f"{factory}:make", "--activation-sparsity", "threshold:0.5", "--max-seconds", "0.05", "--json"]) == 0
    import json

    report = json.loads(capsys.readouterr().out)
    rows = [r for r in report["layers"] if r["pattern"].startswith("mlp")]
    assert len(rows) == 1 and rows[0]["calibration"]["calibrated_sparsity"] >= 0.5
    applied = report["end_to_end"]["runs"] == "compiled"  # (else calls go to the model, without it)
    assert any(f"{'lossy (asked for)' if applied else 'not applied'}" in n and "activation sparsity threshold:0.5" in n
               for n in report["notes"])
    assert main(["compile", f"{factory}:make", "--activation-sparsity", "threshold:1.5"]) == 2
    assert "in (0, 1)" in capsys.readouterr().err


# ---------------------------------------------------------------- pruned AND activation-sparse MLPs


def test_sparse_down_kernel(mlp_kernels):
    """down_sparse_mv against dense rows: pruned rows, a neuron with no nonzero at all, every
    neuron active, none; column ranges that do not divide N."""
    from sparsecomp.backends.torch.mlp import _pack_sparse_rows

    g = torch.Generator().manual_seed(2)
    wdt = torch.randn(H, N, generator=g) * (torch.rand(H, N, generator=g) < 0.2)
    wdt[5] = 0  # a neuron pruned away entirely
    bd = torch.randn(N, generator=g)
    for n in (0, 1, 7, H):
        idx = torch.randperm(H, generator=g)[:n].sort().values.to(torch.int32)
        if n:
            idx[0] = 5
        vals = torch.randn(n, generator=g)
        want = bd + vals @ wdt[idx.long()]
        for parts, serial in ((1, True), (3, False), (4, False)):
            ptr, col, val = _pack_sparse_rows(wdt, parts)
            assert int(ptr[-1, -1]) == int((wdt != 0).sum())
            y = torch.empty(N)
            k = mlp_kernels.build_mlp_kernel("down_sparse_mv", {"serial": serial})
            k(vals.reshape(1, n), idx.reshape(1, n), torch.tensor([n], dtype=torch.int32), ptr, col, val, bd, y)
            _close(y, want)


def _prune(model, spec="unstructured:0.8"):
    from sparsecomp.patterns import impose

    impose(model, spec)
    return model


@pytest.mark.parametrize("make,kernels", [
    (lambda: _prune(Plain(-0.2)), "pruned-mv"),
    (lambda: _prune(Plain(-0.2)), "pruned"),
    (lambda: _prune(Gated()), "pruned-mv"),
    (lambda: _prune(Plain(-50.0)), "pruned-mv"),  # every activation zero
], ids=["plain-mv", "plain-linear", "gated-mv", "all-zero"])
def test_pruned_exact_compile_any_batch(make, kernels, tmp_path):
    """Both sparsities at once: the projections on their sparse-linear kernels, only the active
    neurons' (sparse) down rows read; right at batch 1, 3 and 64 after compiling at batch 1."""
    _model, _cm, mod, row = _compile_exact_at_batch_1(make, kernels, tmp_path)
    assert mod.kernel.split("{")[0] == kernels
    assert "sparse-down" in mod.kernel or kernels == "pruned"  # W_down is 80% zeros: its rows are read sparse
    assert "pruned weights (W_up 20%" in row["reason"]


def test_dense_weights_get_no_pruned_strategy(tmp_path):
    """Near miss: an MLP whose weights are dense (nothing pruned) is not offered the pruned
    strategies, and forcing one leaves the MLP on the strategies that exist."""
    torch.manual_seed(0)
    model = Plain(-0.5).eval()
    x = torch.randn(1, K)
    cm = sc.compile(model, (x,), activation_sparsity="exact", cache_dir=str(tmp_path), max_seconds_per_layer=0.05)
    row = next(r for r in cm.report.rows if r["pattern"].startswith("mlp"))
    assert "pruned" not in row["kernel"] and "pruned weights" not in row["reason"]
    assert "dense" in row["measured"] and not any(k.startswith("pruned") for k in row["measured"])
    cm = sc.compile(model, (x,), activation_sparsity="exact", kernels="pruned-mv", cache_dir=str(tmp_path),
                    max_seconds_per_layer=0.05)
    row = next(r for r in cm.report.rows if r["pattern"].startswith("mlp"))
    assert row["kernel"] == "dense"
    _close(cm(x), model(x))


@pytest.mark.parametrize("kernels", ["tir-up+tir-down", "torch-up+tir-down"])
def test_concurrent_calls_from_threads(kernels, tmp_path):
    """TVM releases the GIL while a kernel runs, so two threads may run one compiled MLP at once:
    the kernels' scratch buffers (compacted activations, partial sums) are per strategy, and each
    thread's outputs must still be its own inputs' (a lock serialises one layer's kernel calls)."""
    import threading

    torch.manual_seed(0)
    model = Plain(-0.5).eval()
    cm = sc.compile(model, (torch.randn(1, K),), activation_sparsity="exact", kernels=kernels, cache_dir=str(tmp_path),
                    max_seconds_per_layer=0.05)
    lowered = CompiledModel(cm.gm, cm.report, "torch")
    (mod,) = _mlp_modules(cm)
    if mod._mm is not None and mod._mm.kind == "tir":  # force the union path at 3 rows (its crossover says dense here)
        mod._mm.cost = {"dense": 1e6, "one": 1.0, "all": 2.0}
    xs = [torch.randn(m, K, generator=torch.Generator().manual_seed(i)) for i, m in enumerate((1, 1, 3, 3))]
    refs = [model(x) for x in xs]  # one row (fused / down kernels) and three (the union path)
    bad = []

    def work(i):
        for r in range(300):
            j = i + 2 * (r % 2)
            y = lowered(xs[j])
            if not torch.allclose(y, refs[j], atol=1e-4, rtol=1e-4):
                bad.append(j)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad, f"{len(bad)} wrong outputs"


@pytest.mark.parametrize("rows,unroll,down_rows,screen", [(4, 1, 8, None), (2, 2, 8, None), (2, 2, 4, None),
                                                          (4, 2, 4, "f16"), (4, 2, 8, "f16"), (4, 2, 4, "i8"), (4, 2, 8, "i8")])
def test_tir_exact_strategy_variants(rows, unroll, down_rows, screen, tmp_path):
    """Every exact-mode TIR variant compile may choose (the down phase 4 or 8 rows at a time, with
    and without the float16 screen) equals the model: on inputs with some, no and all neurons
    active (H = 203 rows: 8 does not divide it)."""
    from sparsecomp.backends.torch.mlp import _TirUpMV

    torch.manual_seed(0)
    model = Plain(-0.5).eval()
    cm = sc.compile(model, (torch.randn(1, K),), activation_sparsity="exact", kernels="tir-up+tir-down",
                    cache_dir=str(tmp_path), max_seconds_per_layer=0.05)
    (mod,) = _mlp_modules(cm)
    s = _TirUpMV(mod._w, rows=rows, unroll=unroll, down_rows=down_rows, screen=screen, crows=4)
    assert s.label.startswith({None: "tir-up+", "f16": "tir-screen-up+", "i8": "tir-screen8-up+"}[screen])
    assert s.label.endswith(",down_rows=8}" if down_rows == 8 else ("crows=4}" if screen else f"unroll={unroll}}}"))
    for x in (torch.randn(1, K), torch.full((1, K), -100.0), torch.zeros(1, K)):
        _close(s(x), model(x))
    with torch.no_grad():
        mod._w.b_up.add_(100.0)  # every neuron active (the strategy reads the same bias tensor)
    try:
        x = torch.randn(1, K)
        with torch.no_grad():  # (the bias may be the model's own tensor: the reference reads it as it is now)
            ref = model.fc2(torch.relu(F.linear(x, model.fc1.weight, mod._w.b_up)))
        _close(_TirUpMV(mod._w, rows=rows, unroll=unroll, down_rows=down_rows, screen=screen, crows=4)(x), ref)
    finally:
        with torch.no_grad():
            mod._w.b_up.sub_(100.0)


def test_mlp_applied_twice_has_a_row_per_call(tmp_path):
    """The same MLP modules applied twice: two fused MLPs, two report rows (`up->down#2`)."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(K, H), nn.Linear(H, K)
            with torch.no_grad():
                self.up.bias -= 0.5

        def forward(self, x):
            return self.down(torch.relu(self.up(self.down(torch.relu(self.up(x))))))

    torch.manual_seed(0)
    model = Twice().eval()
    x = torch.randn(1, K)
    cm = sc.compile(model, (x,), activation_sparsity="exact", kernels="tir-up+tir-down", cache_dir=str(tmp_path),
                    max_seconds_per_layer=0.05)
    rows = [r for r in cm.report.rows if r["pattern"].startswith("mlp")]
    assert len(_mlp_modules(cm)) == 2 and [r["layer"] for r in rows] == ["up->down", "up->down#2"]
    assert all(r["decision"] == "sparse" for r in rows)
    _close(cm(x), model(x))
