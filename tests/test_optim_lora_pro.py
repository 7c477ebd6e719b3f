import logging

import pytest
import torch
from conftest import (
    assert_resume_is_exact,
    lora_config,
    make_batches,
    tiny_base,
    tiny_peft,
    train_steps,
)
from peft import get_peft_model

import gradlora
from gradlora.optim import LoraProAdamW, create_lora_pro_optimizer, find_lora_pairs, lora_pro_adjust
from gradlora.optim.lora_pro import PairBatch, equivalent_gradient


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def problem(m=7, n=6, r=2, s=1.7, seed=0):
    """A, B, a full gradient g and the LoRA gradients autograd would give for it."""
    A, B, g = rand(r, n, seed=seed), rand(m, r, seed=seed + 1), rand(m, n, seed=seed + 2)
    return A, B, g, s * B.T @ g, s * g @ A.T


def tangent_projection(g, A, B):
    P_B = B @ torch.linalg.inv(B.T @ B) @ B.T
    P_A = A.T @ torch.linalg.inv(A @ A.T) @ A
    return P_B @ g + (torch.eye(len(B), dtype=g.dtype) - P_B) @ g @ P_A


def test_equivalent_gradient_is_the_tangent_projection_and_least_squares_optimum():
    s = 1.7
    A, B, g, gA, gB = problem(s=s)
    new_A, new_B, _ = lora_pro_adjust(gA, gB, A, B, s, damping=1e-12)
    equiv = s * (B @ new_A + new_B @ A)
    torch.testing.assert_close(equiv, tangent_projection(g, A, B), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(
        equivalent_gradient(gA, gB, A, B, s, 1e-12), equiv, rtol=1e-9, atol=1e-9
    )
    # least squares over every (dA, dB): the operator (dA, dB) -> s (B dA + dB A) as a matrix
    (r, n), m = A.shape, B.shape[0]
    cols = []
    for k in range(r * n + m * r):
        x = torch.zeros(r * n + m * r, dtype=torch.float64)
        x[k] = 1
        dA, dB = x[: r * n].view(r, n), x[r * n :].view(m, r)
        cols.append((s * (B @ dA + dB @ A)).flatten())
    op = torch.stack(cols, dim=1)
    best = op @ torch.linalg.lstsq(op, g.flatten()[:, None], driver="gelsd").solution
    torch.testing.assert_close(equiv.flatten(), best[:, 0], rtol=1e-8, atol=1e-8)
    # and it is strictly closer to g than plain LoRA's step direction s (B g_A + g_B A)
    assert (equiv - g).norm() < (s * (B @ gA + gB @ A) - g).norm()


def test_X_solves_sylvester_and_makes_the_distance_stationary():
    s = 0.5
    A, B, _, gA, gB = problem(m=9, n=8, r=3, s=s, seed=3)
    _, _, X = lora_pro_adjust(gA, gB, A, B, s, damping=1e-12)
    BtB_inv = torch.linalg.inv(B.T @ B)
    rhs = -(1 / s**2) * BtB_inv @ gA @ A.T
    torch.testing.assert_close(B.T @ B @ X + X @ A @ A.T, rhs, rtol=1e-9, atol=1e-9)

    a0 = BtB_inv @ gA / s**2
    b0 = (torch.eye(9, dtype=torch.float64) - B @ BtB_inv @ B.T) @ gB
    b0 = b0 @ torch.linalg.inv(A @ A.T) / s**2

    def distance(Xv):
        return (a0 + Xv @ A - gA).square().sum() + (b0 - B @ Xv - gB).square().sum()

    Xv = X.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(distance(Xv), Xv)
    X0 = torch.zeros_like(X, requires_grad=True)
    (grad0,) = torch.autograd.grad(distance(X0), X0)
    assert grad.norm() < 1e-9 * grad0.norm()
    assert distance(X) < distance(torch.zeros_like(X))


def test_batched_pairs_equal_the_one_pair_reference():
    shapes = [(7, 5), (4, 9), (7, 5), (12, 3)]
    As = [rand(3, n, seed=i, dtype=torch.float32) for i, (_, n) in enumerate(shapes)]
    Bs = [rand(m, 3, seed=10 + i, dtype=torch.float32) for i, (m, _) in enumerate(shapes)]
    gAs = [rand(3, n, seed=20 + i, dtype=torch.float32) for i, (_, n) in enumerate(shapes)]
    gBs = [rand(m, 3, seed=30 + i, dtype=torch.float32) for i, (m, _) in enumerate(shapes)]
    ss = [2.0, 0.5, 1.0, 4.0]
    batch = PairBatch(As, Bs, ss, damping=1e-6)
    new_A, new_B = batch.adjust(gAs, gBs)
    for i in range(len(shapes)):
        ref_A, ref_B, _ = lora_pro_adjust(gAs[i], gBs[i], As[i], Bs[i], ss[i], 1e-6)
        torch.testing.assert_close(new_A[i], ref_A, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(new_B[i], ref_B, rtol=1e-4, atol=1e-5)
        ref_eq = equivalent_gradient(gAs[i], gBs[i], As[i], Bs[i], ss[i], 1e-6)
        torch.testing.assert_close(
            batch.equivalent(i, gAs[i], gBs[i]), ref_eq, rtol=1e-4, atol=1e-5
        )


def test_zero_B_gives_finite_updates_and_vanilla_lora_trains():
    A, B = rand(3, 7, dtype=torch.float32), torch.zeros(5, 3)
    gB = rand(5, 3, seed=4, dtype=torch.float32)
    new_A, new_B, X = lora_pro_adjust(torch.zeros_like(A), gB, A, B, 2.0)
    assert torch.isfinite(new_A).all() and torch.isfinite(new_B).all() and torch.isfinite(X).all()
    assert new_B.abs().max() > 0 and torch.equal(new_A, torch.zeros_like(A))

    model, _ = tiny_peft("llama")  # peft's default init: B = 0
    assert all((p.B == 0).all() for p in find_lora_pairs(model))
    batches = make_batches("llama")
    for mode in ("efficient", "full"):
        model, _ = tiny_peft("llama")
        opt = create_lora_pro_optimizer(model, lr=1e-2, mode=mode)
        losses = train_steps(model, opt, batches, 9)
        assert all(torch.isfinite(torch.tensor(losses))), mode
        assert losses[6] < losses[0], mode  # same batch, two passes later


def _kron_sylvester(M1, M2, C):
    """X with M1 X + X M2 = C by the Kronecker form (row-major vec): independent of eigh."""
    r = M1.shape[0]
    eye = torch.eye(r, dtype=M1.dtype)
    op = torch.kron(M1, eye) + torch.kron(eye, M2.T.contiguous())
    return torch.linalg.solve(op, C.flatten()).view(r, r)


def _hand_adjust(gA, gB, A, B, s, d):
    eye = torch.eye(A.shape[0], dtype=A.dtype)
    B_inv, A_inv = torch.linalg.inv(B.T @ B + d * eye), torch.linalg.inv(A @ A.T + d * eye)
    X = _kron_sylvester(B.T @ B + d * eye, A @ A.T + d * eye, -(B_inv @ gA @ A.T) / s**2)
    proj = torch.eye(B.shape[0], dtype=A.dtype) - B @ B_inv @ B.T
    return B_inv @ gA / s**2 + X @ A, proj @ gB @ A_inv / s**2 - B @ X, B_inv, A_inv, proj


def hand_steps(A, B, grads, s, mode, lr, betas, eps, wd, d):
    """LoRA-Pro AdamW written out from ALGORITHMS.md 4, float64, one pair."""
    A, B = A.clone(), B.clone()
    mom = {}
    for t, (gA, gB) in enumerate(grads, start=1):
        c1, c2 = 1 - betas[0] ** t, 1 - betas[1] ** t
        adj_A, adj_B, B_inv, A_inv, proj = _hand_adjust(gA, gB, A, B, s, d)
        if mode == "efficient":
            targets = {"A": adj_A, "B": adj_B}
        else:
            equiv = s * (B @ (B_inv @ gA / s**2) + (proj @ gB @ A_inv / s**2) @ A)
            targets = {"W": equiv}
        steps = {}
        for k, g in targets.items():
            m, v = mom.get(k, (0.0, 0.0))
            m, v = betas[0] * m + (1 - betas[0]) * g, betas[1] * v + (1 - betas[1]) * g**2
            mom[k] = (m, v)
            steps[k] = (m / c1) / ((v / c2).sqrt() + eps)
        if mode == "full":
            D = steps["W"]
            steps["A"], steps["B"], *_ = _hand_adjust(s * B.T @ D, s * D @ A.T, A, B, s, d)
        A = A * (1 - lr * wd) - lr * steps["A"]
        B = B * (1 - lr * wd) - lr * steps["B"]
    return A, B


@pytest.mark.parametrize("mode", ["efficient", "full"])
def test_first_and_second_step_match_hand_computation(mode):
    A0, B0 = rand(3, 8, seed=1), rand(6, 3, seed=2) * 0.3
    grads = [(rand(3, 8, seed=10 + t), rand(6, 3, seed=20 + t)) for t in range(2)]
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    A, B = torch.nn.Parameter(A0.clone()), torch.nn.Parameter(B0.clone())
    group = {"params": [A, B], "lora_pairs": True, "scalings": [1.5]}
    opt = LoraProAdamW([group], damping=1e-4, mode=mode, **hyper)
    for t, (gA, gB) in enumerate(grads, start=1):
        A.grad, B.grad = gA.clone(), gB.clone()
        opt.step()
        assert torch.equal(A.grad, gA)  # .grad is left as autograd wrote it
        want_A, want_B = hand_steps(A0, B0, grads[:t], 1.5, mode, d=1e-4, **_hand(hyper))
        torch.testing.assert_close(A.detach(), want_A, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(B.detach(), want_B, rtol=1e-9, atol=1e-10)
    if mode == "full":
        assert opt.state[A]["exp_avg"].shape == (6, 8) and not opt.state[B]
    else:
        assert opt.state[A]["exp_avg"].shape == A.shape


def _hand(hyper):
    return dict(lr=hyper["lr"], betas=hyper["betas"], eps=hyper["eps"], wd=hyper["weight_decay"])


@pytest.mark.parametrize("mode", ["efficient", "full"])
def test_resume_follows_identical_trajectory(mode):
    model, _ = tiny_peft("gpt2")
    assert_resume_is_exact(
        model,
        lambda m: create_lora_pro_optimizer(m, lr=1e-2, mode=mode, weight_decay=0.01),
        tiny_peft("gpt2")[0],
        make_batches("gpt2", n=4),
        before=3,
        after=3,
    )


def test_scaling_is_read_from_each_layer():
    model, _ = tiny_peft("llama", r=4, use_rslora=True, lora_alpha=8)
    opt = create_lora_pro_optimizer(model, lr=1e-3)
    assert opt.param_groups[0]["scalings"] == [pytest.approx(8 / 4**0.5)] * len(
        find_lora_pairs(model)
    )
    model, _ = tiny_peft("llama", r=4, lora_alpha=8, rank_pattern={"q_proj": 2})
    opt = create_lora_pro_optimizer(model, lr=1e-3)
    by_rank = {
        p.A.shape[0]: s
        for p, s in zip(find_lora_pairs(model), opt.param_groups[0]["scalings"], strict=True)
    }
    assert by_rank == {2: pytest.approx(4.0), 4: pytest.approx(2.0)}


def test_plain_loop_with_clipping_trains_adapter_and_head_never_base():
    model, _ = tiny_peft("bert")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    head = {
        n: p.detach().clone()
        for n, p in model.named_parameters()
        if "classifier" in n and p.requires_grad
    }
    opt = create_lora_pro_optimizer(model, lr=1e-2, weight_decay=0.1)
    losses = train_steps(model, opt, make_batches("bert"), 6, clip=0.5)
    assert all(torch.isfinite(torch.tensor(losses)))
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
        if n in head:
            assert not torch.equal(p, head[n]), n


def test_full_mode_logs_its_extra_memory(caplog):
    model, _ = tiny_peft("llama")
    with caplog.at_level(logging.WARNING, logger="gradlora"):
        create_lora_pro_optimizer(model, lr=1e-3, mode="full")
    expected = sum(2 * 4 * p.B.shape[0] * p.A.shape[1] for p in find_lora_pairs(model)) / 2**20
    assert f"{expected:.1f} MiB" in caplog.text
    with pytest.raises(gradlora.GradLoraError, match="unknown LoRA-Pro mode"):
        create_lora_pro_optimizer(model, lr=1e-3, mode="fast")
    with pytest.raises(gradlora.GradLoraError, match="damping"):
        create_lora_pro_optimizer(model, lr=1e-3, damping=0.0)
    with pytest.raises(gradlora.GradLoraError, match="scalings"):
        LoraProAdamW([{"params": [rand(2, 3), rand(4, 2)], "lora_pairs": True}])


def test_lora_ga_init_then_lora_pro():
    batches = make_batches("llama", n=4)
    model, _ = tiny_peft("llama")
    gradlora.initialize(model, batches, method="lora-ga", num_batches=2, progress=False)
    opt = create_lora_pro_optimizer(model, lr=5e-3)
    losses = train_steps(model, opt, batches, 9)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[8] < losses[0]  # same batch, two passes later


def test_bf16_base_with_fp32_adapters():
    model = get_peft_model(tiny_base("llama").to(torch.bfloat16), lora_config("llama"))
    opt = create_lora_pro_optimizer(model, lr=1e-2)
    losses = train_steps(model, opt, make_batches("llama"), 6)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[3] < losses[0]
    assert opt.state[find_lora_pairs(model)[0].A]["exp_avg"].dtype == torch.float32


def test_works_as_trainer_optimizer(tmp_path):
    from transformers import Trainer, TrainingArguments

    model, _ = tiny_peft("bert")
    rows = [{k: v[i] for k, v in b.items()} for b in make_batches("bert", n=4) for i in range(4)]
    opt = create_lora_pro_optimizer(model, lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        max_grad_norm=1.0,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=rows, optimizers=(opt, None)).train()
    moved = [
        n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])
    ]
    assert any("lora_A" in n for n in moved) and any("lora_B" in n for n in moved)
    assert any("classifier" in n for n in moved)
    assert max(s["step"] for s in opt.state.values()) == 4


def test_create_optimizer_by_name():
    model, _ = tiny_peft("llama")
    opt = gradlora.create_optimizer(model, "lora-pro", lr=1e-3, mode="full")
    assert isinstance(opt, LoraProAdamW) and opt.param_groups[0]["mode"] == "full"
