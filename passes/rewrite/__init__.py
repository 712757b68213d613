"""Lossless rewrite passes: swap in `sparsecomp::*` ops (sparsecomp.dialect)."""

from sparsecomp.passes.rewrite import sparse_linear  # noqa: F401  (registration)
from sparsecomp.passes.rewrite import sparse_mlp  # noqa: F401  (registration)
