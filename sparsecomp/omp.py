"""How long torch's OpenMP workers spin-wait after an op, set before torch loads.

Why: a compiled model alternates torch ops (layer norm, attention, GELU) with TIR kernels, and
the two runtimes keep separate thread pools on the same cores. After every parallel op, torch's
OpenMP (libgomp) workers spin for `GOMP_SPINCOUNT` iterations, 300,000 by default (several ms
on this AMD CPU, whose `pause` is slow), before they sleep. A TIR kernel launched meanwhile
shares its cores with a spinning thread and runs up to 2x slower. (TVM's own workers already
sleep at once: `backends/tir/_target.py`.)

Measured on zoo bert-base, every encoder Linear 90% unstructured, seq 128, 2 cores, eager and
compiled interleaved in one process, three processes per setting:

    GOMP_SPINCOUNT   eager dense (ms)   compiled (ms)
    300000 (default)    192-217           141-154
    10000               185-205            96-110
    passive (0)         255-259           135-145   (eager's ops then wake sleeping workers)

So 10,000 keeps eager torch as fast as before and takes about 30% off the compiled model. The
cost: eager one-token decoding (opt-125m-like, M = 1, whose ops leave gaps long enough for the
workers to fall asleep) measured 31-32 ms against 25-32 ms with the default, so up to about 5%
slower; a user who prefers the default sets GOMP_SPINCOUNT=300000 (never overridden). libgomp
reads the variable once, when torch loads it, so `import sparsecomp` sets it (unless the user
already did) only while torch is not yet imported; when torch came first, `spin_note()` tells
`compile` to say so in the report.
"""

from __future__ import annotations

import os
import sys

SPIN_COUNT = "10000"
_VARS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")

# Whether torch's OpenMP runtime started with its default spin (decided at `import sparsecomp`).
_default_spin: bool | None = None


def configure() -> None:
    """Set GOMP_SPINCOUNT before torch loads libgomp (a no-op if the user set either variable)."""
    global _default_spin
    if _default_spin is not None:
        return
    user_set = any(v in os.environ for v in _VARS)
    if "torch" in sys.modules:
        _default_spin = not user_set
        return
    if not user_set:
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
    """A report note when torch was imported before sparsecomp with libgomp's default spin."""
    if not _default_spin:
        return None
    return ("torch was imported before sparsecomp, so its OpenMP workers spin 300,000 iterations after each op "
            "and take the cores the sparse kernels run on (zoo bert-base at 90%: the compiled model ran about "
            f"1.4x slower). Import sparsecomp before torch, or set GOMP_SPINCOUNT={SPIN_COUNT} in the environment")
