"""Decision cache (hit / miss / corruption / atomic merge) and the timing harness."""

import json
import time

import torch

from sparsecomp.cache import DecisionCache, cache_dir, machine_id, pattern_hash
from sparsecomp.timing import compare, measure


def test_cache_dir_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSECOMP_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"


def test_hit_miss_and_persistence(tmp_path):
    c = DecisionCache("torch", tmp_path)
    k = c.key(shape=[4, 8], dtype="float32", pattern="abc")
    assert c.get(k) is None and c.stats["miss"] == 1
    c.put(k, {"format": "csr", "params": {}})
    again = DecisionCache("torch", tmp_path)
    assert again.get(k) == {"format": "csr", "params": {}} and again.stats["hit"] == 1
    # the key depends on every part and on the backend
    assert c.key(shape=[4, 8], dtype="float32", pattern="abd") != k
    assert DecisionCache("ort", tmp_path).key(shape=[4, 8], dtype="float32", pattern="abc") != k


def test_corrupt_file_is_ignored_and_rewritten(tmp_path):
    c = DecisionCache("torch", tmp_path)
    c.path.parent.mkdir(parents=True)
    c.path.write_text("{ not json")
    c = DecisionCache("torch", tmp_path)
    assert c.stats["corrupt"] == 1
    k = c.key(x=1)
    assert c.get(k) is None
    c.put(k, {"format": "dense"})
    assert json.loads(c.path.read_text())["entries"][k] == {"format": "dense"}
    assert c.stats["corrupt"] == 1 and c.stats["written"] == 1  # the write's merge re-read is not counted again


def test_a_cache_that_cannot_be_written_keeps_decisions_for_the_run(tmp_path):
    (tmp_path / "afile").write_text("x")
    c = DecisionCache("torch", tmp_path / "afile")  # a file where the directory should be
    assert c.stats == {"hit": 0, "miss": 0, "corrupt": 0, "written": 0}
    c.put("k", {"format": "dense"})
    assert c.write_error.startswith("NotADirectoryError") and c.stats["written"] == 0
    assert c.get("k") == {"format": "dense"}  # this run still has it
    assert (tmp_path / "afile").read_text() == "x"


def test_cache_files_follow_the_umask(tmp_path):
    import os
    import stat

    c = DecisionCache("torch", tmp_path)
    c.put("k", {"format": "dense"})
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(c.path.stat().st_mode) == 0o666 & ~mask  # (mkstemp alone: 0600, owner-only)


def test_foreign_schema_and_invalid_entries_are_not_trusted(tmp_path):
    c = DecisionCache("torch", tmp_path)
    c.path.parent.mkdir(parents=True)
    c.path.write_text(json.dumps({"schema": 999, "entries": {"k": {"format": "csr"}}}))
    assert DecisionCache("torch", tmp_path).get("k") is None
    c = DecisionCache("torch", tmp_path)
    c.put("k2", {"format": "warp-drive"})
    c = DecisionCache("torch", tmp_path)
    assert c.get("k2", validate=lambda e: e["format"] in ("dense", "csr")) is None
    assert c.stats["corrupt"] == 1


def test_concurrent_writers_merge(tmp_path):
    a, b = DecisionCache("torch", tmp_path), DecisionCache("torch", tmp_path)
    a.put("ka", {"format": "csr"})
    b.put("kb", {"format": "dense"})  # b read before a wrote: must not drop a's entry
    entries = json.loads(a.path.read_text())["entries"]
    assert set(entries) == {"ka", "kb"}
    assert not list(a.path.parent.glob(".*.tmp"))  # no temp files left behind


def test_pattern_hash_sees_positions_not_values():
    w = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    assert pattern_hash(w) == pattern_hash(w * 3)
    assert pattern_hash(w) != pattern_hash(w.flip(0))
    assert len(machine_id()) == 16


def test_measure_and_compare():
    m = measure(lambda: time.sleep(0.001), min_runs=5, max_seconds=1.0)
    assert m.runs == 5 and 0.0009 < m.median < 0.05 and m.p10 <= m.median <= m.p90
    res = compare({"fast": lambda: None, "slow": lambda: time.sleep(0.002)}, min_runs=5)
    assert res["fast"].median < res["slow"].median and res["slow"].runs == 5
    # bounded: a slow candidate stops the rounds at max_seconds (but at least 3 rounds)
    res = compare({"slow": lambda: time.sleep(0.02)}, min_runs=100, max_seconds=0.05, warmup=0)
    assert 3 <= res["slow"].runs < 10


