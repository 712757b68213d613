"""Activation sparsity (issue #5): the fused sparse-MLP rewrite on the torch and ORT backends.

Conventions as `bench_models.py`: one process, 2 threads everywhere (torch and TVM through
`sparsecomp.set_num_threads(2)`, OpenBLAS 1), contenders timed interleaved round-robin with a
short settle between them, the cores kept busy (`bench_models.timed`: medians of >= `--runs` rounds after
warm-up); only ratios measured in the same case mean anything here (read bandwidth swings from
minute to minute), so each case records the load and the bandwidth it ran under. Compiles start
from an empty SPARSECOMP_CACHE_DIR, so the compile time includes measuring and building kernels.
"Compiled" contenders run the lowered graph itself (never the eager fallback `compile` may pick).

Cases (`--cases`, comma-separated; default all):

    ffn      zoo mlp-relu 2048 -> 8192 -> 2048 at M = 1, fc1 bias shifted so ~90% of the ReLU
             outputs are zero: eager; compiled without activation sparsity; exact mode;
             predictor mode at a 10% selection (predictor:0.9, fitted on calibration inputs).
             Then exact mode at M = 1, 2, 4, 8, 16, 64: which path ran (union kernel / dense
             fallback) and the time against eager; the crossover densities from the report.
    gated    a gated ReLU FFN (down(relu(gate(x)) * up(x)), 2048 -> 8192 -> 2048, seeded, gate bias
             set so ~10% of the gates are nonzero), M = 1: eager; compiled without activation
             sparsity; exact mode (not a target of the issue: the gated kernels' figure); then
             exact at M = 2, 4, 8 against eager.
    opt      zoo opt-125m-like (mlp_bias -0.7: ~90% of fc2's inputs zero), one token (M = 1, no KV
             cache), the decoder stack without an LM head: eager; compiled without activation
             sparsity; compiled with exact mode.
    pruned   the ffn with its weights pruned (unstructured 50% and 90%) AND ~90% of its ReLU outputs
             zero, M = 1: eager; compiled without activation sparsity (sparse-linear kernels); exact
             mode (both sparsities: `pruned-mv` / `pruned` strategies). The same in onnxruntime:
             the plain dense export; sparsecomp's export without and with exact mode.
    ort      the opt case in stock onnxruntime: ORT on the plain dense export vs ORT on sparsecomp's
             export with exact mode (`export_onnx(..., activation_sparsity="exact")`).
    minilm   the real all-MiniLM-L6-v2 (GELU) in threshold mode at 40% and 50% and predictor mode at
             50%: quality = mean cosine of mean-pooled embeddings to dense on 128 evaluation
             sentences (disjoint from the 128 calibration sentences); the hidden sparsity those
             sentences actually get (real tokens only); the predictor's recall of the neurons
             threshold mode keeps; the MLPs' measured speedup (per layer, from the compile report)
             and end to end, on one sentence.

    .venv/bin/python benchmarks/bench_mlp.py [--quick] [--cases a,b] [--runs N] [--json PATH]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # OpenBLAS spin-waits starve the other pools
os.environ.setdefault("TVM_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import sparsecomp  # noqa: E402  (first, before torch: it may set torch's OpenMP spin count, sparsecomp/omp.py)

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import fx

sys.path.insert(0, str(Path(__file__).parent))
import bench_models as bm

from sparsecomp import api, models
from sparsecomp.api import CompiledModel
from sparsecomp.dialect import MLP_ACTIVATIONS, predictor_scores
from sparsecomp.ir import compare_outputs, flat_inputs

THREADS = 2
RESULTS = Path(__file__).parent / "results" / "mlp.json"
ALL_CASES = ["ffn", "gated", "opt", "pruned", "ort", "minilm"]
TARGETS = {  # issue #5, "Done when"
    "ffn_exact_vs_compiled_dense": 1.65, "ffn_exact_vs_eager": 1.65, "ffn_predictor_vs_dense": 5.0,
    "opt_exact_vs_compiled_dense": 1.25, "minilm_cosine_0.4": 0.985, "minilm_cosine_0.5": 0.97, "minilm_predictor_recall_0.5": 0.9,
}
log = bm.log


def lowered(cm) -> CompiledModel:
    """The compiled graph itself, whatever the end-to-end check chose."""
    return CompiledModel(cm.gm, cm.report, cm.backend)


def tir_dense(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` with every nn.Linear on the TIR dense GEMV at M = 1: the dense reference
    that reads its weights through the same kind of TIR code as exact mode. exact vs this is the
    gain of skipping inactive neurons alone. Unlike compile's dense lowering (`backends/torch/
    dense.py`, the same module), every layer is moved, whatever the timing says."""
    import copy

    from sparsecomp.backends.tir import _mlp
    from sparsecomp.backends.torch import TirDenseLinear

    k = _mlp.build_mlp_kernel("dense_mv")
    out = copy.deepcopy(model)
    for mname, mod in list(out.named_modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear):
                setattr(mod, name, TirDenseLinear(f"{mname}.{name}".lstrip("."), child.weight, child.bias, k))
    return out


