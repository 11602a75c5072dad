"""The level database: every unit compressed at every level of the grid, computed once and kept on disk.

A *unit* is what shares one level in a search (``group_units``). The default, a block's attention
projections or its MLP (EvoPress's per-sublayer choice), gives SmolLM2-135M 60 units; one unit per linear
layer (210 of them) makes each measurement sweep 3.5 times longer, too slow for two CPU cores.

Each level is computed with the pruning method itself (Wanda, SparseGPT, ...), block by block over the
sequential calibration stream (so at most one block's statistics are alive), from one of two *streams*:

- ``dense``: the statistics of the dense model's calibration inputs. Every level is then independent of the
  levels chosen elsewhere, which a search combining them freely would like; but the model the search settles
  on is pruned afterwards by the ordinary sequential pipeline, where each layer sees the inputs the already
  pruned layers before it give. For a method that only zeroes weights (Wanda, magnitude) the two differ by the
  statistics alone and the stitched candidate stays a fair proxy of the final model.
- ``reference``: each layer's levels come from the inputs the model gives it when every layer before it (in
  earlier blocks and earlier in its own block, the pipeline's ``sequential`` mode) is pruned by the method at
  the *reference* ratio (the search's ratio, uniformly: what ``prune`` without a search gives), and the stream
  then continues through the layer pruned at that ratio. The level at the reference ratio is therefore bit
  for bit the uniform pipeline's layer, and every other level is the pipeline's answer for that layer given a
  reference-pruned past. It matters for methods that update the kept weights (SparseGPT), whose updated
  weights compensate the error of the inputs they were fitted on: fitted on dense inputs, they are a poor
  proxy of the sequentially pruned model (on SmolLM2 at 70 %, a stitched candidate's KL 2.62 against 1.99 for
  the same levels pruned sequentially). The levels now depend on the reference ratio, so each ratio has its
  own database.

On disk (``<root>/<key>/``): ``unit-<u>/step-<s>.safetensors`` per unit and step. A layer whose kept weights
the method leaves unchanged (Wanda, magnitude) is stored as its keep-mask only (a packed bitmap); one the
method updates (SparseGPT) as prunekit's bitmask + values encoding (``io.sparse_format``, codec ``none``);
step 0 keeps the dense weights, so applying a mask needs nothing from memory. Files round-trip bit-exactly.
``block-<i>.done`` marks a finished block: an interrupted build resumes at the first unfinished block (over
the reference stream, the finished blocks before it are pruned again at the reference ratio to rebuild the
stream, then set back to dense). The key digests the model, the method and its settings, the pattern, the
grid, the units, the calibration tokens and the stream (with its reference ratio and sequential mode), so one
dense-stream database serves every budget and every search over the same model and method, and one
reference-stream database every search at its ratio.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors

from prunekit.core.calibration import SequentialCalibration, Target
from prunekit.core.cache import cache_dir
from prunekit.core.progress import progress_bar
from prunekit.core.statistics import LayerStatistics
from prunekit.errors import PrunekitError
from prunekit.io import sparse_format
from prunekit.io.atomic import atomic_file
from prunekit.io.digest import tensor_digest
from prunekit.models.base import ModelAdapter
from prunekit.weights.pipeline import PrunePlan

FORMAT_VERSION = 1
_METADATA = "prunekit-levels"
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass
class Unit:
    """Layers that share one level: their full name prefix, their block, and their targets."""

    name: str
    block: int
    targets: list[Target] = field(default_factory=list)

    @property
    def parameters(self) -> int:
        return sum(t.weight.numel() for t in self.targets)


def group_units(adapter: ModelAdapter, targets: Sequence[Target], how: str) -> list[Unit]:
    """The search's units, in model order: per ``sublayer`` (a block's attention, its MLP; any other target
    is a unit of its own), per ``layer`` or per ``block``. Targets outside the blocks are refused: the
    search measures blocks."""
    outside = [t.name for t in targets if t.block is None or t.block < 0]
    if outside:
        raise PrunekitError(f"a measured allocation searches the blocks' layers; {outside[0]} lies outside them "
                            "(leave it out of --include)")
    units: dict[str, Unit] = {}
    for target in targets:
        block = int(target.block)
        prefix = adapter.block_name(block)
        if how == "block":
            name = prefix
        elif how == "layer":
            name = target.name
        else:
            parts = adapter.block_parts(block)
            owners = [part.module for part in (parts.attention, parts.mlp) if part is not None]
            owner = next((m for m in owners if target.name.startswith(f"{prefix}.{m}.")), None)
            name = f"{prefix}.{owner}" if owner is not None else target.name
        units.setdefault(name, Unit(name, block)).targets.append(target)
    return list(units.values())


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(_INT_VIEW[tensor.element_size()])


def _keeps_values(dense: torch.Tensor, pruned: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether the method only zeroed weights (the kept ones are bit for bit the dense ones)."""
    return bool(torch.equal(_bits(dense)[mask], _bits(pruned)[mask]))


