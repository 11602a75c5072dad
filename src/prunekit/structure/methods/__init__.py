"""Shrink methods that change the basis instead of deleting units (SVD-LLM, ...), one file each; each registers
itself in ``prunekit.structure.shrink_method.SHRINK_METHODS``."""