def mlp_rows(cm) -> list[dict]:
    return [r for r in cm.report.rows if str(r.get("pattern", "")).startswith("mlp")]


def compile_timed(*args, **kwargs):
    t0 = time.perf_counter()
    cm = sparsecomp.compile(*args, **kwargs)
    return cm, time.perf_counter() - t0


def case_env() -> dict:
    return {"loadavg": [round(x, 2) for x in os.getloadavg()], "bandwidth_gbs": round(bm.measure_bandwidth(3), 1)}


# ---------------------------------------------------------------- ffn


def ffn(prune: str | None = None):
    """The zoo ReLU FFN at M = 1 with ~90% of its hidden outputs zero (weights pruned by `prune`):
    (model, example inputs, x, fraction of hidden neurons active)."""
    from sparsecomp.patterns import impose

    model, ex = models.get("mlp-relu", mlp_bias=-1.16)
    if prune:
        impose(model, prune)
    x = ex[0]
    with torch.no_grad():
        density = float((F.relu(model.fc1(x)) != 0).float().mean())
    log(f"ffn: 2048 -> 8192 -> 2048{f' with {prune} weights' if prune else ''}, M = 1, {density:.1%} of hidden neurons active")
    return model, ex, x, density


def case_ffn(args) -> dict:
    model, ex, x, density = ffn()
    dense_cm, t_dense = compile_timed(model, ex, name="ffn")
    exact_cm, t_exact = compile_timed(model, ex, activation_sparsity="exact", name="ffn")
    # 4096 rows: the predictor (rank 256 over 2048 inputs) needs many more rows than inputs
    cal = models.calibration("mlp-relu", 16 if args.quick else 64, mlp_bias=-1.16, batch=64)
    pred_cm, t_pred = compile_timed(model, ex, activation_sparsity="predictor:0.9", calibration=cal, name="ffn")
    exact, pred = lowered(exact_cm), lowered(pred_cm)
    td = tir_dense(model)
    with torch.no_grad():
        ok, err, allowed = compare_outputs(exact(x), model(x))
        td_ok = compare_outputs(td(x), model(x))[0]
    env = case_env()
    t = bm.timed({"eager": lambda: model(x), "compiled_dense": lambda: dense_cm(x), "tir_dense": lambda: td(x),
                  "exact": lambda: exact(x), "predictor": lambda: pred(x)}, args.runs, 3)
    e, d = t["eager"]["median_ms"], t["compiled_dense"]["median_ms"]
    prow, erow = mlp_rows(pred_cm)[0], mlp_rows(exact_cm)[0]
    pmod = next((mm for mm in pred.gm.modules() if type(mm).__name__ == "SparseMLP"), None)
    with torch.no_grad():
        selected = float(pmod._w.keep(x.reshape(1, -1)).float().mean()) if pmod is not None else float("nan")
    out = {
        "active_fraction": density, **env, "times": t,
        "compile_s": {"dense": t_dense, "exact": t_exact, "predictor": t_pred},
        "exact": {"kernel": erow["kernel"], "max_abs_error": err, "allowed": allowed, "ok": ok,
                  "vs_compiled_dense": d / t["exact"]["median_ms"], "vs_eager": e / t["exact"]["median_ms"],
                  "vs_tir_dense": t["tir_dense"]["median_ms"] / t["exact"]["median_ms"], "tir_dense_ok": td_ok,
                  "crossover": erow.get("crossover")},
        "predictor": {"kernel": prow["kernel"], "selected_fraction": selected, "active_and_selected": prow["density"],
                      "calibration": prow.get("calibration"),
                      "vs_dense": min(e, d) / t["predictor"]["median_ms"],
                      "vs_tir_dense": t["tir_dense"]["median_ms"] / t["predictor"]["median_ms"]},
        "dense_runs": dense_cm.runs,
    }
    log(f"  eager {e:.2f} ms, compiled dense {d:.2f} ms ({dense_cm.runs}), exact {t['exact']['median_ms']:.2f} ms "
        f"({out['exact']['vs_compiled_dense']:.2f}x vs compiled dense, {out['exact']['vs_eager']:.2f}x vs eager, "
        f"{out['exact']['vs_tir_dense']:.2f}x vs TIR dense {t['tir_dense']['median_ms']:.2f} ms; {erow['kernel']}), "
        f"predictor {t['predictor']['median_ms']:.2f} ms ({out['predictor']['vs_dense']:.2f}x; {prow['kernel']}, "
        f"{selected:.1%} selected, recall {prow.get('calibration', {}).get('recall')})")
    sweep = {}
    for m in ([1, 2, 4, 8, 16, 64] if not args.quick else [1, 4, 16]):
        xb = torch.randn(m, 2048, generator=torch.Generator().manual_seed(m))
        with torch.no_grad():
            h = F.relu(model.fc1(xb))
        union = float((h != 0).any(0).float().mean())
        chunks = [(h[i:i + 8] != 0).any(0).float().mean().item() for i in range(0, m, 8)]
        mod = next(mm for mm in exact.gm.modules() if type(mm).__name__ == "SparseMLP")
        path = "mv" if m == 1 else ("dense-fallback" if mod._mm is None or sum(chunks) / len(chunks) > mod._mm.crossover(len(chunks))
                                    else mod._mm.label)
        tt = bm.timed({"eager": lambda xb=xb: model(xb), "exact": lambda xb=xb: exact(xb)}, args.runs, 2)
        sweep[str(m)] = {"union_density": union, "chunk_density": sum(chunks) / len(chunks), "path": path,
                         "eager_ms": tt["eager"]["median_ms"], "exact_ms": tt["exact"]["median_ms"],
                         "speedup": tt["eager"]["median_ms"] / tt["exact"]["median_ms"]}
        log(f"  M={m:>2}: union {union:.0%} (chunks of 8: {sweep[str(m)]['chunk_density']:.0%}) -> {path}: "
            f"eager {tt['eager']['median_ms']:.2f} ms, exact {tt['exact']['median_ms']:.2f} ms ({sweep[str(m)]['speedup']:.2f}x)")
    out["batch_sweep"] = sweep
    return out


