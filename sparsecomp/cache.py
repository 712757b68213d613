"""The on-disk cache of measured decisions (and the cache directory every component shares).

Location: `$SPARSECOMP_CACHE_DIR`, default `~/.cache/sparsecomp`. Decisions live in
`decisions/<backend>.json`, one entry per key; a key joins the machine (CPU model, vector
features, core count, thread setting, library versions), the backend, the op's shape and dtype and
a hash of the weight's sparsity pattern, so a decision measured on another machine or another
weight is never reused. Trust rules:

- a file that does not parse, or an entry of the wrong shape or schema version, is ignored (and
  counted in `stats["corrupt"]`): the caller re-measures and the rewrite replaces it;
- writes are atomic (temp file in the same directory + `os.replace`) and merge with what another
  process wrote meanwhile, so concurrent compiles cannot leave a half-written file.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

__all__ = ["cache_dir", "machine_id", "pattern_hash", "DecisionCache", "atomic_write_bytes"]

SCHEMA = 1


def cache_dir() -> Path:
    """`$SPARSECOMP_CACHE_DIR` or `~/.cache/sparsecomp` (read on every call: tests override it)."""
    env = os.environ.get("SPARSECOMP_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "sparsecomp"


@lru_cache(maxsize=1)
def _cpu() -> tuple[str, str]:
    model, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", platform.machine(), platform.processor()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    flags = ",".join(sorted(have & {"avx2", "avx512f", "avx512bw", "avx512vl", "fma", "amx_tile"}))
                    break
    except OSError:
        pass
    return model, flags


def machine_id() -> str:
    """Identity of the measuring machine and software: decisions are only valid on the same one."""
    model, flags = _cpu()
    parts = [model, flags, platform.machine(), str(os.cpu_count()), f"threads={torch.get_num_threads()}",
             f"torch={torch.__version__}"]
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:16]


def pattern_hash(weight: torch.Tensor) -> str:
    """Hash of where a weight's nonzeros are (values do not change a kernel's speed)."""
    mask = (weight.detach() != 0).flatten().cpu().numpy()
    import numpy as np

    bits = np.packbits(mask)
    return hashlib.sha1(bits.tobytes() + str(tuple(weight.shape)).encode()).hexdigest()[:20]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would make a shared cache owner-only
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@lru_cache(maxsize=1)
def _umask() -> int:
    mask = os.umask(0o022)  # (reading it means setting it: once per process)
    os.umask(mask)
    return mask


class DecisionCache:
    """Measured per-layer decisions of one backend, persisted as JSON."""

    def __init__(self, backend: str, directory: Path | None = None):
        self.backend = backend
        self.path = (directory or cache_dir()) / "decisions" / f"{backend}.json"
        self.stats = {"hit": 0, "miss": 0, "corrupt": 0, "written": 0}
        self.write_error: str | None = None  # why decisions could not be written (then none are, this run)
        self._entries = self._read()

    def _read(self, count: bool = True) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (FileNotFoundError, NotADirectoryError):  # (no cache yet, or a path `put` will report)
            return {}
        except (OSError, ValueError):
            self.stats["corrupt"] += count  # (a re-read to merge a write does not count the same file again)
            return {}
        if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(data.get("entries"), dict):
            self.stats["corrupt"] += count
            return {}
        return data["entries"]

    def key(self, **parts: Any) -> str:
        """Key from the machine, the backend and the caller's parts (shape, dtype, pattern hash...)."""
        text = json.dumps({"machine": machine_id(), "backend": self.backend, **parts}, sort_keys=True, default=str)
        return hashlib.sha1(text.encode()).hexdigest()

    def has(self, key: str) -> bool:
        """Whether an entry exists (not yet validated; does not count as a hit or miss)."""
        return key in self._entries

    def get(self, key: str, validate=None) -> dict | None:
        """The entry, or None if absent or (per `validate(entry) -> bool`) not trustworthy."""
        entry = self._entries.get(key)
        if entry is None:
            self.stats["miss"] += 1
            return None
        if not isinstance(entry, dict) or (validate is not None and not validate(entry)):
            self.stats["corrupt"] += 1
            self._entries.pop(key, None)
            return None
        self.stats["hit"] += 1
        return entry

    def decision(self, lookups: list[tuple[str, Any]]) -> tuple[dict | None, int]:
        """The first trustworthy measured decision among `lookups` ((key, labels) pairs, the most
        preferred first, e.g. `tune`'s decision before the compile's own), and its index; a decision
        names one of its lookup's `labels` and has its timings. Only the last key counts as a miss
        when absent (the preferred ones are optional). (None, -1) when none is cached."""
        for i, (key, labels) in enumerate(lookups):
            if i < len(lookups) - 1 and not self.has(key):
                continue
            entry = self.get(key, validate=lambda e, labels=labels: e.get("kernel") in labels and "dense_us" in e and "chosen_us" in e)
            if entry is not None:
                return entry, i
        return None, -1

    def put(self, key: str, entry: dict) -> None:
        """Keep `entry` (for this run) and write it to disk. A cache that cannot be written (a file
        in the path, a read-only directory or file system) does not stop a compile: the decisions
        hold for this run only, and `write_error` says why (the compile report notes it)."""
        self._entries[key] = entry
        if self.write_error is not None:
            return
        merged = self._read(count=False) | self._entries  # keep what other processes wrote meanwhile
        self._entries = merged
        try:
            atomic_write_bytes(self.path, json.dumps({"schema": SCHEMA, "entries": merged}, indent=1, sort_keys=True).encode())
        except OSError as err:
            self.write_error = f"{type(err).__name__}: {err.strerror or err}"
            return
        self.stats["written"] += 1
