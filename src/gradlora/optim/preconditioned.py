"""Preconditioned (scaled / Riemannian) AdamW for LoRA pairs, as used by LoRA-One (docs/algorithms.md, section 3).

Per (A (r, n), B (m, r)) pair, with both factors taken before the step:
    g_A <- (B^T B + lambda I)^-1 g_A,    g_B <- g_B (A A^T + lambda I)^-1
solved in fp32 (or the parameters' precision if higher), then ordinary decoupled AdamW.
Parameters outside a pair (heads, biases) get plain AdamW in the same optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from ..parallel.pair_view import PairView
from ..precision import math_dtype
from .gram import damped_inverse, gram_inverses
from .pair_adamw import PairAdamW
from .pairing import group_by_rank, pair_param_groups, split_trainable


def precondition(
    g_A: Tensor | None, g_B: Tensor | None, A: Tensor, B: Tensor, damping: float
) -> tuple[Tensor | None, Tensor | None]:
    """(ĝ_A, ĝ_B) = ((B^T B + λI)^-1 g_A, g_B (A A^T + λI)^-1), in at least fp32.

    A (r, n), B (m, r), g_A like A, g_B like B (either may be None). The r x r inverses come
    from ``damped_inverse``: finite for any λ > 0, also for B = 0 (vanilla LoRA's init) and for
    rank-deficient B or A.
    """
    dtype = math_dtype(A)
    out_A = out_B = None
    if g_A is not None:
        Bf = B.detach().to(dtype)
        out_A = damped_inverse(Bf.T @ Bf, damping) @ g_A.to(dtype)
    if g_B is not None:
        Af = A.detach().to(dtype)
        out_B = g_B.to(dtype) @ damped_inverse(Af @ Af.T, damping)
    return out_A, out_B


class PreconditionedAdamW(PairAdamW):
    """AdamW whose ``lora_pairs`` groups precondition each (A, B) pair before the moments.

    A group with ``lora_pairs=True`` lists its parameters as A1, B1, A2, B2, ... (use
    ``create_preconditioned_optimizer`` to build it from a PeftModel's structure); other groups
    are plain AdamW. ``.grad`` is never modified. The state dict holds only tensors and numbers.
    """

    method, factory = "preconditioned", "create_preconditioned_optimizer"
    default_damping = 1e-6

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, **settings: Any):
        """``settings``: ``PairSettings``' fields (betas, eps, weight_decay, damping = 1e-6,
        bias_correction)."""
        super().__init__(params, lr, {}, **settings)

    def _step_pairs(self, group: dict[str, Any]) -> None:
        params, grads = [], []
        for idx in group_by_rank(group["params"]):
            As = [group["params"][2 * i] for i in idx]
            Bs = [group["params"][2 * i + 1] for i in idx]
            # the Gram matrices from whole A and B (FSDP2: gathered); ĝ_A from the whole g_A,
            # cut to this rank's part; ĝ_B row by row from this rank's rows of g_B
            view = PairView(As, Bs)
            B_inv = gram_inverses(view.B, left=True, damping=group["damping"])
            A_inv = gram_inverses(view.A, left=False, damping=group["damping"])
            for k, (A, B) in enumerate(zip(As, Bs, strict=True)):
                if A.grad is not None:
                    params.append(A)
                    g = B_inv[k] @ view.whole_grad(A).to(B_inv.dtype)
                    grads.append(view.local(g, A))
                if B.grad is not None:
                    params.append(B)
                    grads.append(view.local_grad_rows(B).to(A_inv.dtype) @ A_inv[k])
        self._adamw(group, params, grads)


def create_preconditioned_optimizer(
    model: nn.Module, lr: float, skip_unsupported: bool = False, **settings: Any
) -> PreconditionedAdamW:
    """PreconditionedAdamW over a PeftModel: the active adapter's (A, B) pairs, preconditioned,
    and every other trainable parameter (classifier head, biases, modules_to_save), plain AdamW.

    Pairs come from the model's LoRA layers, not from parameter order. Works in plain torch loops,
    with LR schedulers, and as ``Trainer(optimizers=(opt, scheduler))``. LoRA on layers other
    than nn.Linear / Conv1D (nn.Embedding, nn.Conv2d) is an error unless
    ``skip_unsupported=True``, which trains their LoRA weights with plain AdamW, unpaired.
    ``settings``: the fields of ``PairSettings`` (betas, eps, weight_decay, damping = 1e-6,
    bias_correction).
    """
    pairs, others = split_trainable(model, skip_unsupported)
    return PreconditionedAdamW(pair_param_groups(pairs, others), lr=lr, **settings)
