"""``create_optimizer(model, name, lr, **kwargs)``: every optimizer gradlora offers, by name.

The one registry: ``GradLoraCallback`` users, ``gradlora train`` and ``gradlora bench`` all
build their optimizers here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from peft.optimizers import create_riemannian_optimizer
from torch import nn
from torch.optim import Optimizer

from ..errors import GradLoraError
from ..peft_view import unwrap
from ..rates import warn_if_far
from .lora_pro import create_lora_pro_optimizer
from .preconditioned import create_preconditioned_optimizer


def _adamw(model: nn.Module, lr: float, skip_unsupported: bool = False, **kwargs: Any) -> Optimizer:
    # plain AdamW treats every LoRA layer alike, so there is nothing to skip: accepted, ignored
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, **kwargs)


def _riemannian(model: nn.Module, lr: float, **kwargs: Any) -> Optimizer:
    if "skip_unsupported" in kwargs:
        raise GradLoraError(
            "skip_unsupported is an option of gradlora's optimizers ('preconditioned', "
            "'lora-pro'; 'adamw' accepts and ignores it), not of peft's 'riemannian', which "
            "decides by itself which LoRA weights it preconditions; drop the option"
        )
    return create_riemannian_optimizer(model, torch.optim.AdamW, lr=lr, **kwargs)


# name -> factory(model, lr, **kwargs)
OPTIMIZERS: dict[str, Callable[..., Optimizer]] = {
    "adamw": _adamw,
    "preconditioned": create_preconditioned_optimizer,
    "lora-pro": create_lora_pro_optimizer,
    "riemannian": _riemannian,
}


def create_optimizer(model: nn.Module, name: str, lr: float, **kwargs: Any) -> Optimizer:
    """An optimizer over ``model``'s trainable parameters, by name, for a plain loop or
    ``Trainer(optimizers=(create_optimizer(model, name, lr), None))``.

    "adamw": torch AdamW over every trainable parameter (LoRA-GA's choice);
    "preconditioned": gradlora's preconditioned AdamW for LoRA pairs (LoRA-One's choice; kwargs
    skip_unsupported and ``PairSettings``' betas, eps, weight_decay, damping, bias_correction);
    "lora-pro": LoRA-Pro's adjusted AdamW (kwargs mode="efficient"|"full", skip_unsupported and
    the same settings); "riemannian": peft's Riemannian-preconditioned AdamW
    (``peft.optimizers.create_riemannian_optimizer``, kwargs passed on).
    ``skip_unsupported=True`` lets the pair optimizers train LoRA on nn.Embedding / nn.Conv2d
    layers with plain AdamW instead of refusing the model; "adamw" accepts and ignores it (it
    pairs nothing), "riemannian" refuses it. ``model`` may be wrapped (``peft_view.unwrap``);
    the pair optimizers need a PeftModel with LoRA layers. Build it on the PeftModel before
    creating the Trainer; a gradlora init writes A and B in place, so the optimizer keeps
    pointing at the right tensors.
    """
    if name not in OPTIMIZERS:
        raise GradLoraError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    optimizer = OPTIMIZERS[name](unwrap(model), lr, **kwargs)
    warn_if_far(unwrap(model), lr, f"create_optimizer({name!r})")  # rates.py
    return optimizer


class OptimizerFactory:
    """A gradlora optimizer for ``Trainer(optimizer_cls_and_kwargs=(factory, kwargs))`` (also
    TRL's trainers): ``OptimizerFactory("lora-pro")`` with ``{"lr": 1e-3, "mode": "full"}``.

    transformers calls a non-Optimizer first element with no arguments and the result with
    ``(model, **kwargs)``, so the optimizer is built from the model it trains and finds its
    LoRA pairs, as ``create_optimizer(model, name, **kwargs)`` does. The Trainer's own
    ``weight_decay`` is not passed on: put it in ``kwargs``.
    """

    def __init__(self, name: str):
        if name not in OPTIMIZERS:
            raise GradLoraError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
        self.name = name

    def __call__(self) -> Callable[..., Optimizer]:
        return functools.partial(create_optimizer, name=self.name)

    def __repr__(self) -> str:
        return f"OptimizerFactory({self.name!r})"
