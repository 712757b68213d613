"""Built-in passes (installed as `sparsecomp.passes`).

Importing this package registers every built-in pass in the one registry
(`sparsecomp.registry`). Where a pass lives:

- `analysis/`: passes that measure and annotate `node.meta["sparsecomp.*"]`, never changing the graph
  (`analyze-weights`, `find-mlps`, `profile-activations`).
- `rewrite/`: lossless graph rewrites that swap in `sparsecomp::*` ops.
- `sparsify/`: lossy passes that create sparsity; they run only when asked.

Passes use the core (`sparsecomp.ir`, `sparsecomp.registry`, `sparsecomp.patterns`,
`sparsecomp.formats`) and never import a backend.
"""

from sparsecomp.passes import analysis, rewrite, sparsify  # noqa: F401  (registration)
