"""The misuses a new user makes in the first hour: each gives the right result or a clear
GradLoraError with the model untouched, never a silently wrong result."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    assert_same_snapshot,
    eval_logits,
    make_batches,
    model_snapshot,
    tiny_base,
    tiny_peft,
)
from peft import PeftModel
from transformers import Trainer, TrainingArguments

import gradlora
from gradlora.init.initialize import InitReport
from gradlora.peft_view import supported_layers


def _rows(n=2, batch=4):
    return [
        {k: v[i] for k, v in b.items()}
        for b in make_batches("llama", n=n, batch=batch)
        for i in range(batch)
    ]


def _trainer(tmp_path, model, **kw):
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_steps=2,
        train_sampling_strategy="sequential",
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        logging_strategy="no",
        disable_tqdm=True,
    )
    return Trainer(model=model, args=args, train_dataset=_rows(), **kw)


@pytest.mark.parametrize("cls", [gradlora.PreconditionedAdamW, gradlora.LoraProAdamW])
def test_trainer_built_optimizer_class_is_refused_not_plain_adamw(tmp_path, cls):
    """The Trainer passes plain parameter groups: the optimizer cannot pair A with B, so it
    refuses instead of silently training plain AdamW."""
    model, _ = tiny_peft("llama", r=2)
    before = model_snapshot(model)
    trainer = _trainer(tmp_path, model, optimizer_cls_and_kwargs=(cls, {"lr": 1e-3}))
    with pytest.raises(gradlora.GradLoraError, match="OptimizerFactory"):
        trainer.train()
    assert_same_snapshot(before, model_snapshot(model))


@pytest.mark.parametrize("name", ["preconditioned", "lora-pro"])
def test_optimizer_factory_lets_the_trainer_build_the_real_optimizer(tmp_path, name):
    """OptimizerFactory(name) through optimizer_cls_and_kwargs trains exactly as the optimizer
    built from the model with create_optimizer and passed as Trainer(optimizers=...)."""
    kwargs = {"lr": 1e-2, "weight_decay": 0.0}
    built, _ = tiny_peft("llama", r=2)
    by_factory = _trainer(
        tmp_path / "a", built, optimizer_cls_and_kwargs=(gradlora.OptimizerFactory(name), kwargs)
    )
    by_factory.train()
    inner = getattr(by_factory.optimizer, "optimizer", by_factory.optimizer)
    assert any(g["lora_pairs"] for g in inner.param_groups)
    ref, _ = tiny_peft("llama", r=2)
    opt = gradlora.create_optimizer(ref, name, **kwargs)
    _trainer(tmp_path / "b", ref, optimizers=(opt, None)).train()
    for a, b in zip(supported_layers(built)[0], supported_layers(ref)[0], strict=True):
        assert not torch.equal(a.B, torch.zeros_like(a.B))  # it trained
        torch.testing.assert_close(a.A, b.A, rtol=0, atol=0)
        torch.testing.assert_close(a.B, b.B, rtol=0, atol=0)


def test_manual_lora_ga_init_makes_peft_save_pretrained_portable(tmp_path):
    """After a manual LoRA-GA init (base offset), peft's own save_pretrained writes an adapter
    that plain peft loads on the ORIGINAL base with the same logits."""
    model, _ = tiny_peft("llama", r=2)
    batches = make_batches("llama")
    gradlora.initialize(model, batches, method="lora-ga", num_batches=2, progress=False)
    with torch.no_grad():
        for t in supported_layers(model)[0]:
            t.B.add_(0.01)  # as if trained: the adapter is no longer its init
    model.save_pretrained(tmp_path / "plain")
    loaded = PeftModel.from_pretrained(tiny_base("llama"), tmp_path / "plain")
    torch.testing.assert_close(
        eval_logits(loaded, batches), eval_logits(model, batches), rtol=1e-4, atol=1e-5
    )


def test_uncollated_examples_are_refused_with_the_fix():
    """A datasets.Dataset or a list of examples yields rows of lists, not tensors."""
    model, _ = tiny_peft("llama", r=2)
    before = model_snapshot(model)
    rows = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}] * 2
    with pytest.raises(gradlora.GradLoraError, match="not collated.*DataLoader"):
        gradlora.initialize(model, rows, num_batches=2, progress=False)
    assert_same_snapshot(before, model_snapshot(model))


def test_inference_mode_is_named_as_the_cause():
    model, _ = tiny_peft("llama", r=2)
    before = model_snapshot(model)
    with torch.inference_mode(), pytest.raises(gradlora.GradLoraError, match="inference_mode"):
        gradlora.initialize(model, make_batches("llama"), num_batches=2, progress=False)
    assert_same_snapshot(before, model_snapshot(model))


def test_summary_says_batches_per_rank():
    one = InitReport(method="lora-ga", options={}, num_batches=6)
    two = InitReport(method="lora-ga", options={}, num_batches=6, ranks=2)
    assert "from 6 batches (" in one.summary() and "ranks" not in one.summary()
    assert "from 6 batches (3 on each of 2 ranks)" in two.summary()


@pytest.mark.parametrize("offset", ["weight", "adapter"])
def test_disabled_adapter_is_the_original_model_after_lora_ga(offset):
    """TRL's DPO takes its reference model from ``with model.disable_adapter():``; after a
    LoRA-GA init that must be the original model, not the offset base W - s B0 A0."""
    model, _ = tiny_peft("llama", r=2)
    batches = make_batches("llama")
    original = eval_logits(tiny_base("llama"), batches)
    gradlora.initialize(model, batches, num_batches=2, offset=offset, progress=False)
    with model.disable_adapter():
        torch.testing.assert_close(eval_logits(model, batches), original, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(eval_logits(model, batches), original, rtol=1e-5, atol=1e-6)
