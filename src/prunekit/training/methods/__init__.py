"""Sparse-training methods, one file each; every file registers its class in ``SPARSIFIERS``."""
