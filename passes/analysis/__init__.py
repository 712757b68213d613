"""Analysis passes: measure and annotate `node.meta`, never change the graph."""

from sparsecomp.passes.analysis import analyze_weights, find_mlps, profile_activations  # noqa: F401
