"""Data-parallel initialization: every rank captures on its own batches, all ranks agree.

``initialize`` is a collective when ``torch.distributed`` is initialized with more than one
rank (torchrun, ``accelerate launch``): call it on every rank, each with its share of the data.

1. Capture: each rank sums dL_b/dW over its batches; ``all_reduce_sum`` (capture's ``reduce``
   hook) adds the sums and the batch counts over all ranks, so G is the mean over all ranks'
   batches, exactly as one process over the union of the batches (up to summation order).
2. SVD: each layer's decomposition runs on one rank (``assign_owners``: largest first to the
   least loaded rank, so each rank does about 1/world of the SVD work), and ``share_factors``
   sends each layer's (A0, B0, singular values) from its rank to all (one broadcast per rank,
   r (m + n) numbers per layer), so every rank holds the same factors bit for bit.
3. Write, then ``synchronize``: the written A, B, W (and the stored A0, B0) are fingerprinted
   bit for bit (two int64 per tensor, one small all-reduce for the whole model). Where a rank
   differs from rank 0 (float nondeterminism across GPU models or library versions), rank 0's
   tensors are broadcast, so every rank ends bit-identical whatever the hardware. On
   homogeneous ranks nothing is broadcast. With FSDP2 (DTensor parameters sharded on dim 0)
   each rank writes its own rows of A and B (``gradlora.parallel.sharding``) and only what every rank
   holds whole is compared.

Before step 1, ``check_joined`` makes sure every rank of the group has entered the init: a
rank that calls it alone (``if rank == 0: gradlora.initialize(...)``) would otherwise wait in
the first all-reduce until the backend's timeout (30 min on gloo). The check goes through the
group's store (a few small messages, no backend collective, so it is the same for gloo and
NCCL) and waits at most ``collective_timeout`` seconds (argument of ``initialize``, else
$GRADLORA_COLLECTIVE_TIMEOUT, else 60), then raises a GradLoraError naming the missing ranks.
The collectives after it are the backend's, with the backend's timeout: a rank that dies
mid-init closes its gloo connections (the others fail at once) or trips NCCL's watchdog
(default 10 min); a rank that stays alive but stops calling collectives is waited for that long.

The gloo backend runs on CPU, NCCL on GPU (tensors on the rank's current CUDA device).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import GradLoraError
from .sharding import is_whole, local


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


TIMEOUT_ENV = "GRADLORA_COLLECTIVE_TIMEOUT"
DEFAULT_TIMEOUT = 60.0
_entered: dict[str, int] = {}  # per process group name: how many inits this process entered


def collective_timeout(seconds: float | None = None) -> float:
    """The seconds ``check_joined`` waits for the other ranks: ``seconds`` if given, else
    $GRADLORA_COLLECTIVE_TIMEOUT, else 60. Must be a positive finite number."""
    where = "collective_timeout"
    if seconds is None:
        raw = os.environ.get(TIMEOUT_ENV, "").strip()
        if not raw:
            return DEFAULT_TIMEOUT
        where = f"${TIMEOUT_ENV}"
        try:
            seconds = float(raw)
        except ValueError:
            seconds = math.nan
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not 0 < seconds < math.inf
    ):
        raise GradLoraError(f"{where} must be a positive number of seconds, got {seconds!r}")
    return float(seconds)


def check_joined(group: Any = None, timeout: float = DEFAULT_TIMEOUT, failed: bool = False) -> None:
    """Wait at most ``timeout`` seconds for every rank of ``group`` to enter this init; raise a
    GradLoraError naming the ranks (global ranks) that did not, on every rank that did.
    ``failed=True``: this rank raised before joining (a pre-write check); tell the others, who
    then raise at once instead of waiting, and return (the caller re-raises its own error).

    Through the group's store, not a backend collective: each rank sets its own key and adds 1
    to a counter; the rank that brings it to the group size marks the call "ok", the others wait
    for that mark. A rank whose wait runs out, or that failed, marks it "failed" instead
    (compare-and-set, so exactly one of the two wins), and a rank that arrives after that raises
    at once rather than entering a collective the others have left. The keys are numbered by a
    per-process count of inits on the group, the same on every rank that calls in the same order.
    """
    pg = dist.group.WORLD if group is None else group
    ranks = dist.get_process_group_ranks(pg)
    me = dist.get_rank()
    if me not in ranks:
        if failed:
            return
        raise GradLoraError(
            f"this rank ({me}) is not in process_group (global ranks {ranks}): call "
            "gradlora.initialize with a process_group only on the ranks of that group"
        )
    store = pg.get_group_store()  # namespaced per group; the count below is per group as well
    call = _entered.get(pg.group_name, 0)
    _entered[pg.group_name] = call + 1
    key = f"gradlora/initialize/{call}"
    state_key = f"{key}/state"
    if failed:
        store.set(f"{key}/raised{me}", "1")
        store.compare_set(state_key, "", "failed")
        return
    store.set(f"{key}/rank{me}", "1")
    missing = None  # the ranks absent when this rank's wait ran out
    if store.add(f"{key}/joined", 1) == len(ranks):
        state = store.compare_set(state_key, "", "ok")
    else:
        try:
            store.wait([state_key], timedelta(seconds=timeout))
            state = store.get(state_key)
        except RuntimeError:  # DistStoreError: the wait ran out
            missing = [r for r in ranks if not store.check([f"{key}/rank{r}"])]
            state = store.compare_set(state_key, "", "failed")
    if state == b"ok":
        return
    fix = (
        "initialize is a collective: call it on every rank with that rank's batches, or pass "
        "distributed=False for a per-process init"
    )
    raised = [r for r in ranks if store.check([f"{key}/raised{r}"])]
    if raised:
        raise GradLoraError(
            f"ranks {raised} raised an error in gradlora.initialize before its first collective "
            f"(see their output), so rank {me} stops too, its model untouched"
        )
    if missing is not None:
        # missing is [] only if the late ranks set their key right at the deadline
        who = f"ranks {missing}" if missing else "some ranks"
        raise GradLoraError(
            f"{who} did not call gradlora.initialize within {timeout:g} s "
            f"(collective_timeout, or ${TIMEOUT_ENV}): {fix}"
        )
    raise GradLoraError(
        f"rank {me} called gradlora.initialize after the other ranks of the group (global ranks "
        f"{ranks}) had stopped waiting for it (their collective_timeout ran out): {fix}; call it "
        f"on all ranks at about the same time, or raise collective_timeout / ${TIMEOUT_ENV}"
    )


def all_reduce_sum(tensors: Sequence[Tensor], group: Any = None) -> None:
    """Sum each tensor over the ranks of ``group``, in place (capture's ``reduce`` hook).

    The reductions are issued asynchronously and waited for together; no extra copy of the
    (m, n) accumulators is made.
    """
    works = [dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group, async_op=True) for t in tensors]
    for work in works:
        work.wait()


def all_reduce_min(value: int, device: torch.device, group: Any = None) -> int:
    """The smallest of the ranks' ``value`` (every rank gets it); ``device``: where the
    backend communicates (the model's device: cuda for NCCL)."""
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return int(t.item())


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
    returns the names of the layers that had to be repaired from rank 0.

    A DTensor sharded on some mesh dimension (FSDP2) holds a different slice on each rank by
    design, so only what every rank holds whole is compared: plain tensors, the local tensor
    of a replicated DTensor, and A0, B0. The shards of A and B are cut from factors that are
    bit-identical on every rank (``share_factors`` sends each from the one rank that computed
    it), and a sharded W is never written."""
    tensors, owners = [], []
    for t in targets:
        stored = t.init_factors() or ()
        for x in (t.A, t.B, t.weight, *stored):
            if not is_whole(x):
                continue
            tensors.append(local(x).data)
            owners.append(t.name)
    return sorted({owners[i] for i in synchronize(tensors, group)})


def assign_owners(costs: Sequence[float], ranks: int) -> list[int]:
    """The rank (0 .. ranks-1) that computes each of the jobs of the given costs: largest first,
    each to the least loaded rank (ties to the lowest), so every rank gets about 1/ranks of the
    work. Depends only on ``costs``, so every rank computes the same assignment."""
    load = [0.0] * ranks
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        owner = min(range(ranks), key=lambda r: (load[r], r))
        owners[i] = owner
        load[owner] += costs[i]
    return owners


def group_rank(group: Any = None) -> int:
    """This process's rank within ``group`` (default: the world)."""
    return dist.get_rank(group)


def share_factors(
    results: dict[str, tuple[Tensor, ...]],
    layout: dict[str, tuple[tuple[tuple[int, ...], torch.dtype], ...]],
    owners: dict[str, int],
    device: torch.device,
    group: Any = None,
) -> dict[str, tuple[Tensor, ...]]:
    """Every rank's ``results`` on every rank: each rank computed the tensors of the layers it
    owns (``owners``: name -> group rank), ``layout`` gives every layer's (shape, dtype) per
    tensor (known to all ranks), and one broadcast per rank sends its layers' tensors packed
    in fp64 (exact for fp32 and fp64), so each layer's tensors are bit-identical on all ranks.
    Collective: every rank passes the same ``layout`` and ``owners``."""
    me = group_rank(group)
    out = {  # in the layout's dtypes on the owning rank too
        n: tuple(x.to(dtype) for x, (_, dtype) in zip(xs, layout[n], strict=True))
        for n, xs in results.items()
    }
    for src in range(world_size(group)):
        names = [n for n in layout if owners[n] == src]
        sizes = [math.prod(shape) for n in names for shape, _ in layout[n]]
        if not names:
            continue
        if src == me:
            flat = torch.cat(
                [x.detach().reshape(-1).to(torch.float64) for n in names for x in results[n]]
            ).to(device)
        else:
            flat = torch.empty(sum(sizes), dtype=torch.float64, device=device)
        global_src = src if group is None else dist.get_global_rank(group, src)
        dist.broadcast(flat, src=global_src, group=group)
        if src == me:
            continue
        parts = iter(flat.split(sizes))
        for n in names:
            out[n] = tuple(next(parts).view(shape).to(dtype).clone() for shape, dtype in layout[n])
    return out
