"""One module per model family; each registers its adapter in ``prunekit.models.ADAPTERS``."""
