"""gradlora's pair optimizers as gradient transforms in front of another optimizer's AdamW.

LoRA-Pro (efficient mode) and LoRA-One's preconditioned AdamW both turn each pair's (g_A, g_B)
into new gradients and then take an ordinary decoupled AdamW step. ``attach_pair_transform``
runs that first half just before a given optimizer's ``step``, so the second half is that
optimizer's own: DeepSpeed's (ZeRO-1/2/3, which steps flattened partitions and cannot pair A
with B itself), accelerate's, the Trainer's, or any torch optimizer. The transform reads each
pair's whole gradients and factors (``parallel/pair_view``: gathered across ranks, in the same
order on every rank), runs the r x r algebra of ``lora_pro.PairBatch`` / ``gram_inverses``, and
writes the new gradients back. With a base AdamW of the same lr, betas, eps and weight decay
the steps are those of ``LoraProAdamW`` / ``PreconditionedAdamW``.

Gradient clipping: a plain loop clips the raw gradients and then the pair optimizer adjusts
them. DeepSpeed's ZeRO optimizers clip inside their step, which would clip the adjusted ones;
so the transform clips the raw gradients itself (norm over every trainable parameter, the
coefficient max_norm / (norm + 1e-6) as torch and DeepSpeed compute it), and DeepSpeed's
clipping is switched off for that step. The transform is linear in the gradients, so this is
the same as clipping before it.
"""

from __future__ import annotations

import math
import types
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import GradLoraError
from ..parallel.pair_view import master_value, set_whole_grad_, whole_grad
from ..peft_view import unwrap
from ..precision import math_dtype
from .gram import gram_inverses
from .lora_pro import DAMPING, PairBatch
from .pair_adamw import DEEPSPEED_CLIENT_ERROR, PairAdamW
from .pairing import split_trainable

TRANSFORMS = {"lora-pro": DAMPING, "preconditioned": 1e-6}  # name: default damping
_WRAPPERS = ("AcceleratedOptimizer", "DeepSpeedOptimizerWrapper")  # accelerate's, .optimizer


class PairTransform:
    """The pair transform of ``method`` over ``model``'s LoRA pairs; ``apply`` rewrites the
    current gradients in place; ``remove`` detaches it from the optimizer it was attached to."""

    def __init__(
        self, model: nn.Module, method: str, damping: float | None, skip_unsupported: bool
    ):
        if method not in TRANSFORMS:
            raise GradLoraError(
                f"unknown pair transform {method!r}; choose one of {sorted(TRANSFORMS)} (LoRA-Pro "
                "efficient mode, LoRA-One's preconditioner)"
            )
        self.method = method
        self.damping = TRANSFORMS[method] if damping is None else float(damping)
        if not self.damping > 0:
            raise GradLoraError(f"damping must be > 0, got {damping!r}")
        self.pairs, self.others = split_trainable(unwrap(model), skip_unsupported)
        self._optimizer: Any = None

    def apply(self, max_norm: float = 0.0) -> float | None:
        """Transform every pair's gradients in place; with ``max_norm`` > 0 clip the raw ones
        first (module doc). Returns the raw gradients' global norm when clipping, else None."""
        g_A = [whole_grad(p.A) for p in self.pairs]
        g_B = [whole_grad(p.B) for p in self.pairs]
        A = [master_value(p.A) for p in self.pairs]
        B = [master_value(p.B) for p in self.pairs]
        others = [whole_grad(p) for p in self.others] if max_norm else []
        coef, norm = 1.0, None
        if max_norm:
            squares = sum(
                float(g.double().square().sum()) for g in [*g_A, *g_B, *others] if g is not None
            )
            norm = math.sqrt(squares)
            coef = min(1.0, max_norm / (norm + 1e-6))
        by_rank: dict[int, list[int]] = {}
        for i, a in enumerate(A):
            if g_A[i] is not None or g_B[i] is not None:  # a pair no gradient reached: left alone
                by_rank.setdefault(a.shape[0], []).append(i)
        for idx in by_rank.values():
            ga = [_zeros_if_none(g_A[i], A[i]) for i in idx]
            gb = [_zeros_if_none(g_B[i], B[i]) for i in idx]
            new_A, new_B = self._transform(idx, [A[i] for i in idx], [B[i] for i in idx], ga, gb)
            for k, i in enumerate(idx):
                set_whole_grad_(self.pairs[i].A, new_A[k].mul_(coef))
                set_whole_grad_(self.pairs[i].B, new_B[k].mul_(coef))
        if coef < 1.0:
            for p, g in zip(self.others, others, strict=True):
                if g is not None:
                    set_whole_grad_(p, g * coef)
        return norm

    def _transform(self, idx, As, Bs, g_As, g_Bs) -> tuple[list[Tensor], list[Tensor]]:
        if self.method == "lora-pro":
            scalings = [self.pairs[i].scaling for i in idx]
            return PairBatch(As, Bs, scalings, self.damping).adjust(g_As, g_Bs)
        dtype = math_dtype(As[0])
        B_inv = gram_inverses(Bs, left=True, damping=self.damping)
        A_inv = gram_inverses(As, left=False, damping=self.damping)
        new_A = [B_inv[k] @ g.to(dtype) for k, g in enumerate(g_As)]
        new_B = [g.to(dtype) @ A_inv[k] for k, g in enumerate(g_Bs)]
        return new_A, new_B

    def remove(self) -> None:
        """Stop transforming: the optimizer's own ``step`` again."""
        if self._optimizer is not None:
            self._optimizer.__dict__.pop("step", None)
            self._optimizer.__dict__.pop("_gradlora_transform", None)
            self._optimizer = None


