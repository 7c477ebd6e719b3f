import pytest
import torch

from gradlora.init.formulas import best_rank_approx, exact_svd, fix_signs, randomized_svd, top_svd


def known_svd(m=40, n=30, k=30, seed=0, decay=0.7):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    S = 10 * decay ** torch.arange(k, dtype=torch.float64)
    return U, S, V, (U * S) @ V.T


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_top_svd_recovers_known_triplets(method):
    U, S, V, M = known_svd()
    Uk, Sk, Vk = top_svd(M, 6, method=method)
    assert Uk.dtype == torch.float64 and Uk.shape == (40, 6) and Vk.shape == (30, 6)
    torch.testing.assert_close(Sk, S[:6])
    # same subspaces, and the same vectors up to the pair's sign
    signs = torch.sign((Uk * U[:, :6]).sum(0))
    torch.testing.assert_close(Uk * signs, U[:, :6])
    torch.testing.assert_close(Vk * signs, V[:, :6])


def test_randomized_matches_exact_on_fp32_and_keeps_global_rng():
    _, _, _, M = known_svd(200, 120, 120, decay=0.8)
    M = M.float()
    state = torch.get_rng_state()
    Ur, Sr, Vr = randomized_svd(M, 8, niter=4, seed=3)
    assert torch.equal(state, torch.get_rng_state())
    Ue, Se, Ve = exact_svd(M, 8)
    torch.testing.assert_close(Sr, Se, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close((Ur * Sr) @ Vr.T, (Ue * Se) @ Ve.T, rtol=1e-4, atol=1e-4)
    # deterministic given the seed
    torch.testing.assert_close(randomized_svd(M, 8, niter=4, seed=3)[0], Ur, rtol=0, atol=0)


def test_fix_signs_is_canonical():
    U, _, V, _ = known_svd()
    flip = torch.tensor([1.0, -1.0] * 15, dtype=torch.float64)
    a = fix_signs(U, V)
    b = fix_signs(U * flip, V * flip)
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    idx = a[0].abs().argmax(0)
    assert (a[0][idx, torch.arange(30)] > 0).all()


def test_best_rank_approx_is_truncation():
    U, S, V, M = known_svd()
    torch.testing.assert_close(best_rank_approx(M, 4), (U[:, :4] * S[:4]) @ V[:, :4].T)


def test_auto_picks_exact_for_small_and_checks_inputs():
    _, _, _, M = known_svd()
    torch.testing.assert_close(top_svd(M, 3)[1], exact_svd(M, 3)[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="k=31"):
        top_svd(M, 31)
    with pytest.raises(ValueError, match="2-D"):
        top_svd(M[None], 2)
    with pytest.raises(ValueError, match="unknown SVD method"):
        top_svd(M, 2, method="qr")
