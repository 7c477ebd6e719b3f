"""Data-parallel initialization: every rank captures on its own batches, all ranks agree.

``initialize`` is a collective when ``torch.distributed`` is initialized with more than one
rank (torchrun, ``accelerate launch``): call it on every rank, each with its share of the data.

1. Capture: each rank sums dL_b/dW over its batches; ``all_reduce_sum`` (capture's ``reduce``
   hook) adds the sums and the batch counts over all ranks, so G is the mean over all ranks'
   batches, exactly as one process over the union of the batches (up to summation order).
2. SVD: every rank runs it on the same summed G (the randomized SVD uses its own seeded
   generator), so the factors agree.
3. Write, then ``synchronize``: the written A, B, W (and the stored A0, B0) are fingerprinted
   bit for bit (two int64 per tensor, one small all-reduce for the whole model). Where a rank
   differs from rank 0 (float nondeterminism across GPU models or library versions), rank 0's
   tensors are broadcast, so every rank ends bit-identical whatever the hardware. On
   homogeneous ranks nothing is broadcast.

The gloo backend runs on CPU, NCCL on GPU (tensors on the rank's current CUDA device).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import GradLoraError


def world_size(group: Any = None) -> int:
    """Ranks in ``group`` (default: the world), or 1 when torch.distributed is not running."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def resolve(distributed: bool | None, group: Any = None) -> bool:
    """Whether ``initialize`` must reduce across ranks.

    None: yes when torch.distributed is initialized with more than one rank. True: the same,
    but an error when it is not initialized. False: a per-process init (no communication).
    """
    if distributed is False:
        return False
    if distributed is None:
        return world_size(group) > 1
    if distributed is True:
        if not (dist.is_available() and dist.is_initialized()):
            raise GradLoraError(
                "distributed=True but torch.distributed is not initialized: launch with torchrun "
                "or accelerate launch and call torch.distributed.init_process_group() first"
            )
        return True
    raise GradLoraError(f"distributed must be None, True or False, got {distributed!r}")


def all_reduce_sum(tensors: Sequence[Tensor], group: Any = None) -> None:
    """Sum each tensor over the ranks of ``group``, in place (capture's ``reduce`` hook).

    The reductions are issued asynchronously and waited for together; no extra copy of the
    (m, n) accumulators is made.
    """
    works = [dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group, async_op=True) for t in tensors]
    for work in works:
        work.wait()


def make_reduce(group: Any = None):
    """capture's ``reduce`` hook for ``group``: ``lambda tensors: all_reduce_sum(tensors, group)``."""

    def reduce(tensors: Sequence[Tensor]) -> None:
        all_reduce_sum(tensors, group)

    return reduce


def fingerprint(t: Tensor, chunk: int = 1 << 22) -> Tensor:
    """Two int64 that change with any bit of ``t``: the sum of its bit patterns, and the sum
    weighted by position (exact integer arithmetic, so independent of summation order).
    Works through ``chunk`` entries at a time: a few 32 MiB temporaries, whatever the size."""
    flat = t.detach().reshape(-1)
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()]
    flat = flat.view(ints)
    total = torch.zeros(2, dtype=torch.int64, device=flat.device)
    for start in range(0, flat.numel(), chunk):
        bits = flat[start : start + chunk].to(torch.int64)
        pos = torch.arange(start, start + bits.numel(), device=bits.device, dtype=torch.int64)
        total[0] += bits.sum()
        total[1] += (bits * (pos % 65521 + 1)).sum()
    return total


def synchronize(tensors: Sequence[Tensor], group: Any = None, src: int = 0) -> list[int]:
    """Make every rank's ``tensors`` bit-identical to rank ``src``'s; returns the indices that
    differed anywhere (and were broadcast). Collective: every rank passes the same list."""
    if not tensors:
        return []
    device = tensors[0].device
    fp = torch.stack([fingerprint(t).to(device) for t in tensors])  # (k, 2)
    both = torch.cat([fp, -fp], dim=1)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    highest, lowest = both[:, :2], -both[:, 2:]
    differ = (highest != lowest).any(dim=1).nonzero().flatten().tolist()
    global_src = src if group is None else dist.get_global_rank(group, src)
    with torch.no_grad():
        for i in differ:
            dist.broadcast(tensors[i], src=global_src, group=group)
    return differ


def synchronize_targets(targets: Sequence[Any], group: Any = None) -> list[str]:
    """``synchronize`` the written A, B, base weight W and stored A0, B0 of every LoRA target;
    returns the names of the layers that had to be repaired from rank 0."""
    tensors, owners = [], []
    for t in targets:
        stored = t.init_factors() or ()
        for x in (t.A, t.B, t.weight, *stored):
            tensors.append(x.data)
            owners.append(t.name)
    return sorted({owners[i] for i in synchronize(tensors, group)})
