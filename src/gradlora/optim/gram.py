"""The r x r algebra shared by gradlora's optimizers: damped Gram eigendecompositions, the
inverses they give, and the Sylvester solve of LoRA-Pro (docs/algorithms.md, sections 3 and 4).

Every inverse comes from ``torch.linalg.eigh`` with the eigenvalues clamped at 0 and the
damping λ added afterwards: a plain solve of (G + λI) fails in floating point when λ is below
the rounding of G's diagonal (fp32 entries above about λ/eps, e.g. |B|² >= 17 at λ = 1e-6) and
B is (numerically) rank-deficient. Here every eigenvalue of the inverse lies in (0, 1/λ].
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..precision import math_dtype


def damped_eigh(M: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """(λ + damping, P) with M = P diag(λ) Pᵀ; M (..., r, r) symmetric PSD, λ clamped at 0."""
    lam, P = torch.linalg.eigh(M)
    return lam.clamp_min(0).add_(damping), P


def inverse_from_eigh(P: Tensor, lam: Tensor) -> Tensor:
    """P diag(1/λ) Pᵀ (..., r, r): the inverse of P diag(λ) Pᵀ."""
    return (P / lam[..., None, :]) @ P.mT


def damped_inverse(grams: Tensor, damping: float) -> Tensor:
    """(G + λI)⁻¹ for symmetric PSD G (..., r, r), from G's eigendecomposition (module doc)."""
    lam, P = damped_eigh(grams, damping)
    return inverse_from_eigh(P, lam)


def gram_stack(mats: list[Tensor], left: bool) -> Tensor:
    """(L, r, r) stack of MᵀM (left=True, M = B (m, r)) or MMᵀ (left=False, M = A (r, n)) for
    L matrices of equal rank r, in ``math_dtype``."""
    dtype = math_dtype(mats[0])
    Ms = [M.detach().to(dtype) for M in mats]
    return torch.stack([M.T @ M if left else M @ M.T for M in Ms])


def gram_inverses(mats: list[Tensor], left: bool, damping: float) -> Tensor:
    """(L, r, r) stack of (MᵀM + λI)⁻¹ (left=True) or (MMᵀ + λI)⁻¹ (left=False): one batched
    ``damped_inverse`` of ``gram_stack(mats, left)``."""
    return damped_inverse(gram_stack(mats, left), damping)


def solve_sylvester_psd(P: Tensor, lam: Tensor, Q: Tensor, mu: Tensor, C: Tensor) -> Tensor:
    """X (..., r, r) with (P diag(λ) Pᵀ) X + X (Q diag(μ) Qᵀ) = C.

    X = P [(Pᵀ C Q) ⊘ (λ_i + μ_j)] Qᵀ; every λ_i + μ_j > 0 when both are damped.
    """
    return P @ ((P.mT @ C @ Q) / (lam[..., :, None] + mu[..., None, :])) @ Q.mT
