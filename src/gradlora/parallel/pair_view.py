"""The LoRA pairs of one optimizer step as whole tensors, and the way back to each rank's part.

The pair optimizers' r x r algebra (optim/) runs on whole A (r, n), B (m, r) and their
gradients, which are small: ``PairView`` gathers them once per step (FSDP2's DTensors: one
all-gather each, in the same order on every rank; plain tensors pass through) and hands each
rank its own part of a whole result, so the kernels never see a DTensor. LoRA-Pro's full mode
keeps (m, n) moments for this rank's rows of B only: ``rows``, ``sum_rows`` and ``gather_rows``
serve it. ``whole_grad``, ``set_whole_grad_`` and ``master_value`` serve the pair transforms
(``optim/transform.py``) in front of another optimizer, DeepSpeed ZeRO's included.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import zero
from .sharding import full, gather_rows, local, local_part, local_rows, require_row_layout
from .sharding import sum_over_shards as _sum_over_shards


class PairView:
    """Pairs (As[i], Bs[i]) of one step: ``A``, ``B`` their whole values (read once)."""

    def __init__(self, As: list[Tensor], Bs: list[Tensor]):
        self.params_A, self.params_B = As, Bs
        self.A = [full(A) for A in As]
        self.B = [full(B) for B in Bs]

    @staticmethod
    def whole_grad(p: Tensor, zeros: bool = False) -> Tensor | None:
        """p's whole gradient (gathered from FSDP2's shards); None, or zeros with ``zeros``,
        when it has none."""
        if p.grad is None:
            return torch.zeros(p.shape, dtype=p.dtype, device=local(p).device) if zeros else None
        return full(p.grad)

    def grads(self) -> tuple[list[Tensor], list[Tensor]]:
        """([whole g_A], [whole g_B]), zeros where a factor has no gradient."""
        g_A = [self.whole_grad(A, zeros=True) for A in self.params_A]
        g_B = [self.whole_grad(B, zeros=True) for B in self.params_B]
        return g_A, g_B

    @staticmethod
    def local(whole: Tensor, param: Tensor) -> Tensor:
        """This rank's part of a whole result shaped like ``param`` (no communication)."""
        return local_part(whole, param)

    @staticmethod
    def local_grad_rows(B: Tensor) -> Tensor:
        """This rank's rows of B's gradient (B sharded on dim 0, FSDP2's layout, or whole)."""
        require_row_layout(B)
        return local(B.grad)

    def rows(self, i: int) -> Tensor | None:
        """The indices of the rows of B_i this rank holds; None when it holds all of them."""
        return local_rows(self.params_B[i])

    def sum_rows(self, i: int, partial: Tensor) -> Tensor:
        """The sum over all rows of B_i of a sum over this rank's rows (an all-reduce)."""
        return _sum_over_shards(partial, self.params_B[i])

    def gather_rows(self, i: int, rows: Tensor) -> Tensor:
        """The whole (m, ...) tensor from each rank's rows of B_i (an all-gather)."""
        return gather_rows(rows, self.params_B[i])

    @staticmethod
    def step_(params: list[Tensor], updates: list[Tensor], lr: float, weight_decay: float):
        """p <- p (1 - lr wd) - lr u for every param and whole update u, on this rank's part."""
        for p, u in zip(params, updates, strict=True):
            u, p_local = local_part(u, p), local(p)
            if weight_decay:
                p_local.mul_(1 - lr * weight_decay)
            p_local.add_(u.to(p.dtype), alpha=-lr)


def whole_grad(p: Tensor) -> Tensor | None:
    """p's whole gradient, wherever it lives: a DeepSpeed ZeRO optimizer's partitions (between
    backward and its step), FSDP2's DTensor shards, or ``p.grad`` (each gather a collective,
    in the same order on every rank); None when there is none."""
    if zero.is_zero(p):
        return zero.whole_grad(p)
    return None if p.grad is None else full(p.grad)


def set_whole_grad_(p: Tensor, value: Tensor) -> None:
    """Replace p's gradient by the whole ``value`` on this rank's part (no communication:
    every rank passes the same value)."""
    if zero.is_zero(p):
        zero.set_whole_grad_(p, value)
        return
    if p.grad is None:  # e.g. B reached by backward, A not: it gets its adjusted gradient too
        p.grad = torch.zeros_like(p)
    local(p.grad).copy_(local_part(value.to(p.grad.dtype), p.grad))


def master_value(p: Tensor) -> Tensor:
    """p's whole value in the precision its optimizer steps it in: a DeepSpeed ZeRO
    optimizer's fp32 master copy (gathered), else the parameter itself (gathered if sharded)."""
    return zero.master_value(p) if zero.has_master_copy(p) else full(p)
