"""The processes of a cohort run: one alone, or the ranks torchrun starts (on one node or many).

:class:`RankGroup` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``).
With more than one process it joins a ``gloo`` process group: the cohort only exchanges a small plan and waits at a
barrier, which gloo does on CPU machines and GPU machines alike, so the model's device does not matter here.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from typing import Any

__all__ = ["RankGroup", "BARRIER_TIMEOUT"]

#: How long a rank waits at a barrier for the others (a rank with a large slide may take hours).
BARRIER_TIMEOUT = datetime.timedelta(days=7)


class RankGroup:
    """This process's place among the cohort's processes.

    Args:
        rank: global rank.
        world_size: number of processes.
        local_rank: rank on this node (picks the GPU).
    """

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of {world_size} processes")
        self.rank, self.world_size, self.local_rank = int(rank), int(world_size), int(local_rank)
        self._joined = False

    @classmethod
    def from_environment(cls) -> RankGroup:
        """The group torchrun describes in the environment; a single process without it."""
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))

    @property
    def distributed(self) -> bool:
        """Whether there is more than one process."""
        return self.world_size > 1

    def __enter__(self) -> RankGroup:
        import torch.distributed as dist

        if self.distributed and not dist.is_initialized():
            dist.init_process_group("gloo", timeout=BARRIER_TIMEOUT)
            self._joined = True
        return self

    def __exit__(self, *exc: object) -> None:
        import torch.distributed as dist

        if self._joined and dist.is_initialized():
            dist.destroy_process_group()
        self._joined = False

    def barrier(self) -> None:
        """Wait until every rank gets here (nothing to wait for alone)."""
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def from_rank0(self, compute: Callable[[], Any]) -> Any:
        """Run ``compute`` on rank 0 and give its result to every rank; an exception it raises is raised on every
        rank (same type when it can be rebuilt from its message, else ``RuntimeError``)."""
        if not self.distributed:
            return compute()
        import torch.distributed as dist

        payload: list[Any] = [None]
        if self.rank == 0:
            try:
                payload[0] = ("ok", compute())
            except Exception as err:  # noqa: BLE001 - sent to the other ranks, then raised here too
                payload[0] = ("error", (type(err), str(err)))
                dist.broadcast_object_list(payload, src=0)
                raise
        dist.broadcast_object_list(payload, src=0)
        kind, value = payload[0]
        if kind == "error":
            error_type, message = value
            try:
                raise error_type(message)
            except TypeError:
                raise RuntimeError(message) from None
        return value