class _LevelRecorder:
    """A calibration processor that prunes a copy of each target at every level and keeps the results.

    With a ``reference`` ratio (the reference stream) it also prunes the target itself at that ratio, in place
    and exactly as the pipeline's ``Pruner`` does, so the stream continues through the pruned layer; the dense
    weights it replaced wait in ``replaced`` until ``restore``. ``record`` off only rebuilds the stream (the
    block's levels are on disk already)."""

    def __init__(self, plan: PrunePlan, grid: Sequence[float], reference: float | None = None):
        self.plan, self.grid, self.reference = plan, list(grid), reference
        self.record = True
        self.found: dict[str, list[tuple[str, torch.Tensor]]] = {}
        self.replaced: dict[str, tuple[Target, torch.Tensor]] = {}

    def statistics(self, target: Target) -> type[LayerStatistics] | None:
        return self.plan.method.statistics

    def _prune(self, weight: torch.Tensor, dense: torch.Tensor, stats: LayerStatistics | None,
               ratio: float) -> tuple[str, torch.Tensor]:
        """Prune ``weight`` (``dense``'s copy, or the target's own weight) at ``ratio``; the level as stored."""
        mask = self.plan.method.prune(weight, stats, ratio, self.plan.pattern)
        pruned = weight.detach().clone() if weight is not dense else weight
        return ("mask", mask) if _keeps_values(dense, pruned, mask) else ("weights", pruned)

    @torch.no_grad()
    def process(self, target: Target, stats: LayerStatistics | None) -> None:
        dense = target.weight.detach().clone()
        at_reference = None
        if self.reference is not None:
            self.replaced[target.name] = (target, dense)
            at_reference = self._prune(target.weight, dense, stats, self.reference)
        if not self.record:
            return
        levels: list[tuple[str, torch.Tensor]] = [("dense", dense)]
        for ratio in self.grid[1:]:
            # the stream's own layer when the reference ratio is a level: the same arithmetic, done once
            on_reference = at_reference is not None and abs(ratio - self.reference) < 1e-12
            levels.append(at_reference if on_reference else self._prune(dense.clone(), dense, stats, ratio))
        self.found[target.name] = levels

    @torch.no_grad()
    def restore(self) -> None:
        """Give the targets pruned for the stream their dense weights back (their block's outputs are computed)."""
        for target, dense in self.replaced.values():
            target.weight.copy_(dense)
        self.replaced.clear()


@dataclass(frozen=True)
class Stream:
    """Which calibration inputs the levels are computed from (module docstring): ``dense``, or ``reference``
    with the ratio every earlier layer is pruned at and the pipeline's sequential mode (``layer``, ``block``)."""

    kind: str
    reference_ratio: float | None = None
    sequential: str | None = None

    @classmethod
    def dense(cls) -> "Stream":
        return cls("dense")

    @classmethod
    def reference(cls, plan: PrunePlan) -> "Stream":
        return cls("reference", plan.ratio, plan.settings.sequential)

    def describe(self) -> dict:
        if self.kind == "dense":
            return {"stream": "dense"}
        return {"stream": self.kind, "reference_ratio": self.reference_ratio, "sequential": self.sequential}


def choose_stream(requested: str, plan: PrunePlan) -> Stream:
    """``auto``: the reference stream for a method that updates the kept weights, whose stitched levels are a
    poor proxy of the sequentially pruned model when fitted on dense inputs; the dense stream otherwise, which
    serves every ratio from one database and whose stitched levels differ from the final model only through
    the statistics."""
    if requested == "auto":
        requested = "reference" if plan.method.updates_kept_weights else "dense"
    if requested == "dense":
        return Stream.dense()
    if requested == "reference":
        return Stream.reference(plan)
    raise PrunekitError(f"unknown level database stream '{requested}'; choose auto, dense or reference")


