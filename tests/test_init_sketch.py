"""Sketch mode: reconstruction math on known spectra, and gradient="sketch" against exact."""

import pytest
import torch
from conftest import (
    assert_same_snapshot,
    make_batches,
    model_snapshot,
    reference_gradients,
    tiny_peft,
)

import gradlora
from gradlora.init.capture import capture
from gradlora.init.formulas import (
    captured_energy,
    exact_svd,
    factored_svd,
    gaussian_test_matrix,
    sketch_svd,
)
from gradlora.init.sketch import SketchAccumulator, sketch_sizes, sketch_svds
from gradlora.peft_view import supported_layers


def planted(m, n, spectrum, seed=0):
    """G = U diag(spectrum) V^T (fp64) with random orthonormal U (m, k), V (n, k)."""
    g = torch.Generator().manual_seed(seed)
    k = len(spectrum)
    U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    return (U * torch.as_tensor(spectrum, dtype=torch.float64)) @ V.T


def single_pass(G, k, s, seed=0):
    m, n = G.shape
    omega = gaussian_test_matrix(n, s, seed).double()
    psi = gaussian_test_matrix(2 * s + 1, m, seed + 1).double()
    return sketch_svd(G @ omega, psi @ G, psi, k)


def projector(M):
    Q = torch.linalg.qr(M.double()).Q
    return Q @ Q.T


# --- the math ---


def test_test_matrix_is_seeded_and_private():
    state = torch.get_rng_state()
    a = gaussian_test_matrix(7, 3, seed=5)
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(a, gaussian_test_matrix(7, 3, seed=5))
    assert not torch.equal(a, gaussian_test_matrix(7, 3, seed=6))
    assert a.dtype == torch.float32 and a.shape == (7, 3)


def test_factored_svd_is_the_svd_of_the_product():
    g = torch.Generator().manual_seed(0)
    L = torch.randn(30, 6, generator=g, dtype=torch.float64)
    R = torch.randn(20, 6, generator=g, dtype=torch.float64)
    U, S, V = factored_svd(L, R, 4)
    Ue, Se, Ve = exact_svd(L @ R.T, 4)
    torch.testing.assert_close(S, Se)
    torch.testing.assert_close(U, Ue)  # same canonical signs
    torch.testing.assert_close(V, Ve)
    torch.testing.assert_close(U.T @ U, torch.eye(4, dtype=torch.float64))


