"""Where the TIR kernels' parallel loops run: on torch's OpenMP threads, one pool for the model.

Why: a compiled model alternates torch ops (layer norm, attention, dense GEMVs) with TIR kernels.
On TVM's own thread pool, each runtime kept worker threads on the same cores: a TIR kernel
launched right after a torch op waited for torch's OpenMP worker, still spinning on the second
core, to give it up (and a torch op after a kernel for TVM's). Measured inside zoo
opt-125m-like's one-token forward (Intel Xeon VM, 2 cores, interleaved medians): a parallel TIR
launch with no work cost ~80 us on TVM's pool, whatever TVM's spin count (0, 30,000, 300,000),
and ~0 on torch's; the exact-mode MLP took 494 us against 457 us, the whole forward 14.2 ms
against 13.4 ms. (Shortening torch's spin instead, GOMP_SPINCOUNT=1000, made eager torch 1.3x
slower.)

How: a module TVM builds calls its parallel loops through a function pointer it exports,
`__TVMBackendParallelLaunch`, which TVM's runtime fills when it loads the module. `attach(path)`
points it at `sc_parallel_launch`, a few lines of C (`_SHIM`, compiled once per machine into
the kernel cache with the C compiler that `export_library` uses too) that runs the loop body on
a team of libgomp, the OpenMP runtime torch loaded (`GOMP_parallel`): the same worker threads
as torch's own ops. Each task gets TVM's arguments (task id = OpenMP thread number, the team
size as `num_task`), so the kernels are unchanged.

Falls back to TVM's pool, and `status()` says why, where: `SPARSECOMP_TIR_POOL=tvm`; torch does
not use libgomp; there is no C compiler; a kernel could not be cached on disk (held in memory,
nothing to point at); a module uses TVM's parallel barrier (none of ours does).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
import threading
from pathlib import Path

from sparsecomp import omp
from sparsecomp.threads import env_threads

__all__ = ["attach", "set_threads", "setting", "status", "tag", "uses_openmp"]

# TVM's C ABI for a parallel loop body: FTVMParallelLambda(task_id, TVMParallelGroupEnv*, cdata),
# the env being {sync_handle, num_task}; a launch returns 0 on success.
_SHIM = r"""
#include <stdint.h>
#include <stddef.h>
typedef struct { void* sync_handle; int32_t num_task; } sc_env;
typedef int (*sc_lambda)(int task_id, sc_env* penv, void* cdata);
typedef void (*sc_gomp_parallel)(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags);
typedef int (*sc_int_fn)(void);
static sc_gomp_parallel gomp_parallel;
static sc_int_fn thread_num, team_size;
static volatile unsigned n_threads = 1;
struct sc_ctx { sc_lambda f; void* cdata; volatile int err; };
void sc_init(void* gp, void* tn, void* ts) {
  gomp_parallel = (sc_gomp_parallel)gp; thread_num = (sc_int_fn)tn; team_size = (sc_int_fn)ts;
}
void sc_set_threads(unsigned n) { n_threads = n ? n : 1; }
static void sc_body(void* p) {
  struct sc_ctx* c = (struct sc_ctx*)p;
  sc_env env = {NULL, team_size()};
  if (c->f(thread_num(), &env, c->cdata) != 0) c->err = 1;
}
int sc_parallel_launch(sc_lambda f, void* cdata, int num_task) {
  struct sc_ctx c = {f, cdata, 0};
  gomp_parallel(sc_body, &c, num_task > 0 ? (unsigned)num_task : n_threads, 0);
  return c.err ? -1 : 0;
}
"""

_lock = threading.Lock()
_attached: set[str] = set()
_skipped: dict[str, str] = {}  # why kernels stayed on TVM's pool (reason -> an example kernel)
_loaded: ctypes.CDLL | None = None  # the shim, once `_shim` loaded it
_threads: int | None = None  # `set_threads`' last setting


def _libgomp_path() -> str | None:
    """The libgomp this process loaded (torch's), from /proc/self/maps."""
    try:
        for line in Path("/proc/self/maps").read_text().splitlines():
            path = line.split()[-1] if len(line.split()) >= 6 else ""
            if Path(path).name.startswith("libgomp") and ".so" in path:
                return path
    except OSError:
        pass
    return None


def _compile_shim(cache: Path) -> Path:
    src = _SHIM.encode()
    path = cache / f"omp-launch-{hashlib.sha1(src).hexdigest()[:16]}.so"
    if path.exists():
        return path
    cc = omp.c_compiler()
    if not cc:
        raise OSError("no C compiler (cc, gcc or clang; or set CC)")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".shim-") as tmp:
        c_file, so = Path(tmp) / "shim.c", Path(tmp) / "shim.so"
        c_file.write_bytes(src)
        res = subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(so), str(c_file)], capture_output=True, text=True)
        if res.returncode != 0:
            raise OSError(f"{cc} failed: {res.stderr.strip()[:300]}")
        os.replace(so, path)  # atomic: a concurrent process sees the whole file or none
    return path


