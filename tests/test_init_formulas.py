import math

import pytest
import torch
from test_init_svd import known_svd

from gradlora import GradLoraError
from gradlora.adapter.offset import offset_weight
from gradlora.init.formulas import (
    LoraGA,
    LoraOne,
    check_rank,
    init_from_gradient,
    make_method,
)


@pytest.mark.parametrize(
    "direction,a_cols,b_cols",
    [
        ("ArB2r", slice(0, 3), slice(3, 6)),
        ("A2rBr", slice(3, 6), slice(0, 3)),
        ("ArBr", slice(1, 6, 2), slice(0, 6, 2)),
    ],
)
@pytest.mark.parametrize("scale", ["stable", "unit"])
def test_lora_ga_factors_match_formula(direction, a_cols, b_cols, scale):
    U, S, V, G = known_svd(40, 30)
    A0, B0, S_top = init_from_gradient(G, 3, LoraGA(direction=direction, scale=scale, gamma=16))
    c = 40**0.25 / 4 if scale == "stable" else 1.0
    torch.testing.assert_close(S_top, S[:6])
    signs = torch.sign((B0 * U[:, b_cols]).sum(0))  # each pair's sign is free
    torch.testing.assert_close(B0 * signs, c * U[:, b_cols])
    signs = torch.sign((A0 * V[:, a_cols].T).sum(1))
    torch.testing.assert_close(A0 * signs[:, None], c * V[:, a_cols].T)


@pytest.mark.parametrize("direction", ["ArB2r", "A2rBr", "ArBr"])
def test_lora_ga_first_sgd_step_is_best_rank_2r_step(direction):
    """s (B1 A1 - B0 A0) = -eta s^2 c^2 [G]_2r + eta^2 s gB gA, exactly (A, B get s B^T G, s G A^T)."""
    U, S, V, G = known_svd(40, 30)
    r, s, eta, gamma = 3, 2.0 / math.sqrt(3), 1e-2, 16
    A0, B0, _ = init_from_gradient(G, r, LoraGA(direction=direction, gamma=gamma))
    gA, gB = s * B0.T @ G, s * G @ A0.T
    A1, B1 = A0 - eta * gA, B0 - eta * gB
    c2 = math.sqrt(40) / gamma
    G2r = (U[:, :6] * S[:6]) @ V[:, :6].T
    expected = -eta * s**2 * c2 * G2r + eta**2 * s * gB @ gA
    torch.testing.assert_close(s * (B1 @ A1 - B0 @ A0), expected)


def test_lora_one_factors_match_formula():
    U, S, V, G = known_svd(40, 30)
    r, gamma = 4, 128.0
    A0, B0, S_top = init_from_gradient(G, r, LoraOne(gamma=gamma))
    torch.testing.assert_close(S_top, S[:r])
    # SVD of -G is (-U) S V^T
    norm = math.sqrt(S[0].item() * gamma)
    signs = torch.sign((B0 * -U[:, :r]).sum(0))
    torch.testing.assert_close(B0 * signs, -U[:, :r] * S[:r].sqrt() / norm)
    torch.testing.assert_close(A0 * signs[:, None], S[:r].sqrt()[:, None] * V[:, :r].T / norm)
    Gr = (U[:, :r] * S[:r]) @ V[:, :r].T
    torch.testing.assert_close(B0 @ A0, -Gr / (gamma * S[0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_offset_weight_cancels_adapter(dtype):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(20, 10, generator=g).to(dtype)
    A0, B0 = torch.randn(3, 10, generator=g).to(dtype), torch.randn(20, 3, generator=g).to(dtype)
    W2 = offset_weight(W, A0, B0, 0.5)
    assert W2.dtype == dtype
    exact = W.double() - 0.5 * B0.double() @ A0.double()
    tol = 1e-6 if dtype == torch.float32 else 2**-8
    assert ((W2.double() - exact).abs() <= tol * exact.abs().clamp_min(1)).all()


def test_make_method_and_rank_errors():
    assert make_method("lora-ga", gamma=64).gamma == 64
    assert make_method("lora-one").gamma == 128
    with pytest.raises(GradLoraError, match="unknown method 'lora-xx'"):
        make_method("lora-xx")
    with pytest.raises(GradLoraError, match=r"unknown option\(s\) stable_gama .*gamma"):
        make_method("lora-ga", stable_gama=4)
    with pytest.raises(GradLoraError, match="direction='BrA2r'"):
        make_method("lora-ga", direction="BrA2r")
    with pytest.raises(GradLoraError, match="gamma must be a positive"):
        make_method("lora-one", gamma=0)
    with pytest.raises(GradLoraError, match=r"needs 8 singular vectors .* 'q'.*rank_pattern"):
        check_rank(LoraGA(), 4, (16, 6), "q")
    check_rank(LoraOne(), 4, (16, 6), "q")  # r <= min(m, n) suffices for LoRA-One
