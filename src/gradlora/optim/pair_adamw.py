"""The shell that LoRA-One's preconditioned AdamW and LoRA-Pro's AdamW share.

A parameter group with ``lora_pairs=True`` lists A1, B1, A2, B2, ... and is stepped by the
subclass's ``_step_pairs``; every other group is plain decoupled AdamW (``adamw_foreach_``).
The shell checks the hyperparameters, refuses plain parameter groups (``require_pair_groups``)
and checks each pair group once, at construction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..errors import GradLoraError
from .adamw import adamw_foreach_, check_hyperparameters
from .pairing import check_pair_group, require_pair_groups

_HYPER = ("lr", "betas", "eps", "weight_decay", "bias_correction")


class PairAdamW(Optimizer):
    """AdamW whose ``lora_pairs`` groups a subclass steps pair by pair (``_step_pairs``)."""

    method = ""  # the name create_optimizer knows it by (for error messages)
    factory = ""  # the create_*_optimizer that builds its pair groups (for error messages)

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        damping: float,
        bias_correction: bool,
        **options: Any,
    ):
        check_hyperparameters(lr, betas, damping)
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            damping=damping,
            bias_correction=bias_correction,
            lora_pairs=False,
            **options,
        )
        super().__init__(require_pair_groups(params, type(self).__name__, self.method), defaults)
        for group in self.param_groups:
            if group["lora_pairs"]:
                self._check_pair_group(group)

    def _check_pair_group(self, group: dict[str, Any]) -> None:
        check_pair_group(group["params"], self.factory)

    @staticmethod
    def _hyper(group: dict[str, Any]) -> dict[str, Any]:
        return {k: group[k] for k in _HYPER}

    def _adamw(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        if any(g.is_sparse for g in grads):
            raise GradLoraError(f"{type(self).__name__} does not support sparse gradients")
        adamw_foreach_(params, grads, [self.state[p] for p in params], **self._hyper(group))

    def _step_pairs(self, group: dict[str, Any]) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["lora_pairs"]:
                self._step_pairs(group)
            else:
                params = [p for p in group["params"] if p.grad is not None]
                self._adamw(group, params, [p.grad for p in params])
        return loss
