"""Data-parallel scoring with ``torch.distributed`` (gloo on CPU), identical to one process.

Work is split into units whose results do not depend on who computes them: whole batches of
consecutive examples (a fixed batch composition, so the same kernels run on the same shapes),
and whole proxy training runs (one per seed). Each process computes its share, everyone gathers
everything, and results are combined in unit order, never in arrival order. With the same
number of threads per process as the single-process run, the scores match it bit for bit.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch.distributed as dist

from prunekit.errors import PrunekitError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, unit: int) -> bool:
        """Round-robin ownership of work unit ``unit`` (a batch, a seed)."""
        return unit % self.size == self.rank

    def gather(self, local: Any) -> list[Any]:
        """Every process's ``local`` object, in rank order (a plain list with one process)."""
        if self.size == 1:
            return [local]
        gathered: list[Any] = [None] * self.size
        dist.all_gather_object(gathered, local)
        return gathered

    def merge(self, local: dict[int, Any]) -> dict[int, Any]:
        """Union of per-unit results from every process, keyed by unit."""
        merged: dict[int, Any] = {}
        for part in self.gather(local):
            merged.update(part)
        return merged

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def agree(self, ok: bool, message: str) -> None:
        """Raise the same error on every process when any of them failed a check."""
        if all(self.gather(bool(ok))):
            return
        raise PrunekitError(message)


def current_world() -> World:
    """The process group in use (set up by the caller or by :func:`distributed_from_env`), else one process."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


@contextlib.contextmanager
def distributed_from_env() -> Iterator[World]:
    """Join the process group ``torchrun`` describes in the environment (gloo); one process otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1 or (dist.is_available() and dist.is_initialized()):
        yield current_world()
        return
    if not dist.is_available():
        raise PrunekitError("this PyTorch build has no torch.distributed; run with one process")
    missing = [key for key in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(key)]
    if missing:
        raise PrunekitError(f"WORLD_SIZE={size} but {', '.join(missing)} is not set; launch with torchrun")
    dist.init_process_group(backend="gloo")
    try:
        yield current_world()
        # A rank that tears gloo down while another is still in a collective aborts the other
        # ("terminate called without an active exception"); meet first on a normal exit.
        dist.barrier()
    finally:
        dist.destroy_process_group()
