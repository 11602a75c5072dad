"""Reading and writing models and results safely: atomic outputs, dense and compressed checkpoints, and the
model formats ``prunekit.load`` reads (``formats``). io sits below models and the dimensions: it imports neither."""
