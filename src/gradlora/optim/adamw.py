"""Decoupled AdamW steps shared by gradlora's optimizers: one tensor at a time (the reference)
and over a list of tensors with ``torch._foreach_*`` kernels (the fast path).

m = β1 m + (1-β1) g;  v = β2 v + (1-β2) g²;  p <- p (1 - lr wd) - lr m̂ / (sqrt(v̂) + eps),
m̂ = m / (1-β1^t), v̂ = v / (1-β2^t) with bias correction, m̂ = m, v̂ = v without.
Moments are kept in fp32 (or the parameter's precision if higher); the step count is an int.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..errors import GradLoraError
from ..parallel.sharding import local
from ..precision import math_dtype


def check_hyperparameters(lr: float, betas: tuple[float, float], damping: float) -> None:
    """Raise a GradLoraError for lr < 0, betas outside [0, 1) or damping <= 0."""
    if not lr >= 0:
        raise GradLoraError(f"lr must be >= 0, got {lr}")
    if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
        raise GradLoraError(f"betas must lie in [0, 1), got {betas}")
    if not damping > 0:
        raise GradLoraError(f"damping must be > 0 (it keeps B = 0 finite), got {damping}")


def init_moments(p: Tensor, state: dict[str, Any]) -> None:
    if not state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p, dtype=math_dtype(p))
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=math_dtype(p))


def adam_direction_(
    state: dict[str, Any],
    g: Tensor,
    *,
    betas: tuple[float, float],
    eps: float,
    bias_correction: bool,
) -> Tensor:
    """Update the moments in ``state`` with ``g`` (created, zero, like ``g`` on the first call)
    and return Adam's direction m̂ / (sqrt(v̂) + eps), a new tensor in the moments' dtype.

    The one Adam moment update: ``adamw_update_`` steps a parameter with it, and LoRA-Pro's
    full mode applies it to the (m, n) equivalent gradient.
    """
    beta1, beta2 = betas
    init_moments(g, state)
    state["step"] += 1
    t = state["step"]
    m, v = state["exp_avg"], state["exp_avg_sq"]
    g = g.to(m.dtype)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    if bias_correction:
        return (m / (1 - beta1**t)).div_((v / (1 - beta2**t)).sqrt_().add_(eps))
    return m / v.sqrt().add_(eps)


def adamw_update_(
    p: Tensor,
    g: Tensor,
    state: dict[str, Any],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    bias_correction: bool,
) -> None:
    """One decoupled AdamW step on ``p`` from gradient ``g`` (the formula in the module doc):
    the reference that ``adamw_foreach_`` is tested against."""
    init_moments(p, state)
    update = adam_direction_(state, g, betas=betas, eps=eps, bias_correction=bias_correction)
    if weight_decay:
        p.mul_(1 - lr * weight_decay)
    p.add_(update.to(p.dtype), alpha=-lr)


def adamw_foreach_(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    bias_correction: bool,
) -> None:
    """``adamw_update_`` on every (p, g, state) with a handful of multi-tensor kernels.

    Parameters whose step counts differ (one skipped a step for lack of a gradient) are
    stepped in separate buckets, so each gets its own bias correction. FSDP2's DTensor
    parameters are stepped shard by shard: their moments are DTensors laid out like them, and
    each grad is either a DTensor laid out like its parameter or this rank's shard of the update.
    """
    beta1, beta2 = betas
    buckets: dict[int, list[int]] = {}
    for i, (p, state) in enumerate(zip(params, states, strict=True)):
        init_moments(p, state)
        state["step"] += 1
        buckets.setdefault(state["step"], []).append(i)
    for t, idx in buckets.items():
        ps = [local(params[i]) for i in idx]
        ms = [local(states[i]["exp_avg"]) for i in idx]
        vs = [local(states[i]["exp_avg_sq"]) for i in idx]
        gs = [
            local(grads[i]) if grads[i].dtype == ms[k].dtype else local(grads[i]).to(ms[k].dtype)
            for k, i in enumerate(idx)
        ]
        torch._foreach_lerp_(ms, gs, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, value=1 - beta2)
        c1, c2 = (1 - beta1**t, 1 - beta2**t) if bias_correction else (1.0, 1.0)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, math.sqrt(c2))
        torch._foreach_add_(denom, eps)
        if weight_decay:
            torch._foreach_mul_(ps, 1 - lr * weight_decay)
        if all(p.dtype == m.dtype for p, m in zip(ps, ms, strict=True)):
            torch._foreach_addcdiv_(ps, ms, denom, value=-lr / c1)
        else:  # e.g. bf16 parameters with fp32 moments
            for p, m, d in zip(ps, ms, denom, strict=True):
                p.add_((m / d).to(p.dtype), alpha=-lr / c1)