# ---------------------------------------------------------------- gated


class GatedFFN(torch.nn.Module):
    def __init__(self, hidden: int = 2048, ffn: int = 8192, gate_bias: float = -1.28):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.gate, self.up, self.down = torch.nn.Linear(hidden, ffn), torch.nn.Linear(hidden, ffn), torch.nn.Linear(ffn, hidden)
        with torch.no_grad():
            for lin in (self.gate, self.up, self.down):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) / lin.in_features ** 0.5)
                lin.bias.copy_(0.02 * torch.randn(lin.bias.shape, generator=g))
            self.gate.bias.add_(gate_bias)  # x ~ N(0, 1): gate pre-activations ~ N(bias, 1)

    def forward(self, x):
        return self.down(F.relu(self.gate(x)) * self.up(x))


def case_gated(args) -> dict:
    model = GatedFFN().eval()
    x = torch.randn(1, 2048, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        density = float((F.relu(model.gate(x)) != 0).float().mean())
    log(f"gated: gated ReLU FFN 2048 -> 8192 -> 2048, M = 1, {density:.1%} of gates nonzero")
    dense_cm, t_dense = compile_timed(model, (x,), name="gated-ffn")
    exact_cm, t_exact = compile_timed(model, (x,), activation_sparsity="exact", name="gated-ffn")
    exact = lowered(exact_cm)
    with torch.no_grad():
        ok, err, allowed = compare_outputs(exact(x), model(x))
    env = case_env()
    t = bm.timed({"eager": lambda: model(x), "compiled_dense": lambda: dense_cm(x), "exact": lambda: exact(x)}, args.runs, 3)
    (row,) = mlp_rows(exact_cm)
    out = {"active_fraction": density, **env, "times": t, "compile_s": {"dense": t_dense, "exact": t_exact},
           "kernel": row["kernel"], "measured_us": row.get("measured"), "max_abs_error": err, "allowed": allowed, "ok": ok,
           "vs_compiled_dense": t["compiled_dense"]["median_ms"] / t["exact"]["median_ms"],
           "vs_eager": t["eager"]["median_ms"] / t["exact"]["median_ms"]}
    log(f"  eager {t['eager']['median_ms']:.2f} ms, compiled dense {t['compiled_dense']['median_ms']:.2f} ms, exact "
        f"{t['exact']['median_ms']:.2f} ms ({out['vs_compiled_dense']:.2f}x vs compiled dense; {row['kernel']})")
    sweep = {}
    for m in ([2, 4, 8] if not args.quick else [4]):  # more rows per call (the M > 1 path of the same compile)
        xb = torch.randn(m, 2048, generator=torch.Generator().manual_seed(m))
        with torch.no_grad():
            ok_m = compare_outputs(exact(xb), model(xb))[0]
            union = float((F.relu(model.gate(xb)) != 0).any(0).float().mean())
        tt = bm.timed({"eager": lambda xb=xb: model(xb), "exact": lambda xb=xb: exact(xb)}, args.runs, 2)
        sweep[str(m)] = {"union_density": union, "ok": ok_m, "eager_ms": tt["eager"]["median_ms"], "exact_ms": tt["exact"]["median_ms"],
                         "speedup": tt["eager"]["median_ms"] / tt["exact"]["median_ms"]}
        log(f"  M={m}: gates nonzero in some row {union:.0%}: eager {tt['eager']['median_ms']:.2f} ms, exact "
            f"{tt['exact']['median_ms']:.2f} ms ({sweep[str(m)]['speedup']:.2f}x)")
    out["batch_sweep"] = sweep
    return out


# ---------------------------------------------------------------- opt


def case_opt(args) -> dict:
    kw = {"seq": 1, "batch": 1, "mlp_bias": -0.7}
    if args.quick:
        kw["layers"] = 4
    model, ex = models.get("opt-125m-like", **kw)
    log(f"opt: opt-125m-like one-token forward, {kw}")
    dense_cm, t_dense = compile_timed(model, ex, name="opt-125m-like")
    exact_cm, t_exact = compile_timed(model, ex, activation_sparsity="exact", name="opt-125m-like")
    exact = lowered(exact_cm)
    td = tir_dense(model)
    with torch.no_grad():
        ok, err, allowed = compare_outputs(exact(*ex), model(*ex))
        td_ok = compare_outputs(td(*ex), model(*ex))[0]
    env = case_env()
    # twice the rounds: one call's p10-p90 spans ~1.5x on this VM, and the target ratio is small
    t = bm.timed({"eager": lambda: model(*ex), "compiled_dense": lambda: dense_cm(*ex), "tir_dense": lambda: td(*ex),
                  "exact": lambda: exact(*ex)}, 2 * args.runs, 3)
    rows = mlp_rows(exact_cm)
    out = {**env, "config": kw, "times": t, "compile_s": {"dense": t_dense, "exact": t_exact},
           "max_abs_error": err, "allowed": allowed, "ok": ok, "dense_runs": dense_cm.runs,
           "torch_threads": {"compiled_dense": dense_cm.torch_threads, "exact": exact.torch_threads},
           "mlp_active_fraction": [r["density"] for r in rows], "mlp_kernels": sorted({r["kernel"] for r in rows}),
           "mlp_layer_speedup": sum(r["dense_us"] for r in rows) / sum(r["chosen_us"] for r in rows),
           "vs_compiled_dense": t["compiled_dense"]["median_ms"] / t["exact"]["median_ms"],
           "vs_eager": t["eager"]["median_ms"] / t["exact"]["median_ms"],
           "vs_tir_dense": t["tir_dense"]["median_ms"] / t["exact"]["median_ms"], "tir_dense_ok": td_ok}
    log(f"  eager {t['eager']['median_ms']:.2f} ms, compiled dense {t['compiled_dense']['median_ms']:.2f} ms ({dense_cm.runs}), "
        f"exact {t['exact']['median_ms']:.2f} ms: {out['vs_compiled_dense']:.2f}x vs compiled dense; TIR dense {t['tir_dense']['median_ms']:.2f} ms "
        f"({out['vs_tir_dense']:.2f}x); MLPs {out['mlp_layer_speedup']:.2f}x "
        f"(active {min(out['mlp_active_fraction']):.0%}-{max(out['mlp_active_fraction']):.0%}); torch ops on "
        f"{out['torch_threads']} threads (None: torch's setting)")
    return out


# ---------------------------------------------------------------- pruned


def case_pruned(args) -> dict:
    """Both sparsities at once: the ffn above with its weights pruned (magnitude, exact count per
    layer) AND ~90% of its ReLU outputs zero, at M = 1."""
    out = {}
    for spec in ("unstructured:0.5", "unstructured:0.9"):
        model, ex, x, density = ffn(spec)
        weights_cm, t_w = compile_timed(model, ex, name="ffn")
        both_cm, t_b = compile_timed(model, ex, activation_sparsity="exact", name="ffn")
        weights, both = lowered(weights_cm), lowered(both_cm)
        with torch.no_grad():
            ok, err, allowed = compare_outputs(both(x), model(x))
        env = case_env()
        fns = {"eager": model, "sparse_weights": weights, "both": both}
        t = bm.timed({k: (lambda f=f, x=x: f(x)) for k, f in fns.items()}, args.runs, 3)
        row = mlp_rows(both_cm)[0]
        ort = _ort_pruned(model, ex, x)
        out[spec] = {**env, "active_fraction": density, "times": t, "compile_s": {"sparse_weights": t_w, "both": t_b}, "ort": ort,
                     "max_abs_error": err, "allowed": allowed, "ok": ok,
                     "weights_kernels": [r["kernel"] for r in weights_cm.report.rows], "both_kernel": row["kernel"],
                     "both_reason": row["reason"],
                     "both_vs_sparse_weights": t["sparse_weights"]["median_ms"] / t["both"]["median_ms"],
                     "both_vs_eager": t["eager"]["median_ms"] / t["both"]["median_ms"]}
        log(f"  eager {t['eager']['median_ms']:.2f} ms, sparse weights only {t['sparse_weights']['median_ms']:.2f} ms, "
            f"both {t['both']['median_ms']:.2f} ms: {out[spec]['both_vs_sparse_weights']:.2f}x vs sparse weights only, "
            f"{out[spec]['both_vs_eager']:.2f}x vs eager ({row['kernel']})")
        log(f"  onnxruntime: dense export {ort['times']['ort_dense']['median_ms']:.2f} ms, sparse weights only "
            f"{ort['times']['ort_sparse_weights']['median_ms']:.2f} ms, both {ort['times']['ort_both']['median_ms']:.2f} ms "
            f"({ort['both_kernel']}): {ort['both_vs_sparse_weights']:.2f}x vs sparse weights only, "
            f"{ort['both_vs_ort_dense']:.2f}x vs ORT dense; files {ort['bytes']}")
    return out


def _ort_pruned(model, ex, x) -> dict:
    """The pruned ffn in onnxruntime: the plain dense export, sparsecomp's export without and with
    activation sparsity (timed side by side)."""
    import bench_onnx as bo
    import onnx
    from sparsecomp.backends.ort import files, session

    work = bm.scratch_dir("bench_mlp_pruned_")
    paths = {k: work / f"{k}.onnx" for k in ("ort_dense", "ort_sparse_weights", "ort_both")}
    bo.dense_export(model, ex, paths["ort_dense"])
    sparsecomp.export_onnx(model, ex, paths["ort_sparse_weights"], name="ffn")
    sparsecomp.export_onnx(model, ex, paths["ort_both"], activation_sparsity="exact", name="ffn")
    sess = {k: session(str(p)) for k, p in paths.items()}
    feeds = {k: bo.feeds_for(s, ex) for k, s in sess.items()}
    with torch.no_grad():
        ref = model(x)
    errs = {k: bo.max_rel_err(s.run(None, feeds[k])[0], ref) for k, s in sess.items()}
    t = bm.timed({k: (lambda s=s, f=feeds[k]: s.run(None, f)) for k, s in sess.items()}, 20, 3)
    (rec,) = [r for r in files.layers(onnx.load(str(paths["ort_both"]), load_external_data=False)) if r.get("op") == "sparse_mlp"]
    return {"times": t, "max_rel_error_vs_eager": errs, "both_kernel": rec["kernel"],
            "bytes": {k: files.file_bytes(p) for k, p in paths.items()},
            "both_vs_sparse_weights": t["ort_sparse_weights"]["median_ms"] / t["ort_both"]["median_ms"],
            "both_vs_ort_dense": t["ort_dense"]["median_ms"] / t["ort_both"]["median_ms"]}


# ---------------------------------------------------------------- ort


def case_ort(args) -> dict:
    """The opt case in stock onnxruntime: the plain dense export vs sparsecomp's export with exact
    mode (each MLP lowered to the standard-ONNX `active` / `dense` candidate measured in ORT)."""
    import bench_onnx as bo
    from sparsecomp.backends.ort import files, session

    kw = {"seq": 1, "batch": 1, "mlp_bias": -0.7, **({"layers": 4} if args.quick else {})}
    model, ex = models.get("opt-125m-like", **kw)
    log(f"ort: opt-125m-like one-token forward in onnxruntime, {kw}")
    work = bm.scratch_dir("bench_mlp_ort_")
    dense_path, sparse_path = work / "dense.onnx", work / "exact.onnx"
    bo.dense_export(model, ex, dense_path)
    t0 = time.perf_counter()
    sparsecomp.export_onnx(model, ex, sparse_path, activation_sparsity="exact", name="opt-125m-like")
    export_s = time.perf_counter() - t0
    import onnx

    layers = [r for r in files.layers(onnx.load(str(sparse_path))) if r.get("op") == "sparse_mlp"]
    s_dense, s_exact = session(str(dense_path)), session(str(sparse_path))
    f_dense, f_exact = bo.feeds_for(s_dense, ex), bo.feeds_for(s_exact, ex)
    with torch.no_grad():
        ref = model(*ex)
    errs = {"dense": bo.max_rel_err(s_dense.run(None, f_dense)[0], ref), "exact": bo.max_rel_err(s_exact.run(None, f_exact)[0], ref)}
    env = case_env()
    t = bm.timed({"ort_dense": lambda: s_dense.run(None, f_dense), "ort_exact": lambda: s_exact.run(None, f_exact)}, args.runs, 3)
    kinds: dict = {}
    for r in layers:
        kinds[r["kernel"]] = kinds.get(r["kernel"], 0) + 1
    out = {**env, "config": kw, "times": t, "export_s": export_s, "max_rel_error_vs_eager": errs,
           "ok": all(v <= 1e-4 for v in errs.values()), "mlp_kernels": kinds,
           "vs_ort_dense": t["ort_dense"]["median_ms"] / t["ort_exact"]["median_ms"]}
    log(f"  ORT dense {t['ort_dense']['median_ms']:.2f} ms, ORT exact {t['ort_exact']['median_ms']:.2f} ms: "
        f"{out['vs_ort_dense']:.2f}x; MLP lowerings {kinds}; errors {errs}")
    return out


# ---------------------------------------------------------------- minilm


class _KeepRecorder(fx.Interpreter):
    """Runs a rewritten graph on the reference ops, keeping each sparse_mlp's keep-mask and the
    threshold-mode score of its true hidden activation (|h| x scale) on the same input."""

    def __init__(self, gm):
        super().__init__(gm)
        self.masks: list[torch.Tensor] = []
        self.true_scores: list[torch.Tensor] = []

    def call_function(self, target, args, kwargs):
        if "sparse_mlp" in str(target):
            x, wu, bu, wg, bg, _, _, act, mode, thr, scale, pa, pb = args
            f = MLP_ACTIVATIONS[act]
            h = f(F.linear(x, wu, bu)) if wg is None else f(F.linear(x, wg, bg)) * F.linear(x, wu, bu)
            true = h.abs() * scale if scale is not None else h.abs()
            if mode == "threshold":
                s = true
            else:
                s = predictor_scores(x, pa, pb, bu if wg is None else bg, act, scale)
            self.masks.append(s > thr)
            self.true_scores.append(true)
        return super().call_function(target, args, kwargs)


def _thresholds(gm) -> list[torch.Tensor]:
    """The threshold argument of every sparse_mlp node, in graph order."""
    return [getattr(gm, n.args[9].target) for n in gm.graph.nodes if "sparse_mlp" in str(n.target)]


def _embed(out, mask):
    m = mask.unsqueeze(-1).float()
    return (out * m).sum(1) / m.sum(1)


def case_minilm(args) -> dict:
    from sparsecomp.models import minilm, text

    model = minilm.load()
    n = 64 if args.quick else 128
    cal = [minilm.tokenize([s]) for s in text.sentences(n, split="calibration", seed=0)]  # one sentence each: no padding
    ev_s = text.sentences(n, split="evaluation", seed=0)
    ev = [minilm.tokenize(ev_s[i:i + 16]) for i in range(0, n, 16)]
    ex = minilm.tokenize(ev_s[:1])
    with torch.no_grad():
        dense = [_embed(model(**b), b["attention_mask"]) for b in ev]
    log(f"minilm: {n} calibration sentences (one per batch), {n} evaluation sentences (disjoint), example = 1 sentence "
        f"({ex['input_ids'].shape[1]} tokens)")
    out: dict = {"calibration_sentences": n, "evaluation_sentences": n, "example_tokens": int(ex["input_ids"].shape[1])}
    graphs = {}
    for spec in ("threshold:0.4", "threshold:0.5", "predictor:0.5"):
        # verify=False, checked below instead: compile's end-to-end check (rtol 1e-4 against the
        # rewritten graph) fails now and then in lossy modes, when rounding differences from an
        # earlier layer's kernel flip a later neuron sitting at its threshold (see the report)
        cm, t_c = compile_timed(model, ex, activation_sparsity=spec, calibration=cal, name="minilm", verify=False)
        low = lowered(cm)
        with torch.no_grad():
            cos = torch.cat([F.cosine_similarity(_embed(low(**b), b["attention_mask"]), d, dim=-1) for b, d in zip(ev, dense)])
        # the hidden sparsity on the evaluation text (real tokens), from the rewritten graph on reference ops
        mode, s = spec.split(":")
        gm, _ = api.run_pipeline(model, ex, f'find-mlps,sparse-mlp{{mode="{mode}",sparsity={s}}}', calibration=cal)
        graphs[spec] = gm
        with torch.no_grad():  # the compiled model against the op's definition, on the evaluation text
            agree = torch.cat([F.cosine_similarity(_embed(low(**b), b["attention_mask"]), _embed(gm(**b), b["attention_mask"]), dim=-1)
                               for b in ev])
        kept = total = 0
        for b in ev:
            rec = _KeepRecorder(gm)
            with torch.no_grad():
                rec.run(*flat_inputs(gm, (), b))
            real = b["attention_mask"].bool().unsqueeze(-1)
            for msk in rec.masks:
                kept += int((msk & real).sum())
                total += int(real.sum()) * msk.shape[-1]
        rows = mlp_rows(cm)
        env = case_env()
        t = bm.timed({"eager": lambda: model(**ex), "compiled": lambda low=low: low(**ex)}, args.runs, 2)
        res = {**env, "compile_s": t_c, "mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
               "compiled_vs_reference_graph_min_cosine": float(agree.min()),
               "eval_hidden_sparsity": 1 - kept / total,
               "calibration": [r.get("calibration") for r in rows], "kernels": sorted({r["kernel"] for r in rows}),
               "mlp_layer_speedup": sum(r["dense_us"] for r in rows) / sum(r["chosen_us"] for r in rows),
               "mlp_measured_us": [{"dense": r["dense_us"], "chosen": r["chosen_us"], "kernel": r["kernel"],
                                    "measured": r.get("measured")} for r in rows],
               "times": t, "end_to_end_vs_eager": t["eager"]["median_ms"] / t["compiled"]["median_ms"]}
        recalls = [c.get("recall") for c in res["calibration"] if c and c.get("recall") is not None]
        if recalls:
            res["calibration_recall"] = sum(recalls) / len(recalls)
        out[spec] = res
        log(f"  {spec}: cosine {res['mean_cosine']:.4f} (min {res['min_cosine']:.3f}), hidden sparsity on evaluation text "
            f"{res['eval_hidden_sparsity']:.3f}, MLP layers {res['mlp_layer_speedup']:.2f}x ({', '.join(res['kernels'])}), "
            f"end to end {res['end_to_end_vs_eager']:.2f}x vs eager" + (f", calibration recall {res['calibration_recall']:.3f}" if recalls else ""))
    # The predictor's recall of the neurons threshold mode keeps, on the evaluation text (real
    # tokens), layer by layer on the same inputs: in the predictor graph, each MLP's input gives
    # both the predictor's selection and the neurons threshold:0.5's thresholds would keep.
    t_thr = _thresholds(graphs["threshold:0.5"])
    hit = want = 0
    for b in ev:
        rec = _KeepRecorder(graphs["predictor:0.5"])
        with torch.no_grad():
            rec.run(*flat_inputs(graphs["predictor:0.5"], (), b))
        real = b["attention_mask"].bool().unsqueeze(-1)
        for mp, true, t in zip(rec.masks, rec.true_scores, t_thr, strict=True):
            mt = true > t
            hit += int((mt & mp & real).sum())
            want += int((mt & real).sum())
    out["predictor:0.5"]["eval_recall_of_threshold_kept"] = hit / want
    log(f"  predictor:0.5 recall of the neurons threshold:0.5 keeps (same inputs, evaluation text): {hit / want:.3f}")
    return out


# ---------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(ALL_CASES))
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="fewer runs, smaller sweeps (a smoke test)")
    p.add_argument("--json", default=str(RESULTS))
    a = p.parse_args(argv)
    a.case_list = [c.strip() for c in a.cases.split(",") if c.strip()]
    unknown = set(a.case_list) - set(ALL_CASES)
    if unknown:
        p.error(f"unknown cases {sorted(unknown)}; cases: {', '.join(ALL_CASES)}")
    if a.quick:
        a.runs = min(a.runs, 5)
    return a


