"""sparsecomp: a sparsity-aware compiler for PyTorch models.

    import sparsecomp as sc
    report = sc.analyze(model, example_inputs)            # what sparsity the model has
    gm = sc.capture(model, example_inputs)                # the torch.fx IR every pass works on
    gm, ctx = sc.run_pipeline(model, example_inputs, "analyze-weights,find-mlps")

Importing this package is light: submodules (and torch) load on first use of a name below.
"""

from __future__ import annotations

import importlib

from sparsecomp import omp as _omp

_omp.configure()  # before torch loads libgomp: see sparsecomp/omp.py

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "analyze": "sparsecomp.api",
    "run_pipeline": "sparsecomp.api",
    "compile": "sparsecomp.api",
    "sparsify": "sparsecomp.api",
    "SparsifyConfig": "sparsecomp.passes.sparsify",
    "export_onnx": "sparsecomp.api",
    "set_num_threads": "sparsecomp.api",
    "capture": "sparsecomp.frontend",
    "SparsityReport": "sparsecomp.report",
    "PassManager": "sparsecomp.pass_manager",
    "PassContext": "sparsecomp.pass_manager",
    "parse_pipeline": "sparsecomp.pipeline",
    "register_pass": "sparsecomp.registry",
    "impose": "sparsecomp.patterns",
    "parse_pattern": "sparsecomp.patterns",
    "SparsecompError": "sparsecomp.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sparsecomp' has no attribute '{name}'")


def __dir__():
    return __all__