def _addr(lib: ctypes.CDLL, name: str) -> int:
    return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value


def setting() -> str:
    """SPARSECOMP_TIR_POOL, checked: "openmp" (the default) or "tvm". `build_source` asks before
    compiling anything, so a misspelt value fails at once, not inside the kernel cache's fallbacks."""
    choice = omp.requested_pool()
    if choice not in ("openmp", "tvm"):
        from sparsecomp.errors import SparsecompError

        raise SparsecompError(f"SPARSECOMP_TIR_POOL must be 'openmp' or 'tvm', got {choice!r}",
                              hint="unset it (torch's OpenMP threads, the default) or set it to tvm (TVM's own pool)")
    return choice


@functools.cache
def _shim() -> tuple[ctypes.CDLL | None, str]:
    """(the loaded shim, "") or (None, why not)."""
    if setting() == "tvm":
        return None, "SPARSECOMP_TIR_POOL=tvm"
    import torch  # noqa: F401  (its libgomp must be loaded to be found)

    gomp_path = _libgomp_path()
    if gomp_path is None:
        return None, "torch does not use GNU OpenMP (libgomp) in this process"
    from ._build import cache_dir

    try:
        shim = ctypes.CDLL(str(_compile_shim(cache_dir())))
        gomp = ctypes.CDLL(gomp_path)  # the same handle as torch's: one team of workers
        shim.sc_init(ctypes.c_void_p(_addr(gomp, "GOMP_parallel")), ctypes.c_void_p(_addr(gomp, "omp_get_thread_num")),
                     ctypes.c_void_p(_addr(gomp, "omp_get_num_threads")))
    except (OSError, AttributeError) as exc:
        return None, f"the OpenMP launch shim is unavailable ({exc})"
    global _loaded
    _loaded = shim
    set_threads(_threads)
    return shim, ""


def attach(path: str | None) -> bool:
    """Point the loaded kernel module at `path` at torch's OpenMP threads; False (and the reason
    recorded for `status`) where it stays on TVM's pool. Idempotent; call after every load."""
    if path is None:
        _skipped.setdefault("a kernel held in memory only (not cached on disk)", "")
        return False
    shim, why = _shim()
    if shim is None:
        _skipped.setdefault(why, path)
        return False
    with _lock:
        try:
            lib = ctypes.CDLL(path)  # the module TVM loaded: dlopen returns the same handle
            if hasattr(lib, "__TVMBackendParallelBarrier"):
                _skipped.setdefault("a kernel uses TVM's parallel barrier", path)
                return False
            ptr = ctypes.c_void_p.in_dll(lib, "__TVMBackendParallelLaunch")
        except (OSError, ValueError):  # no parallel loop in this kernel: nothing to point
            return False
        ptr.value = _addr(shim, "sc_parallel_launch")
        _attached.add(path)
    return True


def set_threads(n: int | None) -> None:
    """Team size of the kernels' parallel loops (as TVM's `set_num_threads` for its pool); None:
    `SPARSECOMP_NUM_THREADS` (sparsecomp's one setting), else `TVM_NUM_THREADS`, else every CPU
    this process may use. Loads nothing: a shim loaded later takes the setting then."""
    global _threads
    _threads = n
    if _loaded is not None:
        if n is None:
            from ._target import _affinity_cpus

            n = env_threads() or int(os.environ.get("TVM_NUM_THREADS") or 0) or _affinity_cpus()
        _loaded.sc_set_threads(ctypes.c_uint(max(1, int(n))))


def uses_openmp() -> bool:
    return _shim()[0] is not None


def tag() -> str:
    """"openmp" or "tvm": part of the torch backend's decision-cache keys (a kernel's measured
    time depends on the pool its loops run on)."""
    return "openmp" if uses_openmp() else "tvm"


def status() -> str:
    """Where the kernels loaded so far run their parallel loops, in words."""
    shim, why = _shim()
    if shim is None:
        return f"TIR kernels run on TVM's thread pool ({why})"
    if _skipped:
        return (f"TIR kernels run on torch's OpenMP threads ({len(_attached)} kernels), but some on TVM's pool: "
                + "; ".join(_skipped))
    return f"TIR kernels run on torch's OpenMP threads ({len(_attached)} kernels)"
