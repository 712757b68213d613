"""Lossy sparsify passes (magnitude, Wanda, SparseGPT): they run only when asked.

- `config.py`: `SparsifyConfig` and the `METHOD:SPEC` spelling (`sparsegpt:2:4`).
- `masks.py`: exact-count mask selection under unstructured / N:M / block patterns.
- `solvers.py`: the per-layer algorithms (magnitude, Wanda, SparseGPT, masked least squares).
- `allocation.py`: per-layer sparsity (uniform, OWL, measured sensitivity), global budget exact.
- `engine.py`: which layers, calibration statistics from a node-major walk of the captured graph
  (layer-sequential in one forward), all-or-nothing commit.
- `passes.py`: the registered passes `sparsify-magnitude`, `sparsify-wanda`, `sparsify-sparsegpt`.
"""

from sparsecomp.passes.sparsify import passes  # noqa: F401  (registration)
from sparsecomp.passes.sparsify.config import (
                                               ALLOCATIONS,
                                               DEFAULT_SKIP,
                                               METHODS,
                                               SparsifyConfig,
                                               SparsifyError,
                                               parse_sparsify_spec,
                                               resolve_pattern,
)
from sparsecomp.passes.sparsify.passes import config_from_pass, pass_text
from sparsecomp.passes.sparsify.engine import (
                                               LayerResult,
                                               SparsifyResult,
                                               sparsify_module,
)

__all__ = ["ALLOCATIONS", "DEFAULT_SKIP", "METHODS", "SparsifyConfig", "SparsifyError", "SparsifyResult", "LayerResult",
           "config_from_pass", "parse_sparsify_spec", "pass_text", "resolve_pattern", "sparsify_module"]
