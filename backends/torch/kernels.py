"""Kernels the torch backend can run a `sparse_linear` with, as candidates to time.

A candidate is a name, its parameters, and a `make(weight, bias) -> runner` that packs the weight
once; `runner(x)` computes `x @ weight.T + bias` for any leading dims. Candidates:

- `dense`: `F.linear` on the dense weight (torch's MKL path). Always present: nothing sparse is
  chosen unless it beats this, measured.
- `torch-csr`: torch.sparse CSR with int32 indices (`torch.mv` for one row; `W @ x.T` otherwise),
  measured here as 2x faster than int64 indices or `torch.sparse.mm` (DESIGN.md section 3).
- `tir-<format>`: the compiled TVM TIR kernels of `sparsecomp.backends.tir`, one candidate per
  format variant that kernel library proposes for the shape (when TVM is installed).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from sparsecomp import patterns
from sparsecomp.lowering import TIR_GEMV

__all__ = ["Candidate", "candidates", "flush_pause_s", "pool_tag", "tir_available", "with_gelu"]

Runner = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Candidate:
    name: str  # e.g. "dense", "torch-csr", "tir-sell"
    fmt: str  # dense | csr | sell | bsr | nm ...
    params: dict = field(default_factory=dict)
    make: Callable[[torch.Tensor, torch.Tensor | None], Runner] | None = None

    @property
    def label(self) -> str:
        if not self.params:
            return self.name
        return self.name + "{" + ",".join(f"{k}={v}" for k, v in sorted(self.params.items())) + "}"


def _dense(weight, bias) -> Runner:
    w = weight.contiguous()
    b = None if bias is None else bias.contiguous()
    return lambda x: F.linear(x, w, b)


def _torch_csr(weight, bias) -> Runner:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": known, and measured before use
        warnings.simplefilter("ignore", UserWarning)
        csr = weight.to_sparse_csr()
        csr = torch.sparse_csr_tensor(csr.crow_indices().to(torch.int32), csr.col_indices().to(torch.int32),
                                      csr.values(), size=weight.shape)
    n = weight.shape[0]

    def run(x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] == 1:
            y = torch.mv(csr, x2[0]).unsqueeze(0)
        else:
            y = (csr @ x2.t().contiguous()).t()
        if bias is not None:
            y = y + bias
        return y.contiguous().reshape(*lead, n)

    return run


def _tir_dense(weight, bias) -> Runner:
    from sparsecomp.backends.tir import build_mlp_kernel

    from .dense import TirDenseLinear

    return TirDenseLinear("", weight, bias, build_mlp_kernel("dense_mv"))


def tir_available() -> bool:
    try:
        from sparsecomp.backends import tir
    except ImportError:
        return False
    return tir.available()


def pool_tag() -> str:
    """Where the TIR kernels' parallel loops run ("openmp", "tvm"; "none" without TVM): part of
    every decision-cache key here, since the measured times depend on it (`backends/tir/_pool.py`)."""
    if not tir_available():
        return "none"
    from sparsecomp.backends import tir

    return tir.pool_tag()


def flush_pause_s() -> float:
    """The pause after each cold-timing flush (`sparsecomp.timing.ColdTiming`). With the kernels on
    torch's OpenMP threads (`backends/tir/_pool.py`), none: inside a model a kernel starts right
    after a torch op, on workers still spinning from it, and a pause that let them sleep made the
    timing pay a wake-up the model does not (opt-125m-like's MLPs then chose kernels whose down
    phase runs on the calling thread, which measured slower inside the model: 14.3-14.8 ms against
    13.4-13.9 ms for the whole forward). On TVM's pool, 1 ms, so that torch's workers, spinning
    after the flush's read, do not take the cores the kernel's own workers need."""
    return 0.0 if pool_tag() == "openmp" else 0.001


def _tir_candidates(weight: torch.Tensor, m: int, exhaustive: bool) -> list[Candidate]:
    from sparsecomp.backends import tir

    n, k = weight.shape
    out = []
    for fmt in tir.FORMATS:
        for params in tir.candidates(fmt, n, k, m, exhaustive=exhaustive):
            if fmt == "nm" and patterns.nm_conformance(weight, params["n"], params["m"]) < 1.0:
                continue  # N:M storage exists only for conformant weights
            out.append(Candidate(f"tir-{fmt}", fmt, dict(params), _tir_make(fmt, params)))
    return out


def _tir_make(fmt: str, params: dict):
    """`make(w, b)` for a TIR kernel variant: pack `w`, build the kernel, return x -> x @ w.T + b
    (through its epilogue, if `params` has one)."""
    def make(w, b):
        from sparsecomp.backends import tir

        kernel = tir.make_linear(fmt, w, params)
        return lambda x: kernel(x, b)

    return make


def candidates(weight: torch.Tensor, m: int, *, use_tir: bool = True, only: set[str] | None = None,
               exhaustive: bool = False) -> list[Candidate]:
    """Candidates for a weight [N, K] at M rows per call (dense first).

    `only` keeps the candidates with those names (e.g. {"dense", "tir-sell"}): for debugging a
    kernel, or forcing a format in experiments. `exhaustive` (tune=True): every TIR variant of the
    grid instead of the cost model's shortlist.
    """
    cands = [Candidate("dense", "dense", {}, _dense), Candidate("torch-csr", "csr", {}, _torch_csr)]
    wants_tir = only is None or any(name.startswith("tir-") for name in only)
    if use_tir and wants_tir and tir_available():
        if m == 1:  # the dense GEMV on TIR (`dense.py`): for a layer whose zeros do not pay at one row
            cands.append(Candidate(TIR_GEMV, "dense-tir", {}, _tir_dense))
        cands += _tir_candidates(weight, m, exhaustive)
    if only is not None:
        cands = [c for c in cands if c.name in only]
    return cands


def with_gelu(cand: Candidate) -> Candidate | None:
    """`cand` with GELU (erf form) applied in its kernel's epilogue: `make(w, b)(x)` computes
    gelu(x @ w.T + b) in one pass. Only the TIR M > 1 kernels have epilogues; None for others."""
    if not cand.name.startswith("tir-") or not cand.params.get("mt"):
        return None
    params = {**cand.params, "act": "gelu"}
    return Candidate(cand.name, cand.fmt, params, _tir_make(cand.fmt, params))
