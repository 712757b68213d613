"""Sparse linear layer y = x @ W^T + b: sparsecomp TIR kernels against torch and ONNX Runtime.

Side by side in one process, 2 threads everywhere (torch, TVM, ORT intra-op; OpenBLAS 1):
torch dense (F.linear), ORT dense (one MatMul + Add), torch CSR (`torch.mv` at M = 1 else
`torch.sparse.mm`, int32 indices), torch BSR (square blocks, the size storing the fewest values),
and the best sparsecomp kernel over `candidates` (autotuned on the hot weight). Each case runs
hot (one weight) and cold (enough distinct copies cycled that the weights exceed 4x L3).

Times are medians over >= 20 rounds after warm-up (each round's sample: the mean of a batch of
calls lasting ~2 ms; cold: after one untimed pass over every copy, `Cycle.prime`); the methods of a case are interleaved round by round, in a new seeded order
each round with a 30 ms settle between methods, so that the machine's load swings hit them alike.
Cold copies exceed 4x the larger of the measured and the reported L3. The cold ORT baseline gets
W^T as a graph input (one session cycles the copies), so onnxruntime cannot prepack it: at M = 1
that costs nothing (same time as hot), at M > 1 it slows ORT down (2.1x at M = 16), so the cold
"vs ORT" ratios at M > 1 overstate the gap. The roofline is the bytes that must
be read (the sparsecomp format's values + indices + pointers, plus x and y) divided by the read
bandwidth of a 512 MiB `tensor.sum()`, measured right before each case.

    python benchmarks/bench_linear.py [--quick] [--cases NAME,...] [--json PATH]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # OpenBLAS spin-waits starve other pools
os.environ.setdefault("TVM_NUM_THREADS", "2")
import sparsecomp  # noqa: E402, F401  (before torch: it sets torch's OpenMP spin count, sparsecomp/omp.py)

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sparsecomp.patterns import impose_pattern  # noqa: E402
from sparsecomp.timing import l3_bytes, read_bandwidth, reported_llc_bytes, settle  # noqa: E402

THREADS = 2

CASES = {
    "4096x4096_m1_u90": dict(N=4096, K=4096, M=1, pattern="unstructured:0.9", fmts=["csr", "sell"]),
    "4096x4096_m1_u70": dict(N=4096, K=4096, M=1, pattern="unstructured:0.7", fmts=["csr", "sell"]),
    "4096x4096_m1_b16x1_90": dict(N=4096, K=4096, M=1, pattern="block:16x1:0.9", fmts=["bsr"], block=(16, 1)),
    "4096x4096_m1_2:4": dict(N=4096, K=4096, M=1, pattern="2:4", fmts=["nm"], n=2, m=4),
    "4096x4096_m16_u90": dict(N=4096, K=4096, M=16, pattern="unstructured:0.9", fmts=["csr"]),
    "768x3072_m128_u90": dict(N=3072, K=768, M=128, pattern="unstructured:0.9", fmts=["csr"]),
}
QUICK_CASES = ["4096x4096_m1_u90", "4096x4096_m16_u90"]


def measure_bandwidth(big: torch.Tensor, reps: int = 5) -> float:
    """Read bandwidth in bytes/s of big.sum() (median of reps)."""
    return read_bandwidth(big, reps)


def n_copies(bytes_per_copy: int, l3: int) -> int:
    return max(2, -(-4 * l3 // max(bytes_per_copy, 1)) + 1)


def run_interleaved(methods: dict, rounds: int, min_batch_s: float = 2e-3, gap_s: float = 0.0) -> dict:
    """methods: name -> zero-arg callable (one call = one layer application). Median us per call.

    gap_s: settle between two methods' batches, so that the spin-waiting worker threads of one
    runtime (torch's OpenMP, ORT's and TVM's pools all spin for a while after a call) have gone
    to sleep before the next runtime is timed on the same two cores; the cores are kept busy
    meanwhile (`sparsecomp.timing.settle`: after a plain sleep, the Intel VM ran torch's cold
    GEMV at 4.6 instead of 2.2 ms).
    """
    gap = settle(gap_s) if gap_s else None
    batch = {}
    for name, fn in methods.items():  # warm-up, and the batch size that takes ~min_batch_s
        for _ in range(3):
            fn()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        batch[name] = max(1, min(200, int(min_batch_s / max(dt, 1e-7))))
    res = {name: [] for name in methods}
    order, rng = list(methods), random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)  # a new (seeded) order each round: no method always follows the same other one
        for name in order:
            fn, k = methods[name], batch[name]
            if gap is not None:
                gap()
                fn()
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            res[name].append((time.perf_counter() - t0) / k * 1e6)
    return {name: statistics.median(v) for name, v in res.items()}


class Cycle:
    """Call fn(item) over items in turn (cold cache: each call touches a different copy).

    `prime()` calls fn once on every item, untimed, before a cold measurement: the timed rounds
    (~150 calls) visit each copy about once, so without it they measured copies just made. Made
    right before, the sparsecomp copies (cloned, then collapsed onto huge pages, `clone_prepared`)
    read slower on their first pass on the Intel VM: 16x1 at 90%, 292 copies, pass by pass 324 ->
    257 -> 257 us (the first 20 calls 513 us), while torch's dense and CSR copies showed no such
    pass (2282 / 2208 / 2242 us, 625 / 617 / 614 us). A deployed model reads its weights every
    call; the copies still exceed 4x the cache, so every timed call still reads from memory."""

    def __init__(self, items, fn):
        self.items, self.fn, self.i = items, fn, 0

    def prime(self) -> "Cycle":
        for it in self.items:
            self.fn(it)
        return self

    def __call__(self):
        it = self.items[self.i]
        self.i = (self.i + 1) % len(self.items)
        return self.fn(it)


def ort_sessions(K: int, N: int):
    """(hot session with W as initializer factory, cold session taking W^T as an input)."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    def opts():
        o = ort.SessionOptions()
        o.intra_op_num_threads = THREADS
        o.inter_op_num_threads = 1
        o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Its pool sleeps between calls instead of spin-waiting: a session here runs one MatMul
        # per call, so spinning buys it nothing, and its spinning threads slowed the contender
        # timed after it despite the settle. Measured on the Intel VM (cold, 4096x4096, M = 1,
        # interleaved, 2 rounds): TIR BSR 16x1 687-688 us beside a spinning ORT, 520-551 us beside
        # a sleeping one; ORT itself 2648-2852 us spinning, 2601 us sleeping (its first round
        # without spinning took 4838 us while warming up).
        o.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return o

    def hot(wt: np.ndarray, b: np.ndarray):
        g = helper.make_graph(
            [helper.make_node("MatMul", ["x", "wt"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
            "linear",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", N])],
            initializer=[numpy_helper.from_array(wt, "wt"), numpy_helper.from_array(b, "b")],
        )
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)  # ORT 1.30 refuses IR 14
        return ort.InferenceSession(m.SerializeToString(), opts(), providers=["CPUExecutionProvider"])

    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "wt"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "linear_in",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K]),
         helper.make_tensor_value_info("wt", TensorProto.FLOAT, [K, N]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [N])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", N])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)  # ORT 1.30 refuses IR 14
    onnx.checker.check_model(m)
    cold = ort.InferenceSession(m.SerializeToString(), opts(), providers=["CPUExecutionProvider"])
    return hot, cold


def torch_sparse(W: torch.Tensor, kind: str):
    if kind == "csr":
        c = W.to_sparse_csr()
        return torch.sparse_csr_tensor(c.crow_indices().to(torch.int32), c.col_indices().to(torch.int32), c.values(), W.shape)
    best, bs_best = None, None
    for bs in (2, 4, 8, 16):
        if W.shape[0] % bs or W.shape[1] % bs:
            continue
        occ = (W.view(W.shape[0] // bs, bs, W.shape[1] // bs, bs) != 0).any(3).any(1).sum().item() * bs * bs
        if best is None or occ < best:
            best, bs_best = occ, bs
    if bs_best is None:
        return None
    b = W.to_sparse_bsr((bs_best, bs_best))
    return torch.sparse_bsr_tensor(b.crow_indices().to(torch.int32), b.col_indices().to(torch.int32), b.values(), W.shape)


def torch_sparse_apply(S, x, b):
    if x.shape[0] == 1:
        return torch.mv(S, x[0]) + b
    return torch.sparse.mm(S, x.t()).t() + b


def clone_prepared(p):
    """A copy of a prepared weight for the cold cycle, stored as `prepare` stores it (arrays on
    huge pages where the system allows, `sparsecomp.memory`): a plain clone sits on 4 KB pages,
    which is not what a compiled layer reads."""
    import copy

    from sparsecomp.memory import prefer_huge_pages

    q = copy.copy(p)
    q.arrays = [prefer_huge_pages(a.clone()) for a in p.arrays]
    return q


def bench_case(name: str, spec: dict, rounds: int, tune_rounds: int, l3: int, big: torch.Tensor, log) -> dict:
    import warnings

    from sparsecomp.backends import tir

    warnings.filterwarnings("ignore", message=".*Sparse.*")
    N, K, M = spec["N"], spec["K"], spec["M"]
    g = torch.Generator().manual_seed(0)
    W = impose_pattern(torch.randn(N, K, generator=g), spec["pattern"])
    x = torch.randn(M, K, generator=g)
    b = torch.randn(N, generator=g)
    ref = F.linear(x, W, b)

    # --- autotune sparsecomp on the hot weight
    kw = {k: spec[k] for k in ("block", "n", "m") if k in spec}
    tuned = {}
    methods = {}
    for fmt in spec["fmts"]:
        for params in tir.candidates(fmt, N, K, M, **kw):
            prep = tir.prepare(fmt, W, params)
            lin = tir.SparseLinearKernel(prep, tir.build(fmt, prep.params))
            y = lin(x, b)
            err = (y - ref).abs().max().item() / ref.abs().max().item()
            if err > 1e-4:
                raise RuntimeError(f"{name}: {fmt} {params} wrong (rel err {err:.2e})")
            label = f"{fmt}:{json.dumps(params, separators=(',', ':'))}"
            tuned[label] = (fmt, params, prep, lin)
            methods[label] = (lambda lin: lambda: lin(x, b))(lin)
    times = run_interleaved(methods, tune_rounds, min_batch_s=1e-3)
    best_label = min(times, key=times.get)
    fmt, params, prep, lin = tuned[best_label]
    log(f"  tuned {len(times)} variants; best {best_label} {times[best_label]:.1f} us (worst {max(times.values()):.1f})")
    # The cold variant is tuned cold, as `compile` times a layer whose model exceeds the cache
    # (`cold_copies`): a variant's prefetch and slice height pay differently when every read
    # comes from memory. Copies past 2x the measured cache share, freed before the baselines.
    share = l3_bytes()
    cold_tune = {label: Cycle([tir.SparseLinearKernel(clone_prepared(t[2]), t[3].kernel)
                               for _ in range(n_copies(t[2].nbytes, share // 2))], lambda l: l(x, b))
                 for label, t in tuned.items()}
    for c in cold_tune.values():
        c.prime()
    times_cold = run_interleaved(cold_tune, tune_rounds, min_batch_s=1e-3)
    del cold_tune
    cold_label = min(times_cold, key=times_cold.get)
    log(f"  tuned cold: best {cold_label} {times_cold[cold_label]:.1f} us (the hot winner: {times_cold[best_label]:.1f})")
    cold_fmt, cold_params, cold_prep, cold_lin = tuned[cold_label]

    # --- baselines
    import numpy as np

    wt = W.t().contiguous().numpy()
    bn = b.numpy()
    xn = x.numpy()
    ort_hot_f, ort_cold_s = ort_sessions(K, N)
    ort_hot = ort_hot_f(wt, bn)
    S_csr = torch_sparse(W, "csr")
    S_bsr = torch_sparse(W, "bsr")
    hot = {
        "torch_dense": lambda: F.linear(x, W, b),
        "ort_dense": lambda: ort_hot.run(None, {"x": xn}),
        "torch_csr": lambda: torch_sparse_apply(S_csr, x, b),
        "sparsecomp": lambda: lin(x, b),
    }
    if S_bsr is not None:
        hot["torch_bsr"] = lambda: torch_sparse_apply(S_bsr, x, b)
    for k in ("torch_csr", "torch_bsr"):
        if k in hot:
            e = (hot[k]() - ref).abs().max().item()
            assert e <= 1e-3 * ref.abs().max().item(), (k, e)

    # --- cold copies
    dense_bytes = N * K * 4
    nd = n_copies(dense_bytes, l3)
    Wc = [W.clone() for _ in range(nd)]
    wtc = [np.ascontiguousarray(wt.copy()) for _ in range(nd)]
    csr_bytes = S_csr.values().numel() * 8 + (N + 1) * 4
    Sc = [torch_sparse(W, "csr") for _ in range(n_copies(csr_bytes, l3))]
    Bc = None
    if S_bsr is not None:
        Bc = [torch_sparse(W, "bsr") for _ in range(n_copies(S_bsr.values().numel() * 4, l3))]
    np_ = n_copies(cold_prep.nbytes, l3)
    lins = [tir.SparseLinearKernel(clone_prepared(cold_prep), cold_lin.kernel) for _ in range(np_)]
    cold = {
        "torch_dense": Cycle(Wc, lambda w: F.linear(x, w, b)),
        "ort_dense": Cycle(wtc, lambda w: ort_cold_s.run(None, {"x": xn, "wt": w, "b": bn})),
        "torch_csr": Cycle(Sc, lambda s: torch_sparse_apply(s, x, b)),
        "sparsecomp": Cycle(lins, lambda l: l(x, b)),
    }
    if Bc is not None:
        cold["torch_bsr"] = Cycle(Bc, lambda s: torch_sparse_apply(s, x, b))

    for c in cold.values():
        c.prime()
    bw = [measure_bandwidth(big)]
    t_hot = run_interleaved(hot, rounds, gap_s=0.03)
    bw.append(measure_bandwidth(big))
    t_cold = run_interleaved(cold, rounds, gap_s=0.03)
    bw.append(measure_bandwidth(big))
    bwm = statistics.median(bw)
    need = prep.nbytes + (M * K + M * N) * 4
    roof_us = need / bwm * 1e6
    need_cold = cold_prep.nbytes + (M * K + M * N) * 4  # (the cold winner's format may read other bytes)
    roof_cold_us = need_cold / bwm * 1e6
    out = {
        "case": name, "N": N, "K": K, "M": M, "pattern": spec["pattern"],
        "winner": {"fmt": fmt, "params": params}, "tuned_us": times,
        "winner_cold": {"fmt": cold_fmt, "params": cold_params}, "tuned_cold_us": times_cold,
        "bytes_needed_cold": need_cold, "roofline_cold_us": roof_cold_us,
        "hot_us": t_hot, "cold_us": t_cold,
        "bandwidth_GBps": [v / 1e9 for v in bw], "bandwidth_median_GBps": bwm / 1e9,
        "bytes_needed": need, "roofline_us": roof_us,
        "roofline_fraction_cold": roof_cold_us / t_cold["sparsecomp"],
        "roofline_fraction_hot": roof_us / t_hot["sparsecomp"],
        "copies": {"dense": nd, "sparsecomp": np_, "torch_csr": len(Sc)},
        "torch_bsr_blocksize": list(S_bsr.values().shape[1:]) if S_bsr is not None else None,
    }
    del Wc, wtc, Sc, Bc, lins
    return out


def print_table(results: list[dict], log) -> None:
    cols = ["torch_dense", "ort_dense", "torch_csr", "torch_bsr", "sparsecomp"]
    log("")
    log(f"{'case':24s} {'mode':4s} " + " ".join(f"{c:>11s}" for c in cols) + f" {'vs dense':>8s} {'vs ORT':>7s} {'vs tCSR':>7s} {'vs best tsp':>11s} {'roof us':>8s} {'frac':>5s} {'GB/s':>5s}")
    for r in results:
        for mode in ("hot", "cold"):
            t = r[f"{mode}_us"]
            sc = t["sparsecomp"]
            best_sp = min(t[k] for k in ("torch_csr", "torch_bsr") if k in t)
            frac = r["roofline_fraction_" + mode]
            log(f"{r['case']:24s} {mode:4s} " + " ".join(f"{t[c]:11.1f}" if c in t else f"{'-':>11s}" for c in cols)
                + f" {t['torch_dense'] / sc:7.1f}x {t['ort_dense'] / sc:6.1f}x {t['torch_csr'] / sc:6.2f}x {best_sp / sc:10.2f}x"
                + f" {r['roofline_cold_us' if mode == 'cold' else 'roofline_us']:8.1f} {frac:5.0%} {r['bandwidth_median_GBps']:5.1f}")
    log("")
    for r in results:
        log(f"{r['case']:24s} winner: {r['winner']['fmt']} {r['winner']['params']}; cold: {r['winner_cold']['fmt']} {r['winner_cold']['params']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="two cases, fewer rounds (smoke test)")
    ap.add_argument("--cases", default=None, help=f"comma-separated subset of: {', '.join(CASES)}")
    ap.add_argument("--rounds", type=int, default=None, help="timing rounds per method (default 25)")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "bench_linear.json"))
    args = ap.parse_args(argv)

    torch.set_num_threads(THREADS)
    from sparsecomp.backends import tir

    tir.set_num_threads(THREADS)
    names = args.cases.split(",") if args.cases else (QUICK_CASES if args.quick else list(CASES))
    for n in names:
        if n not in CASES:
            ap.error(f"unknown case {n!r}; cases: {', '.join(CASES)}")
    rounds = args.rounds or 25
    tune_rounds = 7 if args.quick else 11
    # Cold means the copies exceed 4x the L3 whichever way it is counted: the share this process
    # measured (`l3_bytes`, 128 MiB on the Intel VM) or the size the machine reports (480 MiB
    # there, the whole socket's); with the measured share alone the copies were only 1.1-1.2x the
    # reported L3, and the roofline fraction went past 100% (part of the weights stayed cached).
    l3 = max(l3_bytes(), reported_llc_bytes() or 0)

    def log(s):
        print(s, flush=True)

    log(f"threads={THREADS} (tvm {tir.get_num_threads()}), L3={l3 >> 20} MiB, target={tir.host_target()}, "
        f"vector width {tir.vector_width()}")
    big = torch.ones(128 * 1024 * 1024)  # 512 MiB
    results = []
    t0 = time.time()
    failed = {}
    for n in names:
        log(f"case {n} ...")
        try:
            results.append(bench_case(n, CASES[n], rounds, tune_rounds, l3, big, log))
        except Exception as err:  # noqa: BLE001 - one case failing must not lose the others' results
            failed[n] = f"{type(err).__name__}: {err}"
            log(f"case {n} FAILED: {failed[n]}")
            continue
        print_table(results[-1:], log)
    log(f"total {time.time() - t0:.0f} s")
    print_table(results, log)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"threads": THREADS, "l3_bytes": l3, "l3_bytes_measured": l3_bytes(),
                               "l3_bytes_reported": reported_llc_bytes(), "target": str(tir.host_target()),
                               "results": results, "failed": failed}, indent=1))
    os.replace(tmp, out)
    log(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