def _zeros_if_none(g: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g.reshape(like.shape)


def stepping_optimizer(target: Any) -> Any:
    """The optimizer whose ``step`` updates the weights: a DeepSpeed engine's ZeRO optimizer,
    the one inside accelerate's wrappers, or ``target`` itself."""
    if type(target).__name__ == "DeepSpeedEngine":
        target = target.optimizer
    while type(target).__name__ in _WRAPPERS:
        target = target.optimizer
    if target is None or not callable(getattr(target, "step", None)):
        raise GradLoraError(
            f"attach_pair_transform needs an optimizer or a DeepSpeed engine with one, got "
            f"{type(target).__name__}"
        )
    return target


def refuse_pair_optimizer_inside(optimizer: Any) -> None:
    """A GradLoraError if a gradlora pair optimizer sits inside DeepSpeed as its client optimizer
    (DeepSpeed hands it flattened partitions: it would be plain AdamW, silently)."""
    deepspeed, current = False, optimizer
    while current is not None:
        deepspeed |= type(current).__module__.startswith("deepspeed.")
        if isinstance(current, PairAdamW) and deepspeed:
            raise GradLoraError(DEEPSPEED_CLIENT_ERROR.format(name=type(current).__name__))
        current = getattr(current, "optimizer", None)


def attach_pair_transform(
    optimizer: Any,
    method: str = "lora-pro",
    model: nn.Module | None = None,
    damping: float | None = None,
    skip_unsupported: bool = False,
    mode: str = "efficient",
) -> PairTransform:
    """Run ``method``'s pair transform ("lora-pro": LoRA-Pro's adjusted gradients, efficient
    mode; "preconditioned": LoRA-One's (BᵀB + λI)⁻¹ g_A, g_B (AAᵀ + λI)⁻¹) before every step
    of ``optimizer``: a DeepSpeed engine (``deepspeed.initialize``'s first result, its model
    used), accelerate's prepared optimizer, or any torch optimizer (pass ``model``). Returns the
    ``PairTransform``; ``.remove()`` detaches it. Under DeepSpeed every rank attaches it (the
    transform gathers each pair's gradients: a collective). LoRA-Pro's full mode keeps (m, n)
    Adam moments of the equivalent gradient, which a transform in front of another optimizer's
    Adam cannot hold: ``mode="full"`` is refused; use ``LoraProAdamW`` in a plain loop.
    """
    if mode != "efficient":
        raise GradLoraError(
            f"LoRA-Pro mode={mode!r} cannot run as a transform in front of another optimizer: "
            "full mode keeps (m, n) Adam moments of the equivalent gradient, while the optimizer "
            "behind the transform keeps moments of A and B only. Use mode='efficient', or "
            "gradlora.create_lora_pro_optimizer(model, lr, mode='full') without DeepSpeed"
        )
    if model is None:
        model = getattr(optimizer, "module", None)
    if model is None:
        raise GradLoraError("attach_pair_transform needs model=... unless given a DeepSpeed engine")
    refuse_pair_optimizer_inside(optimizer)  # inside DeepSpeed: refused here
    inner = stepping_optimizer(optimizer)
    pair = inner if isinstance(inner, PairAdamW) else getattr(inner, "optimizer", None)
    if isinstance(pair, PairAdamW):
        raise GradLoraError(
            f"{type(pair).__name__} already adjusts the LoRA pairs; a transform in front of "
            "it would do it twice. Attach the transform to a plain AdamW instead"
        )
    if "_gradlora_transform" in inner.__dict__:
        raise GradLoraError("this optimizer already has a gradlora pair transform attached")
    # DeepSpeed's fp16: the gradients carry the loss scale, which the clip norm must not see
    scaled = float(getattr(inner, "loss_scale", 1.0) or 1.0) != 1.0
    if (
        scaled
        or getattr(inner, "fp16_enabled", False)
        or getattr(inner, "dynamic_loss_scale", False)
    ):
        raise GradLoraError(
            "the pair transform under DeepSpeed supports fp32 and bf16 training, not fp16 with "
            "loss scaling; use bf16"
        )
    transform = PairTransform(model, method, damping, skip_unsupported)
    own_step = inner.step

    def step(self, *args: Any, **kwargs: Any) -> Any:
        max_norm = float(getattr(self, "clip_grad", 0.0) or 0.0)  # DeepSpeed ZeRO's clipping
        transform.apply(max_norm)
        if not max_norm:
            return own_step(*args, **kwargs)
        self.clip_grad = 0.0  # the raw gradients were clipped above
        try:
            return own_step(*args, **kwargs)
        finally:
            self.clip_grad = max_norm

    inner.step = types.MethodType(step, inner)
    inner._gradlora_transform = transform
    transform._optimizer = inner
    return transform
