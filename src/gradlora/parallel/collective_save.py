"""Saving an adapter from an FSDP2-sharded model: a collective with one writer.

Under FSDP2 (``fully_shard``) each rank holds a shard of every LoRA factor and base weight, so
``adapter_io.save_adapter`` is a collective: every rank gathers the whole state (``whole``, an
all-gather per tensor in the same order on every rank), one rank writes the files, and
``write_once`` tells every rank how the write went (an all-gather of one small object), so all
ranks return the path together or all raise. On one process (or a model with no DTensor in
it) it is the ordinary write, with no communication.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch.distributed as dist
from torch import Tensor

from ..errors import GradLoraError
from .sharding import full, is_sharded


def any_sharded(state: Mapping[str, Tensor]) -> bool:
    """Whether any tensor of ``state`` is a DTensor (the save is then a collective)."""
    return any(is_sharded(v) for v in state.values())


def whole(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state`` with every DTensor gathered to the whole tensor (a collective when any is one:
    every rank calls it on the same keys, in the same order), detached."""
    return {k: full(v.detach()) for k, v in state.items()}


def write_once(
    path: str | os.PathLike, write: Callable[[], Path], sharded: bool, writer: bool | None
) -> Path:
    """``write()`` on one process; under FSDP2 (``sharded``) a collective of the default group:
    ``write()`` runs where ``writer`` is true (None: on rank 0), the others write nothing, and
    every rank returns ``Path(path)`` once the writers are done, or raises if any failed."""
    if not sharded:
        return write()
    if not dist.is_initialized():
        raise GradLoraError("the model has DTensor weights but torch.distributed is not running")
    rank = dist.get_rank()
    error = None
    if rank == 0 if writer is None else writer:
        try:
            write()
        except Exception as e:  # reported to every rank below, so none waits for the others
            error = f"rank {rank}: {type(e).__name__}: {e}"
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    failed = [e for e in errors if e is not None]
    if failed:
        raise GradLoraError(f"saving the adapter to {path} failed on {failed[0]}")
    return Path(path)
