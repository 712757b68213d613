"""Lossy sparsify passes (magnitude, Wanda, SparseGPT): they run only when asked."""
