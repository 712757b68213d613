"""The registered sparsify passes: `sparsify-magnitude`, `sparsify-wanda`, `sparsify-sparsegpt`.

Each prunes the captured graph's matmul weights in place of the graph's own attributes (new
Parameters are swapped in: the user's model, which shares the captured parameters, is untouched),
using `ctx.calibration` for activations. They are lossy and run only when a pipeline names them;
`sparsecomp.sparsify` / `compile(sparsify=...)` call the same engine on the model itself.
"""

from __future__ import annotations

from typing import Literal

from sparsecomp.registry import PassResult, register_pass

from .config import DEFAULT_SKIP, SparsifyConfig, SparsifyError
from .engine import commit, compute, graph_sites

__all__ = ["META_KEY", "config_from_pass", "pass_text"]

META_KEY = "sparsecomp.sparsify"

Allocation = Literal["uniform", "owl", "sensitivity"]


def config_from_pass(name: str, options: dict) -> SparsifyConfig:
    """The `SparsifyConfig` that sparsify pass `name` runs with these typed options (a pipeline
    entry's `options`): `compile` applies a pipeline's sparsify passes to the model through it."""
    opts = dict(options)
    skip = tuple(s for s in opts.pop("skip").split(",") if s)
    return SparsifyConfig(method=name.removeprefix("sparsify-"), skip=skip, **opts)


def pass_text(cfg: SparsifyConfig) -> str:
    """Pipeline text of the sparsify pass that runs `cfg` (`config_from_pass` of it gives `cfg` back,
    for every field the method reads). The pattern is always written, other options only where they
    differ from the pass's defaults."""
    from sparsecomp.pipeline import PipelineEntry
    from sparsecomp.registry import get_pass

    info = get_pass(f"sparsify-{cfg.method}")
    if any("," in glob for glob in cfg.skip):
        raise SparsifyError(f"a skip glob with a comma cannot be written as pass text: {cfg.skip!r}",
                            hint="the sparsify passes' skip option is a comma-separated list of globs")
    raw = []
    for key, opt in info.options.items():
        value = ",".join(cfg.skip) if key == "skip" else str(cfg.pattern) if key == "pattern" else getattr(cfg, key)
        if key == "pattern" or value != opt.default:
            text = str(value).lower() if isinstance(value, bool) else repr(value) if isinstance(value, float) else str(value)
            raw.append((key, text))
    return str(PipelineEntry(info.name, tuple(raw)))


def _run(gm, ctx, name: str, options: dict) -> PassResult:
    cfg = config_from_pass(name, options)
    sites = graph_sites(gm)  # the sites compute reports on, in its order (names repeat for a layer called twice)
    tensors, result = compute(gm, cfg, list(ctx.calibration) or None, gm=gm, label=ctx.model_name)
    commit(gm, tensors, replace=True)
    for site, r in zip(sites, result.layers, strict=True):
        site.node.meta[META_KEY] = {"method": cfg.method, "status": r.status,
                                    **({"sparsity": r.sparsity} if r.status == "pruned" else {"reason": r.reason})}
    ctx.results[name] = result
    return PassResult(bool(tensors), {"pruned": len(result.pruned), "skipped": len(result.skipped)})


_SKIP = ",".join(DEFAULT_SKIP)


