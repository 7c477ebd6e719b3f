"""Defaults that follow the reference codes (issue "value"): LoRA-Pro's damping, the randomized
SVD's accuracy on slowly decaying spectra, and LoRA-GA's learning-rate-matched scale."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_batches, tiny_peft

import gradlora
from gradlora.init.formulas import LoraGA, LoraOne, exact_svd, init_from_gradient
from gradlora.optim import LoraProAdamW
from gradlora.peft_view import supported_layers

# --- LoRA-Pro: a float64 transcription of the reference optimizer ------------------------------


def _sylvester(P: torch.Tensor, Q: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """X with P X + X Q = C, by the Kronecker form (independent of gradlora's eigen path)."""
    r = P.shape[0]
    eye = torch.eye(r, dtype=P.dtype)
    K = torch.kron(eye, P) + torch.kron(Q.T.contiguous(), eye)
    return torch.linalg.solve(K, C.T.reshape(-1)).reshape(r, r).T


def _reference_adjust(g_A, g_B, A, B, s, delta=1e-8):
    """The reference's adjusted gradients: pinv(Gram + delta I), Sylvester on the raw Grams."""
    m, r = B.shape
    BtB, AAt = B.T @ B, A @ A.T
    BtB_inv = torch.linalg.pinv(BtB + delta * torch.eye(r, dtype=B.dtype))
    AAt_inv = torch.linalg.pinv(AAt + delta * torch.eye(r, dtype=B.dtype))
    X = _sylvester(BtB, AAt, -(1 / s**2) * BtB_inv @ g_A @ A.T)
    new_A = (1 / s**2) * BtB_inv @ g_A + X @ A
    proj = torch.eye(m, dtype=B.dtype) - B @ BtB_inv @ B.T
    new_B = (1 / s**2) * proj @ g_B @ AAt_inv - B @ X
    return new_A, new_B, BtB_inv, AAt_inv


def _adam(state, g, t, betas=(0.9, 0.999), eps=1e-8):
    m, v = state.setdefault("m", torch.zeros_like(g)), state.setdefault("v", torch.zeros_like(g))
    m.mul_(betas[0]).add_((1 - betas[0]) * g)
    v.mul_(betas[1]).add_((1 - betas[1]) * g * g)
    return (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)


def _problem(seed=0, m=48, n=32, N=64):
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(m, n, generator=g, dtype=torch.float64) / math.sqrt(n)
    X = torch.randn(n, N, generator=g, dtype=torch.float64)
    Y = torch.randn(m, N, generator=g, dtype=torch.float64)
    return W0, X, Y


def _full_grad(W, X, Y):
    """dL/dW of L = 0.5 ||W X - Y||^2 / N."""
    return (W @ X - Y) @ X.T / X.shape[1]


def _run(mode, steps, lr, damping=None, r=4, s=2.0):
    """(ours, reference): s B A after each step, from B = 0 and a kaiming-like A."""
    W0, X, Y = _problem()
    A0 = torch.randn(
        r, W0.shape[1], generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    A0 /= math.sqrt(W0.shape[1])
    A = torch.nn.Parameter(A0.clone())
    B = torch.nn.Parameter(torch.zeros(W0.shape[0], r, dtype=torch.float64))
    kw = {} if damping is None else {"damping": damping}
    opt = LoraProAdamW(
        [{"params": [A, B], "lora_pairs": True, "scalings": [s]}], lr=lr, mode=mode, **kw
    )
    rA, rB = A0.clone(), torch.zeros_like(B.detach())
    state_A, state_B, state_full = {}, {}, {}
    ours, ref = [], []
    for t in range(1, steps + 1):
        G = _full_grad(W0 + s * B.detach() @ A.detach(), X, Y)
        A.grad, B.grad = s * B.detach().T @ G, s * G @ A.detach().T
        opt.step()
        ours.append(s * B.detach() @ A.detach())
        G = _full_grad(W0 + s * rB @ rA, X, Y)
        g_A, g_B = s * rB.T @ G, s * G @ rA.T
        if mode == "efficient":
            new_A, new_B, _, _ = _reference_adjust(g_A, g_B, rA, rB, s)
            dA, dB = _adam(state_A, new_A, t), _adam(state_B, new_B, t)
        else:
            _, _, BtB_inv, AAt_inv = _reference_adjust(g_A, g_B, rA, rB, s)
            proj = torch.eye(rB.shape[0], dtype=rB.dtype) - rB @ BtB_inv @ rB.T
            g_eq = (rB @ BtB_inv @ g_A + proj @ g_B @ AAt_inv @ rA) / s
            D = _adam(state_full, g_eq, t)
            dA, dB, _, _ = _reference_adjust(s * rB.T @ D, s * D @ rA.T, rA, rB, s)
        rA, rB = rA - lr * dA, rB - lr * dB
        ref.append(s * rB @ rA)
    return ours, ref


def _worst(ours, ref):
    return max(((a - b).norm() / b.norm()).item() for a, b in zip(ours, ref, strict=True))


@pytest.mark.parametrize("mode", ["efficient", "full"])
def test_lora_pro_default_damping_follows_the_reference_from_b_zero(mode):
    ours, ref = _run(mode, steps=20, lr=2e-5)
    assert _worst(ours, ref) < 1e-3


def test_the_old_absolute_damping_did_not():
    """The previous default 1e-6 dominates B^T B near B = 0: full mode left the reference."""
    ours, ref = _run("full", steps=20, lr=2e-5, damping=1e-6)
    assert _worst(ours, ref) > 1e-2


# --- randomized SVD on a slowly decaying spectrum ---------------------------------------------


def test_lora_one_default_init_matches_the_exact_svd_on_a_slow_spectrum():
    """1024 x 640 (randomized under svd='auto'), sigma_i ~ i^-0.5."""
    g = torch.Generator().manual_seed(0)
    m, n, r = 1024, 640, 8
    U, _ = torch.linalg.qr(torch.randn(m, n, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    G = (U * torch.arange(1, n + 1).float() ** -0.5) @ V.T
    A, B, _ = init_from_gradient(G, r, LoraOne())
    A_exact, B_exact, _ = init_from_gradient(G, r, LoraOne(svd="exact"))
    want = B_exact @ A_exact
    assert ((B @ A - want).norm() / want.norm()).item() < 1e-3
    _, S, _ = exact_svd(G, r + 1)
    assert (S[r - 1] / S[r]).item() < 1.07  # a slow spectrum indeed: no gap to help the sketch


# --- LoRA-GA's learning-rate-matched scale ------------------------------------------------------


def _first_adamw_deltas(model, batches, lr=1e-3):
    targets = supported_layers(model)[0]
    before = {t.name: t.scaling * t.B.detach() @ t.A.detach() for t in targets}
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0
    )
    model.train()
    (sum(model(**b).loss for b in batches) / len(batches)).backward()
    opt.step()
    return {t.name: t.scaling * t.B.detach() @ t.A.detach() - before[t.name] for t in targets}


def test_matched_scale_moves_the_first_adamw_step_as_far_as_vanilla_lora():
    batches = make_batches("llama", n=2)
    vanilla, _ = tiny_peft("llama", r=2)
    matched, _ = tiny_peft("llama", r=2)
    G = gradlora.estimate_gradients(matched, batches, num_batches=2, progress=False)
    gradlora.initialize(matched, batches, num_batches=2, scale="matched", progress=False)
    d_lora = _first_adamw_deltas(vanilla, batches)
    d_ga = _first_adamw_deltas(matched, batches)
    ratios = torch.tensor([(d_ga[k].norm() / d_lora[k].norm()).item() for k in d_lora])
    assert 0.8 <= ratios.median().item() <= 1.25, ratios
    assert ((ratios >= 0.5) & (ratios <= 2.0)).all(), ratios
    for name, dW in d_ga.items():  # the step stays in G's top-2r row and column spaces
        r2 = 2 * 2
        U, _, V = exact_svd(G[name], r2)
        outside = dW - U @ (U.T @ dW) - (dW @ V) @ V.T + U @ (U.T @ dW @ V) @ V.T
        assert (outside.norm() / dW.norm()).item() < 1e-2, name
        off = d_lora[name] - U @ (U.T @ d_lora[name]) - (d_lora[name] @ V) @ V.T
        off = off + U @ (U.T @ d_lora[name] @ V) @ V.T
        assert (off.norm() / d_lora[name].norm()).item() > 0.1  # vanilla LoRA's does not


def test_matched_scale_formula():
    ga = LoraGA(scale="matched")
    assert ga.scale_factor(300, 100) == pytest.approx(math.sqrt(300 / 1200))
    assert LoraGA().scale_factor(256, 64) == pytest.approx(256**0.25 / 4)
