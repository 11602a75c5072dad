"""KV-cache compression methods, one per file; each registers itself in ``prunekit.kv.METHODS``."""
