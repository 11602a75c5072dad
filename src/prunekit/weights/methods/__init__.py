"""One-shot weight pruning methods, one file each; each registers itself in ``prunekit.weights.METHODS``."""
