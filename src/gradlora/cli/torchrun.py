"""``gradlora train`` under torchrun: process group, per-rank data shards, rank-0 output.

torchrun (``torchrun --nproc_per_node N -m gradlora.cli train ...``) sets WORLD_SIZE, RANK and
LOCAL_RANK; with WORLD_SIZE > 1 ``start`` joins the process group (gloo on CPU, NCCL on CUDA
with one GPU per process, ``cuda:LOCAL_RANK``). Without torchrun everything here is a no-op and
``gradlora train`` runs exactly as a single process.

Sharding: the global batches are made as in a single process (a pure function of the seed, each
of ``--batch-size`` examples), and rank r trains on rows [r k, (r + 1) k) of every one, k =
batch size / world size. DDP averages the ranks' gradients, so a step sees the same global batch
as the single-process run (exactly the same mean loss for classification; for causal LM each
rank's loss is a mean over its own tokens).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import GradLoraError


@dataclass
class Ranks:
    """Where this process stands: its rank, how many there are, and its device."""

    rank: int
    world: int
    device: torch.device | None  # None when alone: --device is resolved as it always was
    owns_group: bool = False  # start() created the process group (close() destroys it)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, batches: Sequence[dict[str, Any]], batch_size: int) -> list[dict[str, Any]]:
        """This rank's rows of every global batch (the batches themselves when alone)."""
        if not self.active:
            return list(batches)
        if batch_size % self.world:
            raise GradLoraError(
                f"--batch-size {batch_size} does not split evenly over {self.world} processes; "
                f"use a multiple of {self.world} (it is the global batch, shared by all processes)"
            )
        k = batch_size // self.world
        lo, hi = self.rank * k, (self.rank + 1) * k
        return [{name: t[lo:hi] for name, t in b.items()} for b in batches]

    def wrap(self, model: nn.Module) -> nn.Module:
        """DistributedDataParallel around ``model`` (the model itself when alone).

        Buffers are not re-broadcast on every forward: transformers' buffers (position ids,
        rotary tables, gradlora's stored A0/B0) are constant and identical on every rank."""
        if not self.active:
            return model
        ids = [self.device.index] if self.device and self.device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel
        # torch 2.13 renamed broadcast_buffers (and warns on the old name)
        new = "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters
        no_sync = {"forward_sync_buffers" if new else "broadcast_buffers": False}
        return ddp(model, device_ids=ids, **no_sync)

    def mean(self, loss: torch.Tensor) -> float:
        """The mean of ``loss`` over the ranks (non-finite if any rank's is): every rank sees
        the same value, so all stop together on a diverged loss."""
        if not self.active:
            return loss.item()
        total = loss.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total.item() / self.world

    def same(self, value: int, what: str) -> None:
        """Raise on every rank unless all ranks hold the same integer ``value``."""
        if not self.active:
            return
        both = torch.tensor([value, -value], dtype=torch.int64, device=self.device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        if both[0].item() != -both[1].item():
            raise GradLoraError(
                f"the processes disagree on {what} ({-both[1].item()} to {both[0].item()}); the "
                "output folder must be one that every node sees, with the same files"
            )

    def rng_states(self) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        """Every rank's (CPU, CUDA) RNG state, in rank order (collective)."""
        mine = (
            torch.get_rng_state(),
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        )
        if not self.active:
            return [mine]
        states: list[Any] = [None] * self.world
        dist.all_gather_object(states, mine)
        return states

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group if ``start`` joined it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False


def start(device: str) -> Ranks:
    """This process's Ranks: the process group joined when torchrun started several.

    ``device`` is --device: "auto", "cpu", "cuda" (under torchrun each process takes
    cuda:LOCAL_RANK, so an explicit index is refused), or a single-process device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks(0, 1, None)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    wanted = torch.device(auto if device == "auto" else device)  # as gradlora bench resolves it
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if wanted.type == "cuda":
        if wanted.index is not None:
            raise GradLoraError(
                f"--device {device} under torchrun: each process uses cuda:LOCAL_RANK; "
                "pass --device cuda (or auto) and choose GPUs with CUDA_VISIBLE_DEVICES"
            )
        if local >= torch.cuda.device_count():
            raise GradLoraError(
                f"process {rank} has LOCAL_RANK {local} but this node has "
                f"{torch.cuda.device_count()} GPU(s); lower --nproc_per_node"
            )
        wanted = torch.device("cuda", local)
        torch.cuda.set_device(wanted)
        backend = "nccl"
    elif wanted.type == "cpu":
        backend = "gloo"
    else:
        raise GradLoraError(f"--device {device} under torchrun: use cpu, cuda or auto")
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend)
    return Ranks(dist.get_rank(), dist.get_world_size(), wanted, owns_group=owns)
