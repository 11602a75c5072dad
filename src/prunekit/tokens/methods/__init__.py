"""Token reduction methods, one file each; every file registers its method in ``METHODS`` by name."""