def verdicts(cases: dict) -> dict:
    got = {}
    if "ffn" in cases:
        got["ffn_exact_vs_compiled_dense"] = cases["ffn"]["exact"]["vs_compiled_dense"]
        got["ffn_exact_vs_eager"] = cases["ffn"]["exact"]["vs_eager"]
        got["ffn_predictor_vs_dense"] = cases["ffn"]["predictor"]["vs_dense"]
    if "opt" in cases:
        got["opt_exact_vs_compiled_dense"] = cases["opt"]["vs_compiled_dense"]
    if "minilm" in cases:
        got["minilm_cosine_0.4"] = cases["minilm"]["threshold:0.4"]["mean_cosine"]
        got["minilm_cosine_0.5"] = cases["minilm"]["threshold:0.5"]["mean_cosine"]
        got["minilm_predictor_recall_0.5"] = cases["minilm"]["predictor:0.5"]["eval_recall_of_threshold_kept"]
    verdict = {k: {"target": TARGETS[k], "measured": v, "met": v >= TARGETS[k]} for k, v in got.items()}
    # "never slower than dense at any M (falls back)": every batch of the sweeps, strictly and
    # within the 5% timing noise (an M whose MLP falls back to dense times dense against dense)
    for case in ("ffn", "gated"):
        sweep = cases.get(case, {}).get("batch_sweep")
        if sweep:
            worst = min(v["speedup"] for v in sweep.values())
            verdict[f"{case}_never_slower_any_m"] = {"target": 1.0, "measured": worst, "met": worst >= 1.0,
                                                     "within_5pct_noise": worst >= 0.95}
    # MiniLM threshold mode: the hidden sparsity reached on the evaluation text, at least the target
    for target in (0.4, 0.5):
        res = cases.get("minilm", {}).get(f"threshold:{target}")
        if res and "eval_hidden_sparsity" in res:
            verdict[f"minilm_eval_sparsity_{target}"] = {"target": target, "measured": res["eval_hidden_sparsity"],
                                                         "met": res["eval_hidden_sparsity"] >= target}
    return verdict


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["SPARSECOMP_CACHE_DIR"] = str(bm.scratch_dir("bench_mlp_"))
    sparsecomp.set_num_threads(THREADS)
    results = {"schema": 1, "quick": args.quick, "threads": THREADS, "runs": args.runs,
               "machine": {"cpu": bm.cpu_model(), "isa": bm.cpu_isa(), "cores": os.cpu_count(), "platform": platform.platform()},
               "versions": bm.versions(), "background_cpu_start": bm.background_cpu(), "cases": {}}
    log(f"bench_mlp: {results['machine']['cpu']}, {THREADS} threads, load {os.getloadavg()[0]:.2f}, "
        f"other processes' CPU {results['background_cpu_start']:.0%}")
    runners = {"ffn": case_ffn, "gated": case_gated, "opt": case_opt, "pruned": case_pruned, "ort": case_ort, "minilm": case_minilm}
    for case in args.case_list:
        t0 = time.perf_counter()
        try:
            results["cases"][case] = runners[case](args)
        except Exception as err:  # noqa: BLE001 - one case failing (e.g. minilm without the hf extra) keeps the others
            log(f"case {case} FAILED: {type(err).__name__}: {err}")
            results.setdefault("failed", {})[case] = f"{type(err).__name__}: {err}"
            continue
        results["cases"][case]["case_s"] = time.perf_counter() - t0
    results["targets"] = verdicts(results["cases"])
    for k, v in results["targets"].items():
        noise = "" if "within_5pct_noise" not in v else f" (within 5% timing noise: {'yes' if v['within_5pct_noise'] else 'no'})"
        log(f"target {k}: {v['measured']:.3f} vs {v['target']} -> {'met' if v['met'] else 'NOT met'}{noise}")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str))
    log(f"wrote {path}")
    return 1 if results.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