@pytest.mark.parametrize("rank", [1, 5, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_single_pass_is_exact_for_rank_at_most_sketch_width(rank, seed):
    G = planted(60, 40, torch.linspace(5, 1, rank).tolist(), seed=seed)
    k = min(rank, 4)
    U, S, V = single_pass(G, k, s=8, seed=seed + 10)
    Ue, Se, Ve = exact_svd(G, k)
    torch.testing.assert_close(S, Se, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(U, Ue, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(V, Ve, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_single_pass_error_and_energy_on_decaying_spectra(seed):
    """Decaying spectra (rank 40 > sketch width): the rank-k output's error stays within a
    small factor of the best rank-k error, and nearly all the top-k energy is captured."""
    spectrum = (0.6 ** torch.arange(40.0)).tolist()
    G = planted(80, 50, spectrum, seed=seed)
    k, s = 4, 8
    U, S, V = single_pass(G, k, s, seed=100 + seed)
    tail = torch.tensor(spectrum[k:], dtype=torch.float64).square().sum().sqrt()
    err = (G - (U * S) @ V.T).norm()
    assert err <= 2.0 * tail, (err / tail).item()
    left, both = captured_energy(G, U, V)
    assert 0.99 < both <= left <= 1 + 1e-12
    # and a flat spectrum is where a width-8 sketch cannot find the top 4: the check bites
    flat = planted(80, 50, [1.0] * 40, seed=seed)
    assert captured_energy(flat, *single_pass(flat, k, s, seed=seed)[::2])[1] < 0.9


def test_captured_energy_is_one_for_exact_subspaces_only():
    G = planted(30, 20, [4, 3, 2, 1], seed=3)
    U, _, V = exact_svd(G, 2)
    assert captured_energy(G, U, V) == pytest.approx((1.0, 1.0))
    U3, _, V3 = exact_svd(G, 3)
    swapped = captured_energy(G, U3[:, 1:], V3[:, 1:])[1]  # pairs 2 and 3 instead of 1 and 2
    assert swapped == pytest.approx((9 + 4) / (16 + 9))


def test_sketch_sizes():
    assert sketch_sizes(4, (100, 50), None) == (32, 65)  # default s = 8k, l = 2s + 1
    assert sketch_sizes(4, (100, 50), 2) == (6, 13)
    assert sketch_sizes(8, (12, 50), None) == (12, 12)  # capped by the layer


# --- the model plumbing ---


def few_token_batches(arch, tokens):
    """One batch of one sequence of ``tokens`` tokens: every layer's G has rank <= tokens
    (tokens - 1 for the causal LMs, whose last token has no label)."""
    return make_batches(arch, n=1, batch=1, seq=tokens)


@pytest.mark.parametrize("passes", [1, 2, 3])
def test_sketch_is_exact_on_a_planted_low_rank_gradient(arch, passes):
    """With 5 tokens each G = sum_t delta_t^T x_t has rank <= 5 <= sketch width 6, so the
    sketch must give the exact top-4 triplets (also for GPT-2's transposed Conv1D)."""
    model, original = tiny_peft(arch, r=2)
    batches = few_token_batches(arch, tokens=5)
    targets = supported_layers(model)[0]
    G = reference_gradients(original, batches, [t.name for t in targets])
    sketches, used = sketch_svds(
        model,
        targets,
        batches,
        {t.name: 4 for t in targets},
        progress=False,
        passes=passes,
        oversample=2,
    )
    assert used == 1 and set(sketches) == set(G)
    for t in targets:
        U, S, V = sketches[t.name].svd()
        assert U.shape == (t.shape[0], 4) and V.shape == (t.shape[1], 4)
        assert torch.linalg.matrix_rank(G[t.name]) <= 5
        Ue, Se, Ve = exact_svd(G[t.name], 4)
        scale = Se[0]
        torch.testing.assert_close(S, Se, rtol=0, atol=1e-4 * scale.item())
        torch.testing.assert_close((U * S) @ V.T, (Ue * Se) @ Ve.T, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sketch_lora_ga_keeps_outputs_and_matches_exact_subspaces(arch):
    """7 tokens: rank-6 gradients (5 for q), so the top 4 = 2r singular pairs are well defined
    and within the default sketch width (capped at the tiny layers' 16..128 dimensions)."""
    batches = few_token_batches(arch, tokens=7)
    exact, _ = tiny_peft(arch, r=2)
    sketched, _ = tiny_peft(arch, r=2)
    rep_e = gradlora.initialize(exact, batches, progress=False, gradient="exact")
    eval_batches = make_batches(arch, n=2)
    sketched.eval()
    with torch.no_grad():
        before = [sketched(**b).logits for b in eval_batches]
    rep_s = gradlora.initialize(sketched, batches, progress=False, gradient="sketch")
    assert rep_e.gradient == "exact" and rep_s.gradient == "sketch"
    assert rep_s.gradient_options["passes"] >= 1
    sketched.eval()
    with torch.no_grad():
        after = [sketched(**b).logits for b in eval_batches]
    for a, b in zip(before, after, strict=True):
        assert (a - b).abs().max() < 1e-5 * a.abs().max()
    for te, ts in zip(supported_layers(exact)[0], supported_layers(sketched)[0], strict=True):
        assert ts.B.abs().max() > 0 and ts.init_factors() is not None
        torch.testing.assert_close(projector(ts.A.T), projector(te.A.T), rtol=0, atol=1e-4)
        torch.testing.assert_close(projector(ts.B), projector(te.B), rtol=0, atol=1e-4)
        s_e = torch.tensor(rep_e.layers[te.name].singular_values)
        s_s = torch.tensor(rep_s.layers[ts.name].singular_values)
        assert s_e[3] > 1e-2 * s_e[0]  # the check of B's subspace is well posed
        torch.testing.assert_close(s_s, s_e, rtol=1e-4, atol=1e-4 * s_e[0].item())


def test_sketch_lora_one_matches_exact_on_planted_gradient():
    batches = few_token_batches("gpt2", tokens=3)  # rank <= 2 = r
    exact, _ = tiny_peft("gpt2", r=2)
    sketched, _ = tiny_peft("gpt2", r=2)
    kw = dict(method="lora-one", progress=False)
    gradlora.initialize(exact, batches, gradient="exact", **kw)
    gradlora.initialize(sketched, batches, gradient="sketch", sketch_passes=1, **kw)
    for te, ts in zip(supported_layers(exact)[0], supported_layers(sketched)[0], strict=True):
        ref = te.B @ te.A
        torch.testing.assert_close(ts.B @ ts.A, ref, rtol=0, atol=1e-4 * ref.abs().max().item())


def test_sketch_is_deterministic_given_the_seed():
    batches = make_batches("llama", n=2)
    results = []
    for seed in (0, 0, 1):
        model, _ = tiny_peft("llama", r=2)
        gradlora.initialize(
            model,
            batches,
            progress=False,
            gradient="sketch",
            sketch_passes=1,
            sketch_oversample=0,  # s = 2r: the tiny layers' flat spectra are not all captured
            seed=seed,
        )
        results.append(
            [(t.A.detach().clone(), t.weight.detach().clone()) for t in supported_layers(model)[0]]
        )
    for (a0, w0), (a1, w1) in zip(results[0], results[1], strict=True):
        assert torch.equal(a0, a1) and torch.equal(w0, w1)
    # the flat random-model spectra make a different test matrix give a different answer
    assert any(
        not torch.equal(a0, a2) for (a0, _), (a2, _) in zip(results[0], results[2], strict=True)
    )


def test_more_passes_capture_more_energy():
    model, original = tiny_peft("gpt2", r=2)
    batches = make_batches("gpt2", n=2)
    targets = supported_layers(model)[0]
    G = reference_gradients(original, batches, [t.name for t in targets])
    mean_energy = []
    for passes in (1, 2, 4):
        sk, _ = sketch_svds(
            model,
            targets,
            batches,
            {t.name: 4 for t in targets},
            progress=False,
            passes=passes,
            oversample=2,
        )
        energies = [captured_energy(G[n], *sk[n].svd()[::2])[1] for n in G]
        mean_energy.append(sum(energies) / len(energies))
    assert mean_energy[0] < mean_energy[1] < mean_energy[2]
    assert mean_energy[2] > 0.95


def test_no_weight_requires_grad_during_capture_and_all_restored(arch):
    model, _ = tiny_peft(arch)
    model.eval()
    head = [p for p in model.parameters() if p.requires_grad][0]
    head.grad = torch.ones_like(head)
    before = model_snapshot(model)
    rng = torch.get_rng_state()
    seen = []

    def loss_fn(m, batch):
        seen.append([p.requires_grad for p in m.parameters()])
        return m(**batch).loss

    targets = supported_layers(model)[0]
    accs, used = capture(
        model,
        targets,
        make_batches(arch),
        loss_fn=loss_fn,
        progress=False,
        make_accumulator=lambda t: SketchAccumulator(
            t, right=torch.ones(t.shape[1], 2), left=torch.ones(2, t.shape[0])
        ),
    )
    assert used == 3 and len(seen) == 3
    assert not any(any(flags) for flags in seen)  # nothing requires grad, not even the head
    assert all(a.hits == 3 and a.GR.abs().sum() > 0 and a.LG.abs().sum() > 0 for a in accs.values())
    assert torch.equal(rng, torch.get_rng_state())
    assert_same_snapshot(before, model_snapshot(model))  # flags, modes and the head's .grad


def test_sketch_accumulator_sums_match_exact_products():
    model, original = tiny_peft("gpt2")
    batches = make_batches("gpt2", n=2)
    targets = supported_layers(model)[0]
    G = reference_gradients(original, batches, [t.name for t in targets])
    g = torch.Generator().manual_seed(0)
    mats = {
        t.name: (torch.randn(t.shape[1], 3, generator=g), torch.randn(5, t.shape[0], generator=g))
        for t in targets
    }
    accs, used = capture(
        model,
        targets,
        batches,
        progress=False,
        make_accumulator=lambda t: SketchAccumulator(t, *mats[t.name]),
    )
    for name, acc in accs.items():
        GR, LG = acc.result(used)
        right, left = mats[name]
        torch.testing.assert_close(GR, G[name] @ right, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(LG, left @ G[name], rtol=1e-4, atol=1e-6)


def test_bf16_model_sketch_keeps_fp32_and_outputs():
    model, _ = tiny_peft("llama")
    model.to(torch.bfloat16)
    batches = make_batches("llama")
    rep = gradlora.initialize(model, batches, progress=False, gradient="sketch")
    assert rep.gradient == "sketch"
    t = supported_layers(model)[0][0]
    assert t.weight.dtype == torch.bfloat16 and t.init_factors() is not None
    assert all(torch.isfinite(torch.tensor(lr.singular_values)).all() for lr in rep.layers.values())


def _fails_untouched(model, match, batches, **kw):
    kw.setdefault("gradient", "sketch")
    before = model_snapshot(model)
    with pytest.raises(gradlora.GradLoraError, match=match):
        gradlora.initialize(model, batches, progress=False, **kw)
    assert_same_snapshot(before, model_snapshot(model))


@pytest.mark.parametrize("passes", [1, 2])
def test_sketch_errors_leave_model_untouched(passes):
    model, _ = tiny_peft("llama")
    batches = make_batches("llama")
    kw = dict(sketch_passes=passes)
    _fails_untouched(model, "empty", [], **kw)
    _fails_untouched(
        model, "loss is nan", batches, loss_fn=lambda m, b: m(**b).loss * float("nan"), **kw
    )
    _fails_untouched(
        model,
        r"no gradient reached layer\(s\) \['model.layers.1",
        batches,
        loss_fn=lambda m, b: m(**b, output_hidden_states=True).hidden_states[1].pow(2).mean(),
        **kw,
    )
    _fails_untouched(model, "exactly zero", batches, loss_fn=lambda m, b: m(**b).loss * 0, **kw)

    def infinite_gradient(m, b):  # finite loss (0), but d sqrt|u| / du at u = 0 is inf
        logits = m(**b).logits
        return (logits - logits.detach()).abs().sqrt().sum()

    _fails_untouched(model, "NaN/inf", batches, loss_fn=infinite_gradient, **kw)
    _fails_untouched(
        model,
        "does not depend on any LoRA target",
        batches,
        loss_fn=lambda m, b: torch.zeros(()),
        **kw,
    )


def test_bad_gradient_options():
    model, _ = tiny_peft("llama")
    batches = make_batches("llama")
    _fails_untouched(model, "unknown gradient='fast'", batches, gradient="fast")
    _fails_untouched(model, "sketch_passes must be", batches, sketch_passes=0)
    _fails_untouched(model, "sketch_oversample must be", batches, sketch_oversample=-1)
    _fails_untouched(model, "sketch_memory must be", batches, gradient="sketch", sketch_memory=0)
