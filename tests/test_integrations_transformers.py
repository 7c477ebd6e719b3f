"""GradLoraCallback / create_optimizer with an unmodified transformers Trainer (tiny models, CPU)."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    lora_config,
    make_batches,
    tiny_base,
    tiny_peft,
)
from peft import PeftModel, get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

import gradlora
import gradlora.integrations.transformers as gtrainer
from gradlora.peft_view import peft_model_of, supported_layers

TESTS = Path(__file__).parent


def rows(arch, n=4, batch=4):
    """The rows of make_batches(arch, n, batch), in order; the default collator stacks them back."""
    return [
        {k: v[i] for k, v in b.items()}
        for b in make_batches(arch, n=n, batch=batch)
        for i in range(batch)
    ]


def args(tmp_path, **kw):
    kw.setdefault("max_steps", 3)
    kw.setdefault("train_sampling_strategy", "sequential")
    kw.setdefault("save_strategy", "no")
    kw.setdefault("learning_rate", 1e-2)
    return TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        report_to="none",
        use_cpu=True,
        logging_strategy="no",
        disable_tqdm=True,
        **kw,
    )


def logits(model, batches):
    was = model.training
    model.eval()
    with torch.no_grad():
        out = torch.cat(
            [model(**{k: v for k, v in b.items() if k != "labels"}).logits for b in batches]
        )
    model.train(was)
    return out


class Probe(TrainerCallback):
    """Records the adapter and base weights at the first step, and logits at every save."""

    def __init__(self, batches):
        self.batches, self.first, self.saved, self.steps, self.substeps = batches, None, {}, 0, 0

    def on_substep_end(self, args, state, control, **kw):
        self.substeps += 1

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kw):
        self.steps += 1
        if self.first is None:
            targets = supported_layers(model)[0]
            ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
            assert all(id(t.A) in ids and id(t.B) in ids for t in targets)  # same tensors
            self.first = {
                t.name: (t.A.detach().clone(), t.B.detach().clone(), t.weight.detach().clone())
                for t in targets
            }

    def on_save(self, args, state, control, model=None, **kw):
        self.saved[state.global_step] = logits(model, self.batches)


def expected_init(arch, method, batches, **kw):
    """A, B and base weights of a fresh copy initialized directly on ``batches``."""
    model, _ = tiny_peft(arch, **kw)
    gradlora.initialize(model, batches, method=method, num_batches=len(batches), progress=False)
    return {
        t.name: (t.A.detach(), t.B.detach(), t.weight.detach()) for t in supported_layers(model)[0]
    }


def assert_same_init(got, want):
    assert got.keys() == want.keys()
    for name in want:
        for x, y in zip(got[name], want[name], strict=True):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6, msg=name)


def plain_peft_logits(tmp_path, jobs):
    """Logits of each (arch, adapter dir) on its ORIGINAL base model, loaded by plain peft in a
    subprocess that never imports gradlora."""
    script = f"""
import sys, torch
sys.path.insert(0, {str(TESTS)!r})
from conftest import tiny_base, make_batches
from peft import PeftModel
jobs = {[(a, str(d)) for a, d in jobs]!r}
outs = []
for arch, path in jobs:
    model = PeftModel.from_pretrained(tiny_base(arch), path).eval()
    with torch.no_grad():
        outs.append(torch.cat([model(**{{k: v for k, v in b.items() if k != "labels"}}).logits
                               for b in make_batches(arch, n=2)]))
