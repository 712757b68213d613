"""What every backend's lowering returns, so the face treats backends alike.

A backend is a package `sparsecomp.backends.<name>` with the same shape:

    NAME: str
    lower(gm, example, *, cache, max_seconds, only, progress, **backend_options) -> Lowered

`gm` is the rewritten FX graph (holding `sparsecomp::*` ops), `example` the normalised example
inputs `(args, kwargs)`, `cache` a `DecisionCache` for this backend. The backend decides per layer by
measurement (records a `LayerDecision` for each sparsecomp op it lowered) and returns a module that
runs the whole model: for torch the lowered GraphModule itself, for ONNX Runtime a module wrapping
an `InferenceSession`. After lowering, no op the backend cannot run may remain.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: the report (which reads TIR_GEMV) must not load torch
    import torch

__all__ = ["LOSSY_MIN_COSINE", "LayerDecision", "Lowered", "MLPDecision", "KernelFilter", "TIR_GEMV", "speedup_text"]

# The kernel label of a dense layer a backend runs on its compiled GEMV instead of the graph's own
# op (torch backend, one row per call). Such a row is "dense" yet lowered: the face and the report
# count it apart from the layers left on torch.
TIR_GEMV = "tir-dense-mv"

# Agreement (cosine of the outputs) a lossy mode must keep with its reference: compile()'s
# whole-model check, and a backend's per-op check where its kernels change the arithmetic.
LOSSY_MIN_COSINE = 0.999


class KernelFilter(set):
    """The names given as `compile(kernels=...)`, as backends receive them (`only`): a set whose
    membership tests remember the names that matched a candidate, so the face can name those that
    matched none (a typo such as "tir-selll" would otherwise just leave the layers dense)."""

    def __init__(self, names=()):
        super().__init__(names)
        self.hits: set[str] = set()

    def __contains__(self, name) -> bool:
        found = super().__contains__(name)
        if found:
            self.hits.add(name)
        return found

    def unmatched(self) -> list[str]:
        return sorted(set(self) - self.hits)


def speedup_text(dense_us: float, chosen_us: float, where: str = "") -> str:
    """A report reason's lead: "1.23x faster than dense<where> (measured)", or why there is no
    ratio (dense not among the kernels timed, e.g. `kernels=` left it out; nothing timed)."""
    if not chosen_us or not math.isfinite(chosen_us):
        return "measured fastest"
    if not dense_us or not math.isfinite(dense_us):
        return "measured fastest; dense was not timed (not among the kernels= allowed)"
    return f"{dense_us / chosen_us:.2f}x faster than dense{where} (measured)"


@dataclass
class LayerDecision:
    """One lowered layer: what was measured and what was chosen (a row of `CompileReport`)."""

    layer: str
    shape: list[int]  # [out, in]
    m: int  # rows per call at the example inputs
    density: float
    decision: str  # "sparse" | "dense"
    kernel: str  # candidate label
    dense_us: float
    chosen_us: float
    reason: str
    cached: bool = False
    measured: dict | None = None  # candidate label -> median us

    @property
    def speedup(self) -> float:
        return self.dense_us / self.chosen_us if self.chosen_us else float("nan")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["speedup"] = self.speedup
        return d


@dataclass
class MLPDecision(LayerDecision):
    """One lowered MLP block (`sparse_mlp`), in any backend: a `LayerDecision` whose shape is
    `[in, hidden, out]` and whose density is the fraction of hidden neurons active on the example
    inputs (union over rows)."""

    pattern: str = ""  # e.g. "mlp plain relu exact"
    crossover: dict = field(default_factory=dict)  # torch backend: M -> union density above which the down runs dense
    calibration: dict = field(default_factory=dict)  # lossy modes: calibrated sparsity, recall, cosine


@dataclass
class Lowered:
    """A backend's result: the runnable module, the per-layer decisions, notes for the report."""

    module: torch.nn.Module
    decisions: list[Any] = field(default_factory=list)  # LayerDecision or a backend's richer record with to_dict()
    notes: list[str] = field(default_factory=list)
    artifacts: dict[str, Any] = field(default_factory=dict)  # e.g. {"onnx": ModelProto} for export
