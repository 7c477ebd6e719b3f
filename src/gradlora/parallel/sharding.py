"""Whole tensors and local shards of FSDP2's DTensor parameters (``torch.distributed.fsdp.
fully_shard``): the few conversions gradlora's init and optimizers need, as functions on tensors;
and how a layer's parameters are split (FSDP2, DeepSpeed ZeRO-3: ``parallel/zero.py``).

gradlora's math runs on whole tensors: LoRA factors and their gradients are small (r x n,
m x r), so they are gathered with ``full`` (an all-gather), the result is computed on every
rank, and each rank keeps its own part with ``local_part`` (no communication: every rank holds
the whole result). Plain tensors pass through all of these unchanged, so the same code serves
one process, DDP and FSDP2.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from ..errors import GradLoraError
from .zero import is_zero, is_zero3, read_whole, write_whole_

try:
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
except ImportError:  # a torch build without torch.distributed: nothing can be a DTensor
    DTensor = Partial = Replicate = Shard = distribute_tensor = None


def is_sharded(t: Tensor | None) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 parameter, or its gradient)."""
    return DTensor is not None and isinstance(t, DTensor)


def partitioning(params: Iterable[Tensor]) -> str | None:
    """How a layer's parameters are split across ranks: "zero3" if DeepSpeed ZeRO-3 partitioned
    any of them, "fsdp2" if any is a DTensor (``fully_shard``), None if every one is whole."""
    params = list(params)
    if any(is_zero3(p) for p in params):
        return "zero3"
    return "fsdp2" if any(is_sharded(p) for p in params) else None


def is_whole(t: Tensor) -> bool:
    """Whether every rank holds all of ``t``: a plain tensor or a replicated DTensor (not a
    ZeRO-3 parameter)."""
    if is_zero3(t):
        return False
    return not is_sharded(t) or all(isinstance(p, Replicate) for p in t.placements)


def full(t: Tensor) -> Tensor:
    """The whole tensor: ``t.full_tensor()`` for a DTensor, a gathered copy of a ZeRO-3
    parameter (each a collective: every rank calls it, in the same order), ``t`` otherwise."""
    if is_zero3(t):
        return read_whole(t)
    return t.full_tensor() if is_sharded(t) else t


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (its storage: writing to it writes the parameter), or ``t``."""
    return t.to_local() if is_sharded(t) else t


def local_part(whole: Tensor, like: Tensor) -> Tensor:
    """This rank's part of ``whole`` (shaped like ``like``) as ``like`` is laid out: for a
    DTensor, the slice its placements give this rank, cut locally (every rank holds ``whole``,
    so nothing is sent); ``whole`` itself for a plain tensor."""
    if not is_sharded(like):
        return whole
    if tuple(whole.shape) != tuple(like.shape):
        raise GradLoraError(
            f"cannot shard a tensor of shape {tuple(whole.shape)} like a parameter of shape "
            f"{tuple(like.shape)}"
        )
    whole = whole.to(local(like).device)
    return distribute_tensor(
        whole, like.device_mesh, like.placements, src_data_rank=None
    ).to_local()


def assign_whole_(p: Tensor, value: Tensor) -> None:
    """p <- ``value`` (p's whole shape) on this rank's part: a DTensor's slice, a DeepSpeed ZeRO
    parameter's slice and master copy (``zero.write_whole_``), or p itself; no communication
    (every rank passes the same value)."""
    with torch.no_grad():
        if is_zero(p):
            write_whole_(p, value)
        else:
            local(p).copy_(local_part(value.to(local(p).dtype), p))


def local_rows(like: Tensor) -> Tensor | None:
    """The indices (into dim 0) of the rows this rank holds of a DTensor sharded on dim 0 or
    replicated (FSDP2's layout, also with a replicate mesh dimension); None for a plain tensor."""
    if not is_sharded(like):
        return None
    require_row_layout(like)
    index = torch.arange(like.shape[0], device=local(like).device)
    return distribute_tensor(
        index, like.device_mesh, like.placements, src_data_rank=None
    ).to_local()


def sum_over_shards(partial: Tensor, like: Tensor) -> Tensor:
    """Sum of ``partial`` over the ranks that hold different rows of ``like`` (an all-reduce over
    its dim-0 shard mesh dimensions, none over replicate ones); ``partial`` for a plain ``like``.
    Turns a sum over this rank's rows into the sum over all rows."""
    if not is_sharded(like):
        return partial
    require_row_layout(like)
    placements = [Partial() if isinstance(p, Shard) else Replicate() for p in like.placements]
    return DTensor.from_local(partial, like.device_mesh, placements, run_check=False).full_tensor()


def gather_rows(rows: Tensor, like: Tensor) -> Tensor:
    """The whole (M, ...) tensor from each rank's ``rows``, sharded on dim 0 as ``like``
    (M = like.shape[0]); ``rows`` for a plain ``like``."""
    if not is_sharded(like):
        return rows
    require_row_layout(like)
    shape = (like.shape[0], *rows.shape[1:])
    stride = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        stride[i] = stride[i + 1] * shape[i + 1]
    return DTensor.from_local(
        rows, like.device_mesh, like.placements, run_check=False, shape=shape, stride=tuple(stride)
    ).full_tensor()


def require_row_layout(like: Tensor) -> None:
    """Raise unless ``like`` is plain, or a DTensor sharded on dim 0 or replicated: then its
    local tensor is a set of whole rows (products from the right act on it shard by shard)."""
    if not is_sharded(like):
        return
    if not all(
        isinstance(p, Replicate) or (isinstance(p, Shard) and p.dim == 0) for p in like.placements
    ):
        raise GradLoraError(
            f"a parameter is laid out as {like.placements}; gradlora supports DTensor parameters "
            "sharded on dim 0 (FSDP2's default, fully_shard without shard_placement_fn) or "
            "replicated"
        )
