"""The core's timing harness: what every per-layer decision and benchmark measures with.

Decisions are made by measurement on the target machine (DESIGN.md section 1), so the harness
must be cheap enough to run at compile time and honest enough to trust: a warm-up, then runs
until both `min_runs` and `min_seconds` are reached (or `max_seconds` is spent), and the
**median** is the figure (robust to the other core being busy). `compare` times candidates
interleaved, round-robin, so a machine-wide slowdown (read bandwidth swings 40-79 GB/s here from
minute to minute) hits every candidate alike.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

from sparsecomp.errors import SparsecompError

__all__ = ["Measurement", "OthersCpu", "cold_copies", "compare", "l3_bytes", "measure", "model_is_cold", "read_bandwidth",
           "settle"]


@dataclass
class Measurement:
    median: float  # seconds
    runs: int
    samples: list[float] = field(default_factory=list, repr=False)

    @property
    def p10(self) -> float:
        return _quantile(self.samples, 0.1)

    @property
    def p90(self) -> float:
        return _quantile(self.samples, 0.9)

    def to_dict(self) -> dict:
        return {"median_s": self.median, "p10_s": self.p10, "p90_s": self.p90, "runs": self.runs}


def _quantile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def measure(fn: Callable[[], object], *, warmup: int = 2, min_runs: int = 20, min_seconds: float = 0.0,
            max_seconds: float = 2.0) -> Measurement:
    """Median wall time of `fn()` (seconds) after `warmup` calls."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while True:
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - start
        if (len(samples) >= min_runs and elapsed >= min_seconds) or elapsed >= max_seconds:
            break
    return Measurement(statistics.median(samples), len(samples), samples)


def compare(candidates: dict[str, Callable[[], object]], *, warmup: int = 2, min_runs: int = 20,
            max_seconds: float = 2.0, between: Callable[[], object] | None = None) -> dict[str, Measurement]:
    """Time candidates interleaved (round-robin) and return each one's median.

    Each round runs the candidates in a new order (seeded shuffle: reproducible), so no candidate
    always runs right after the same other one: a call runs slower right after some others (one
    that left torch's OpenMP workers spinning slows the next TVM kernel by up to 2x here), and in a
    fixed order that cost fell on the same candidate every round (the exact-mode FFN's first TIR
    variant, always right after torch's dense MLP, measured 14% slower than the second, which runs
    19% slower than it alone).

    Stops after `min_runs` rounds, or earlier when `max_seconds` is spent (at least 3 rounds), so
    compile-time decisions have a bounded cost. `between`: called (untimed) before every timed
    call, e.g. a pause that lets spinning thread pools park (benchmarks).
    """
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in candidates}
    items = list(candidates.items())
    order = random.Random(len(items))
    start = time.perf_counter()
    rounds = 0
    while rounds < min_runs:
        if rounds:
            order.shuffle(items)
        for name, fn in items:
            if between is not None:
                between()
            t = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t)
        rounds += 1
        if rounds >= 3 and time.perf_counter() - start >= max_seconds:
            break
    return {k: Measurement(statistics.median(v), len(v), v) for k, v in samples.items()}


def read_bandwidth(big=None, reps: int = 5) -> float:
    """Measured memory read bandwidth in bytes/s: median time of `big.sum()` over a 512 MiB
    float32 tensor (or `big`). The roofline of a memory-bound kernel is bytes read / this."""
    import torch

    big = torch.ones(128 * 1024 * 1024) if big is None else big
    big.sum()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        big.sum()
        ts.append(time.perf_counter() - t0)
    return big.numel() * big.element_size() / statistics.median(ts)


def _sysfs_llc_bytes() -> int:
    """The last-level cache size Linux reports (sysfs), 0 where it cannot be read."""
    from pathlib import Path

    best = 0
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (d / "size").read_text().strip().upper()
            size = int(text.rstrip("KMG")) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
            best = max(best, size)
        except (OSError, ValueError, IndexError):
            continue
    return best


# Above this reported size the cache is measured (`_measured_llc_bytes`) instead of trusted.
MEASURE_LLC_ABOVE = 64 * 2**20
_llc_memo: dict[int, int] = {}


