"""Truncated SVD of gradient matrices: exact or randomized, deterministic signs, own RNG.

All functions take an (m, n) matrix and return the top-k triplets as
``U`` (m, k), ``S`` (k,), ``V`` (n, k) with ``M ~= U @ diag(S) @ V.T``.
Computation happens in fp32 (fp64 when given fp64), on the matrix's device.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

SvdMethod = Literal["auto", "exact", "randomized"]

# "auto" uses the exact SVD up to this many rows/columns on the short side.
EXACT_SVD_MAX_DIM = 1024


def _compute_dtype(matrix: Tensor) -> torch.dtype:
    return torch.float64 if matrix.dtype == torch.float64 else torch.float32


def fix_signs(U: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    """Flip each singular pair (u_i, v_i) so that u_i's entry of largest magnitude is positive.

    The SVD is unique only up to the sign of each pair; fixing it makes the init reproducible
    across devices and LAPACK/cuSOLVER versions. ``U`` (m, k), ``V`` (n, k).
    """
    idx = U.abs().argmax(dim=0, keepdim=True)
    signs = torch.sign(U.gather(0, idx))
    signs[signs == 0] = 1
    return U * signs, V * signs


def exact_svd(matrix: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k triplets of ``matrix`` (m, n) from the full thin SVD (LAPACK / cuSOLVER)."""
    M = matrix.to(_compute_dtype(matrix))
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    U, V = fix_signs(U[:, :k], Vh[:k].T)
    return U.contiguous(), S[:k].contiguous(), V.contiguous()


def randomized_svd(
    matrix: Tensor,
    k: int,
    *,
    oversample: int | None = None,
    niter: int = 4,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k triplets by randomized subspace iteration (Halko, Martinsson, Tropp 2011).

    Sketch width q = min(k + oversample, min(m, n)), default oversample = k, so q = 2k: with
    k = 2r this is the reference code's q = 4r. ``niter`` power iterations, re-orthonormalized
    with QR each time. The Gaussian test matrix comes from a private generator seeded with
    ``seed``, so the global RNG is never touched.
    """
    M = matrix.to(_compute_dtype(matrix))
    m, n = M.shape
    q = min(k + (k if oversample is None else oversample), m, n)
    gen = torch.Generator(device=M.device).manual_seed(seed)
    omega = torch.randn(n, q, generator=gen, device=M.device, dtype=M.dtype)
    Q = torch.linalg.qr(M @ omega).Q
    for _ in range(niter):
        Q = torch.linalg.qr(M.T @ Q).Q
        Q = torch.linalg.qr(M @ Q).Q
    Ub, S, Vh = torch.linalg.svd(Q.T @ M, full_matrices=False)
    U, V = fix_signs((Q @ Ub)[:, :k], Vh[:k].T)
    return U.contiguous(), S[:k].contiguous(), V.contiguous()


def top_svd(
    matrix: Tensor,
    k: int,
    *,
    method: SvdMethod = "auto",
    niter: int = 4,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k singular triplets of ``matrix`` (m, n): ``U`` (m, k), ``S`` (k,), ``V`` (n, k).

    ``method="auto"`` is exact when min(m, n) <= EXACT_SVD_MAX_DIM or when k is more than a
    quarter of min(m, n) (a sketch would not save work), randomized otherwise.
    """
    if matrix.ndim != 2:
        raise ValueError(f"top_svd expects a 2-D matrix, got shape {tuple(matrix.shape)}")
    short = min(matrix.shape)
    if not 1 <= k <= short:
        raise ValueError(f"k={k} singular triplets requested from a {tuple(matrix.shape)} matrix")
    if method == "auto":
        method = "exact" if short <= EXACT_SVD_MAX_DIM or 4 * k > short else "randomized"
    if method == "exact":
        return exact_svd(matrix, k)
    if method == "randomized":
        return randomized_svd(matrix, k, niter=niter, seed=seed)
    raise ValueError(f"unknown SVD method {method!r}; use 'auto', 'exact' or 'randomized'")


def best_rank_approx(matrix: Tensor, k: int) -> Tensor:
    """[M]_k, the best rank-k approximation of ``matrix`` (m, n) in Frobenius norm (exact SVD)."""
    U, S, V = exact_svd(matrix, k)
    return (U * S) @ V.T
