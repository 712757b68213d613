"""Sparse matmul kernels for CPU written in TVM TIR: `y = x @ W^T + b`, W sparse.

Formats (storage from `sparsecomp.formats`): CSR, SELL-C (slice heights 8/16/32...), BSR with
any r x c block, N:M. Each has an M = 1 kernel (memory bound: vectorised along contiguous
values, narrow indices, parallel over rows) and an M > 1 kernel (x transposed so the inner loop
is a broadcast FMA over a tile of M). Variants are parameterised; `candidates` proposes a few,
the caller times them on its real weight and keeps the fastest.

    prepared = prepare("csr", W, params)             # pack for this variant
    kernel = build("csr", prepared.params)           # compile (cached in memory and on disk)
    lin = SparseLinearKernel(prepared, kernel)
    y = lin(x, bias)                                 # x [..., K] -> y [..., N]

TVM is imported on first use; without it `available()` is False and the calls raise
`SparsecompError`. Threads: `set_num_threads(n)` (see `_target` for how TVM's pool is sized); where the kernels'
parallel loops run (torch's OpenMP threads, else TVM's pool): `_pool`, `pool_status()`.
"""

from __future__ import annotations

from ._build import Kernel, OutputStock, bound_args, build, cache_dir, clear_memory_cache
from ._linear import (FORMATS, PreparedWeight, SparseLinearKernel, begin_transpose_reuse, candidates,
                      end_transpose_reuse, prepare)
from ._mlp import build_mlp_kernel, predictor_panels
from ._pool import set_threads as set_pool_threads, status as pool_status, tag as pool_tag
from ._target import available, get_num_threads, host_target, set_num_threads, vector_width

__all__ = [
    "FORMATS",
    "Kernel",
    "OutputStock",
    "PreparedWeight",
    "SparseLinearKernel",
    "available",
    "begin_transpose_reuse",
    "bound_args",
    "build",
    "build_mlp_kernel",
    "cache_dir",
    "candidates",
    "clear_memory_cache",
    "end_transpose_reuse",
    "get_num_threads",
    "host_target",
    "make_linear",
    "pool_status",
    "pool_tag",
    "predictor_panels",
    "prepare",
    "set_pool_threads",
    "set_num_threads",
    "vector_width",
]


def make_linear(fmt: str, dense_weight, params: dict | None = None) -> SparseLinearKernel:
    """prepare + build + SparseLinearKernel in one call."""
    prepared = prepare(fmt, dense_weight, params)
    return SparseLinearKernel(prepared, build(fmt, prepared.params))
