"""End to end: sparse zoo models compiled for the torch backend against eager torch and ONNX Runtime.

Side by side in ONE process, 2 threads everywhere (torch and TVM through
`sparsecomp.set_num_threads(2)`, ONNX Runtime `intra_op_num_threads=2` on one shared global pool,
OpenBLAS 1). Within a case the contenders are timed interleaved, round-robin, with the core harness
(`sparsecomp.timing.compare`): medians of >= 20 rounds after warm-up, with a 50 ms pause between
contenders so that the previous runtime's spin-waiting workers have parked (a spinning ORT pool
made the next eager call 2x slower here; the pauses are not timed). Read bandwidth swings from
minute to minute here (DESIGN.md section 3), so only ratios measured in the same case mean
anything; the read bandwidth of a 512 MiB `tensor.sum()` is measured before every case and recorded.

Cases (`--cases`, comma-separated; default all):

    bert-base-u90      zoo bert-base (seq 128, batch 1), every encoder Linear 90% unstructured
    bert-base-u70      the same at 70%
    bert-base-dense    the dense model: compiled must be >= 0.95x eager (it falls back to eager)
    deepsparse         DeepSparse 1.8 on the 90% export, in its own venv (/tmp/ds), via a subprocess
    mlp-relu-u90       zoo mlp-relu (2048 -> 8192 -> 2048, M = 1), 90% unstructured
    mlp-relu-b16x1     the same with 90% of its 16x1 blocks zero

Each model case times eager torch, `sparsecomp.compile(model, example, backend="torch")`, ONNX
Runtime on the DENSE model's export (the stronger dense baseline) and, for sparse cases, ONNX
Runtime on the sparse weights' export (zeros buy nothing there). Exports use the legacy exporter at
opset 17 (DeepSparse 1.8 reads it). Compiles start from an empty temporary SPARSECOMP_CACHE_DIR
(`--cache-dir D` reuses one), so the compile time includes measuring every layer and building
the TIR kernels.

    .venv/bin/python benchmarks/bench_models.py [--quick] [--cases a,b] [--runs N] [--json PATH]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # OpenBLAS spin-waits starve the other pools
os.environ.setdefault("TVM_NUM_THREADS", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import sparsecomp  # noqa: E402  (first, before torch: it may set torch's OpenMP spin count, sparsecomp/omp.py)

import argparse  # noqa: E402
import atexit  # noqa: E402
import collections  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sparsecomp import models  # noqa: E402
from sparsecomp.timing import OthersCpu, compare, read_bandwidth, settle  # noqa: E402

THREADS = 2
RESULTS = Path(__file__).parent / "results" / "bench_models.json"
ALL_CASES = ["bert-base-u90", "bert-base-u70", "bert-base-dense", "deepsparse", "mlp-relu-u90", "mlp-relu-b16x1"]
TARGETS = {  # issue #3: compiled vs ORT dense (sparse cases), compiled vs eager (dense case)
    "bert-base-u90": ("vs_ort_dense", 2.2),
    "bert-base-u70": ("vs_ort_dense", 1.3),
    "bert-base-dense": ("vs_eager", 0.95),
}
DS_PYTHON = "/tmp/ds/bin/python"
DS_SPEC = "deepsparse==1.8.0"
SETTLE_S = 0.05  # settle between contenders in a round (spin-waiting pools park meanwhile; `timing.settle`)


# ---------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_isa() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return sorted(f for f in flags if f in ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16"))
    except OSError:
        pass
    return []


def measure_bandwidth(reps: int = 5) -> float:
    """Read bandwidth in GB/s of a 512 MiB float32 `tensor.sum()` (median of reps)."""
    return read_bandwidth(reps=reps) / 1e9


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__, "sparsecomp": sparsecomp.__version__}
    try:
        import onnxruntime as ort

        out["onnxruntime"] = ort.__version__
    except ImportError:
        out["onnxruntime"] = None
    try:
        import tvm

        out["tvm"] = tvm.__version__
    except Exception:  # noqa: BLE001
        out["tvm"] = None
    try:
        import onnx

        out["onnx"] = onnx.__version__
    except ImportError:
        out["onnx"] = None
    return out


# ---------------------------------------------------------------- ONNX Runtime

_ORT_POOL = False


def ort_session(path: Path):
    """A CPU session on the process-wide shared thread pool (2 intra-op threads, 1 inter-op)."""
    global _ORT_POOL
    import onnxruntime as ort

    if not _ORT_POOL:  # must come before the first session creates the environment
        from onnxruntime.capi import _pybind_state as C

        C.set_global_thread_pool_sizes(THREADS, 1)
        _ORT_POOL = True
    so = ort.SessionOptions()
    so.use_per_session_threads = False  # intra/inter sizes come from the global pool (THREADS, 1)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def export_onnx(model, example, path: Path) -> float:
    """Legacy exporter, opset 17 (DeepSparse 1.8 and every ORT read it). Returns seconds."""
    names = list(example) if isinstance(example, dict) else [f"input_{i}" for i in range(len(example))]
    args = tuple(example.values()) if isinstance(example, dict) else tuple(example)
    t0 = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings of the legacy exporter: known, harmless here
        torch.onnx.export(model, args, str(path), input_names=names, output_names=["output"], opset_version=17,
                          dynamo=False, do_constant_folding=True)
    return time.perf_counter() - t0


def ort_feed(example) -> dict:
    if isinstance(example, dict):
        return {k: v.numpy() for k, v in example.items()}
    return {f"input_{i}": t.numpy() for i, t in enumerate(example)}


# ---------------------------------------------------------------- helpers


def call(model, example):
    return model(**example) if isinstance(example, dict) else model(*example)


def max_err(a, b) -> float:
    a = torch.as_tensor(a).float()
    b = torch.as_tensor(b).float()
    return float((a - b).abs().max())


def kernel_family(label: str) -> str:
    return label.split("{", 1)[0]


def summarize_compile(cm, compile_s: float) -> dict:
    rep = cm.report.to_dict()
    rows = rep["layers"]
    sparse = [r for r in rows if r["decision"] == "sparse"]
    fam = collections.Counter(kernel_family(r["kernel"]) for r in sparse)
    lab = collections.Counter(r["kernel"] for r in sparse)
    return {
        "compile_s": compile_s,
        "compile_s_per_layer": compile_s / len(rows) if rows else None,
        "layers": len(rows),
        "sparse_layers": len(sparse),
        "runs": cm.runs,
        "end_to_end": cm.report.end_to_end,
        "kernel_families": dict(fam.most_common()),
        "kernels": dict(lab.most_common()),
        "cached_decisions": sum(bool(r.get("cached")) for r in rows),
        "report": rep,
    }


def timed(cands: dict, runs: int, warmup: int, settle_s: float = SETTLE_S) -> dict:
    """Interleaved medians (ms) with p10/p90; never cut short by time (>= runs rounds).

    Before every timed call the round settles for `settle_s` (untimed; `compare`'s `between`),
    and each round runs the contenders in a new order: ORT's, OpenMP's and TVM's pools spin-wait
    after a call, and measured here a spinning ORT pool made the next eager torch call 2x slower.
    The settle lets them park first, with the cores kept busy (`sparsecomp.timing.settle`: a
    plain sleep made the next call pay for the cores' wake-up, up to 2x on the Intel VM).
    """
    with torch.no_grad():
        res = compare(cands, warmup=warmup, min_runs=runs, max_seconds=float("inf"),
                      between=settle(settle_s) if settle_s > 0 else None)
    return {k: {"median_ms": m.median * 1e3, "p10_ms": m.p10 * 1e3, "p90_ms": m.p90 * 1e3, "runs": m.runs}
            for k, m in res.items() if k in cands}


def background_cpu(seconds: float = 1.0) -> float:
    """Fraction of the machine's CPU time used by OTHER processes over `seconds` (this one sleeps;
    its own threads' time, e.g. pools still spinning, is subtracted)."""
    def snap():
        v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        own = os.times()
        return sum(v), sum(v) - v[3] - v[4], (own.user + own.system) * os.sysconf("SC_CLK_TCK")
    try:
        t0, b0, s0 = snap()
        time.sleep(seconds)
        t1, b1, s1 = snap()
        return round(max(0.0, (b1 - b0) - (s1 - s0)) / max(t1 - t0, 1), 3)
    except (OSError, ValueError, IndexError):
        return float("nan")


def wait_quiet(max_wait_s: float, threshold: float = 0.1) -> float:
    """Wait (up to max_wait_s) until other processes use < threshold of the CPUs; returns seconds waited."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait_s:
        if background_cpu(1.0) < threshold:
            break
    return time.perf_counter() - t0


def scratch_dir(prefix: str) -> Path:
    """A temporary folder removed when the benchmark exits: exports of bert-size models are about
    1 GB each, and leaked ones filled the disk of a shared machine."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def log(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------- the bench


class Bench:
    def __init__(self, args, workdir: Path):
        self.args = args
        self.work = workdir
        self.quick = args.quick
        self.runs = args.runs or (5 if args.quick else 20)
        self.warmup = 1 if args.quick else 3
        self.bert_overrides = {"layers": 2} if args.quick else {}
        self._dense_onnx: dict[str, Path] = {}
        self.u90_onnx: Path | None = None
        self.u90_example = None
        self.u90_ort_ms: float | None = None
        self.u90_compiled_ms: float | None = None

    # -- models
    def bert(self):
        return models.get("bert-base", **self.bert_overrides)

    def dense_onnx(self, name: str, model, example) -> Path:
        """The dense model's export, made once per model."""
        if name not in self._dense_onnx:
            path = self.work / f"{name}-dense.onnx"
            s = export_onnx(model, example, path)
            log(f"  exported dense {name} to ONNX in {s:.1f} s")
            self._dense_onnx[name] = path
        return self._dense_onnx[name]

    def model_case(self, case: str, zoo: str, spec: str | None, layers_glob: str | None) -> dict:
        if zoo == "bert-base":
            model, example = self.bert()
        else:
            model, example = models.get(zoo)
        dense_path = self.dense_onnx(zoo, model, example)
        imposed = []
        if spec:
            imposed = sparsecomp.impose(model, spec, layers=layers_glob)
        out: dict = {"model": zoo, "overrides": self.bert_overrides if zoo == "bert-base" else {},
                     "pattern": spec or "dense", "layers_imposed": len(imposed),
                     "inputs": {k: list(v.shape) for k, v in example.items()} if isinstance(example, dict)
                     else [list(t.shape) for t in example]}

        sparse_path = None
        if spec:
            sparse_path = self.work / f"{case}.onnx"
            out["export_s"] = export_onnx(model, example, sparse_path)

        log(f"  compiling ({len(imposed)} layers imposed {spec or 'nothing'}) ...")
        gc.collect()
        t0 = time.perf_counter()
        with OthersCpu() as mon:
            cm = sparsecomp.compile(model, example, backend="torch", max_seconds_per_layer=self.args.max_seconds_per_layer)
        compile_s = time.perf_counter() - t0
        out["compile"] = summarize_compile(cm, compile_s)
        out["compile"]["others_cpu_while_compiling"] = mon.share
        c = out["compile"]
        log(f"  compiled in {compile_s:.1f} s ({c['compile_s_per_layer'] or 0:.2f} s/layer), "
            f"{c['sparse_layers']}/{c['layers']} layers sparse, runs: {c['runs']}, kernels: {c['kernel_families']}; "
            f"other processes used {mon.share:.0%} of the CPUs meanwhile")

        feed = ort_feed(example)
        with torch.no_grad():
            ref = call(model, example)
            errs = {"compiled": max_err(call(cm, example), ref)}
        sess_dense = ort_session(dense_path)
        cands = {"eager": lambda: call(model, example), "compiled": lambda: call(cm, example),
                 "ort_dense": lambda: sess_dense.run(None, feed)}
        # the ORT dense session runs the DENSE weights: its output is not compared with the sparse model
        if sparse_path is not None:
            sess_sparse = ort_session(sparse_path)
            errs["ort_sparse_export"] = max_err(sess_sparse.run(None, feed)[0], ref)
            cands["ort_sparse_export"] = lambda: sess_sparse.run(None, feed)
        else:
            errs["ort_dense"] = max_err(sess_dense.run(None, feed)[0], ref)
        out["max_abs_error_vs_eager"] = errs

        t, attempts = self.timed_clean(cands)
        out["times"] = t
        out["others_cpu_while_timing"] = min(a["others_cpu"] for a in attempts)
        out["timing_attempts"] = attempts
        e, k, o = t["eager"]["median_ms"], t["compiled"]["median_ms"], t["ort_dense"]["median_ms"]
        out["speedup"] = {"vs_eager": e / k, "vs_ort_dense": o / k, "ort_dense_vs_eager": e / o}
        if "ort_sparse_export" in t:
            out["speedup"]["ort_sparse_export_vs_ort_dense"] = o / t["ort_sparse_export"]["median_ms"]
        if case in TARGETS:
            key, target = TARGETS[case]
            out["target"] = {"metric": key, "target": target, "measured": out["speedup"][key],
                             "met": out["speedup"][key] >= target}
        if case == "bert-base-u90":
            self.u90_onnx, self.u90_example, self.u90_ort_ms, self.u90_compiled_ms = sparse_path, example, o, k
        cm = sess_dense = cands = None  # free them before the next case (not del: the lambdas above name them)
        gc.collect()
        return out

    def timed_clean(self, cands: dict) -> tuple[dict, list]:
        """Time `cands` (after waiting for other processes to go quiet); if others still used more
        than 10% of the CPUs meanwhile, wait and time once more, and keep the cleaner attempt."""
        attempts, best = [], None
        for attempt in range(2):
            waited = wait_quiet(self.args.wait_quiet) if self.args.wait_quiet > 0 else 0.0
            log(f"  timing {', '.join(cands)} interleaved, {self.runs} rounds"
                + (f" (waited {waited:.0f} s for quiet)" if waited > 1.5 else "") + " ...")
            with OthersCpu() as mon:
                t = timed(cands, self.runs, self.warmup)
            attempts.append({"others_cpu": mon.share, "waited_s": round(waited, 1),
                             "medians_ms": {k: round(v["median_ms"], 3) for k, v in t.items()}})
            if best is None or mon.share < best[1]:
                best = (t, mon.share)
            if mon.share <= 0.1:
                break
            log(f"  other processes used {mon.share:.0%} of the CPUs meanwhile"
                + ("; timing again" if attempt == 0 else "; keeping the cleaner attempt"))
        return best[0], attempts

    # -- DeepSparse
    def deepsparse(self) -> dict:
        """DeepSparse 1.8 in its own venv (never a project dependency), through a subprocess."""
        t_start = time.perf_counter()
        py = Path(self.args.deepsparse_python)
        info: dict = {"python": str(py)}
        if not py.exists():
            if self.args.no_deepsparse_install:
                return {"available": False, "why": f"{py} does not exist and --no-deepsparse-install was given"}
            venv = py.parent.parent
            log(f"  installing {DS_SPEC} into {venv} (one attempt, <= 8 min) ...")
            try:
                subprocess.run(["python3", "-m", "venv", str(venv)],
                               check=True, capture_output=True, timeout=120)
                r = subprocess.run([str(py), "-m", "pip", "install", "-q", DS_SPEC], capture_output=True, text=True, timeout=480)
            except (subprocess.SubprocessError, OSError) as err:
                return {"available": False, "why": f"install failed: {type(err).__name__}: {err}"[:400]}
            if r.returncode != 0:
                tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
                return {"available": False, "why": "pip install failed: " + " | ".join(tail)[:400]}
            info["installed_now_s"] = time.perf_counter() - t_start
        probe = subprocess.run([str(py), "-c", "import deepsparse, json; from deepsparse import cpu; "
                                "print(json.dumps({'version': deepsparse.__version__, 'cpu': cpu.cpu_architecture()}))"],
                               capture_output=True, text=True, timeout=120, env=self._ds_env())
        if probe.returncode != 0:
            tail = probe.stderr.strip().splitlines()[-2:]
            return {"available": False, "why": "import deepsparse failed: " + " | ".join(tail)[:400]}
        meta = json.loads(probe.stdout.strip().splitlines()[-1])
        info.update(version=meta["version"], isa=meta["cpu"].get("isa"), cores=meta["cpu"].get("num_cores"))

        if self.u90_onnx is None:  # `--cases deepsparse` alone: make the 90% export here
            model, example = self.bert()
            self.dense_onnx("bert-base", model, example)
            sparsecomp.impose(model, "unstructured:0.9", layers="encoder.*")
            self.u90_onnx = self.work / "bert-base-u90.onnx"
            export_onnx(model, example, self.u90_onnx)
            self.u90_example = example
            del model
        np.savez(self.work / "ds_inputs.npz", **ort_feed(self.u90_example))
        script = self.work / "ds_bench.py"
        script.write_text(DS_SCRIPT)
        cmd = [str(py), str(script), str(self.u90_onnx), str(self._dense_onnx["bert-base"]), str(self.work / "ds_inputs.npz"),
               str(THREADS), str(self.runs), str(self.warmup), str(SETTLE_S)]
        log("  running DeepSparse in its venv (interleaved with that venv's ORT on the dense export) ...")
        try:
            waited = wait_quiet(self.args.wait_quiet) if self.args.wait_quiet > 0 else 0.0
            info["waited_for_quiet_s"] = round(waited, 1)
            with OthersCpu() as mon:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=self._ds_env())
            info["others_cpu_while_timing"] = mon.share
        except subprocess.TimeoutExpired:
            return {**info, "available": False, "why": "DeepSparse run timed out (600 s)"}
        if r.returncode != 0:
            tail = r.stderr.strip().splitlines()[-3:]
            return {**info, "available": False, "why": "DeepSparse run failed: " + " | ".join(tail)[:400]}
        res = json.loads(r.stdout.strip().splitlines()[-1])
        info.update(available=True, **res)
        info["speedup"] = {"vs_ort_dense_same_subprocess": res["ort_dense"]["median_ms"] / res["deepsparse"]["median_ms"]}
        if self.u90_ort_ms:
            info["speedup"]["vs_ort_dense_main_process"] = self.u90_ort_ms / res["deepsparse"]["median_ms"]
        if self.u90_compiled_ms:
            # issue #3: compiled bert-base 90% faster than DeepSparse. The two are timed minutes
            # apart (DeepSparse in its own venv), so besides the plain ratio of medians, each is
            # also taken relative to the ORT dense timed beside it; both must be >= 1
            ds_ms, ours = res["deepsparse"]["median_ms"], self.u90_compiled_ms
            plain = ds_ms / ours
            normalised = (self.u90_ort_ms / ours) / info["speedup"]["vs_ort_dense_same_subprocess"]
            info["compiled_vs_deepsparse"] = {"compiled_ms": ours, "deepsparse_ms": ds_ms, "plain": plain,
                                              "relative_to_ort_dense": normalised}
            info["target"] = {"metric": "compiled_vs_deepsparse", "target": 1.0, "measured": min(plain, normalised),
                              "met": min(plain, normalised) > 1.0}  # "faster than"
        info["wall_s"] = time.perf_counter() - t_start
        return info

    @staticmethod
    def _ds_env() -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
        env.update(OPENBLAS_NUM_THREADS="1", NM_DISABLE_ANALYTICS="1", NM_SPARSEZOO_DISABLE_ANALYTICS="1")
        return env


DS_SCRIPT = textwrap.dedent('''
    """Run by bench_models.py with DeepSparse's venv: DeepSparse vs ORT dense, interleaved."""
    import json, os, statistics, sys, time
    import numpy as np

    sparse_path, dense_path, inputs_path, threads, runs, warmup, settle = sys.argv[1:8]
    threads, runs, warmup, settle = int(threads), int(runs), int(warmup), float(settle)
    feed = dict(np.load(inputs_path))
    import onnxruntime as ort
    from deepsparse import compile_model

    t0 = time.perf_counter()
    engine = compile_model(sparse_path, batch_size=1, num_cores=threads)
    ds_compile_s = time.perf_counter() - t0
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    dense = ort.InferenceSession(dense_path, so, providers=["CPUExecutionProvider"])
    sparse_ort = ort.InferenceSession(sparse_path, so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sparse_ort.get_inputs()]
    ds_inputs = [feed[n] for n in names]
    ref = sparse_ort.run(None, feed)[0]
    out = engine.run(ds_inputs)[0]
    err = float(np.abs(out.astype(np.float32) - ref).max())
    del sparse_ort
    cands = {"deepsparse": lambda: engine.run(ds_inputs), "ort_dense": lambda: dense.run(None, feed)}
    for fn in cands.values():
        for _ in range(warmup):
            fn()
    samples = {k: [] for k in cands}
    busy = np.ones(1 << 20, dtype=np.float32)
    for _ in range(runs):
        for k, fn in cands.items():
            # DeepSparse's and ORT's workers spin after a call: let them park, the cores kept busy
            # (sparsecomp.timing.settle, which this venv does not have)
            end = time.perf_counter() + settle
            while time.perf_counter() < end:
                busy.sum()
            time.sleep(0.002)
            t = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - t)
    def q(xs, p):
        s = sorted(xs)
        return s[min(len(s) - 1, int(p * len(s)))]
    res = {k: {"median_ms": statistics.median(v) * 1e3, "p10_ms": q(v, 0.1) * 1e3, "p90_ms": q(v, 0.9) * 1e3, "runs": len(v)}
           for k, v in samples.items()}
    alone = []  # DeepSparse back to back, nothing in between (its best case)
    for _ in range(runs):
        t = time.perf_counter()
        engine.run(ds_inputs)
        alone.append(time.perf_counter() - t)
    res["deepsparse_back_to_back"] = {"median_ms": statistics.median(alone) * 1e3, "runs": len(alone)}
    res["compile_s"] = ds_compile_s
    res["max_abs_error_vs_ort_sparse_export"] = err
    res["ort_version"] = ort.__version__
    res["engine"] = str(engine).splitlines()[0][:200]
    print(json.dumps(res))
''')


# ---------------------------------------------------------------- output


def fmt_ms(x) -> str:
    return "-" if x is None else f"{x:8.2f}"


def fmt_x(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def print_table(results: dict) -> None:
    cases = results["cases"]
    log("")
    log(f"sparsecomp end-to-end, torch backend, {results['threads']} threads, {results['machine']['cpu']}; "
        f"read bandwidth {results['bandwidth_gbs']['start']:.1f} GB/s at start")
    hdr = (f"{'case':<18} {'eager ms':>9} {'compiled':>9} {'ORT dense':>9} {'ORT sp.exp':>10} {'vs eager':>9} "
           f"{'vs ORT':>7} {'sparse':>7} {'runs':>8} {'compile s':>9} {'others':>6}  top kernels")
    log(hdr)
    log("-" * len(hdr))
    for name, c in cases.items():
        if name == "deepsparse" or "error" in c:
            continue
        t, s, comp = c["times"], c["speedup"], c["compile"]
        kern = ", ".join(f"{k} x{n}" for k, n in list(comp["kernel_families"].items())[:3]) or "-"
        log(f"{name:<18} {fmt_ms(t['eager']['median_ms']):>9} {fmt_ms(t['compiled']['median_ms']):>9} "
            f"{fmt_ms(t['ort_dense']['median_ms']):>9} {fmt_ms(t.get('ort_sparse_export', {}).get('median_ms')):>10} "
            f"{fmt_x(s['vs_eager']):>9} {fmt_x(s['vs_ort_dense']):>7} {comp['sparse_layers']:>3}/{comp['layers']:<3} "
            f"{comp['runs']:>8} {comp['compile_s']:>9.1f} {c.get('others_cpu_while_timing', float('nan')):>6.0%}  {kern}")
    for name, c in cases.items():
        if "error" in c:
            log(f"{name}: ERROR {c['error']}")
    ds = cases.get("deepsparse")
    if ds is not None:
        if ds.get("available"):
            log(f"deepsparse {ds['version']} (isa {ds.get('isa')}): bert-base 90% {ds['deepsparse']['median_ms']:.2f} ms vs ORT dense "
                f"{ds['ort_dense']['median_ms']:.2f} ms in the same subprocess ({ds['speedup']['vs_ort_dense_same_subprocess']:.2f}x; "
                f"back to back {ds['deepsparse_back_to_back']['median_ms']:.2f} ms); "
                f"engine compile {ds['compile_s']:.1f} s; max abs error vs ORT {ds['max_abs_error_vs_ort_sparse_export']:.2g}; "
                f"other processes' CPU use meanwhile {ds.get('others_cpu_while_timing', float('nan')):.0%}")
            cmp = ds.get("compiled_vs_deepsparse")
            if cmp:
                log(f"compiled bert-base 90% vs DeepSparse: {cmp['compiled_ms']:.2f} vs {cmp['deepsparse_ms']:.2f} ms "
                    f"({cmp['plain']:.2f}x); relative to the ORT dense timed beside each: {cmp['relative_to_ort_dense']:.2f}x")
        else:
            log(f"deepsparse: not available ({ds.get('why')})")
    log("")
    for name, c in cases.items():
        if "target" in c:
            tg = c["target"]
            log(f"target {name}: {tg['metric']} {tg['measured']:.2f}x, needs >= {tg['target']}x -> {'MET' if tg['met'] else 'NOT MET'}")
    bw = results["bandwidth_gbs"]
    log("read bandwidth GB/s: " + ", ".join(f"{k} {v:.1f}" for k, v in bw.items()))
    log("'others' = share of the CPUs other processes used while a case was timed (0% = a clean measurement)")
    log(f"load average at start {results['loadavg']['start']}, at end {results['loadavg'].get('end')}; "
        f"wall time {results['wall_s']:.0f} s")


# ---------------------------------------------------------------- main


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="bert-base with 2 layers, 5 rounds (smoke test)")
    ap.add_argument("--cases", default=",".join(ALL_CASES), help=f"comma-separated, from {','.join(ALL_CASES)}")
    ap.add_argument("--runs", type=int, default=None, help="timed rounds per case (default 20, quick 5)")
    ap.add_argument("--cache-dir", default=None, help="reuse this SPARSECOMP_CACHE_DIR (default: a fresh temporary one)")
    ap.add_argument("--max-seconds-per-layer", type=float, default=0.5, help="compile(max_seconds_per_layer=...)")
    ap.add_argument("--deepsparse-python", default=DS_PYTHON, help="python of the venv holding deepsparse")
    ap.add_argument("--no-deepsparse-install", action="store_true", help="do not try to create the DeepSparse venv")
    ap.add_argument("--wait-quiet", type=float, default=30.0,
                    help="before timing a case wait up to this many seconds for other processes' CPU use to drop below 10%%")
    ap.add_argument("--json", default=str(RESULTS), help="where to write the results")
    args = ap.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in cases if c not in ALL_CASES]
    if bad:
        ap.error(f"unknown case(s) {', '.join(bad)}; choose from {', '.join(ALL_CASES)}")
    args.case_list = cases
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench_models_"))
    if args.cache_dir:
        os.environ["SPARSECOMP_CACHE_DIR"] = str(Path(args.cache_dir).resolve())
    else:
        os.environ["SPARSECOMP_CACHE_DIR"] = str(tmp / "cache")
    sparsecomp.set_num_threads(THREADS)

    results: dict = {
        "schema": 1, "quick": args.quick, "threads": THREADS,
        "machine": {"cpu": cpu_model(), "isa": cpu_isa(), "cores": os.cpu_count(), "platform": platform.platform()},
        "versions": versions(), "cache_dir": os.environ["SPARSECOMP_CACHE_DIR"], "fresh_cache": args.cache_dir is None,
        "env": {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "TVM_NUM_THREADS", "SPARSECOMP_NUM_THREADS")},
        "loadavg": {"start": [round(x, 2) for x in os.getloadavg()]},
        "bandwidth_gbs": {"start": measure_bandwidth()},
        "background_cpu": {"start": background_cpu()},
        "settle_s": SETTLE_S,
        "cases": {},
    }
    log(f"bench_models: {results['machine']['cpu']} ({os.cpu_count()} cores, {', '.join(results['machine']['isa'])}), "
        f"torch {results['versions']['torch']}, ORT {results['versions']['onnxruntime']}, TVM {results['versions']['tvm']}; "
        f"{THREADS} threads; cache {results['cache_dir']}")
    log(f"read bandwidth {results['bandwidth_gbs']['start']:.1f} GB/s; other processes' CPU use "
        f"{results['background_cpu']['start']:.0%}; load average {results['loadavg']['start']}")
    if results["background_cpu"]["start"] > 0.2:
        log("  warning: other processes are using the CPUs: absolute times will be inflated (DeepSparse, which pins "
            "and spins its threads, suffers most); same-case ratios hold best")

    bench = Bench(args, tmp)
    specs = {
        "bert-base-u90": ("bert-base", "unstructured:0.9", "encoder.*"),
        "bert-base-u70": ("bert-base", "unstructured:0.7", "encoder.*"),
        "bert-base-dense": ("bert-base", None, None),
        "mlp-relu-u90": ("mlp-relu", "unstructured:0.9", None),
        "mlp-relu-b16x1": ("mlp-relu", "block:16x1:0.9", None),
    }
    try:
        for case in [c for c in ALL_CASES if c in args.case_list]:
            bw = measure_bandwidth()
            results["bandwidth_gbs"][case] = bw
            busy = background_cpu()
            results["background_cpu"][case] = busy
            log(f"\n[{case}] read bandwidth {bw:.1f} GB/s, other processes' CPU use {busy:.0%}, load average {os.getloadavg()[0]:.2f}")
            t0 = time.perf_counter()
            try:
                if case == "deepsparse":
                    res = bench.deepsparse()
                    if not res.get("available"):
                        log(f"  deepsparse: available false: {res.get('why')}")
                else:
                    res = bench.model_case(case, *specs[case])
            except Exception as err:  # one broken case must not lose the others' results
                import traceback

                traceback.print_exc()
                res = {"error": f"{type(err).__name__}: {err}"[:500]}
            res["case_wall_s"] = time.perf_counter() - t0
            res["loadavg"] = [round(x, 2) for x in os.getloadavg()]
            results["cases"][case] = res
            if "times" in res:
                log("  " + ", ".join(f"{k} {v['median_ms']:.2f} ms" for k, v in res["times"].items()))
    finally:
        results["bandwidth_gbs"]["end"] = measure_bandwidth()
        results["loadavg"]["end"] = [round(x, 2) for x in os.getloadavg()]
        results["wall_s"] = time.perf_counter() - t_start
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1, default=str))
        shutil.rmtree(tmp, ignore_errors=True)  # exports, inputs and (without --cache-dir) the cache
    print_table(results)
    log(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
