"""Calibration across processes with ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Every rank runs the same block-by-block pipeline on its share of the calibration windows; the
statistics of each layer are summed across ranks before the layer is pruned, so every rank
prunes with the statistics of the whole calibration set and ends with the same weights.
Only rank 0 writes outputs.

Summing across ranks reorders float additions, so N ranks match one within a tolerance, not
bit for bit: on the test model identical masks, weights within rtol 1e-4 / atol 1e-6, perplexity
within a relative 1e-4 (asserted by tests/core/test_distributed.py). On SmolLM2, SparseGPT's
masks differ in 1.7 % of positions, exactly as much as with another thread count in one process
(docs/streaming.md, measured).

Data scoring (``prunekit.data``) uses the same group differently: it splits work into units whose
results do not depend on who computes them (whole batches, whole proxy runs per seed), gathers
them and combines them in unit order, so N processes match one bit for bit.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

from prunekit.core.statistics import LayerStatistics
from prunekit.errors import PrunekitError


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place among the processes ``torchrun`` started; one process by default."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def owns(self, unit: int) -> bool:
        """Round-robin ownership of work unit ``unit`` (a batch, a seed)."""
        return unit % self.world_size == self.rank

    def gather(self, local: Any) -> list[Any]:
        """Every process's ``local`` object, in rank order (a plain list with one process)."""
        if self.world_size == 1:
            return [local]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, local)
        return gathered

    def merge(self, local: dict[int, Any]) -> dict[int, Any]:
        """Union of per-unit results from every process, keyed by unit."""
        merged: dict[int, Any] = {}
        for part in self.gather(local):
            merged.update(part)
        return merged

    def agree(self, ok: bool, message: str) -> None:
        """Raise the same error on every process when any of them failed a check."""
        if not all(self.gather(bool(ok))):
            raise PrunekitError(message)

    def share(self, windows: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of the calibration windows."""
        if windows.shape[0] < self.world_size:
            raise PrunekitError(f"{windows.shape[0]} calibration windows cannot be split across {self.world_size} "
                                "processes; use more windows or fewer processes")
        return torch.tensor_split(windows, self.world_size)[self.rank]

    def reduce_statistics(self, stats: LayerStatistics) -> None:
        for tensor in stats.accumulators():
            dist.all_reduce(tensor)
        rows = torch.tensor([stats.rows], dtype=torch.int64, device=stats.accumulators()[0].device)
        dist.all_reduce(rows)
        stats.rows = int(rows)

    def sum_floats(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather_lists(self, values: list) -> list:
        """Every rank's list, concatenated in rank order (the order of ``share``)."""
        return [item for part in self.gather(values) for item in part]

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def broadcast_object(self, value):
        if self.world_size == 1:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]


def from_environment(device: str = "cpu") -> ProcessGroup | None:
    """The process group set up by ``torchrun`` (WORLD_SIZE > 1), or None in a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return None
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return ProcessGroup(rank=dist.get_rank(), world_size=dist.get_world_size())


def current_group() -> ProcessGroup:
    """The process group already set up (by the caller or :func:`joined_from_environment`), else one process."""
    if dist.is_available() and dist.is_initialized():
        return ProcessGroup(rank=dist.get_rank(), world_size=dist.get_world_size())
    return ProcessGroup()


@contextlib.contextmanager
def joined_from_environment() -> Iterator[ProcessGroup]:
    """Join the gloo group ``torchrun`` describes in the environment for the block, then leave it; one process otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1 or (dist.is_available() and dist.is_initialized()):
        yield current_group()
        return
    if not dist.is_available():
        raise PrunekitError("this PyTorch build has no torch.distributed; run with one process")
    missing = [key for key in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(key)]
    if missing:
        raise PrunekitError(f"WORLD_SIZE={size} but {', '.join(missing)} is not set; launch with torchrun")
    dist.init_process_group(backend="gloo")
    try:
        yield current_group()
        # A rank that tears gloo down while another is still in a collective aborts the other
        # ("terminate called without an active exception"); meet first on a normal exit.
        dist.barrier()
    finally:
        dist.destroy_process_group()
