"""Data-pruning scores, one file each; every file registers its score in ``prunekit.data.base.SCORES``."""
