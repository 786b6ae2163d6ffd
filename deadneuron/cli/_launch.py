"""The command line under torchrun: the process group from the environment, each rank's share of the batches.

``torchrun --nproc-per-node N -m deadneuron audit ...`` starts one process per rank with RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set. `launch` initialises the default process group
from them (NCCL where the audit runs on CUDA, else gloo), puts each rank on its own GPU (``cuda:LOCAL_RANK``,
the default device where CUDA is available) and destroys the group on exit; a group that is already
initialised is used as it is. Without torchrun (WORLD_SIZE unset or 1) nothing changes.

Batches are shared out by rank: batch i of the whole stream goes to rank ``i % world_size``. An
adapter's ``batches()`` or a ``--data`` factory that takes ``rank`` and ``world_size`` keyword arguments
is asked for its own share, which it should choose the same way (then ``--batches N`` still means the
first N batches of the whole stream: rank r audits at most ``len(range(r, N, world_size))`` of its own);
any other source is read by every rank, which keeps every ``world_size``-th batch from its rank on.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from typing import Any

from deadneuron.errors import AuditRuntimeError, UsageError


@dataclass(frozen=True)
class Shard:
    """This process's rank among ``world_size`` processes (0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1

    @property
    def primary(self) -> bool:
        """The rank that prints and writes."""
        return self.rank == 0

    def kwargs_for(self, source: Callable[..., Any]) -> dict[str, int]:
        """``rank`` and ``world_size`` where ``source`` takes them (by name, or ``**kwargs``), else none."""
        if self.world_size == 1:
            return {}
        try:
            params = inspect.signature(source).parameters
        except (TypeError, ValueError):
            return {}
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) or {"rank", "world_size"} <= set(params):
            return {"rank": self.rank, "world_size": self.world_size}
        return {}

    def take(self, batches: Iterable[Any], limit: int | None, *, sharded: bool) -> Iterable[Any]:
        """This rank's batches of the first ``limit`` of the whole stream; ``sharded``: ``batches`` is
        already this rank's share (from a source that took `kwargs_for`)."""
        if self.world_size == 1:
            return batches if limit is None else islice(batches, limit)
        if sharded:
            return batches if limit is None else islice(batches, len(range(self.rank, limit, self.world_size)))
        return islice(islice(batches, limit), self.rank, None, self.world_size)


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return None
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"environment variable {name}={raw!r} is not an integer (torchrun sets it)") from None


def world_size() -> int:
    """How many ranks this process is one of: the initialised group's size, else torchrun's WORLD_SIZE, else 1."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return max(1, _env_int("WORLD_SIZE") or 1)


@contextmanager
def launch(device: str | None, *, backend: str | None = None) -> Iterator[tuple[Shard, str | None]]:
    """This process's Shard and device: under torchrun the default process group is initialised here
    (and destroyed on exit); ``device`` None becomes this rank's GPU where CUDA is available.
    ``backend``: the group's backend (default: NCCL where the work runs on CUDA, else gloo)."""
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        yield Shard(dist.get_rank(), dist.get_world_size()), device
        return
    world = _env_int("WORLD_SIZE")
    if world is None or world <= 1:
        yield Shard(), device
        return
    if not dist.is_available():
        raise UsageError("launched with WORLD_SIZE > 1, but this build of torch has no torch.distributed")
    local = _env_int("LOCAL_RANK") or 0
    if device == "cuda" or (device is None and torch.cuda.is_available()):
        device = f"cuda:{local}"
    cuda = device is not None and device.startswith("cuda")
    if device is not None and cuda:
        torch.cuda.set_device(torch.device(device))
    try:
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"))
    except Exception as exc:
        line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise AuditRuntimeError(f"cannot join the process group of {world} ranks (MASTER_ADDR, MASTER_PORT): {line}") from exc
    try:
        yield Shard(dist.get_rank(), dist.get_world_size()), device
    finally:
        dist.destroy_process_group()


__all__ = ["Shard", "launch", "world_size"]