def test_compare_varies_the_order():
    """Every round runs each candidate once, in a new order: the first round as given, later ones
    shuffled (reproducibly), so every candidate comes right after each other one in some round."""
    def run():
        order = []
        compare({k: (lambda k=k: order.append(k)) for k in "abcd"}, min_runs=30, warmup=0)
        return order

    order = run()
    rounds = [order[i:i + 4] for i in range(0, len(order), 4)]
    assert len(rounds) == 30 and all(sorted(r) == list("abcd") for r in rounds) and rounds[0] == list("abcd")
    follows = {(r[i], r[i + 1]) for r in rounds for i in range(3)}
    assert follows == {(p, q) for p in "abcd" for q in "abcd" if p != q}
    assert run() == order  # seeded: the same order every time


def test_compare_between_runs_before_every_timed_call():
    log = []
    res = compare({"a": lambda: log.append("a"), "b": lambda: log.append("b")}, min_runs=3, warmup=0,
                  between=lambda: log.append("|"))
    assert log.count("|") == 6 and all(log[i] == "|" for i in range(0, 12, 2))  # untimed, before each call
    assert res["a"].runs == res["b"].runs == 3


def test_cache_flush_reads_past_the_cache_and_pauses(monkeypatch):
    """`cache_flush` streams a buffer of twice the last-level cache (so a small op's weights are
    evicted before the next timed call) and then pauses so OpenMP workers can park."""
    import time

    from sparsecomp import timing

    monkeypatch.setattr(timing, "l3_bytes", lambda: 1 << 20)
    flush = timing.cache_flush(pause_s=0.01)
    t0 = time.perf_counter()
    flush()
    assert time.perf_counter() - t0 >= 0.01
    buf = next(c.cell_contents for c in flush.__closure__ if hasattr(c.cell_contents, "numel"))
    assert buf.numel() * buf.element_size() == 2 << 20


def _fake_cache(monkeypatch, reported_mib: int, cached_mib: int):
    """sysfs reports `reported_mib`; buffers up to `cached_mib` read at 48 GB/s hot, larger at 24."""
    from sparsecomp import timing

    sizes = []
    monkeypatch.delenv("SPARSECOMP_LLC_BYTES", raising=False)
    monkeypatch.setattr(timing, "_llc_memo", {})
    monkeypatch.setattr(timing, "_sysfs_llc_bytes", lambda: reported_mib << 20)
    monkeypatch.setattr(timing, "_hot_bandwidth", lambda n: sizes.append(n) or (48e9 if n <= cached_mib << 20 else 24e9))
    return timing, sizes


def test_llc_reported_by_sysfs_is_trusted_up_to_the_threshold(monkeypatch):
    timing, sizes = _fake_cache(monkeypatch, 32, 8)
    assert timing.l3_bytes() == 32 << 20 and not sizes  # an ordinary cache: nothing measured


def test_llc_of_a_vm_reporting_the_whole_socket_is_measured(monkeypatch):
    """A 2-vCPU VM that reports 480 MiB but keeps only ~64 MiB hot counts on 64 MiB (measured once
    per process); a cache that really is as large as reported keeps its size; a cache that never
    reads faster than memory counts as 8 MiB, the smallest size tried."""
    timing, sizes = _fake_cache(monkeypatch, 480, 64)
    assert timing.l3_bytes() == 64 << 20
    n = len(sizes)
    assert n and timing.l3_bytes() == 64 << 20 and len(sizes) == n  # memoised
    assert max(sizes) == 960 << 20  # the memory reference: twice the reported size (<= 1 GiB)
    timing, _ = _fake_cache(monkeypatch, 128, 128)
    assert timing.l3_bytes() == 128 << 20
    timing, _ = _fake_cache(monkeypatch, 480, 0)
    assert timing.l3_bytes() == 8 << 20


def test_llc_override_and_its_error(monkeypatch):
    import pytest

    from sparsecomp.errors import SparsecompError

    timing, sizes = _fake_cache(monkeypatch, 480, 64)
    monkeypatch.setenv("SPARSECOMP_LLC_BYTES", str(16 << 20))
    assert timing.l3_bytes() == 16 << 20 and not sizes
    monkeypatch.setenv("SPARSECOMP_LLC_BYTES", "32M")
    with pytest.raises(SparsecompError, match="SPARSECOMP_LLC_BYTES"):
        timing.l3_bytes()


def test_settle_keeps_the_cores_busy_then_pauses():
    """`settle` (the benchmarks' `between`) works for about `seconds`, then sleeps `quiet_s`."""
    from sparsecomp.timing import settle

    wait = settle(0.02, 0.005)
    cpu0, t0 = time.process_time(), time.perf_counter()
    wait()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    assert wall >= 0.025
    assert cpu >= 0.005  # busy, not asleep (a plain sleep uses ~no CPU; a quarter of the 20 ms: other work may share the cores)