torch.save(outs, {str(tmp_path / "plain.pt")!r})
assert "gradlora" not in sys.modules
"""
    subprocess.run(
        [sys.executable, "-c", script], check=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""}
    )
    return torch.load(tmp_path / "plain.pt")


@pytest.fixture
def init_calls(monkeypatch):
    calls = []
    real = gtrainer.initialize

    def counting(*a, **kw):
        calls.append(kw.get("num_batches"))
        return real(*a, **kw)

    monkeypatch.setattr(gtrainer, "initialize", counting)
    return calls


def test_lora_ga_trainer_init_once_before_step_one_and_portable_saves(tmp_path, init_calls, caplog):
    model, _ = tiny_peft("llama", r=2)
    eval_batches = make_batches("llama", n=2)
    callback = gradlora.GradLoraCallback("lora-ga", num_batches=2, progress=False)
    probe = Probe(eval_batches)
    trainer = Trainer(
        model=model,
        args=args(
            tmp_path,
            max_steps=3,
            gradient_accumulation_steps=2,
            save_strategy="steps",
            save_steps=2,
        ),
        train_dataset=rows("llama", n=6),
        callbacks=[callback, probe],
    )
    with caplog.at_level(logging.INFO, logger="gradlora.integrations.transformers"):
        trainer.train()
    # once, on the first 2 micro-batches of the Trainer's dataloader, before the first step
    assert init_calls == [2] and callback.report.num_batches == 2
    assert len(callback.report.layers) == 2 * 7
    assert any("lora-ga init of 14 layers" in r.message for r in caplog.records)
    assert (probe.steps, probe.substeps) == (3, 3)  # 3 optimizer steps of 2 micro-batches
    assert_same_init(
        probe.first, expected_init("llama", "lora-ga", make_batches("llama", n=2), r=2)
    )
    assert not torch.equal(
        supported_layers(model)[0][0].B, probe.first[supported_layers(model)[0][0].name][1]
    )

    trainer.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "checkpoint-2", tmp_path / "final"):
        cfg = json.loads((folder / "adapter_config.json").read_text())
        assert cfg["r"] == 4 and json.loads((folder / "gradlora.json").read_text())["converted"]
    ckpt, final = plain_peft_logits(
        tmp_path, [("llama", tmp_path / "checkpoint-2"), ("llama", tmp_path / "final")]
    )
    torch.testing.assert_close(ckpt, probe.saved[2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(final, logits(model, eval_batches), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ckpt, final)  # the checkpoint is the step-2 model, not the final one
    # load_best_model_at_end's path: a converted checkpoint loaded back into the trained model
    model.load_adapter(str(tmp_path / "checkpoint-2"), "default")
    torch.testing.assert_close(logits(model, eval_batches), probe.saved[2], rtol=1e-5, atol=1e-6)


def test_lora_one_with_preconditioned_optimizer(tmp_path, init_calls):
    model, original = tiny_peft("bert", r=2)  # SEQ_CLS: the classifier head is in modules_to_save
    eval_batches = make_batches("bert", n=2)
    optimizer = gradlora.create_optimizer(model, "preconditioned", lr=1e-2)
    callback = gradlora.GradLoraCallback("lora-one", num_batches=3, progress=False)
    probe = Probe(eval_batches)
    trainer = Trainer(
        model=model,
        args=args(tmp_path, max_steps=4),
        train_dataset=rows("bert", n=4),
        optimizers=(optimizer, None),
        callbacks=[callback, probe],
    )
    trainer.train()
    assert init_calls == [3] and callback.report.method == "lora-one"
    assert_same_init(probe.first, expected_init("bert", "lora-one", make_batches("bert", n=3), r=2))
    assert getattr(trainer.optimizer, "optimizer", trainer.optimizer) is optimizer  # used as given
    assert max(s["step"] for s in optimizer.state.values()) == 4
    trainer.save_model(str(tmp_path / "final"))
    assert json.loads((tmp_path / "final" / "adapter_config.json").read_text())["r"] == 2
    loaded = PeftModel.from_pretrained(original, str(tmp_path / "final"))
    torch.testing.assert_close(
        logits(loaded, eval_batches), logits(model, eval_batches), rtol=1e-5, atol=1e-6
    )


def test_resume_from_checkpoint_restores_lora_ga_without_reinit(tmp_path, init_calls):
    data, eval_batches = rows("llama", n=4), make_batches("llama", n=2)
    model, _ = tiny_peft("llama", r=2)
    first = Trainer(
        model=model,
        args=args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2),
        train_dataset=data,
        callbacks=[gradlora.GradLoraCallback("lora-ga", num_batches=2, progress=False)],
    )
    first.train()
    assert init_calls == [2]

    fresh, _ = tiny_peft("llama", r=2)  # the original base weights, a vanilla adapter
    callback = gradlora.GradLoraCallback("lora-ga", num_batches=2, progress=False)
    resumed = Trainer(
        model=fresh,
        args=args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2),
        train_dataset=data,
        callbacks=[callback],
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert init_calls == [2] and callback.report is None and callback.resumed_at == 2
    for a, b in zip(supported_layers(model)[0], supported_layers(fresh)[0], strict=True):
        torch.testing.assert_close(b.weight, a.weight, rtol=0, atol=0)  # offset again, exactly
        torch.testing.assert_close(b.A, a.A, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(
        logits(fresh, eval_batches), logits(model, eval_batches), rtol=1e-4, atol=1e-5
    )


def test_resume_lora_ga_from_a_plain_checkpoint_is_refused(tmp_path):
    data = rows("llama", n=2)
    model, _ = tiny_peft("llama", r=2)
    Trainer(
        model=model,
        args=args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2),
        train_dataset=data,
    ).train()
    fresh, _ = tiny_peft("llama", r=2)
    trainer = Trainer(
        model=fresh,
        args=args(tmp_path, max_steps=3),
        train_dataset=data,
        callbacks=[gradlora.GradLoraCallback("lora-ga", progress=False)],
    )
    with pytest.raises(gradlora.GradLoraError, match="not gradlora's converted LoRA-GA form"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_second_train_call_does_not_reinit(tmp_path, init_calls):
    model, _ = tiny_peft("gpt2", r=2)
    callback = gradlora.GradLoraCallback("lora-one", num_batches=1, progress=False)
    trainer = Trainer(
        model=model,
        args=args(tmp_path, max_steps=1),
        train_dataset=rows("gpt2", n=1),
        callbacks=[callback],
    )
    trainer.train()
    trained = supported_layers(model)[0][0].B.detach().clone()
    trainer.train()
    assert init_calls == [1]
    assert not torch.equal(supported_layers(model)[0][0].B, trained)  # trained on, not reset


def test_errors_name_the_fix(tmp_path):
    with pytest.raises(gradlora.GradLoraError, match="unknown method"):
        gradlora.GradLoraCallback("lora-xx")
    with pytest.raises(gradlora.GradLoraError, match="unknown option"):
        gradlora.GradLoraCallback("lora-one", direction="ArB2r")
    with pytest.raises(gradlora.GradLoraError, match="get_peft_model"):
        Trainer(
            model=tiny_base("llama"), args=args(tmp_path), callbacks=[gradlora.GradLoraCallback()]
        )
    model, _ = tiny_peft("llama", r=2)
    with pytest.raises(gradlora.GradLoraError, match="choose one of"):
        gradlora.create_optimizer(model, "sgd", lr=1e-3)


def test_unwraps_data_parallel_and_compile_wrappers():
    model, _ = tiny_peft("llama", r=2)
    assert peft_model_of(torch.nn.DataParallel(model)) is model
    assert peft_model_of(torch.compile(model)) is model
    opt = gradlora.create_optimizer(torch.nn.DataParallel(model), "adamw", lr=1e-3)
    assert len(opt.param_groups[0]["params"]) == sum(p.requires_grad for p in model.parameters())


class PeftBuildingTrainer(Trainer):
    """Like TRL's SFTTrainer with peft_config: the Trainer wraps the base model itself."""

    def __init__(self, model, peft_config, **kw):
        super().__init__(model=get_peft_model(model, peft_config), **kw)


def test_trainer_built_peft_model_and_shuffled_data(tmp_path, init_calls):
    seen = []

    def collate(features):
        batch = default_data_collator(features)
        seen.append(batch["input_ids"].clone())
        return batch

    callback = gradlora.GradLoraCallback("lora-one", num_batches=2, progress=False)
    trainer = PeftBuildingTrainer(
        tiny_base("gpt2"),
        lora_config("gpt2", r=2),
        args=args(tmp_path, max_steps=2, train_sampling_strategy="random"),
        train_dataset=rows("gpt2", n=4),
        data_collator=collate,
        callbacks=[callback],
    )
    trainer.train()
    assert init_calls == [2] and callback.report.num_batches == 2
    # the init saw the first two shuffled batches, and training then saw the same two: the
    # init neither skipped data nor shifted the Trainer's shuffle
    assert len(seen) >= 4  # 2 for the init, then training (accelerate reads one batch ahead)
    assert torch.equal(seen[0], seen[2]) and torch.equal(seen[1], seen[3])
    assert not torch.equal(seen[0], seen[1])
