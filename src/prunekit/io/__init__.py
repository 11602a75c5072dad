"""Reading and writing models and results safely: atomic outputs, dense and compressed checkpoints."""
