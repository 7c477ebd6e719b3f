"""LoRA-Pro (docs/algorithms.md, section 4): adjust the LoRA gradients so that the low-rank step is the one
closest to the full fine-tuning gradient.

Per pair A (r, n), B (m, r) with scaling s, autograd gives g_A = s Bᵀ g and g_B = s g Aᵀ for
the (never formed) full gradient g (m, n). The adjusted gradients

    g_A' = (1/s²) (BᵀB)⁻¹ g_A + X A
    g_B' = (1/s²) [I - B (BᵀB)⁻¹ Bᵀ] g_B (AAᵀ)⁻¹ - B X

make the equivalent gradient s (B g_A' + g_B' A) = P_B g + (I - P_B) g P_A, the projection of
g onto the rank-r tangent space (P_B = B(BᵀB)⁻¹Bᵀ, P_A = Aᵀ(AAᵀ)⁻¹A), and X, the solution of
the Sylvester equation BᵀB X + X AAᵀ = -(1/s²) (BᵀB)⁻¹ g_A Aᵀ, keeps (g_A', g_B') closest to
(g_A, g_B). Both r x r Gram matrices are regularized (+ damping I, eigenvalues clamped at 0)
and diagonalized once by ``eigh``; inverses and X come from the two eigendecompositions.

``lora_pro_adjust`` is the one-pair reference; ``PairBatch`` does the same for many pairs of
equal rank with one batched ``eigh`` per Gram matrix, and is what the optimizer runs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import GradLoraError
from ..parallel.pair_view import PairView
from ..parallel.sharding import local
from ..precision import math_dtype
from .adamw import adam_direction_, adamw_foreach_
from .gram import damped_eigh, inverse_from_eigh, solve_sylvester_psd
from .pair_adamw import PairAdamW
from .pairing import group_by_rank, pair_param_groups, split_trainable

log = logging.getLogger("gradlora")
MODES = ("efficient", "full")
# The reference's damping (pinv(Gram + 1e-8 I)). From peft's B = 0 at lr 2e-5, BᵀB's eigenvalues
# are 1e-7 to 4e-6 after two steps: an absolute 1e-6 dominated them and moved full mode's s B A
# 34% away from the reference at step 2. The eigen path (eigenvalues clamped at 0, + damping)
# keeps every inverse finite at any damping > 0, also at B = 0.
DAMPING = 1e-8


def lora_pro_adjust(
    g_A: Tensor, g_B: Tensor, A: Tensor, B: Tensor, scaling: float, damping: float = DAMPING
) -> tuple[Tensor, Tensor, Tensor]:
    """(g_A' (r, n), g_B' (m, r), X (r, r)) for one pair, in fp32 or wider (module doc)."""
    dtype = math_dtype(A)
    A, B, g_A, g_B = (t.detach().to(dtype) for t in (A, B, g_A, g_B))
    lam, P = damped_eigh(B.T @ B, damping)
    mu, Q = damped_eigh(A @ A.T, damping)
    B_inv, A_inv = inverse_from_eigh(P, lam), inverse_from_eigh(Q, mu)
    s2 = scaling**2
    a0 = B_inv @ g_A / s2
    X = solve_sylvester_psd(P, lam, Q, mu, -a0 @ A.T)
    g_A_new = a0 + X @ A
    g_B_new = (g_B - B @ (B_inv @ (B.T @ g_B))) @ A_inv / s2 - B @ X
    return g_A_new, g_B_new, X


def equivalent_gradient(
    g_A: Tensor, g_B: Tensor, A: Tensor, B: Tensor, scaling: float, damping: float = DAMPING
) -> Tensor:
    """g̃ (m, n) = s (B g_A' + g_B' A) = P_B g + (I - P_B) g P_A, written with X = 0
    (X cancels in g̃): (1/s) [B (BᵀB)⁻¹ g_A + (I - P_B) g_B (AAᵀ)⁻¹ A]."""
    dtype = math_dtype(A)
    A, B, g_A, g_B = (t.detach().to(dtype) for t in (A, B, g_A, g_B))
    lam, P = damped_eigh(B.T @ B, damping)
    mu, Q = damped_eigh(A @ A.T, damping)
    B_inv, A_inv = inverse_from_eigh(P, lam), inverse_from_eigh(Q, mu)
    left = (g_B - B @ (B_inv @ (B.T @ g_B))) @ A_inv
    return (B @ (B_inv @ g_A) + left @ A) / scaling


class PairBatch:
    """The r x r algebra of many (A, B) pairs of equal rank, with one batched ``eigh`` each for
    the BᵀB and AAᵀ stacks (L, r, r). Factors are read once, at construction."""

    def __init__(self, As: list[Tensor], Bs: list[Tensor], scalings: list[float], damping: float):
        dtype = math_dtype(As[0])
        self.As = [A.detach().to(dtype) for A in As]
        self.Bs = [B.detach().to(dtype) for B in Bs]
        device = self.As[0].device
        self.s = torch.tensor(scalings, dtype=dtype, device=device)[:, None, None]
        self.lam, self.P = damped_eigh(torch.stack([B.T @ B for B in self.Bs]), damping)
        self.mu, self.Q = damped_eigh(torch.stack([A @ A.T for A in self.As]), damping)
        self.B_inv = inverse_from_eigh(self.P, self.lam)
        self.A_inv = inverse_from_eigh(self.Q, self.mu)

    def adjust(self, g_As: list[Tensor], g_Bs: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """[g_A'], [g_B'] for every pair: ``lora_pro_adjust`` batched over the r x r work."""
        dtype = self.s.dtype
        g_As = [g.to(dtype) for g in g_As]
        g_Bs = [g.to(dtype) for g in g_Bs]
        s2 = self.s**2
        GAt = torch.stack([g @ A.T for g, A in zip(g_As, self.As, strict=True)])
        BtG = torch.stack([B.T @ g for B, g in zip(self.Bs, g_Bs, strict=True)])
        X = solve_sylvester_psd(self.P, self.lam, self.Q, self.mu, -(self.B_inv @ GAt) / s2)
        # g_B' = (1/s²) g_B (AAᵀ)⁻¹ - B Y with Y = (1/s²) (BᵀB)⁻¹ Bᵀ g_B (AAᵀ)⁻¹ + X
        Y = self.B_inv @ BtG @ self.A_inv / s2 + X
        left_A = self.B_inv / s2
        right_B = self.A_inv / s2
        out_A = [torch.addmm(X[i] @ A, left_A[i], g_As[i]) for i, A in enumerate(self.As)]
        out_B = [torch.addmm(B @ Y[i], g_Bs[i], right_B[i], beta=-1) for i, B in enumerate(self.Bs)]
        return out_A, out_B

    def equivalent(self, i: int, g_A: Tensor, g_B: Tensor, rows: Tensor | None = None) -> Tensor:
        """g̃ (m, n) of pair i: ``equivalent_gradient`` with the shared factorizations; with
        ``rows`` (indices into m) only those rows of it, (len(rows), n)."""
        dtype = self.s.dtype
        A, B, B_inv = self.As[i], self.Bs[i], self.B_inv[i]
        g_A, g_B = g_A.to(dtype), g_B.to(dtype)
        left = (g_B - B @ (B_inv @ (B.T @ g_B))) @ self.A_inv[i]
        if rows is not None:
            left, B = left[rows], B[rows]
        return torch.addmm(left @ A, B, B_inv @ g_A).div_(self.s[i])


class LoraProAdamW(PairAdamW):
    """AdamW on LoRA-Pro's adjusted gradients (``lora_pairs`` groups) and plain AdamW elsewhere.

    A ``lora_pairs=True`` group lists A1, B1, A2, B2, ... and ``scalings`` (s per pair); build it
    with ``create_lora_pro_optimizer``. mode="efficient": Adam moments of (g_A', g_B'), the size
    of the LoRA weights. mode="full": Adam moments (m, n) of the equivalent gradient g̃ per pair
    (kept in A's state), the normalized step D = m̂ / (sqrt(v̂) + eps) re-projected to
    (s Bᵀ D, s D Aᵀ) and adjusted again; A -= lr D_A', B -= lr D_B'. Weight decay is decoupled
    and applies to A and B. ``.grad`` is never modified; the state holds tensors and numbers.
    """

    method, factory = "lora-pro", "create_lora_pro_optimizer"
    default_damping = DAMPING

    def __init__(
        self, params: Iterable[Any], lr: float = 1e-3, mode: str = "efficient", **settings: Any
    ):
        """``settings``: ``PairSettings``' fields (betas, eps, weight_decay, damping = 1e-8,
        bias_correction)."""
        if mode not in MODES:
            raise GradLoraError(f"unknown LoRA-Pro mode {mode!r}; choose 'efficient' or 'full'")
        super().__init__(params, lr, {"mode": mode, "scalings": None}, **settings)

    def _check_pair_group(self, group: dict[str, Any]) -> None:
        super()._check_pair_group(group)
        if group["scalings"] is None or len(group["scalings"]) != len(group["params"]) // 2:
            raise GradLoraError(
                "a lora_pairs group needs 'scalings', one LoRA scaling s per (A, B) pair; build "
                "the optimizer with create_lora_pro_optimizer(model, ...)"
            )

    def _step_pairs(self, group: dict[str, Any]) -> None:
        params = group["params"]
        for idx in group_by_rank(params):
            idx = [
                i
                for i in idx
                if params[2 * i].grad is not None or params[2 * i + 1].grad is not None
            ]
            if not idx:
                continue
            As = [params[2 * i] for i in idx]
            Bs = [params[2 * i + 1] for i in idx]
            view = PairView(As, Bs)  # whole A, B and gradients (FSDP2: gathered; small)
            g_As, g_Bs = view.grads()
            ss = [group["scalings"][i] for i in idx]
            batch = PairBatch(view.A, view.B, ss, group["damping"])
            if group["mode"] == "efficient":
                new_A, new_B = batch.adjust(g_As, g_Bs)
                adamw_foreach_(
                    As + Bs,
                    [view.local(d, p) for d, p in zip(new_A + new_B, As + Bs, strict=True)],
                    [self.state[p] for p in As + Bs],
                    **self._hyper(group),
                )
            else:
                directions = [
                    full_mode_direction(batch, i, g_As[i], g_Bs[i], self.state[A], view, group)
                    for i, A in enumerate(As)
                ]
                new_A, new_B = batch.adjust(*map(list, zip(*directions, strict=True)))
                view.step_(As + Bs, new_A + new_B, group["lr"], group["weight_decay"])


def full_mode_direction(
    batch: PairBatch, i: int, g_A: Tensor, g_B: Tensor, state: dict, view: PairView, hyper
) -> tuple[Tensor, Tensor]:
    """(D_A, D_B) = (s Bᵀ D, s D Aᵀ) of pair i in full mode, with D = m̂ / (sqrt(v̂) + eps) the
    Adam direction of the equivalent gradient g̃ (m, n), whose moments live in ``state`` (A's).

    One (m, n) g̃ and D live at a time. Under FSDP2 g̃ and its moments are kept for this rank's
    rows of B only, so D_A is summed over the ranks and D_B gathered by rows (``view``).
    """
    rows = view.rows(i)
    D = adam_direction_(
        state,
        batch.equivalent(i, g_A, g_B, rows),
        betas=hyper["betas"],
        eps=hyper["eps"],
        bias_correction=hyper["bias_correction"],
    )
    B = batch.Bs[i] if rows is None else batch.Bs[i][rows]
    D_A = view.sum_rows(i, batch.s[i] * (B.T @ D))
    D_B = view.gather_rows(i, batch.s[i] * (D @ batch.As[i].T))
    return D_A, D_B


def create_lora_pro_optimizer(
    model: nn.Module,
    lr: float,
    mode: str = "efficient",
    skip_unsupported: bool = False,
    **settings: Any,
) -> LoraProAdamW:
    """LoraProAdamW over a PeftModel: the active adapter's (A, B) pairs with their scalings
    (alpha/r, or alpha/sqrt(r) with rsLoRA, read from each layer), and every other trainable
    parameter (head, biases) as plain AdamW. mode="full" keeps two (m, n) fp32 moments per
    adapted weight and logs how much memory that is. Works in plain loops, with LR schedulers,
    gradient clipping and ``Trainer(optimizers=(opt, scheduler))``. LoRA on layers other than
    nn.Linear / Conv1D (nn.Embedding, nn.Conv2d) is an error unless ``skip_unsupported=True``,
    which trains their LoRA weights with plain AdamW, unpaired. ``settings``: the fields of
    ``PairSettings`` (betas, eps, weight_decay, damping = 1e-8, bias_correction).
    """
    if mode not in MODES:
        raise GradLoraError(f"unknown LoRA-Pro mode {mode!r}; choose 'efficient' or 'full'")
    pairs, others = split_trainable(model, skip_unsupported)
    if mode == "full":
        # per rank: with FSDP2 each rank keeps the rows of its shard of B
        extra = sum(2 * local(p.B).shape[0] * p.A.shape[1] * 4 for p in pairs)
        log.warning(
            "LoRA-Pro mode='full' keeps (m, n) Adam moments for %d adapted weights: %.1f MiB of "
            "extra optimizer memory (mode='efficient' keeps LoRA-sized moments)",
            len(pairs),
            extra / 2**20,
        )
    return LoraProAdamW(
        pair_param_groups(pairs, others, scalings=[pair.scaling for pair in pairs]),
        lr=lr,
        mode=mode,
        **settings,
    )
