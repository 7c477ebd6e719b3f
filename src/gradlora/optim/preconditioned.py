"""Preconditioned (scaled / Riemannian) AdamW for LoRA pairs, as used by LoRA-One (ALGORITHMS.md 3).

Per (A (r, n), B (m, r)) pair, with both factors taken before the step:
    g_A <- (B^T B + lambda I)^-1 g_A,    g_B <- g_B (A A^T + lambda I)^-1
solved in fp32 (or the parameters' precision if higher), then ordinary decoupled AdamW.
Parameters outside a pair (heads, biases) get plain AdamW in the same optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..errors import GradLoraError
from .pairing import split_trainable


def _solve_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def precondition(
    g_A: Tensor | None, g_B: Tensor | None, A: Tensor, B: Tensor, damping: float
) -> tuple[Tensor | None, Tensor | None]:
    """(ĝ_A, ĝ_B) = ((B^T B + λI)^-1 g_A, g_B (A A^T + λI)^-1), in at least fp32.

    A (r, n), B (m, r), g_A like A, g_B like B (either may be None). The r x r systems are
    solved, never inverted; λ > 0 keeps them finite when B = 0 (vanilla LoRA's init).
    """
    dtype = _solve_dtype(A)
    r = A.shape[0]
    eye = torch.eye(r, dtype=dtype, device=A.device)
    out_A = out_B = None
    if g_A is not None:
        Bf = B.detach().to(dtype)
        out_A = torch.linalg.solve(Bf.T @ Bf + damping * eye, g_A.to(dtype))
    if g_B is not None:
        Af = A.detach().to(dtype)
        out_B = torch.linalg.solve(Af @ Af.T + damping * eye, g_B.to(dtype), left=False)
    return out_A, out_B


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
    """One decoupled AdamW step on ``p`` from gradient ``g``; moments kept in at least fp32.

    m = β1 m + (1-β1) g;  v = β2 v + (1-β2) g²;  p <- p (1 - lr wd) - lr m̂ / (sqrt(v̂) + eps),
    m̂ = m / (1-β1^t), v̂ = v / (1-β2^t) with bias correction, m̂ = m, v̂ = v without.
    """
    beta1, beta2 = betas
    if not state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p, dtype=_solve_dtype(p))
        state["exp_avg_sq"] = torch.zeros_like(p, dtype=_solve_dtype(p))
    state["step"] += 1
    t = state["step"]
    m, v = state["exp_avg"], state["exp_avg_sq"]
    g = g.to(m.dtype)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    if bias_correction:
        update = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt_().add_(eps))
    else:
        update = m / v.sqrt().add_(eps)
    if weight_decay:
        p.mul_(1 - lr * weight_decay)
    p.add_(update.to(p.dtype), alpha=-lr)


class PreconditionedAdamW(Optimizer):
    """AdamW whose ``lora_pairs`` groups precondition each (A, B) pair before the moments.

    A group with ``lora_pairs=True`` lists its parameters as A1, B1, A2, B2, ... (use
    ``create_preconditioned_optimizer`` to build it from a PeftModel's structure); other groups
    are plain AdamW. ``.grad`` is never modified. The state dict holds only tensors and numbers.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        damping: float = 1e-6,
        bias_correction: bool = True,
    ):
        if not lr >= 0:
            raise GradLoraError(f"lr must be >= 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise GradLoraError(f"betas must lie in [0, 1), got {betas}")
        if not damping > 0:
            raise GradLoraError(f"damping must be > 0 (it keeps B = 0 finite), got {damping}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            damping=damping,
            bias_correction=bias_correction,
            lora_pairs=False,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["lora_pairs"]:
                _check_pairs(group["params"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = group["params"]
            if group["lora_pairs"]:
                updates = []
                for A, B in zip(params[0::2], params[1::2], strict=True):
                    g_A, g_B = precondition(A.grad, B.grad, A, B, group["damping"])
                    updates += [(A, g_A), (B, g_B)]
            else:
                updates = [(p, p.grad) for p in params]
            for p, g in updates:
                if g is None:
                    continue
                if g.is_sparse:
                    raise GradLoraError("PreconditionedAdamW does not support sparse gradients")
                adamw_update_(
                    p,
                    g,
                    self.state[p],
                    lr=group["lr"],
                    betas=group["betas"],
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    bias_correction=group["bias_correction"],
                )
        return loss


def _check_pairs(params: list[Tensor]) -> None:
    if len(params) % 2:
        raise GradLoraError(
            "a lora_pairs group needs parameters in (A, B) order: A1, B1, A2, B2, ..."
        )
    for A, B in zip(params[0::2], params[1::2], strict=True):
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise GradLoraError(
                f"parameters of shapes {tuple(A.shape)} and {tuple(B.shape)} are not a LoRA (A (r, n), "
                "B (m, r)) pair; build the optimizer with create_preconditioned_optimizer(model, ...)"
            )


def create_preconditioned_optimizer(
    model: nn.Module,
    lr: float,
    damping: float = 1e-6,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    bias_correction: bool = True,
) -> PreconditionedAdamW:
    """PreconditionedAdamW over a PeftModel: the active adapter's (A, B) pairs, preconditioned,
    and every other trainable parameter (classifier head, biases, modules_to_save), plain AdamW.

    Pairs come from the model's LoRA layers, not from parameter order. Works in plain torch loops,
    with LR schedulers, and as ``Trainer(optimizers=(opt, scheduler))``.
    """
    pairs, others = split_trainable(model)
    groups = [{"params": [p for pair in pairs for p in (pair.A, pair.B)], "lora_pairs": True}]
    if others:
        groups.append({"params": others, "lora_pairs": False})
    return PreconditionedAdamW(
        groups,
        lr=lr,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
        damping=damping,
        bias_correction=bias_correction,
    )
