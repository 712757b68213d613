"""Transparent huge pages for the arrays compiled kernels stream.

A kernel that streams a weight touches a new 4 KiB page every 1024 floats, and each page costs a
TLB miss; on a virtual machine that is a two-level page walk, which the hardware prefetchers do
not hide when the rows read are scattered (the selected neurons' rows of an MLP, a sparse format's
slices). Backed by 2 MiB pages, the same arrays need 512x fewer translations. Measured on the
bench_mlp FFN (2048 -> 8192, M = 1, cold, interleaved, 2 threads): the predictor kernel 907 ->
775 us, the exact-mode kernels about 9% and the dense TIR GEMV about 6% faster.

`prefer_huge_pages(t)` works in place, with no copy and no extra memory: it advises the kernel
(`MADV_HUGEPAGE`, so the range stays eligible) and asks it to collapse the pages already there
(`MADV_COLLAPSE`, Linux 6.1+; ~4 ms per 2 MiB). Only the whole 2 MiB pages inside the tensor's
storage are touched, so memory outside it is never affected. Where the system cannot (no Linux,
THP disabled, an older kernel, file-backed or pinned memory), the tensor simply stays on 4 KiB
pages: this is a speed hint, never a condition for correctness. Tensors shared with the user's
model (a dense weight the TIR GEMV reads) are collapsed in place too, so the eager model gets the
same pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

import torch

__all__ = ["HUGE_PAGE", "MIN_BYTES", "huge_page_bytes", "huge_pages_available", "prefer_huge_pages"]

HUGE_PAGE = 2 << 20
# Below this an array spans at most a few huge pages, and its interior often none: not worth a call.
MIN_BYTES = 4 << 20
_MADV_HUGEPAGE, _MADV_COLLAPSE = 14, 25


@functools.cache
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


@functools.cache
def huge_pages_available() -> bool:
    """Whether this system can back memory with transparent huge pages (THP not `never`)."""
    if _libc() is None:
        return False
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def _interior(t: torch.Tensor) -> tuple[int, int]:
    """The 2 MiB-aligned range inside `t`'s storage (empty when there is none)."""
    st = t.untyped_storage()
    p, n = st.data_ptr(), st.nbytes()
    return (p + HUGE_PAGE - 1) // HUGE_PAGE * HUGE_PAGE, (p + n) // HUGE_PAGE * HUGE_PAGE


def prefer_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """`t` itself, its storage (the whole 2 MiB pages inside it) moved onto huge pages where the
    system allows; returns at once for small or non-CPU tensors. Calling it again on a range
    already collapsed costs ~3 ms per 64 MiB (no memo: a freed range's address may come back
    as new memory)."""
    if t.device.type != "cpu" or t.untyped_storage().nbytes() < MIN_BYTES or not huge_pages_available():
        return t
    start, end = _interior(t)
    if end <= start:
        return t
    libc = _libc()
    libc.madvise(start, end - start, _MADV_HUGEPAGE)
    # failure (EINVAL on kernels before 6.1, EAGAIN / ENOMEM when no huge page is free) leaves the
    # pages as they were; the range may still be collapsed later by khugepaged
    libc.madvise(start, end - start, _MADV_COLLAPSE)
    return t


def huge_page_bytes(t: torch.Tensor) -> int:
    """Bytes of `t`'s storage that sit on huge pages (Linux `/proc/self/smaps`; 0 elsewhere).
    For tests and diagnostics: it reads the whole map, so it is slow."""
    st = t.untyped_storage()
    lo, hi = st.data_ptr(), st.data_ptr() + st.nbytes()
    try:
        with open("/proc/self/smaps") as f:
            lines = f.read().splitlines()
    except OSError:
        return 0
    total, cur = 0, None
    for line in lines:
        head = line.split()[0] if line else ""
        if "-" in head and not head.endswith(":"):
            a, b = (int(v, 16) for v in head.split("-"))
            cur = (a, b) if a < hi and b > lo else None
        elif cur is not None and head == "AnonHugePages:":
            # the VMA's huge-page kB, clipped to the share of the VMA that overlaps t
            kb = int(line.split()[1])
            a, b = cur
            total += min(kb * 1024, max(0, min(b, hi) - max(a, lo)))
    return total
