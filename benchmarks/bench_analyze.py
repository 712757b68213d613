"""What analysis costs: capture and `analyze-weights,find-mlps` time per zoo model.

Not a speed claim about sparse kernels (those come with the sparse-linear issue); this measures the
compiler's own overhead, which users pay on every `analyze` / `compile`. For each zoo model:
median of `--repeat` runs (after one warm-up) of capture, and of the analysis pipeline on the
captured graph, plus the per-weight cost. Prints a table and writes JSON to
`benchmarks/results/bench_analyze.json`.

    .venv/bin/python benchmarks/bench_analyze.py [--models a,b] [--repeat N (default 3)]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import sparsecomp  # noqa: E402  (first, before torch: it may set torch's OpenMP spin count, sparsecomp/omp.py)

import torch  # noqa: E402

from sparsecomp import models  # noqa: E402
from sparsecomp.pass_manager import PassContext, PassManager  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "bench_analyze.json"


def median_time(fn, repeat: int) -> tuple[float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(models.names()))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    sparsecomp.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        model, example = models.get(name)
        cap_s, gm = median_time(lambda: sparsecomp.capture(model, example, name=name), args.repeat)

        def analyse():
            ctx = PassContext.create(example, model_name=name)
            PassManager("analyze-weights,find-mlps").run(gm, ctx)
            return ctx

        ana_s, ctx = median_time(analyse, args.repeat)
        weights = ctx.results["analyze-weights"]
        n_params = sum(w.numel for w in weights)
        rows.append({"model": name, "capture_s": cap_s, "analysis_s": ana_s, "weights": len(weights),
                     "weight_params": n_params, "ms_per_weight": 1e3 * ana_s / max(len(weights), 1),
                     "mlps": len(ctx.results["find-mlps"])})
        r = rows[-1]
        print(f"{name:15s} capture {r['capture_s']:7.2f} s   analysis {r['analysis_s']:7.2f} s   "
              f"{r['weights']:4d} weights ({r['weight_params'] / 1e6:6.1f} M params, {r['ms_per_weight']:6.1f} ms each)   "
              f"{r['mlps']} MLPs", flush=True)
    out = {"benchmark": "bench_analyze", "repeat": args.repeat, "threads": args.threads, "torch": torch.__version__,
           "machine": platform.machine(), "processor": platform.processor(), "python": sys.version.split()[0],
           "statistic": "median", "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
