import pytest
import torch
from conftest import assert_resume_is_exact, lora_config, make_batches, tiny_peft, train_steps

import gradlora
from gradlora.optim import (
    PreconditionedAdamW,
    create_preconditioned_optimizer,
    find_lora_pairs,
    precondition,
)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_precondition_formula():
    A, B, gA, gB = rand(3, 7, seed=1), rand(5, 3, seed=2), rand(3, 7, seed=3), rand(5, 3, seed=4)
    lam = 1e-3
    hA, hB = precondition(gA, gB, A, B, lam)
    eye = torch.eye(3, dtype=torch.float64)
    Ad, Bd = A.double(), B.double()
    torch.testing.assert_close(
        hA.double(), torch.linalg.inv(Bd.T @ Bd + lam * eye) @ gA.double(), rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(
        hB.double(), gB.double() @ torch.linalg.inv(Ad @ Ad.T + lam * eye), rtol=1e-4, atol=1e-5
    )
    assert hA.dtype == torch.float32
    bf = precondition(gA.bfloat16(), None, A.bfloat16(), B.bfloat16(), lam)[0]
    assert bf.dtype == torch.float32  # the r x r solve never runs in bf16


def test_damping_keeps_zero_B_finite():
    A = rand(3, 7)
    B = torch.zeros(5, 3)
    hA, hB = precondition(rand(3, 7, seed=5), rand(5, 3, seed=6), A, B, 1e-6)
    assert torch.isfinite(hA).all() and torch.isfinite(hB).all()
    # a full optimizer step from vanilla LoRA's B = 0 is finite too
    A_p, B_p = torch.nn.Parameter(A.clone()), torch.nn.Parameter(B.clone())
    opt = PreconditionedAdamW([{"params": [A_p, B_p], "lora_pairs": True}], lr=1e-2)
    A_p.grad, B_p.grad = torch.zeros_like(A_p), rand(5, 3, seed=7)  # g_A = s B^T g = 0 at B = 0
    opt.step()
    assert torch.isfinite(A_p).all() and torch.isfinite(B_p).all() and B_p.abs().max() > 0


def reference_steps(A, B, grads, lr, betas, eps, wd, lam, bias_correction):
    """Preconditioned AdamW written out in float64, for a single pair over several steps."""
    A, B = A.double().clone(), B.double().clone()
    mA = vA = torch.zeros_like(A)
    mB = vB = torch.zeros_like(B)
    eye = torch.eye(A.shape[0], dtype=torch.float64)
    for t, (gA, gB) in enumerate(grads, start=1):
        hA = torch.linalg.inv(B.T @ B + lam * eye) @ gA.double()
        hB = gB.double() @ torch.linalg.inv(A @ A.T + lam * eye)
        mA, vA = betas[0] * mA + (1 - betas[0]) * hA, betas[1] * vA + (1 - betas[1]) * hA**2
        mB, vB = betas[0] * mB + (1 - betas[0]) * hB, betas[1] * vB + (1 - betas[1]) * hB**2
        c1, c2 = (1 - betas[0] ** t, 1 - betas[1] ** t) if bias_correction else (1.0, 1.0)
        A = A * (1 - lr * wd) - lr * (mA / c1) / ((vA / c2).sqrt() + eps)
        B = B * (1 - lr * wd) - lr * (mB / c1) / ((vB / c2).sqrt() + eps)
    return A, B


@pytest.mark.parametrize("bias_correction", [True, False])
def test_steps_match_hand_computation(bias_correction):
    A0, B0 = rand(3, 7, seed=1), rand(5, 3, seed=2) * 0.1
    grads = [(rand(3, 7, seed=10 + t), rand(5, 3, seed=20 + t)) for t in range(4)]
    hyper = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    A, B = torch.nn.Parameter(A0.clone()), torch.nn.Parameter(B0.clone())
    opt = PreconditionedAdamW(
        [{"params": [A, B], "lora_pairs": True}],
        damping=1e-4,
        bias_correction=bias_correction,
        **hyper,
    )
    for t, (gA, gB) in enumerate(grads, start=1):
        A.grad, B.grad = gA.clone(), gB.clone()
        opt.step()
        assert torch.equal(A.grad, gA)  # .grad is left as autograd wrote it
        if t in (1, 4):  # the first Adam step and a later one
            wantA, wantB = reference_steps(
                A0,
                B0,
                grads[:t],
                hyper["lr"],
                hyper["betas"],
                hyper["eps"],
                hyper["weight_decay"],
                1e-4,
                bias_correction,
            )
            torch.testing.assert_close(A.detach().double(), wantA, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(B.detach().double(), wantB, rtol=1e-5, atol=1e-6)


def test_non_pair_parameters_get_plain_adamw():
    w = torch.nn.Parameter(rand(4, 4))
    ref = torch.nn.Parameter(w.detach().clone())
    ours = PreconditionedAdamW([{"params": [w], "lora_pairs": False}], lr=1e-2, weight_decay=0.05)
    theirs = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.05)
    for t in range(3):
        w.grad = rand(4, 4, seed=t)
        ref.grad = w.grad.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(w, ref)


def test_pairs_come_from_structure_not_parameter_order():
    model, _ = tiny_peft("bert")
    layer = find_lora_pairs(model)[0]
    lora_layer = model.base_model.model.get_submodule(layer.name)
    lora_layer._modules["lora_A"] = lora_layer._modules.pop("lora_A")  # B now precedes A
    names = [n for n, _ in lora_layer.named_parameters() if "lora_" in n]
    assert names.index("lora_B.default.weight") < names.index("lora_A.default.weight")
    opt = create_preconditioned_optimizer(model, lr=1e-3)
    pair_group, other_group = opt.param_groups
    assert pair_group["lora_pairs"] and not other_group["lora_pairs"]
    pairs = list(zip(pair_group["params"][0::2], pair_group["params"][1::2], strict=True))
    for (A, B), pair in zip(pairs, find_lora_pairs(model), strict=True):
        assert A is pair.A and B is pair.B
    assert lora_layer.lora_A["default"].weight is pairs[0][0]
    # the classifier head (modules_to_save) is trained by plain AdamW in the same optimizer
    head = [p for n, p in model.named_parameters() if "classifier" in n and p.requires_grad]
    assert head and all(any(p is q for q in other_group["params"]) for p in head)


def test_two_adapters_only_active_is_paired_or_clear_error():
    model, _ = tiny_peft("llama")
    model.add_adapter("other", lora_config("llama", r=2))
    opt = create_preconditioned_optimizer(model, lr=1e-3)
    paired = {id(p) for p in opt.param_groups[0]["params"]}
    for n, p in model.named_parameters():
        if ".other." in n:
            assert id(p) not in paired and not p.requires_grad
    for n, p in model.named_parameters():
        if ".other." in n:
            p.requires_grad_(True)
    with pytest.raises(gradlora.GradLoraError, match="not part of the active adapter"):
        create_preconditioned_optimizer(model, lr=1e-3)


def test_resume_from_checkpoint_follows_identical_trajectory():
    batches = make_batches("gpt2", n=4)
    model, _ = tiny_peft("gpt2")
    gradlora.initialize(model, batches, method="lora-one", num_batches=2, progress=False)
    assert_resume_is_exact(
        model,
        lambda m: create_preconditioned_optimizer(m, lr=1e-2, weight_decay=0.01),
        tiny_peft("gpt2")[0],
        batches,
        before=3,
        after=4,
    )


def test_lr_scheduler_drives_the_step():
    model, _ = tiny_peft("llama")
    opt = create_preconditioned_optimizer(model, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0 if step >= 1 else 1.0)
    batches = make_batches("llama")
    train_steps(model, opt, batches, 1, sched)
    assert all(g["lr"] == 0.0 for g in opt.param_groups)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    train_steps(model, opt, batches, 2, sched)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n  # lr 0 (and no weight decay): nothing moves


def test_bf16_model_with_fp32_adapters():
    from conftest import tiny_base
    from peft import get_peft_model

    base = tiny_base("llama").to(torch.bfloat16)
    model = get_peft_model(base, lora_config("llama"))  # peft keeps adapters in fp32
    pairs = find_lora_pairs(model)
    assert pairs[0].A.dtype == torch.float32 and pairs[0].B.dtype == torch.float32
    batches = make_batches("llama")
    gradlora.initialize(model, batches, method="lora-one", num_batches=3, progress=False)
    opt = create_preconditioned_optimizer(model, lr=1e-3)
    model.train()
    losses = []
    for i in range(6):
        opt.zero_grad()
        loss = model(**batches[i % 3]).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[3] < losses[0]  # same batch, three steps later
    state = opt.state[pairs[0].A]
    assert state["exp_avg"].dtype == torch.float32 and isinstance(state["step"], int)


def test_works_as_trainer_optimizer(tmp_path):
    from transformers import Trainer, TrainingArguments

    model, _ = tiny_peft("bert")
    rows = [{k: v[i] for k, v in b.items()} for b in make_batches("bert", n=4) for i in range(4)]
    opt = create_preconditioned_optimizer(model, lr=1e-2)
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.1, total_iters=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=rows, optimizers=(opt, sched)).train()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    moved = [
        n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])
    ]
    assert any("lora_A" in n for n in moved) and any("classifier" in n for n in moved)
    assert max(s["step"] for s in opt.state.values()) == 4


def test_batched_gram_inverses_match_the_per_pair_solve():
    from gradlora.optim.gram import gram_inverses

    As = [rand(3, n, seed=i) for i, n in enumerate((7, 4, 9))]
    Bs = [rand(m, 3, seed=10 + i) * 0.1 for i, m in enumerate((5, 8, 2))]
    Bs[1] = torch.zeros(8, 3)  # vanilla init in the same batch
    B_inv = gram_inverses(Bs, left=True, damping=1e-3)
    A_inv = gram_inverses(As, left=False, damping=1e-3)
    for k, (A, B) in enumerate(zip(As, Bs, strict=True)):
        gA, gB = rand(*A.shape, seed=20 + k), rand(*B.shape, seed=30 + k)
        hA, hB = precondition(gA, gB, A, B, 1e-3)
        torch.testing.assert_close(B_inv[k] @ gA, hA, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(gB @ A_inv[k], hB, rtol=1e-4, atol=1e-5)
