"""How long torch's OpenMP workers spin-wait after an op, set before torch loads.

By default the TIR kernels run their parallel loops on torch's own OpenMP threads
(`backends/tir/_pool.py`): one pool, and then torch's spin is left as libgomp sets it (300,000
iterations). Measured on the Intel VM with the kernels on torch's threads: bert-base compiled at
90% 32.2 ms with the default spin against 32.6 ms with 10,000, at 70% 64.9 ms with both, eager
the same; opt-125m-like one token, eager 15.4-15.9 against 16.1-16.3 ms and exact mode 12.6-12.9
against 13.4 ms (longer spins keep the workers awake between a decoder's small ops).

Where the kernels will run on TVM's own pool instead (SPARSECOMP_TIR_POOL=tvm, no C compiler,
not Linux: `openmp_pool_expected`), `import sparsecomp` shortens the spin, since two pools then
share the cores: after every parallel op torch's workers spin 300,000 iterations (several ms on
the AMD CPU of the first sessions, whose `pause` is slow) before they sleep, and a TIR kernel
launched meanwhile shares its cores with a spinning thread and runs up to 2x slower. Measured
there on zoo bert-base, every encoder Linear 90% unstructured, seq 128, 2 cores, eager and
compiled interleaved in one process, three processes per setting:

    GOMP_SPINCOUNT   eager dense (ms)   compiled (ms)
    300000 (default)    192-217           141-154
    10000               185-205            96-110
    passive (0)         255-259           135-145   (eager's ops then wake sleeping workers)

So 10,000 kept eager torch as fast and took about 30% off the compiled model, at a cost to eager
one-token decoding (31-32 ms against 25-32 ms). libgomp reads the variable once, when torch loads
it, so `import sparsecomp` sets it (unless the user set it or OMP_WAIT_POLICY) only while torch is
not yet imported; when torch came first with the default spin and the kernels end up on TVM's
pool, `spin_note()` tells `compile` to say so in the report.
"""

from __future__ import annotations

import os
import sys

SPIN_COUNT = "10000"
_VARS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")

# Whether torch's OpenMP runtime started with its default spin (decided at `import sparsecomp`).
_default_spin: bool | None = None
_torch_first = False  # torch was imported before sparsecomp (its spin could not be set)


def requested_pool() -> str:
    """SPARSECOMP_TIR_POOL as given, lower case ("openmp" when unset); `backends/tir/_pool.setting`
    checks it."""
    return os.environ.get("SPARSECOMP_TIR_POOL", "openmp").strip().lower() or "openmp"


def c_compiler() -> str | None:
    """The C compiler the TIR launch shim is built with: $CC, else cc, gcc or clang on PATH."""
    import shutil

    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def openmp_pool_expected() -> bool:
    """Whether the TIR kernels will run on torch's OpenMP threads (`backends/tir/_pool.py` decides
    for sure later; this is its guess before torch loads): Linux (torch's wheels use libgomp
    there), a C compiler for the launch shim, and SPARSECOMP_TIR_POOL not "tvm"."""
    return requested_pool() != "tvm" and sys.platform.startswith("linux") and c_compiler() is not None


def configure() -> None:
    """Set GOMP_SPINCOUNT before torch loads libgomp where the kernels will run on TVM's pool (a
    no-op if the user set either variable)."""
    global _default_spin, _torch_first
    if _default_spin is not None:
        return
    user_set = any(v in os.environ for v in _VARS)
    _torch_first = "torch" in sys.modules
    if _torch_first or user_set or openmp_pool_expected():
        _default_spin = not user_set
        return
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    _default_spin = False


def torch_spin_is_short() -> bool:
    """Whether torch's OpenMP workers stop spinning soon after an op: our GOMP_SPINCOUNT (or a
    user's <= 30,000, or OMP_WAIT_POLICY=PASSIVE) was in the environment when torch loaded."""
    if _default_spin is None or _default_spin:
        return False
    policy = os.environ.get("OMP_WAIT_POLICY", "").strip().upper()
    count = os.environ.get("GOMP_SPINCOUNT", "").strip()
    return policy == "PASSIVE" or (count.isdigit() and int(count) <= 30000)


def spin_note() -> str | None:
    """A report note for kernels on TVM's pool beside torch's workers at libgomp's default spin
    (torch imported before sparsecomp); `compile` adds it only where the kernels did run on TVM's
    pool."""
    if not (_default_spin and _torch_first):
        return None
    return ("torch was imported before sparsecomp, so its OpenMP workers spin 300,000 iterations after each op "
            "and take the cores the sparse kernels run on (zoo bert-base at 90%: the compiled model ran about "
            f"1.4x slower). Import sparsecomp before torch, or set GOMP_SPINCOUNT={SPIN_COUNT} in the environment")
