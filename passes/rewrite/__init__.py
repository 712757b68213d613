"""Lossless rewrite passes (swap in sparsecomp ops). The sparse-linear rewrite lands here."""
