"""Dense Linear layers at one row per call: torch's GEMV or the TIR one, whichever measures faster.

Lowering table (torch backend, after the sparse lowerings):

    aten.linear(x, W, b)  with constant fp32 W, one row at the example inputs
        ->  call_module TirDenseLinear (TIR `dense_mv` at M = 1, `F.linear` otherwise) | unchanged

Why a sparsity compiler touches dense layers: at M = 1 (decoding one token) a Linear only streams
its weight, and torch's GEMV (MKL) reads it at about half the bandwidth of the TIR kernels on AMD
CPUs (measured here: the 768 -> 3072 GEMV at ~13 GB/s, the TIR kernel at 25-28 GB/s). A decoder
whose MLPs run sparse kernels would otherwise keep its attention projections on the slower path,
and alternate between torch's OpenMP pool and TVM's on every layer. Nothing is assumed: each layer
shape is timed once (torch vs TIR, interleaved, on the layer's real input), TIR must win by
`MARGIN`, and the choice is checked numerically and cached like every other decision. When the
model's weights exceed the last-level cache, each timed call cycles through copies of the weight
(`sparsecomp.timing.cold_copies`): inside such a model a layer reads its weight from memory,
while a layer timed alone finds it in cache (the ORT backend times cold for the same reason). On
the AMD VM both GEMVs measured within ~20% hot vs cold; the Intel run, where the hot timing chose
the TIR GEMV for most opt-125m-like layers and the whole graph then ran slower, is what this
guards. Layers that see more than one row at the example inputs stay on torch's GEMM
(compute-bound there).
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from sparsecomp.cache import DecisionCache
from sparsecomp.errors import SparsecompError
from sparsecomp.ir import compare_outputs, get_attr_value, linear_sites, record_inputs
from sparsecomp.lowering import TIR_GEMV as KERNEL  # the report's kernel label
from sparsecomp.lowering import LayerDecision
from sparsecomp.memory import prefer_huge_pages
from sparsecomp.timing import cold_copies, compare, model_is_cold
from .kernels import pool_tag as _pool_tag

__all__ = ["KERNEL", "MARGIN", "TirDenseLinear", "lower_dense_linear"]
MARGIN = 1.05  # the TIR GEMV must beat torch's by 5%: timing noise must not flip a layer
VERSION = 2  # bump when the kernel or the timing changes: cached decisions no longer apply


class TirDenseLinear(torch.nn.Module):
    """A dense Linear measured faster on the TIR GEMV at one row per call; other row counts (and
    empty inputs) run `F.linear` on the same weight."""

    def __init__(self, layer: str, weight: torch.Tensor, bias: torch.Tensor | None, kernel):
        from sparsecomp.backends.tir import OutputStock, bound_args

        super().__init__()
        self.layer, self.kernel = layer, KERNEL
        self._w = prefer_huge_pages(weight.detach().contiguous())  # in place: see sparsecomp.memory
        self._b = bias.detach().contiguous() if bias is not None else None
        self._n = self._w.shape[0]
        self._b_or_zero = self._b if self._b is not None else torch.zeros(self._n)
        self._k = kernel
        self._bound = bound_args(self._w, self._b_or_zero)  # converted once (see bound_args)
        self._out = OutputStock((self._n,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (kept lean: at one row per call this wrapper's own cost is a visible share of the layer)
        if x.dtype is not torch.float32 or not x.is_cpu:
            raise SparsecompError(
                f"layer {self.layer} was compiled for float32 CPU inputs, got {str(x.dtype).replace('torch.', '')} on {x.device}",
                hint="cast the inputs to float32 on the CPU, or compile the model again for this dtype/device",
            )
        n = x.shape[-1]
        if x.numel() != n or n == 0:
            return F.linear(x, self._w, self._b)
        y, yt = self._out.take()
        self._k(x.reshape(n).contiguous(), *self._bound, yt)
        return y.reshape(*x.shape[:-1], self._n)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, kernel={self.kernel}"


def _sites(gm: fx.GraphModule):
    """aten.linear nodes with a constant fp32 weight (and a constant or no bias) that no sparse
    lowering has decided on already."""
    out = []
    for site in linear_sites(gm):
        node = site.node
        if site.kind != "linear" or node.op != "call_function" or node.target is not torch.ops.aten.linear.default:
            continue
        if str(node.meta.get("sparsecomp.rule", "")).startswith("sparse_linear->"):
            continue  # a sparse_linear node whose measured choice was dense: reported there
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if bias is not None and site.bias_target is None:
            continue  # a bias computed at run time
        w = site.weight(gm)
        if w.dtype != torch.float32 or w.dim() != 2:
            continue
        out.append(site)
    return out


def lower_dense_linear(gm: fx.GraphModule, example: tuple[tuple, dict], *, cache: DecisionCache | None,
                       max_seconds: float = 0.5, min_runs: int = 20, rtol: float = 1e-4, progress=None) -> list[LayerDecision]:
    """Move the one-row dense Linear layers of `gm` that measure faster on the TIR GEMV onto it (in
    place); returns one decision per one-row layer (either way)."""
    from sparsecomp.backends.tir import build_mlp_kernel

    sites = _sites(gm)
    if not sites:
        return []
    inputs = record_inputs(gm, [s.node for s in sites], example)
    cold = model_is_cold(gm)
    kernel = None
    decisions: list[LayerDecision] = []
    by_shape: dict[tuple, tuple[dict, bool]] = {}  # one timing per weight shape: later layers follow the first
    for i, site in enumerate(sites):
        node, x = site.node, inputs[site.node]
        if x.dtype != torch.float32 or x.dim() == 0 or x.numel() != x.shape[-1]:
            continue  # more than one row per call (or no row): the GEMM stays torch's
        w = site.weight(gm).detach()
        b = get_attr_value(gm, site.bias_target).detach() if site.bias_target else None
        if kernel is None:
            kernel = build_mlp_kernel("dense_mv")
        mod = TirDenseLinear(site.name, w, b, kernel)
        with torch.no_grad():
            reference = F.linear(x, w, b)
            ok, err, allowed = compare_outputs(mod(x), reference, rtol=rtol)
        shape = tuple(w.shape)
        notes: list[str] = []
        cached = False
        if not ok:
            entry = {"kernel": "dense", "dense_us": float("nan"), "chosen_us": float("nan"), "measured": {}}
            notes.append(f"{KERNEL} dropped: max abs error {err:.3g} > {allowed:.3g}")
        elif shape in by_shape:
            entry, cached = by_shape[shape]
            notes.append("decided by an earlier layer of this shape")
        else:
            key = cache.key(op="dense_linear", shape=list(shape), m=1, dtype="float32", bias=b is not None, cold=cold,
                            version=VERSION, pool=_pool_tag()) if cache is not None else None
            entry = cache.get(key, validate=lambda e: e.get("kernel") in ("dense", KERNEL) and "dense_us" in e) if key else None
            cached = entry is not None
            if entry is None:
                n = cold_copies(w.numel() * 4) if cold else 1
                ws = [w] + [w.clone() for _ in range(n - 1)]
                mods = [mod] + [TirDenseLinear(site.name, wc, b, kernel) for wc in ws[1:]]

                def torch_gemv():
                    for wc in ws:
                        F.linear(x, wc, b)

                def tir_gemv():
                    for m in mods:
                        m(x)

                with torch.no_grad():
                    t = compare({"dense": torch_gemv, KERNEL: tir_gemv}, min_runs=min_runs, max_seconds=max_seconds * n ** 0.5)
                measured = {k: v.median * 1e6 / n for k, v in t.items()}
                del ws, mods
                best = KERNEL if measured[KERNEL] * MARGIN < measured["dense"] else "dense"
                entry = {"kernel": best, "dense_us": measured["dense"], "chosen_us": measured[best], "measured": measured}
                if cache is not None:
                    cache.put(key, entry)
            by_shape[shape] = (entry, cached)
        dense_us, chosen_us = entry["dense_us"], entry["chosen_us"]
        if entry["kernel"] == KERNEL:
            reason = f"one row per call: the TIR GEMV measured {dense_us / chosen_us:.2f}x faster than torch's"
            name = f"dense_{i}_{site.name.replace('.', '_')}"
            gm.add_submodule(name, mod)
            with gm.graph.inserting_before(node):
                new = gm.graph.call_module(name, (node.args[0],))
            new.meta.update(node.meta)
            new.meta["sparsecomp.rule"] = f"dense_linear->{KERNEL}"
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
        else:
            tir_us = entry.get("measured", {}).get(KERNEL)
            reason = (f"one row per call: torch's GEMV kept (TIR GEMV {tir_us:.0f} us vs {dense_us:.0f} us; it must win by "
                      f"{MARGIN:.2f}x)" if tir_us else "one row per call: torch's GEMV kept")
        decisions.append(LayerDecision(site.name, list(shape), 1, float((w != 0).float().mean()), "dense", entry["kernel"],
                                       dense_us, chosen_us, "; ".join([reason, *notes]), cached, dict(entry.get("measured", {}))))
        if progress is not None:
            progress(i + 1, len(sites), site.name)
    gm.graph.lint()
    gm.recompile()
    return decisions
