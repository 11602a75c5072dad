"""Structural pruning: remove whole channels, neurons, heads, blocks, so the model gets smaller and faster.

- ``graph.build_graph``: trace any ``nn.Module`` and group coupled slices into families of units;
- ``importance``: l1, l2, taylor, wanda (structured), flap, fisher, random; registered by name, each
  declaring what it needs (activation moments, gradients, per-sample gradients), which the pipeline provides;
- ``pipeline.prune_structure``: the one call, following a ``WidthSettings`` plan;
- ``allocation.allocate``: uniform or global widths, floors, rounding, overrides;
- ``shrink.shrink``: slice the tensors and update the attributes forwards read;
- ``depth``: remove whole blocks by block influence or measured perplexity;
- ``saving``: ``save_pretrained`` where the config can describe the result, a shape spec otherwise; ONNX;
- ``measure``, and the jobs behind ``prunekit shrink`` and ``prunekit shrink-graph`` (recovery fine-tuning is
  ``prunekit.training.recovery``, shared with ``prunekit train recover``).
"""

from prunekit.structure.graph import DependencyGraph, Family, build_graph
from prunekit.structure.pipeline import (Calibration, StructuredResult, WidthSettings, classifier_calibration,
                                         encoder_calibration, lm_calibration, lm_example_inputs, prune_structure)
from prunekit.structure.shrink import shrink, zero_units

__all__ = ["Calibration", "DependencyGraph", "Family", "StructuredResult", "WidthSettings", "build_graph",
           "classifier_calibration", "encoder_calibration", "lm_calibration", "lm_example_inputs", "prune_structure",
           "shrink", "zero_units"]
