"""The public API (the face): `analyze`, `capture`, `run_pipeline`, and the entry points that later
issues fill in (`compile`, `sparsify`, `export_onnx`), which say clearly that they are not yet
available rather than failing obscurely.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

import torch

from sparsecomp.capture import capture
from sparsecomp.errors import NotYetAvailableError, SparsecompError
from sparsecomp.pass_manager import Instrument, PassContext, PassManager
from sparsecomp.report import SparsityReport

__all__ = ["analyze", "run_pipeline", "compile", "sparsify", "export_onnx", "set_num_threads", "BACKENDS"]

DEFAULT_ANALYSIS = "analyze-weights,find-mlps"

# Backends the compile contract names, and where each stands. A name not in this table is a typo.
BACKENDS: dict[str, str | None] = {
    "torch": "not yet available (arrives with the sparse-linear issue, #3)",
    "ort": "not yet available (arrives with the ONNX-export issue, #4)",
    "tvm": "not yet available",
    "triton": "not yet available",
    "auto": "not yet available (needs at least one backend)",
}


def _load_passes() -> None:
    import sparsecomp.passes  # noqa: F401  (registers the built-in passes)


def _is_onnx(model: Any) -> bool:
    if isinstance(model, (str, Path)) and str(model).endswith(".onnx"):
        return True
    return type(model).__name__ == "ModelProto"


def _analyze_onnx(model: Any, name: str | None, blocks: str, nm: str) -> SparsityReport:
    from sparsecomp import onnx_io
    from sparsecomp.passes.analysis.analyze_weights import parse_block_shapes, parse_nm_list, weight_stats

    proto = onnx_io.load_onnx(model) if isinstance(model, (str, Path)) else model
    block_list, nm_list = parse_block_shapes(blocks), parse_nm_list(nm)
    layers = [weight_stats(s.name, s.op.lower(), s.weight, blocks=block_list, nm=nm_list) for s in onnx_io.onnx_weight_sites(proto)]
    label = name or (Path(model).name if isinstance(model, (str, Path)) else proto.graph.name or "onnx model")
    return SparsityReport(
        model=label, source="onnx", pipeline="analyze-weights", layers=layers,
        notes=["ONNX input: weights are read from the initializers of MatMul/Gemm/Conv nodes; "
               "MLP regions and activation profiles need a torch model (or `sparsecomp opt` on the imported graph)"],
    )


def analyze(model: torch.nn.Module | str | Path, example_inputs: Any = None, calibration: Iterable | None = None, *,
            name: str | None = None, blocks: str | None = None, nm: str | None = None) -> SparsityReport:
    """Analyse the sparsity of a model's weights (and activations, with calibration data).

    `model`: an `nn.Module` (captured with `sparsecomp.capture`), an already captured GraphModule,
    or an `.onnx` file / `onnx.ModelProto` (weights read from the ONNX graph).
    `calibration`: an iterable of batches, each a tuple of positional args or a dict of keyword
    args; when given, `profile-activations` runs on them.
    `blocks` / `nm`: block shapes and N:M patterns to measure (defaults: the analysis pass's).
    """
    _load_passes()
    from sparsecomp.passes.analysis.analyze_weights import DEFAULT_BLOCKS, DEFAULT_NM

    blocks, nm = blocks or DEFAULT_BLOCKS, nm or DEFAULT_NM
    if _is_onnx(model):
        if calibration is not None:
            raise SparsecompError("calibration is not supported for ONNX input yet",
                                  hint="analyse the torch model to profile activations")
        return _analyze_onnx(model, name, blocks, nm)
    if not isinstance(model, torch.nn.Module):
        raise SparsecompError(f"analyze expects an nn.Module or an .onnx path, got {type(model).__name__}")
    label = name or type(model).__name__
    if isinstance(model, torch.fx.GraphModule) and "sparsecomp.capture" in model.meta:
        gm = model
    else:
        if example_inputs is None:
            raise SparsecompError(f"analyze({label}) needs example_inputs to capture the model")
        gm = capture(model, example_inputs, name=label)
    pipeline = f'analyze-weights{{blocks="{blocks}",nm="{nm}"}},find-mlps'
    batches = list(calibration) if calibration is not None else []
    if batches:
        pipeline += ",profile-activations"
    ctx = PassContext.create(example_inputs, batches, model_name=label)
    PassManager(pipeline).run(gm, ctx)
    info = gm.meta.get("sparsecomp.capture")
    return SparsityReport(
        model=label, source="fx", pipeline=pipeline,
        layers=ctx.results.get("analyze-weights", []), mlps=ctx.results.get("find-mlps", []),
        activations=ctx.results.get("profile-activations", []),
        capture={"dynamic": info.dynamic, "static_shapes": info.static_shapes, "notes": info.notes} if info else None,
        notes=list(info.notes) if info else [],
    )


def run_pipeline(model: torch.nn.Module, example_inputs: Any, pipeline: str, *, calibration: Iterable | None = None,
                 instruments: list[Instrument] | tuple = (), name: str | None = None, repro: str = "") -> tuple[torch.fx.GraphModule, PassContext]:
    """Capture `model` (unless already a captured GraphModule) and run `pipeline` over it."""
    _load_passes()
    label = name or type(model).__name__
    pm = PassManager(pipeline, instruments)  # parse first: a typo fails before a slow capture
    if isinstance(model, torch.fx.GraphModule) and ("sparsecomp.capture" in model.meta or example_inputs is None):
        gm = model
    else:
        gm = capture(model, example_inputs, name=label)
    ctx = PassContext.create(example_inputs, list(calibration or []), model_name=label, repro=repro)
    pm.run(gm, ctx)
    return gm, ctx


def _not_yet(what: str) -> NotYetAvailableError:
    return NotYetAvailableError(f"{what} is not yet available in this release",
                                hint="`sparsecomp analyze` and `sparsecomp opt` work today; see the README's roadmap")


def compile(model, example_inputs, backend: str = "torch", **kwargs):  # noqa: A001  (public name from the contract)
    """Compile a model for a backend (contract in DESIGN.md section 2). Not yet available."""
    if backend not in BACKENDS:
        raise SparsecompError(f"unknown backend '{backend}'", hint=f"backends: {', '.join(BACKENDS)}")
    raise NotYetAvailableError(f"backend '{backend}' is {BACKENDS[backend]}",
                               hint="`sparsecomp.analyze` works today; see the README's roadmap")


def sparsify(model, method: str = "magnitude", sparsity: float = 0.5, pattern: str = "unstructured", calibration=None):
    """One-shot sparsifiers (magnitude, Wanda, SparseGPT). Not yet available."""
    raise _not_yet("sparsecomp.sparsify (issue #6)")


def export_onnx(model, example_inputs, path):
    """Export the rewritten graph to ONNX for stock onnxruntime. Not yet available."""
    raise _not_yet("sparsecomp.export_onnx (issue #4)")


def set_num_threads(n: int | None = None) -> int:
    """One thread setting for torch (and, as they arrive, TVM and ORT); default SPARSECOMP_NUM_THREADS."""
    if n is None:
        n = int(os.environ.get("SPARSECOMP_NUM_THREADS", torch.get_num_threads()))
    if n < 1:
        raise SparsecompError(f"thread count must be >= 1, got {n}")
    torch.set_num_threads(n)
    os.environ["TVM_NUM_THREADS"] = str(n)  # read by TVM's runtime when it loads
    return n