@register_pass("sparsify-magnitude", kind="sparsify")
def sparsify_magnitude(gm, ctx, *, pattern: str = "unstructured:0.5", allocation: Allocation = "uniform",
                       skip: str = _SKIP, owl_m: float = 5.0, owl_lambda: float = 0.08) -> PassResult:
    """Zero the smallest-magnitude weights of every matmul (lossy: only when asked).

    Requires: an ATen-level graph (`sparsecomp.capture`); calibration batches in `ctx.calibration`
      only for allocation owl / sensitivity.
    Ensures: every linear / addmm / matmul weight not skipped holds exactly the asked zeros under
      `pattern` (unstructured and block: the smallest |w| / tile L1 norms of the layer; with an N-of-M pattern:
      per group of M); skipped layers (skip globs, tied heads, convolutions, patterns that do not divide
      the shape) are unchanged; `node.meta["sparsecomp.sparsify"]` says which; the report is
      `ctx.results["sparsify-magnitude"]`. The graph's structure is unchanged.
    Options:
      pattern: unstructured:S | block:RxC:S | N:M.
      allocation: per-layer sparsity: uniform | owl | sensitivity (global budget exact).
      skip: comma-separated globs of layer names left dense (default: output heads).
      owl_m: OWL's outlier threshold (M x mean score), with allocation owl.
      owl_lambda: OWL's spread of layer sparsities (+-lambda), with allocation owl.
    """
    return _run(gm, ctx, "sparsify-magnitude", dict(pattern=pattern, allocation=allocation, skip=skip, owl_m=owl_m,
                                                    owl_lambda=owl_lambda))


@register_pass("sparsify-wanda", kind="sparsify")
def sparsify_wanda(gm, ctx, *, pattern: str = "unstructured:0.5", allocation: Allocation = "uniform",
                   skip: str = _SKIP, owl_m: float = 5.0, owl_lambda: float = 0.08) -> PassResult:
    """Wanda: zero the weights with the smallest |w| x ||input||, per output row (lossy).

    Requires: calibration batches in `ctx.calibration`; an ATen-level graph.
    Ensures: as sparsify-magnitude, with scores |w_ij| x ||x_j|| measured layer by layer on the
      already-pruned model's activations (unstructured quotas per output row); report in
      `ctx.results["sparsify-wanda"]`.
    Options:
      pattern: unstructured:S | block:RxC:S | N:M.
      allocation: per-layer sparsity: uniform | owl | sensitivity (global budget exact).
      skip: comma-separated globs of layer names left dense (default: output heads).
      owl_m: OWL's outlier threshold (M x mean score), with allocation owl.
      owl_lambda: OWL's spread of layer sparsities (+-lambda), with allocation owl.
    """
    return _run(gm, ctx, "sparsify-wanda", dict(pattern=pattern, allocation=allocation, skip=skip, owl_m=owl_m,
                                                owl_lambda=owl_lambda))


@register_pass("sparsify-sparsegpt", kind="sparsify")
def sparsify_sparsegpt(gm, ctx, *, pattern: str = "unstructured:0.5", allocation: Allocation = "uniform",
                       skip: str = _SKIP, owl_m: float = 5.0, owl_lambda: float = 0.08, damp: float = 0.01,
                       blocksize: int = 128, correct: bool = False, update_bias: bool = False, refine: int = 0) -> PassResult:
    """SparseGPT: prune with OBS updates of the remaining weights, layer by layer (lossy).

    Requires: calibration batches in `ctx.calibration`; an ATen-level graph.
    Ensures: as sparsify-magnitude, with masks and new values from SparseGPT on each layer's input
      Hessian, measured on the already-pruned model's activations; report in
      `ctx.results["sparsify-sparsegpt"]`.
    Options:
      pattern: unstructured:S | block:RxC:S | N:M.
      allocation: per-layer sparsity: uniform | owl | sensitivity (global budget exact).
      skip: comma-separated globs of layer names left dense (default: output heads).
      owl_m: OWL's outlier threshold (M x mean score), with allocation owl.
      owl_lambda: OWL's spread of layer sparsities (+-lambda), with allocation owl.
      damp: Hessian damping, fraction of its mean diagonal.
      blocksize: lazy-update block width (columns).
      correct: target the dense model's layer outputs (compensates earlier layers' errors).
      update_bias: let the bias absorb the mean of the error.
      refine: conjugate-gradient steps of the exact masked least squares after SparseGPT.
    """
    return _run(gm, ctx, "sparsify-sparsegpt", dict(pattern=pattern, allocation=allocation, skip=skip, owl_m=owl_m,
                                                    owl_lambda=owl_lambda, damp=damp, blocksize=blocksize, correct=correct,
                                                    update_bias=update_bias, refine=refine))