class LevelDatabase:
    """Reads and builds the files described in the module docstring."""

    def __init__(self, directory: Path, units: list[Unit], grid: Sequence[float], stream: Stream | None = None):
        self.directory, self.units, self.grid = Path(directory), units, list(grid)
        self.stream = stream or Stream.dense()
        self.built_blocks = 0  # blocks computed by this process (0: everything came from disk)

    @staticmethod
    def key(model_digest: str, plan: PrunePlan, units: list[Unit], grid: Sequence[float],
            calibration: torch.Tensor, batch_size: int, stream: Stream | None = None) -> str:
        description = {"version": FORMAT_VERSION, "model": model_digest, "method": plan.method.settings(),
                       "pattern": str(plan.pattern), "grid": list(grid),
                       "units": [[u.name, [t.name for t in u.targets]] for u in units],
                       "calibration": tensor_digest([calibration]), "batch_size": batch_size,
                       **(stream or Stream.dense()).describe()}
        return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:24]

    @classmethod
    def at(cls, root: str | Path | None, key: str, units: list[Unit], grid: Sequence[float],
           stream: Stream | None = None) -> "LevelDatabase":
        base = Path(root).expanduser() if root else cache_dir("level-databases")
        directory = base / key
        directory.mkdir(parents=True, exist_ok=True)
        return cls(directory, units, grid, stream)

    def _path(self, unit: int, step: int) -> Path:
        return self.directory / f"unit-{unit:04d}" / f"step-{step:02d}.safetensors"

    def _done(self, block: int) -> Path:
        return self.directory / f"block-{block:04d}.done"

    def complete(self) -> bool:
        return all(self._done(b).exists() for b in {u.block for u in self.units})

    def build(self, plan: PrunePlan, calibration: torch.Tensor, batch_size: int) -> None:
        """Compute every unfinished block's levels in one pass over the calibration windows (module docstring);
        the model ends as dense as it came."""
        blocks = plan.adapter.blocks()
        needed = sorted(b for b in {u.block for u in self.units} if not self._done(b).exists())
        if not needed:
            return
        reference = self.stream.kind == "reference"
        recorder = _LevelRecorder(plan, self.grid, self.stream.reference_ratio if reference else None)
        steps = SequentialCalibration(plan.adapter, recorder, self.stream.sequential if reference else "dense")
        steps.capture(plan.adapter.model, calibration, batch_size)
        by_block: dict[int, list[int]] = {}
        for index, unit in enumerate(self.units):
            by_block.setdefault(unit.block, []).append(index)
        try:
            with progress_bar(f"Level database ({plan.method.name}, {len(self.grid)} levels, {self.stream.kind} "
                              "stream)", needed[-1] + 1) as bar:
                for index in range(needed[-1] + 1):
                    targets = [t for u in by_block.get(index, []) for t in self.units[u].targets]
                    recorder.record = index in needed
                    if recorder.record:
                        steps.run_block(index, blocks[index], targets)
                        for unit in by_block.get(index, []):
                            self._write_unit(unit, recorder.found)
                        recorder.found.clear()
                        self._done(index).write_text("")
                        self.built_blocks += 1
                    else:
                        # a finished block: the reference stream passes through it pruned, as it did when built
                        steps.run_block(index, blocks[index], targets if reference else [])
                    recorder.restore()
                    bar.advance()
        finally:
            recorder.restore()
            steps.inputs = None

    def _write_unit(self, unit: int, found: dict[str, list[tuple[str, torch.Tensor]]]) -> None:
        folder = self._path(unit, 0).parent
        folder.mkdir(exist_ok=True)
        for step in range(len(self.grid)):
            tensors: dict[str, torch.Tensor] = {}
            entries: dict[str, dict] = {}
            for target in self.units[unit].targets:
                kind, tensor = found[target.name][step]
                if kind == "mask":
                    tensors[f"{target.name}::mask"] = torch.from_numpy(np.packbits(tensor.reshape(-1).numpy()))
                    entries[target.name] = {"kind": "mask", "shape": list(tensor.shape)}
                else:
                    entry, payloads = sparse_format.encode_tensor(tensor, "none")
                    tensors.update({f"{target.name}::{suffix}": p for suffix, p in payloads.items()})
                    entries[target.name] = {"kind": "weights", **entry}
            data = save_safetensors(tensors, metadata={_METADATA: json.dumps(entries)})
            with atomic_file(self._path(unit, step), "wb") as handle:
                handle.write(data)

    def load(self, unit: int, step: int) -> dict[str, torch.Tensor]:
        """The unit's weights at ``step``, by target name, bit-exactly as the method left them."""
        stored = self._read(unit, step)
        result = {}
        dense = None
        for name, (entry, tensors) in stored.items():
            if entry["kind"] == "weights":
                manifest = sparse_format.new_manifest({name: {k: v for k, v in entry.items() if k != "kind"}})
                result[name] = sparse_format.decode({f"{name}::{k}": v for k, v in tensors.items()}, manifest)[name]
            else:
                if dense is None:
                    dense = self.load(unit, 0)
                shape = tuple(entry["shape"])
                keep = np.unpackbits(tensors["mask"].numpy(), count=math.prod(shape)).astype(bool)
                mask = torch.from_numpy(keep).reshape(shape)
                result[name] = torch.where(mask, dense[name], torch.zeros((), dtype=dense[name].dtype))
        return result

    def _read(self, unit: int, step: int) -> dict[str, tuple[dict, dict[str, torch.Tensor]]]:
        path = self._path(unit, step)
        if not path.exists():
            raise PrunekitError(f"the level database {self.directory} lacks {path.name} of unit "
                                f"{self.units[unit].name}; delete the folder to rebuild it")
        with safe_open(str(path), framework="pt") as handle:
            entries = json.loads(handle.metadata()[_METADATA])
            grouped: dict[str, tuple[dict, dict[str, torch.Tensor]]] = {name: (entry, {}) for name, entry in entries.items()}
            for key in handle.keys():
                name, _, suffix = key.rpartition("::")
                grouped[name][1][suffix] = handle.get_tensor(key)
        return grouped

    @torch.no_grad()
    def apply(self, unit: int, step: int) -> None:
        """Write the unit's weights at ``step`` into the model."""
        weights = self.load(unit, step)
        for target in self.units[unit].targets:
            target.weight.copy_(weights[target.name])

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.directory.rglob("*.safetensors"))
