"""Selection strategies, one file each; every file registers itself in ``prunekit.data.base.STRATEGIES``."""
