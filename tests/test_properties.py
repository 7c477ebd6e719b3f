"""Property-based tests (hypothesis) of the pure math: inits, spectral, the preconditioner.

Matrices are float64 and built from a drawn seed, so each example is reproducible and the
identities hold to near machine precision; shapes, ranks, scales and spectra are drawn.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradlora import GradLoraError
from gradlora.init.formulas import (
    LoraGA,
    LoraOne,
    best_rank_approx,
    exact_svd,
    init_from_gradient,
    randomized_svd,
)
from gradlora.optim import precondition

FAST = settings(
    max_examples=int(os.environ.get("GRADLORA_HYPOTHESIS_EXAMPLES", 25)),
    deadline=None,
    database=None,
)  # no .hypothesis folder


pytestmark = pytest.mark.usefixtures("one_thread")


def orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64)).Q


def with_spectrum(m: int, n: int, S: torch.Tensor, seed: int) -> torch.Tensor:
    """An (m, n) float64 matrix whose singular values are S (len <= min(m, n)), random vectors."""
    gen = torch.Generator().manual_seed(seed)
    k = S.numel()
    return (orthonormal(m, k, gen) * S) @ orthonormal(n, k, gen).T


@st.composite
def gradients(draw, min_short: int = 2):
    """(G (m, n), r): a random matrix of random rank and scale, and an adapter rank for it."""
    m = draw(st.integers(min_short, 24))
    n = draw(st.integers(min_short, 24))
    rank = draw(st.integers(1, min(m, n)))
    scale = 10.0 ** draw(st.integers(-6, 6))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    S = (
        scale
        * torch.rand(rank, generator=gen, dtype=torch.float64).add(0.1).sort(descending=True)[0]
    )
    G = with_spectrum(m, n, S, draw(st.integers(0, 2**31)))
    return G, m, n


@FAST
@given(
    data=gradients(),
    direction=st.sampled_from(["ArB2r", "A2rBr", "ArBr"]),
    scale=st.sampled_from(["stable", "unit"]),
    gamma=st.floats(0.5, 256),
    s=st.floats(0.05, 8),
    r_frac=st.floats(0, 1),
)
def test_lora_ga_first_step_is_best_rank_2r_step(data, direction, scale, gamma, s, r_frac):
    """A0 (r, n), B0 (m, r), orthogonal rows/columns of norm c, and the first-order change of
    s B A under one SGD step (g_A = s B0^T G, g_B = s G A0^T) is exactly -s^2 c^2 [G]_2r,
    also when G has rank < 2r."""
    G, m, n = data
    r = 1 + int(r_frac * (min(m, n) // 2 - 1))
    spec = LoraGA(direction=direction, scale=scale, gamma=gamma)
    A0, B0, S = init_from_gradient(G, r, spec)
    assert A0.shape == (r, n) and B0.shape == (m, r) and S.shape == (2 * r,)
    assert A0.dtype == B0.dtype == torch.float64
    c2 = math.sqrt(m) / gamma if scale == "stable" else 1.0
    eye = torch.eye(r, dtype=torch.float64)
    torch.testing.assert_close(A0 @ A0.T, c2 * eye, rtol=0, atol=1e-10 * c2)
    torch.testing.assert_close(B0.T @ B0, c2 * eye, rtol=0, atol=1e-10 * c2)
    first_order = s * (B0 @ (s * B0.T @ G) + (s * G @ A0.T) @ A0)
    expected = s**2 * c2 * best_rank_approx(G, 2 * r)
    err = (first_order - expected).norm() / (s**2 * c2 * G.norm())
    assert err < 1e-10, err


@FAST
@given(
    data=gradients(min_short=1),
    gamma=st.floats(1, 1024),
    s=st.floats(0.05, 8),
    r_frac=st.floats(0, 1),
)
def test_lora_one_is_one_normalized_gradient_step(data, gamma, s, r_frac):
    """s B0 A0 = -(s / (gamma sigma_1)) [G]_r, split evenly: B0^T B0 = A0 A0^T = diag(S_r)/(gamma sigma_1)."""
    G, m, n = data
    r = 1 + int(r_frac * (min(m, n) - 1))
    A0, B0, S = init_from_gradient(G, r, LoraOne(gamma=gamma))
    assert A0.shape == (r, n) and B0.shape == (m, r)
    sigma1 = torch.linalg.svdvals(G)[0]
    expected = -(s / (gamma * sigma1)) * best_rank_approx(G, r)
    err = (s * B0 @ A0 - expected).norm() / (s / gamma)  # ||expected|| <= sqrt(r) s / gamma
    assert err < 1e-10, err
    gram = torch.diag(S[:r] / (gamma * sigma1))
    torch.testing.assert_close(B0.T @ B0, gram, rtol=0, atol=1e-10 / gamma)
    torch.testing.assert_close(A0 @ A0.T, gram, rtol=0, atol=1e-10 / gamma)


@pytest.mark.parametrize("method", [LoraGA(), LoraOne()])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_gradient_is_a_clear_error(method, dtype):
    with pytest.raises(GradLoraError, match="zero or not finite"):
        init_from_gradient(torch.zeros(12, 9, dtype=dtype), 2, method)


@FAST
@given(
    m=st.integers(4, 40),
    n=st.integers(4, 40),
    k_frac=st.floats(0, 1),
    decay=st.floats(0.05, 0.5),
    scale=st.sampled_from([1e-8, 1.0, 1e8]),
    seed=st.integers(0, 2**31),
)
def test_randomized_svd_on_known_spectrum(m, n, k_frac, decay, scale, seed):
    """Geometric spectrum with ratio <= 0.5: 4 power iterations with q = 2k recover the top-k
    singular values to 1e-4 relative (the error decays as (sigma_q+1 / sigma_k)^9 < 0.5^9),
    never exceed the true ones (interlacing, up to eps sigma_1), and give orthonormal U, V."""
    short = min(m, n)
    k = 1 + int(k_frac * (short // 3 - 1))
    S = scale * decay ** torch.arange(short, dtype=torch.float64)
    M = with_spectrum(m, n, S, seed)
    U, Sr, V = randomized_svd(M, k, niter=4, seed=seed % 1000)
    assert U.shape == (m, k) and V.shape == (n, k) and Sr.shape == (k,)
    torch.testing.assert_close(Sr, S[:k], rtol=1e-4, atol=0)
    # interlacing holds in exact arithmetic; in float64 up to the rounding of M, eps * sigma_1
    true = torch.linalg.svdvals(M)[:k]
    assert (Sr <= true + 100 * torch.finfo(M.dtype).eps * true[0]).all()
    eye = torch.eye(k, dtype=torch.float64)
    torch.testing.assert_close(U.T @ U, eye, rtol=0, atol=1e-10)
    torch.testing.assert_close(V.T @ V, eye, rtol=0, atol=1e-10)


@FAST
@given(
    m=st.integers(2, 30),
    n=st.integers(2, 30),
    k_frac=st.floats(0, 1),
    seed=st.integers(0, 2**31),
)
def test_best_rank_approx_is_optimal(m, n, k_frac, seed):
    """Eckart-Young: ||M - [M]_k||_F^2 = sum_{i>k} sigma_i^2, rank <= k, and no other rank-k
    matrix (the randomized SVD's, a random one) is closer."""
    gen = torch.Generator().manual_seed(seed)
    M = torch.randn(m, n, generator=gen, dtype=torch.float64)
    k = 1 + int(k_frac * (min(m, n) - 1))
    Mk = best_rank_approx(M, k)
    sigma = torch.linalg.svdvals(M)
    err2 = (M - Mk).norm() ** 2
    torch.testing.assert_close(err2, sigma[k:].pow(2).sum(), rtol=1e-9, atol=1e-12)
    assert torch.linalg.matrix_rank(Mk, rtol=1e-9) <= k
    Ur, Sr, Vr = randomized_svd(M, k, niter=1, seed=seed % 1000)
    other = (Ur * Sr) @ Vr.T
    random_k = torch.randn(m, k, generator=gen, dtype=torch.float64) @ torch.randn(
        k, n, generator=gen, dtype=torch.float64
    )
    for X in (other, random_k):
        assert err2 <= (M - X).norm() ** 2 * (1 + 1e-12) + 1e-26 * M.norm() ** 2
    # the exact SVD agrees with the truncation it defines
    U, S, V = exact_svd(M, k)
    torch.testing.assert_close((U * S) @ V.T, Mk, rtol=0, atol=1e-12 * sigma[0])


@st.composite
def pairs(draw):
    """(A (r, n), B (m, r), g_A, g_B, damping): B and A near-singular, any scale."""
    r = draw(st.integers(1, 6))
    m, n = draw(st.integers(r, 20)), draw(st.integers(r, 20))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    scale = 10.0 ** draw(st.integers(-4, 2))
    smallest = 10.0 ** -draw(st.integers(0, 12))  # relative size of the weakest direction
    spectrum = scale * torch.logspace(0, math.log10(smallest), r, dtype=torch.float64)
    if draw(st.booleans()):
        spectrum[-1] = 0.0  # exactly singular
    B = (orthonormal(m, r, gen) * spectrum) @ orthonormal(r, r, gen).T
    A = orthonormal(r, r, gen) @ (spectrum[:, None] * orthonormal(n, r, gen).T)
    gA = torch.randn(r, n, generator=gen, dtype=torch.float64)
    gB = torch.randn(m, r, generator=gen, dtype=torch.float64)
    damping = 10.0 ** -draw(st.integers(2, 8))
    return A, B, gA, gB, damping


def solve_by_eigh(M: torch.Tensor, g: torch.Tensor, damping: float) -> torch.Tensor:
    """(M + damping I)^-1 g for symmetric PSD M, through its eigendecomposition (independent of
    the LU solve under test)."""
    lam, Q = torch.linalg.eigh(M)
    return Q @ ((Q.T @ g) / (lam.clamp_min(0) + damping)[:, None])


@FAST
@given(p=pairs())
def test_precondition_float64_matches_independent_solve(p):
    A, B, gA, gB, damping = p
    hA, hB = precondition(gA, gB, A, B, damping)
    assert hA.dtype == hB.dtype == torch.float64
    refA = solve_by_eigh(B.T @ B, gA, damping)
    refB = solve_by_eigh(A @ A.T, gB.T, damping).T
    for got, ref, F in ((hA, refA, B), (hB, refB, A)):
        kappa = (torch.linalg.matrix_norm(F, 2) ** 2 + damping) / damping
        rel = (got - ref).norm() / ref.norm()
        assert rel <= 1e3 * kappa * torch.finfo(torch.float64).eps, (rel, kappa)


@FAST
@given(p=pairs())
def test_precondition_float32_is_finite_and_backward_stable(p):
    """In fp32 with near-singular B^T B: finite, and the solve's residual is as small as fp32
    allows, (m + r) eps (||B||^2 + damping) ||x||, whatever the conditioning; the forward error
    against the float64 solve is within the condition number times eps."""
    A, B, gA, gB, damping = (x.float() if torch.is_tensor(x) else x for x in p)
    hA, hB = precondition(gA, gB, A, B, damping)
    assert hA.dtype == hB.dtype == torch.float32
    assert torch.isfinite(hA).all() and torch.isfinite(hB).all()
    eps32 = torch.finfo(torch.float32).eps
    for got, F, g, left in ((hA, B, gA, True), (hB, A, gB, False)):
        F64, x, g64 = F.double(), got.double(), g.double()
        gram = F64.T @ F64 if left else F64 @ F64.T
        eye = torch.eye(gram.shape[0], dtype=torch.float64)
        system = gram + damping * eye
        residual = system @ x - g64 if left else x @ system - g64
        dims = F.shape[0] + F.shape[1]
        bound = 10 * dims * eps32 * (gram.norm() + damping) * x.norm() + eps32 * g64.norm()
        assert residual.norm() <= bound, (residual.norm(), bound)
        exact = (
            torch.linalg.solve(system, g64) if left else torch.linalg.solve(system, g64, left=False)
        )
        kappa = torch.linalg.cond(system)
        rel = (x - exact).norm() / exact.norm()
        assert rel <= 10 * dims * kappa * eps32 + 1e-6, (rel, kappa)


@FAST
@given(p=pairs())
def test_precondition_zero_gradient_gives_zero(p):
    A, B, _, _, damping = p
    hA, hB = precondition(torch.zeros_like(A), torch.zeros_like(B), A, B, damping)
    assert not hA.any() and not hB.any()


@FAST
@given(p=pairs(), copies=st.integers(1, 3))
def test_batched_gram_inverses_match_float64_solve(p, copies):
    """The optimizer's batched path, (B^T B + λI)^-1 for a stack of equal-rank B (and A A^T for
    A), in fp32 on near-singular B: finite, and applied to g within the condition number times
    eps of the float64 solve, like the per-pair ``precondition``."""
    from gradlora.optim.gram import gram_inverses

    A, B, gA, gB, damping = p
    eps32 = torch.finfo(torch.float32).eps
    for mats, g, left in (([B] * copies, gA, True), ([A] * copies, gB, False)):
        inv = gram_inverses([M.float() for M in mats], left=left, damping=damping)
        assert inv.shape == (copies, A.shape[0], A.shape[0]) and torch.isfinite(inv).all()
        F = mats[0].float().double()
        system = (F.T @ F if left else F @ F.T) + damping * torch.eye(
            A.shape[0], dtype=torch.float64
        )
        g32 = g.float()
        got = (inv[-1] @ g32 if left else g32 @ inv[-1]).double()
        exact = torch.linalg.solve(system, g32.double(), left=left)
        kappa = torch.linalg.cond(system)
        rel = (got - exact).norm() / exact.norm()
        dims = F.shape[0] + F.shape[1]
        assert rel <= 10 * dims * kappa * eps32 + 1e-6, (rel, kappa)


def test_rank_deficient_B_with_large_norm_does_not_crash_the_optimizer():
    """Found by the properties above: with B^T B + λI solved in fp32, λ = 1e-6 is lost below the
    rounding of a Gram matrix with entries ~ 100, and a rank-1 B made the solve raise
    "the input matrix is singular" in the middle of training. Now finite, with the damping."""
    from gradlora.optim import PreconditionedAdamW

    B = torch.tensor([[30.0, 60.0], [40.0, 80.0]])  # (2, 2), rank 1: B^T B = [[2500, 5000], ...]
    A = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0]])  # (2, 3), rank 1
    gA, gB = torch.ones(2, 3), torch.ones(2, 2)
    hA, hB = precondition(gA, gB, A, B, 1e-6)
    assert torch.isfinite(hA).all() and torch.isfinite(hB).all()
    # every eigenvalue of (G + λI)^-1 is at most 1/λ, so |ĝ| <= |g| / λ
    assert hA.norm() <= 1e6 * gA.norm() * (1 + 1e-5) and hB.norm() <= 1e6 * gB.norm() * (1 + 1e-5)
    assert hA.norm() > 1e5 * gA.norm()  # the null direction of B^T B does get the 1/λ scale
    A_p, B_p = torch.nn.Parameter(A.clone()), torch.nn.Parameter(B.clone())
    opt = PreconditionedAdamW([{"params": [A_p, B_p], "lora_pairs": True}], lr=1e-3)
    A_p.grad, B_p.grad = gA.clone(), gB.clone()
    opt.step()
    assert torch.isfinite(A_p).all() and torch.isfinite(B_p).all()