def _hot_bandwidth(nbytes: int, reps: int = 7) -> float:
    """Bytes/s of `sum()` over a buffer of `nbytes` read again and again (hot: what stays cached)."""
    import torch

    buf = torch.ones(max(nbytes // 4, 1024))
    buf.sum()  # one more warm-up pass than `read_bandwidth`: the buffer is to be hot
    return read_bandwidth(buf, reps)


def _measured_llc_bytes(reported: int) -> int:
    """The largest buffer (powers of two from 8 MiB up to `reported`) that is still read at least
    1.5x faster hot than one of 2x `reported` (capped at 1 GiB), i.e. that stays in cache.

    Why: a VM on a server CPU may report the whole socket's cache. One 2-vCPU Intel Xeon VM here
    reported 480 MiB, but read 46-49 GB/s hot up to 64 MiB and 22-26 GB/s (memory) from 128 MiB
    on, mostly: its share of the cache, which other tenants use too, measured 64 or 128 MiB from
    one process to the next (either way below the 134 MB of the bench_mlp FFN). Trusting 480 MiB, the
    340 MB of opt-125m-like counted as "in cache", so its one-row layers were timed with their
    weights in cache, which inside the model they are not. (Timed cold there, torch's GEMV still
    won: 58 vs 65 us for 768 x 768; MKL is strong on Intel.) ~1 s, once per process, and only
    where the reported size is above `MEASURE_LLC_ABOVE`.
    """
    ref = _hot_bandwidth(min(2 * reported, 2**30))
    best, size = 0, 8 * 2**20
    while size <= reported:
        if _hot_bandwidth(size) >= 1.5 * ref:
            best = size
        size *= 2
    return max(best, 8 * 2**20)


def reported_llc_bytes() -> int | None:
    """The last-level cache size the machine reports (sysfs), None where it reports none. On a VM
    this can be the whole socket's, more than the process can count on (`l3_bytes`)."""
    return _sysfs_llc_bytes() or None


def l3_bytes() -> int:
    """The last-level cache this process can count on: the size sysfs reports (default 32 MiB);
    where that is above `MEASURE_LLC_ABOVE`, the measured share instead (`_measured_llc_bytes`).
    `SPARSECOMP_LLC_BYTES` overrides both."""
    env = os.environ.get("SPARSECOMP_LLC_BYTES", "").strip()
    if env:
        try:
            return max(int(env), 1)
        except ValueError:
            raise SparsecompError(f"SPARSECOMP_LLC_BYTES={env!r} is not a whole number of bytes",
                                  hint="e.g. SPARSECOMP_LLC_BYTES=33554432 for 32 MiB, or unset it") from None
    reported = _sysfs_llc_bytes() or 32 * 2**20
    if reported <= MEASURE_LLC_ABOVE:
        return reported
    if reported not in _llc_memo:
        _llc_memo[reported] = _measured_llc_bytes(reported)
    return _llc_memo[reported]


def model_is_cold(module) -> bool:
    """Whether a module's weights exceed the last-level cache: a layer then reads its weights from
    memory at run time, and a layer timed alone (its weights left in cache by the previous call)
    may look faster than it runs (2-3x for ONNX Runtime's 9 MB dense GEMV at one row here;
    within ~20% for torch's and the TIR GEMV). Backends time such layers cold (`cold_copies`)."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()]) > l3_bytes()


def cache_flush(pause_s: float = 0.001) -> Callable[[], None]:
    """A `between` for `compare` that makes every timed call start cold: it reads a buffer of
    twice the last-level cache (so a small op's weights, left in cache by its previous call, are
    evicted, as they are inside a model whose weights exceed the cache), then pauses `pause_s` so
    the OpenMP workers the read used can park (0: the call starts as inside a model, right after
    a torch op, its workers still spinning). ~3 ms per call here: for ops whose copies would be
    costly to cycle (`cold_copies`), e.g. a whole MLP with its strategies' packed weights."""
    import torch

    buf = torch.ones(2 * l3_bytes() // 4)

    def flush() -> None:
        buf.sum()
        if pause_s > 0:
            time.sleep(pause_s)

    return flush


def settle(seconds: float = 0.05, quiet_s: float = 0.002) -> Callable[[], None]:
    """A `between` for `compare` (the benchmarks): before each timed call, keep the cores busy for
    `seconds` summing a 4 MiB buffer on torch's threads, then sleep `quiet_s`. The cores never
    idle, and TVM's and ORT's pools, spinning after the previous contender's call, are made to
    yield or park meanwhile. Caveats measured since: torch's own workers are the ones kept
    warm (they spin through the 2 ms quiet); every Python step of the next call then misses the
    caches (`sparsecomp.callpath`); and an ORT session that spins between calls still slowed the
    next contender in bench_linear, which now runs its ORT sessions without spinning.

    Why: on an Intel Xeon VM here, a core that idled for 30-50 ms runs slowly for the next 10-30 ms
    (the host lowers its clock or deschedules the vCPU), so a sleep measured that ramp rather than
    the code. Measured there, interleaved medians:

        opt-125m-like, one token          back to back   sleep 50 ms   busy 50 ms + sleep 2 ms
          eager                              15.96 ms       30.67 ms        17.21 ms
          exact mode, torch's 2 threads      15.32          34.72           17.28
        4096x4096 M = 1, cold copies: torch's GEMV 2.24 ms back to back, 4.6 ms after a 30 ms sleep
        even with 3 ms of warm-up calls; the TIR BSR kernel 288 vs 604 us.
        bert-base eager after an ORT call: sleep 50 ms 90.9 ms, busy + 2 ms 89.2, nothing 112.7.

    (On the AMD VM of earlier sessions the sleep cost each call only ~0.3-0.4 ms.)
    """
    import torch

    buf = torch.ones(1 << 20)

    def wait() -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            buf.sum()
        time.sleep(quiet_s)

    return wait


class ColdTiming:
    """Which ops of a lowered model to time cold, for the sparse-linear and sparse-MLP lowerings:
    `flush(rows, nbytes)` is a `cache_flush` (one per model, made on first need) for an op that
    sees one row per call in a model whose weights exceed the last-level cache, when its own
    weights (`nbytes`) are under twice that cache (so the timing loop would keep them there);
    None otherwise (larger weights are cold in any timing loop). `pause_s`: the flush's pause
    (`cache_flush`), which the backend picks for where its kernels' threads run."""

    def __init__(self, module, pause_s: float = 0.001):
        self.model_cold = model_is_cold(module)
        self.pause_s = pause_s
        self._flush = None

    def flush(self, rows: int, nbytes: int) -> Callable[[], None] | None:
        if not (rows == 1 and self.model_cold and nbytes < 2 * l3_bytes()):
            return None
        if self._flush is None:
            self._flush = cache_flush(self.pause_s)
        return self._flush


def cold_copies(nbytes: int, max_copies: int = 32) -> int:
    """How many copies of `nbytes` of weights to cycle through per timed call so that each is read
    from memory: enough to fill twice the last-level cache."""
    return int(min(max_copies, max(1, -(-2 * l3_bytes() // max(nbytes, 1)))))


class OthersCpu:
    """Share of the machine's CPU time used by OTHER processes inside the `with` block (`.share`,
    NaN where /proc/stat cannot be read). This process's threads and its finished children are
    not "others". Timing on a machine where others take a core measures contention, not kernels:
    on a 2-core VM a parallel TVM kernel then waits a whole scheduler slice for its descheduled
    worker (measured: 0.26 ms -> 3.4 ms per call), so `compile` reports the share it timed under."""

    @staticmethod
    def _snap() -> tuple[int, int, float]:
        from pathlib import Path

        v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        own = os.times()
        mine = own.user + own.system + own.children_user + own.children_system
        return sum(v), sum(v) - v[3] - v[4], mine * os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> OthersCpu:
        try:
            self.t0 = self._snap()
        except (OSError, ValueError, IndexError):
            self.t0 = None
        self.share = float("nan")
        return self

    def __exit__(self, *exc) -> bool:
        if self.t0 is not None:
            try:
                t1 = self._snap()
            except (OSError, ValueError, IndexError):
                return False
            total, busy, own = (b - a for a, b in zip(self.t0, t1))
            self.share = round(max(0.0, busy - own) / max(total, 1), 3)
        return False
