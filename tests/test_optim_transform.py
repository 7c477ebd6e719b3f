"""The pair transforms in front of a plain torch AdamW (one process): the same steps as
gradlora's own pair optimizers, also through a Trainer; the misuses refused."""

from __future__ import annotations

import pytest
import torch
from conftest import make_batches, tiny_peft

import gradlora
from gradlora.peft_view import supported_layers

LR, WD = 1e-2, 0.01


def nonzero_b(model):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for t in supported_layers(model)[0]:
            t.B.copy_(0.1 * torch.randn(t.B.shape, generator=g))
    return model


def factors(model):
    return [(t.A.detach().clone(), t.B.detach().clone()) for t in supported_layers(model)[0]]


@pytest.mark.parametrize("name", ["lora-pro", "preconditioned"])
@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_transform_then_adamw_equals_the_pair_optimizer(name, clip):
    """Three steps: torch AdamW behind attach_pair_transform equals LoraProAdamW (efficient) /
    PreconditionedAdamW with the same lr, betas, eps, weight decay (clipping before both)."""
    batches = make_batches("llama", n=3)
    ours = nonzero_b(tiny_peft("llama", r=3)[0])
    ref = nonzero_b(tiny_peft("llama", r=3)[0])
    opt = torch.optim.AdamW(
        [p for p in ours.parameters() if p.requires_grad], lr=LR, weight_decay=WD
    )
    transform = gradlora.attach_pair_transform(opt, name, model=ours)
    ref_opt = gradlora.create_optimizer(ref, name, lr=LR, weight_decay=WD)
    start = factors(ref)
    for batch in batches:
        for model, o in ((ours, opt), (ref, ref_opt)):
            o.zero_grad()
            model(**batch).loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            o.step()
    for (A, B), (A_ref, B_ref), (A0, _) in zip(factors(ours), factors(ref), start, strict=True):
        assert torch.allclose(A, A_ref, rtol=1e-5, atol=1e-7)
        assert torch.allclose(B, B_ref, rtol=1e-5, atol=1e-7)
        assert (A_ref - A0).norm() > 1e-3 * A0.norm()  # the steps moved A: not vacuous
    transform.remove()
    assert "step" not in opt.__dict__  # the optimizer's own step again


def test_misuses_are_refused():
    model = nonzero_b(tiny_peft("llama", r=3)[0])
    pair_opt = gradlora.create_lora_pro_optimizer(model, lr=LR)
    with pytest.raises(gradlora.GradLoraError, match="would do it twice"):
        gradlora.attach_pair_transform(pair_opt, "lora-pro", model=model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    with pytest.raises(gradlora.GradLoraError, match="mode='full'"):
        gradlora.attach_pair_transform(opt, "lora-pro", model=model, mode="full")
    with pytest.raises(gradlora.GradLoraError, match="unknown pair transform"):
        gradlora.attach_pair_transform(opt, "sgd", model=model)
    with pytest.raises(gradlora.GradLoraError, match="needs model="):
        gradlora.attach_pair_transform(opt, "lora-pro")
    gradlora.attach_pair_transform(opt, "lora-pro", model=model)
    with pytest.raises(gradlora.GradLoraError, match="already has"):
        gradlora.attach_pair_transform(opt, "preconditioned", model=model)


def test_pair_optimizer_stepping_foreign_parameters_is_refused():
    """What DeepSpeed does to a client optimizer: its groups' parameters replaced by flat
    partitions. The pair optimizer refuses to step them (it would be plain AdamW)."""
    model = nonzero_b(tiny_peft("llama", r=3)[0])
    opt = gradlora.create_preconditioned_optimizer(model, lr=LR)
    flat = torch.nn.Parameter(torch.zeros(10))
    flat.grad = torch.ones(10)
    opt.param_groups[0]["params"] = [flat]
    with pytest.raises(gradlora.GradLoraError, match="client optimizer"):
        opt.step()
    assert torch.equal(flat, torch.zeros(10))


def test_trainer_callback_transform_equals_the_pair_optimizer(tmp_path):
    """Trainer + GradLoraCallback("lora-one", transform="preconditioned") with the Trainer's own
    AdamW ends where the same Trainer with gradlora's PreconditionedAdamW does (no DeepSpeed);
    passing both (the optimizer and the transform) is refused: it would precondition twice."""
    from test_integrations_transformers import args, rows
    from transformers import Trainer

    def run(transform, optimizer_of):
        model, _ = tiny_peft("llama", r=2)
        callback = gradlora.GradLoraCallback(
            "lora-one", num_batches=2, progress=False, transform=transform
        )
        optimizers = (optimizer_of(model), None) if optimizer_of else (None, None)
        trainer = Trainer(
            model=model,
            args=args(tmp_path, max_steps=3, weight_decay=0.0, adam_epsilon=1e-8),
            train_dataset=rows("llama", n=3),
            optimizers=optimizers,
            callbacks=[callback],
        )
        trainer.train()
        return factors(model)

    got = run("preconditioned", None)
    want = run(None, lambda m: gradlora.create_optimizer(m, "preconditioned", lr=1e-2))
    for (A, B), (A_ref, B_ref) in zip(got, want, strict=True):
        assert torch.allclose(A, A_ref, rtol=1e-5, atol=1e-7)
        assert torch.allclose(B, B_ref, rtol=1e-5, atol=1e-7)
    with pytest.raises(gradlora.GradLoraError, match="twice"):
        run("preconditioned", lambda m: gradlora.create_optimizer(m, "preconditioned", lr=1e-2))


def test_a_pair_no_gradient_reached_is_left_alone():
    """Like LoraProAdamW: a pair whose A and B got no gradient keeps none (the AdamW behind skips
    it), the others are transformed."""
    model = nonzero_b(tiny_peft("llama", r=3)[0])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    transform = gradlora.attach_pair_transform(opt, "lora-pro", model=model)
    model(**make_batches("llama", n=1)[0]).loss.backward()
    first = transform.pairs[0]
    first.A.grad, first.B.grad = None, None
    before = [p.B.grad.clone() for p in transform.pairs[1:]]
    opt.step()
    assert first.A.grad is None and first.B.grad is None
    assert all(
        not torch.equal(p.B.grad, b) for p, b in zip(transform.pairs[1:], before, strict=True)
    )
