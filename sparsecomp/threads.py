"""sparsecomp's one thread setting (DESIGN.md section 2): `SPARSECOMP_NUM_THREADS`, checked the
same way wherever it is read (`sparsecomp.set_num_threads`, the ort backend's sessions, the TIR
kernels' pool), so the runtimes can never disagree about it."""

from __future__ import annotations

import operator
import os

from sparsecomp.errors import SparsecompError

__all__ = ["ENV", "check_count", "env_threads", "env_threads_to_torch"]

ENV = "SPARSECOMP_NUM_THREADS"


def check_count(n, source: str = "thread count") -> int:
    """`n` as a thread count, or a clear error naming `source`: an int (numpy's too, not a bool,
    float or string) from 1 to 4x this machine's CPUs (more makes no sense for these kernels, and
    TVM / OpenMP allocate per thread)."""
    try:
        if isinstance(n, bool):
            raise TypeError
        n = operator.index(n)
    except TypeError:
        raise SparsecompError(f"{source} must be an int, got {n!r}", hint="e.g. sparsecomp.set_num_threads(2)") from None
    if n < 1:
        raise SparsecompError(f"{source} must be >= 1, got {n}", hint="e.g. 2")
    cpus = os.cpu_count() or n
    if n > 4 * cpus:
        raise SparsecompError(f"{source} {n} is more than 4x this machine's {cpus} CPUs",
                              hint=f"at most {4 * cpus}; one thread per core ({cpus}) is what the kernels are tuned for")
    return n


def env_threads() -> int | None:
    """`SPARSECOMP_NUM_THREADS` as a checked count, None where unset or empty."""
    env = os.environ.get(ENV, "").strip()
    if not env:
        return None
    try:
        value = int(env)
    except ValueError:
        raise SparsecompError(f"{ENV}={env!r} is not an integer", hint=f"e.g. {ENV}=2") from None
    return check_count(value, f"{ENV}")


_applied_to_torch: int | None = None  # the value `env_threads_to_torch` last gave torch


def env_threads_to_torch() -> None:
    """Give torch `SPARSECOMP_NUM_THREADS` (checked: a malformed value is a clear error here),
    where it is set and differs from what this last gave torch: at the first compile and at the
    CLI's start. The TIR kernels and the ort sessions read the variable themselves; importing
    sparsecomp changes nothing, and a `torch.set_num_threads` of the user's afterwards is kept
    while the variable stays the same."""
    global _applied_to_torch
    n = env_threads()
    if n is not None and n != _applied_to_torch:
        import torch

        torch.set_num_threads(n)
        _applied_to_torch = n
