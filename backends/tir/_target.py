"""Host target detection and the TVM thread pool (TVM is imported lazily, on first use).

Why these choices:
- The target is the host CPU as LLVM detects it (`llvm_get_system_cpu`), never a hard-coded
  `-mcpu`; on a VM whose CPUID hides AVX-512 this gives e.g. "znver3" (AVX2), which is what the
  VM can actually run. `num-cores` is the CPUs this process may run on.
- The vector width (float lanes) comes from the target's LLVM features: 16 with avx512f, 8 with
  AVX/AVX2, else 4. Kernels take it as a variant parameter, so an AVX2-only machine never gets a
  16-wide candidate it would emulate.
- TVM sizes its thread pool once, from `TVM_NUM_THREADS` read when the pool starts (without it,
  TVM uses half the logical CPUs: 1 thread on a 2-core VM). We set the variable before the pool
  exists, to `SPARSECOMP_NUM_THREADS` or every CPU we may use, so the pool is as large as the
  machine; `set_num_threads(n)` then narrows or widens the number of workers actually used at
  run time through TVM's `runtime.config_threadpool` (it cannot grow past the pool's size).
- By default the kernels' parallel loops run on torch's OpenMP threads, not on TVM's pool
  (`_pool.py`); what follows about TVM's pool holds where they fall back to it.
- TVM's idle workers spin 300,000 iterations after each kernel (`TVM_THREAD_POOL_SPIN_COUNT`)
  and torch's OpenMP threads spin after each op: in a graph that alternates torch ops and TVM
  kernels on the same cores, each runtime's spinning threads starve the other's. Measured on
  2-layer bert-base, 90% sparse, 2 cores (compiled vs eager, same run): spin 300000 -> 0.84-1.0x,
  20000 -> 0.84x, 2000 -> 1.33x, 0 -> 1.37-1.55x. That was with torch's workers spinning
  300,000 `pause` iterations. Since `import sparsecomp` shortens that to 10,000 (sparsecomp/omp.py),
  TVM's own spin (which yields the CPU while it waits) pays instead: every kernel no longer wakes
  a sleeping worker. With GOMP_SPINCOUNT=10000, two processes per setting: opt-125m-like one
  token, exact mode vs eager, TVM spin 0 -> 1.05x and 1.09x, 30000 -> 1.23x and 1.25x; bert-base
  90% compiled, spin 0 -> 132 and 149 ms, 30000 -> 126 and 136 ms. So the default is 30000 when
  torch's spin is short (`omp.torch_spin_is_short`), else 0; a user's own setting is kept.
"""

from __future__ import annotations

import functools
import os

from sparsecomp import omp
from sparsecomp.errors import SparsecompError
from sparsecomp.threads import env_threads

__all__ = ["available", "tvm", "host_target", "vector_width", "has_feature", "set_num_threads", "get_num_threads"]


def _affinity_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _default_threads() -> int:
    return env_threads() or _affinity_cpus()


def _spin_count() -> str:
    # TVM's workers spin by yielding the CPU (sched_yield), torch's by `pause`: a short TVM spin
    # only pays once torch's workers stop spinning soon (sparsecomp/omp.py)
    return "30000" if omp.torch_spin_is_short() else "0"


@functools.cache
def _import_tvm():
    # before TVM's thread pool starts (it starts lazily at the first parallel kernel call)
    os.environ.setdefault("TVM_NUM_THREADS", str(_default_threads()))
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", _spin_count())  # see the module docstring
    try:
        import tvm  # noqa: F401
        import tvm.script  # noqa: F401
        from tvm.script import tirx  # noqa: F401
        from tvm.target import codegen  # noqa: F401
    except ImportError as exc:
        return exc
    return tvm


def available() -> bool:
    """True when TVM (with the TIR script dialect and LLVM codegen) imports."""
    return not isinstance(_import_tvm(), BaseException)


def tvm():
    """The `tvm` module, or a SparsecompError saying how to install it."""
    mod = _import_tvm()
    if isinstance(mod, BaseException):
        raise SparsecompError(
            f"the TIR sparse kernels need Apache TVM, which does not import here ({mod})",
            hint="pip install 'sparsecomp[tvm]' (apache-tvm==0.27.0.post1, apache-tvm-ffi==0.1.14.post0)",
        )
    return mod


@functools.cache
def host_target():
    """The host CPU as a TVM llvm Target (detected mcpu, num-cores = CPUs we may use)."""
    tvm_ = tvm()
    from tvm.target import codegen

    return tvm_.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": _affinity_cpus()})


@functools.cache
def _features() -> frozenset[str]:
    tvm()
    from tvm.target import codegen

    try:
        feats = codegen.llvm_get_cpu_features(host_target())
        return frozenset(str(k) for k in feats)
    except Exception:  # noqa: BLE001 - an LLVM without feature query: be conservative
        return frozenset()


def has_feature(name: str) -> bool:
    """Whether the host target has an LLVM feature (e.g. "avx2", "avx512f")."""
    return name in _features()


def vector_width() -> int:
    """float32 lanes of the widest vector the host target has: 16 (AVX-512), 8 (AVX2), else 4."""
    if has_feature("avx512f"):
        return 16
    if has_feature("avx2") or has_feature("avx"):
        return 8
    return 4


def set_num_threads(n: int) -> None:
    """Use `n` TVM worker threads for the kernels from now on (1 <= n <= the pool's size).

    The pool itself is created once per calling thread with `TVM_NUM_THREADS` workers; `n`
    beyond that cannot be honoured (set `TVM_NUM_THREADS` / `SPARSECOMP_NUM_THREADS` before the
    first kernel call instead) and raises.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise SparsecompError(f"set_num_threads needs a positive int, got {n!r}")
    tvm()  # raises the install hint when TVM is missing
    import tvm_ffi

    cap = _pool_size()
    if n > cap:
        raise SparsecompError(
            f"TVM's thread pool has {cap} workers, cannot use {n}",
            hint="set TVM_NUM_THREADS or SPARSECOMP_NUM_THREADS before the first kernel call",
        )
    # kBig (1) = all cores; nthreads = n workers. MaxConcurrency (read from the environment at
    # every launch; 1 means "run inline, no pool") must agree.
    os.environ["TVM_NUM_THREADS"] = str(n)
    tvm_ffi.get_global_func("runtime.config_threadpool")(1, n)
    os.environ["TVM_NUM_THREADS"] = str(n)
    from . import _pool

    _pool.set_threads(n)  # the kernels on torch's OpenMP threads (`_pool`) use n as well


@functools.cache
def _pool_size() -> int:
    """Workers of TVM's pool, recorded the first time we ask (before we reconfigure it)."""
    return int(tvm().runtime.num_threads())


def get_num_threads() -> int:
    """Workers TVM's pool uses now (for the calling thread)."""
    tvm_ = tvm()
    if int(os.environ.get("TVM_NUM_THREADS", "0") or 0) == 1:
        return 1
    return int(tvm_.runtime.num_threads())
