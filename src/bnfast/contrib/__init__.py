"""Adapters of bnfast's kernels for other frameworks (optional dependencies)."""
