"""The shell that LoRA-One's preconditioned AdamW and LoRA-Pro's AdamW share.

A parameter group with ``lora_pairs=True`` lists A1, B1, A2, B2, ... and is stepped by the
subclass's ``_step_pairs``; every other group is plain decoupled AdamW (``adamw_foreach_``).
The shell checks the hyperparameters, refuses plain parameter groups (``require_pair_groups``)
and checks each pair group once, at construction.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..errors import GradLoraError
from .adamw import adamw_foreach_, check_hyperparameters
from .pairing import check_pair_group, require_pair_groups


@dataclass(frozen=True)
class PairSettings:
    """The hyperparameters both pair optimizers take besides ``lr``, named once: their classes
    and their ``create_*_optimizer`` functions accept them as keywords and pass them on."""

    betas: tuple[float, float] = (0.9, 0.999)  # decay rates of Adam's first and second moments
    eps: float = 1e-8  # added to sqrt(v̂) in Adam's denominator
    weight_decay: float = 0.0  # decoupled (AdamW): p <- p (1 - lr wd), on A and B too
    damping: float | None = None  # λ added to the r x r Gram matrices; None: the optimizer's own
    bias_correction: bool = True  # divide the moments by (1 - β^t)

    @classmethod
    def of(cls, settings: dict[str, Any], optimizer: str) -> PairSettings:
        """The settings from keyword arguments; an unknown name is a GradLoraError."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(settings) - set(names))
        if unknown:
            raise GradLoraError(
                f"{optimizer} got unknown setting(s) {unknown}; it takes lr and {', '.join(names)}"
            )
        return cls(**settings)


DEEPSPEED_CLIENT_ERROR = (
    "{name} is DeepSpeed's client optimizer: DeepSpeed steps it on flattened partitions, so it "
    "cannot pair each LoRA A with its B and would silently be plain AdamW. Give DeepSpeed a "
    "plain AdamW (torch.optim.AdamW, or the config's optimizer) and add the pair step in front "
    "of it: gradlora.attach_pair_transform(engine, 'lora-pro' | 'preconditioned'), or "
    "GradLoraCallback(..., transform='lora-pro') with the Trainer"
)
_HYPER = ("lr", *(f.name for f in fields(PairSettings) if f.name != "damping"))


class PairAdamW(Optimizer):
    """AdamW whose ``lora_pairs`` groups a subclass steps pair by pair (``_step_pairs``)."""

    method = ""  # the name create_optimizer knows it by (for error messages)
    factory = ""  # the create_*_optimizer that builds its pair groups (for error messages)
    default_damping = 1e-6  # λ when the settings leave it None

    def __init__(self, params: Iterable[Any], lr: float, options: dict[str, Any], **settings: Any):
        hyper = PairSettings.of(settings, type(self).__name__)
        damping = self.default_damping if hyper.damping is None else hyper.damping
        check_hyperparameters(lr, hyper.betas, damping)
        defaults = dict(
            asdict(hyper), lr=lr, betas=tuple(hyper.betas), damping=damping, lora_pairs=False
        )
        defaults |= options
        super().__init__(require_pair_groups(params, type(self).__name__, self.method), defaults)
        for group in self.param_groups:
            if group["lora_pairs"]:
                self._check_pair_group(group)
        self._paired = {id(p) for g in self.param_groups if g["lora_pairs"] for p in g["params"]}

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
            if group["lora_pairs"] and any(id(p) not in self._paired for p in group["params"]):
                # DeepSpeed replaced the groups' parameters by its flattened partitions
                raise GradLoraError(DEEPSPEED_CLIENT_ERROR.format(name=type(self).__name__))
            if group["lora_pairs"]:
                self._step_pairs(group)
            else:
                params = [p for p in group["params"] if p.grad is not None]
                self._adamw(group, params, [p.grad for p in params])
        return loss
