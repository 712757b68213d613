"""Compiling kernels, with an in-process cache and an on-disk cache of the built libraries.

Disk layout: `$SPARSECOMP_CACHE_DIR/kernels/` (default `~/.cache/sparsecomp/kernels/`) holds
`<key>.so` and `<key>.json`, where key = sha256 of (kernel source text, target JSON, TVM version,
cache format version) and the JSON records the sha256 of the .so bytes. A .so is only loaded when
its bytes match the recorded hash (so a truncated or overwritten file is never dlopen'ed, where
damaged code could crash the process instead of failing); any mismatch or load error rebuilds
and rewrites. Writes go to a temporary file in the same folder, then `os.replace` (atomic on
POSIX): readers never see a half-written file, and concurrent writers of one key are harmless.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from sparsecomp.errors import SparsecompError

from . import _pool, _target
from ._codegen import kernel_source

__all__ = ["Kernel", "OutputStock", "bound_args", "build", "build_source", "cache_dir", "clear_memory_cache"]

_log = logging.getLogger("sparsecomp.backends.tir")
_CACHE_VERSION = "1"
_lock = threading.Lock()
_memory: dict[str, "Kernel"] = {}


@dataclass(eq=False)
class Kernel:
    """One compiled kernel: `func(*args)` runs it on torch CPU tensors (passed via DLPack)."""

    fmt: str
    params: dict
    dtype: str
    source: str
    key: str
    func: object = field(repr=False)
    path: str | None = None  # the cached .so, when the disk cache is in use

    @property
    def mode(self) -> str:
        return "mm" if self.params.get("mt", 0) else "mv"

    def __call__(self, *args):
        return self.func(*args)


def bound_args(*tensors) -> tuple:
    """A kernel's constant arguments (weights, packed indices, scratch buffers), converted once to
    TVM tensors that share the torch tensors' memory (DLPack, zero copy; each keeps its torch
    tensor alive), for call sites that pass the same tensors on every call.

    Why: a call converts every torch tensor it is given, and that costs far more than the ~0.7 us
    measured in a warm loop once the caches are cold. On the bench_mlp FFN (predictor kernel, 13
    constant arguments, interleaved medians on the Intel VM) a call took 0.98 ms with torch
    tensors against 0.68 ms with these, after the benchmarks' settle; 316 against 261 us back to
    back. In-place changes to a torch tensor stay visible (the memory is shared); a tensor
    re-assigned to a new object is not followed: bind again. A tensor TVM refuses to wrap (data not
    64-byte aligned) is kept as it is, and converted per call as before; anything that is not a
    tensor passes through."""
    import torch

    tvm = _target.tvm()
    out = []
    for t in tensors:
        if isinstance(t, torch.Tensor):
            try:
                t = tvm.runtime.from_dlpack(t.detach())
            except (RuntimeError, ValueError, TypeError):
                pass
        out.append(t)
    return tuple(out)


class OutputStock:
    """Fresh output tensors for a kernel that writes one new output per call, made `batch` at a
    time: `take()` returns (tensor, the same memory as a TVM tensor for the kernel's argument),
    each pair handed out once and never again (so a caller's earlier outputs are never written).

    Why: the allocation itself is what costs once the caches are cold. After the benchmarks'
    settle, `torch.empty(1, 2048)` took 160 us, a second one right after it ~2 us, and converting a
    new tensor for the call another ~40 us; against `torch.empty` + conversion on every call, the
    bench_mlp FFN's predictor path measured 0.69-1.05 ms against 0.92-1.16 ms (interleaved).
    Costs `batch` outputs of memory per kernel owner. `view` (optional): the shape the kernel
    sees (e.g. [N] for a [1, N] output)."""

    def __init__(self, shape: tuple, batch: int = 8, view: tuple | None = None):
        self.shape, self.batch, self.view = tuple(shape), batch, view
        self._stock: list = []

    def take(self) -> tuple:
        try:
            return self._stock.pop()
        except IndexError:  # empty (or emptied by another thread meanwhile): make the next batch
            import torch

            tvm = _target.tvm()
            fresh = []
            for _ in range(self.batch):
                t = torch.empty(self.shape)
                fresh.append((t, tvm.runtime.from_dlpack(t.view(self.view) if self.view else t)))
            self._stock = fresh
            return fresh.pop()


def cache_dir() -> Path:
    """Where built kernels are cached: `$SPARSECOMP_CACHE_DIR/kernels` or `~/.cache/sparsecomp/kernels`."""
    root = os.environ.get("SPARSECOMP_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "sparsecomp")
    return Path(root) / "kernels"


def clear_memory_cache() -> None:
    """Forget the in-process kernels (the disk cache stays); for tests."""
    with _lock:
        _memory.clear()


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _compile(source: str):
    tvm = _target.tvm()
    from tvm.script import tirx as T

    try:
        func = tvm.script.from_source(source, extra_vars={"T": T})
        return tvm.compile(tvm.IRModule({"main": func}), target=_target.host_target())
    except Exception as exc:  # noqa: BLE001 - TVM raises many types; this is a bug in our template
        raise SparsecompError(f"TIR kernel failed to compile: {str(exc).strip().splitlines()[-1][:300]}",
                              hint="this is a sparsecomp bug; the kernel source is in the exception's __cause__") from exc


def _load(path: Path, meta: Path):
    """The cached module's function, or None when the files are missing, damaged or stale."""
    tvm = _target.tvm()
    try:
        want = json.loads(meta.read_text())["sha256"]
        if _sha256_file(path) != want:
            _log.warning("kernel cache %s is damaged (hash mismatch); rebuilding", path.name)
            return None
        func = tvm.runtime.load_module(str(path))["main"]
        _pool.attach(str(path))
        return func
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - corrupt json / dlopen failure: rebuild
        _log.warning("kernel cache %s unusable (%s); rebuilding", path.name, exc)
        return None


_store_warned: set[str] = set()  # kernel folders already said to be unwritable


def _store(lib, path: Path, meta: Path):
    """Export atomically; returns the loaded function, or None if exporting is impossible."""
    tvm = _target.tvm()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # (a file in the path, a read-only disk: in memory below)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".so", dir=path.parent)
        os.close(fd)
        lib.export_library(tmp)
        digest = _sha256_file(Path(tmp))
        fdm, tmpm = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
        with os.fdopen(fdm, "w") as f:
            json.dump({"sha256": digest, "tvm": tvm.__version__}, f)
        os.replace(tmp, path)
        os.replace(tmpm, meta)
        func = tvm.runtime.load_module(str(path))["main"]
        _pool.attach(str(path))
        return func
    except Exception as exc:  # noqa: BLE001 - no C compiler / read-only disk: stay in memory
        if str(path.parent) not in _store_warned:  # once per folder: a compile builds dozens of kernels
            _store_warned.add(str(path.parent))
            _log.warning("cannot cache kernels on disk in %s (%s); using them from memory for this run", path.parent, exc)
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        return None


def _normalise(fmt: str, params: dict) -> dict:
    p = dict(params)
    p.setdefault("mt", 0)
    p.setdefault("unroll", 1)
    p.setdefault("vec", _target.vector_width())
    p.setdefault("gather", "sw")
    p.setdefault("index_dtype", "uint16")
    if fmt == "bsr":
        p["block"] = tuple(p.get("block", (16, 1)))
        p.setdefault("scheme", "col")
    if fmt == "sell":
        p.setdefault("slice_height", 16)
        p.setdefault("scheme", "col")
        if p["mt"]:  # the M > 1 kernel reads plain column indices
            p["scheme"] = "col"
        if p["scheme"] == "delta":  # uint8 column deltas (see _codegen._sell_delta_mv)
            p["index_dtype"] = "uint8"
    if fmt == "nm":
        p.setdefault("n", 2)
        p.setdefault("m", 4)
        p.setdefault("scheme", "row")
        if p["mt"]:  # the M > 1 kernel reads the row layout
            p["scheme"] = "row"
    return p


def build(fmt: str, params: dict, dtype: str = "float32") -> Kernel:
    """Compile (or fetch from the caches) the kernel for `fmt` and variant `params`.

    `params` is a dict from `candidates(...)` / `prepare(...).params` (it carries the index
    dtype and, for SELL, whether rows are permuted). Only float32 is generated today.
    """
    if dtype != "float32":
        raise SparsecompError(f"TIR kernels support float32 only, got {dtype!r}")
    params = _normalise(fmt, params)
    return build_source(fmt, params, kernel_source(fmt, params, params["index_dtype"]))


@functools.lru_cache(maxsize=4096)
def _source_key(source: str) -> str:
    # memoised: kernels are looked up on every call of some layers (the transpose), and exporting
    # the target to hash it cost tens of microseconds
    tvm = _target.tvm()
    target = _target.host_target()
    return hashlib.sha256("\n".join([source, str(target.export() if hasattr(target, "export") else target),
                                      tvm.__version__, _CACHE_VERSION]).encode()).hexdigest()[:32]


def build_source(label: str, params: dict, source: str, key_prefix: str = "") -> Kernel:
    """Compile TVMScript `source` (or fetch it from the in-memory / on-disk caches) as a Kernel.

    The cache key is the source text with the target and TVM version: every kernel family
    (`build` above, the sparse-MLP kernels, the transpose) goes through here."""
    _pool.setting()  # a misspelt SPARSECOMP_TIR_POOL fails here, before any fallback can hide it
    key = key_prefix + _source_key(source)
    with _lock:
        hit = _memory.get(key)
        if hit is not None:
            return hit
        d = cache_dir()
        path, meta = d / f"{key}.so", d / f"{key}.json"
        func = _load(path, meta) if path.exists() else None
        if func is None:
            lib = _compile(source)
            func = _store(lib, path, meta)
            if func is None:
                func = lib.mod["main"] if hasattr(lib, "mod") else lib["main"]
                path = None
                _pool.attach(None)  # stays on TVM's pool: recorded for `_pool.status`
        k = Kernel(fmt=label, params=params, dtype="float32", source=source, key=key, func=func,
                   path=str(path) if path else None)
        _memory[key] = k
        return k
