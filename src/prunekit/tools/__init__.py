"""Developer tools: the support matrix over architectures, the import-layering check."""
