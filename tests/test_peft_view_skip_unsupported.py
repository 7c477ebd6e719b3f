"""LoRA on layers gradlora does not support (peft's lora.Embedding, lora.Conv2d): a clear error
by default, and with ``skip_unsupported=True`` those layers stay at peft's init and train with
plain AdamW while the rest is initialized and paired."""

import logging

import pytest
import torch
from conftest import assert_same_snapshot, make_batches, model_snapshot, tiny_base
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

import gradlora
from gradlora import GradLoraError
from gradlora.optim import LoraProAdamW, PreconditionedAdamW
from gradlora.peft_view import supported_layers

EMBED = "model.embed_tokens"
LINEAR = ["q_proj", "v_proj"]


def llama_with_embedding(r: int = 2, seed: int = 0, targets=("embed_tokens", *LINEAR)):
    base = tiny_base("llama", seed)
    torch.manual_seed(seed + 1)
    return get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets)))


def embedding_lora(model) -> list[torch.nn.Parameter]:
    layer = model.get_submodule(f"base_model.model.{EMBED}")
    return [layer.lora_embedding_A["default"], layer.lora_embedding_B["default"]]


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc = torch.nn.Linear(4 * 4 * 4, 8)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def conv_model():
    torch.manual_seed(0)
    return get_peft_model(ConvNet(), LoraConfig(r=2, lora_alpha=4, target_modules=["conv", "fc"]))


def conv_batches(n=3):
    g = torch.Generator().manual_seed(5)
    return [torch.randn(4, 3, 6, 6, generator=g) for _ in range(n)]


def conv_loss(model, x):
    return (model(x) ** 2).mean()


def skip_records(caplog):
    return [r for r in caplog.records if r.name == "gradlora" and "skip_unsupported" in r.message]


# --- the default: one clear error, nothing touched ---------------------------------------------


def test_default_init_refuses_naming_the_layer_and_both_fixes():
    model = llama_with_embedding()
    before = model_snapshot(model)
    with pytest.raises(GradLoraError) as err:
        gradlora.initialize(model, make_batches("llama"), num_batches=2, progress=False)
    msg = str(err.value)
    assert f"'{EMBED}', an nn.Embedding layer (peft lora.Embedding)" in msg
    assert "nn.Linear and transformers' Conv1D" in msg
    assert "remove it from LoraConfig.target_modules" in msg
    assert "skip_unsupported=True" in msg and "plain AdamW" in msg
    assert "wrapped by" not in msg
    assert_same_snapshot(before, model_snapshot(model))

    conv = conv_model()
    before = model_snapshot(conv)
    with pytest.raises(GradLoraError, match=r"'conv', an nn\.Conv2d layer \(peft lora\.Conv2d\)"):
        gradlora.initialize(conv, conv_batches(), loss_fn=conv_loss, progress=False)
    assert_same_snapshot(before, model_snapshot(conv))


def test_default_error_lists_every_unsupported_layer():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.Conv2d(4, 4, 1),
        torch.nn.Flatten(),
        torch.nn.Linear(64, 2),
    )
    model = get_peft_model(net, LoraConfig(r=2, target_modules=["0", "1", "3"]))
    with pytest.raises(GradLoraError, match="2 layers .*'0', .*; '1', .*remove them .*leave them"):
        gradlora.initialize(model, conv_batches(), loss_fn=conv_loss, progress=False)


@pytest.mark.parametrize(
    "make",
    [
        lambda m: gradlora.create_preconditioned_optimizer(m, lr=1e-3),
        lambda m: gradlora.create_lora_pro_optimizer(m, lr=1e-3),
        lambda m: gradlora.create_optimizer(m, "preconditioned", lr=1e-3),
        lambda m: gradlora.create_optimizer(m, "lora-pro", lr=1e-3),
    ],
)
def test_default_optimizers_refuse_naming_the_option(make):
    with pytest.raises(GradLoraError, match=f"'{EMBED}', an nn.Embedding .*skip_unsupported=True"):
        make(llama_with_embedding())


# --- initialize with skip_unsupported=True -------------------------------------------------------


@pytest.mark.parametrize("method", ["lora-ga", "lora-one"])
def test_init_skips_embedding_and_initializes_the_rest(method, caplog):
    batches = make_batches("llama")
    model = llama_with_embedding()
    emb_before = [p.detach().clone() for p in embedding_lora(model)]
    base_emb = model.get_submodule(f"base_model.model.{EMBED}").get_base_layer().weight
    base_emb_before = base_emb.detach().clone()
    with caplog.at_level(logging.WARNING, logger="gradlora"):
        report = gradlora.initialize(
            model, batches, method=method, num_batches=3, progress=False, skip_unsupported=True
        )
    records = skip_records(caplog)  # before this test's own find_targets below logs again
    for p, q in zip(embedding_lora(model), emb_before, strict=True):
        assert torch.equal(p, q)  # exactly peft's init
    assert torch.equal(base_emb, base_emb_before)
    assert report.skipped == [EMBED] and EMBED not in report.layers
    targets = supported_layers(model, skip_unsupported=True)[0]
    assert {t.name for t in targets} == set(report.layers) and len(targets) == 4
    assert all(t.B.abs().sum() > 0 for t in targets)  # no longer peft's zeros

    # the same init as on a model without the embedding LoRA (its peft init adds nothing)
    plain = llama_with_embedding(targets=LINEAR)
    gradlora.initialize(plain, batches, method=method, num_batches=3, progress=False)
    want = {t.name: t for t in supported_layers(plain)[0]}
    for t in targets:
        torch.testing.assert_close(t.B, want[t.name].B)
        torch.testing.assert_close(t.weight, want[t.name].weight)

    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert EMBED in records[0].message and "nn.Embedding" in records[0].message


def test_init_skips_conv2d_with_a_loss_fn():
    model = conv_model()
    conv = model.base_model.model.conv
    conv_before = [p.detach().clone() for p in conv.parameters()]
    fc_weight = model.base_model.model.fc.get_base_layer().weight.detach().clone()
    report = gradlora.initialize(
        model, conv_batches(), loss_fn=conv_loss, progress=False, skip_unsupported=True
    )
    assert report.skipped == ["conv"] and list(report.layers) == ["fc"]
    for p, q in zip(conv.parameters(), conv_before, strict=True):
        assert torch.equal(p, q)
    (fc,) = supported_layers(model, skip_unsupported=True)[0]
    assert fc.B.abs().sum() > 0
    assert not torch.equal(fc.weight, fc_weight)  # LoRA-GA offset the Linear's base weight


@pytest.mark.parametrize("case", ["dora", "merged", "quantized"])
def test_dora_merged_and_quantized_stay_errors_with_skip(case):
    if case == "dora":
        model = get_peft_model(
            tiny_base("llama"), LoraConfig(r=2, use_dora=True, target_modules=["embed_tokens"])
        )
        match = "DoRA"
    else:
        model = llama_with_embedding()
        layer = model.get_submodule(f"base_model.model.{EMBED}")
        if case == "merged":
            layer.merge()
            match = "merged adapters"
        else:
            base = layer.get_base_layer()
            base.weight = torch.nn.Parameter(
                torch.zeros(base.weight.shape, dtype=torch.int8), requires_grad=False
            )
            match = "quantized"
    before = model_snapshot(model)
    with pytest.raises(GradLoraError, match=match):
        gradlora.initialize(model, make_batches("llama"), progress=False, skip_unsupported=True)
    assert_same_snapshot(before, model_snapshot(model))
    with pytest.raises(GradLoraError, match=match):
        gradlora.create_preconditioned_optimizer(model, lr=1e-3, skip_unsupported=True)


# --- the optimizers with skip_unsupported=True ---------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda m, **kw: gradlora.create_preconditioned_optimizer(m, **kw),
        lambda m, **kw: gradlora.create_lora_pro_optimizer(m, **kw),
        lambda m, **kw: gradlora.create_optimizer(m, "preconditioned", **kw),
        lambda m, **kw: gradlora.create_optimizer(m, "lora-pro", **kw),
    ],
)
def test_optimizers_pair_the_rest_and_give_skipped_layers_plain_adamw(make, caplog):
    model = llama_with_embedding()
    hyper = dict(lr=1e-2, weight_decay=0.01)
    with caplog.at_level(logging.WARNING, logger="gradlora"):
        opt = make(model, skip_unsupported=True, **hyper)
    assert len(skip_records(caplog)) == 1 and EMBED in skip_records(caplog)[0].message

    targets = supported_layers(model, skip_unsupported=True)[0]
    pair_group, other_group = opt.param_groups
    assert pair_group["lora_pairs"] and not other_group["lora_pairs"]
    assert [id(p) for p in pair_group["params"]] == [id(p) for t in targets for p in (t.A, t.B)]
    emb = embedding_lora(model)
    assert [id(p) for p in other_group["params"]] == [id(p) for p in emb]

    # references: torch AdamW on copies of the embedding LoRA, and the pair optimizer on copies
    # of the pairs alone (built from explicit groups, no model)
    emb_ref = [torch.nn.Parameter(p.detach().clone()) for p in emb]
    adamw = torch.optim.AdamW(emb_ref, **hyper)
    pair_ref = [torch.nn.Parameter(p.detach().clone()) for p in pair_group["params"]]
    group = {"params": pair_ref, "lora_pairs": True}
    if isinstance(opt, LoraProAdamW):
        ref = LoraProAdamW([{**group, "scalings": [t.scaling for t in targets]}], **hyper)
    else:
        assert isinstance(opt, PreconditionedAdamW)
        ref = PreconditionedAdamW([group], **hyper)

    for batch in make_batches("llama", n=2):
        opt.zero_grad()
        model(**batch).loss.backward()
        assert all(p.grad is not None for p in emb) and emb[0].grad.abs().sum() > 0
        for p, q in zip(emb + pair_group["params"], emb_ref + pair_ref, strict=True):
            q.grad = p.grad.clone()
        opt.step()
        adamw.step()
        ref.step()
    for p, q in zip(emb + pair_group["params"], emb_ref + pair_ref, strict=True):
        torch.testing.assert_close(p, q)
    # and the pairs were not plain AdamW
    assert not torch.allclose(targets[0].B, _plain_adamw_B(model, targets[0], hyper))


def _plain_adamw_B(model, target, hyper):
    """B of ``target`` after the same two steps taken by plain torch AdamW on a fresh copy."""
    fresh = llama_with_embedding()
    params = [p for p in fresh.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, **hyper)
    for batch in make_batches("llama", n=2):
        opt.zero_grad()
        fresh(**batch).loss.backward()
        opt.step()
    return fresh.get_submodule(target.module_name).lora_B["default"].weight


def test_create_optimizer_adamw_ignores_the_option_riemannian_refuses_it():
    model = llama_with_embedding()
    opt = gradlora.create_optimizer(model, "adamw", lr=1e-3, skip_unsupported=True)
    assert isinstance(opt, torch.optim.AdamW)
    with pytest.raises(GradLoraError, match="skip_unsupported .*riemannian"):
        gradlora.create_optimizer(model, "riemannian", lr=1e-3, skip_unsupported=True)


# --- Trainer callback, saving and loading --------------------------------------------------------


def test_callback_option_and_portable_save_with_a_skipped_embedding(tmp_path):
    model = llama_with_embedding()
    rows = [{k: v[i] for k, v in b.items()} for b in make_batches("llama", n=3) for i in range(4)]
    callback = gradlora.GradLoraCallback("lora-ga", num_batches=2, skip_unsupported=True)
    opt = gradlora.create_optimizer(model, "preconditioned", lr=1e-2, skip_unsupported=True)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
    )
    emb_init = [p.detach().clone() for p in embedding_lora(model)]
    trainer = Trainer(
        model=model, args=args, train_dataset=rows, callbacks=[callback], optimizers=(opt, None)
    )
    trainer.train()
    assert callback.report.skipped == [EMBED] and len(callback.report.layers) == 4
    assert not any(torch.equal(p, q) for p, q in zip(embedding_lora(model), emb_init, strict=True))

    # the rank-2r portable form loads with plain peft on the ORIGINAL base model
    trainer.save_model(str(tmp_path / "final"))
    batches = make_batches("llama", n=2)
    want = _logits(model, batches)
    plain = PeftModel.from_pretrained(tiny_base("llama"), str(tmp_path / "final"))
    torch.testing.assert_close(_logits(plain, batches), want, rtol=1e-4, atol=1e-5)

    # and gradlora.load_adapter splits it back into the trained rank-r adapter plus the offset
    again = gradlora.load_adapter(tiny_base("llama"), tmp_path / "final")
    for p, q in zip(embedding_lora(again), embedding_lora(model), strict=True):
        assert torch.equal(p, q)
    torch.testing.assert_close(_logits(again, batches), want, rtol=1e-4, atol=1e-5)


def _logits(model, batches):
    model.eval()
    with torch.no_grad():
        return torch.cat(
            [model(**{k: v for k, v in b.items() if k != "labels"}).logits for b in batches]
        )


def test_conv2d_skipped_by_lora_ga_saves_and_loads_portably(tmp_path):
    model = conv_model()
    batches = conv_batches()
    gradlora.initialize(
        model, batches, loss_fn=conv_loss, num_batches=3, progress=False, skip_unsupported=True
    )
    opt = gradlora.create_lora_pro_optimizer(model, lr=1e-2, skip_unsupported=True)
    for x in batches:  # train every LoRA weight, the skipped conv's included
        opt.zero_grad()
        conv_loss(model, x).backward()
        opt.step()
    assert model.base_model.model.conv.lora_B["default"].weight.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        want = torch.cat([model(x) for x in batches])
    gradlora.save_adapter(model, tmp_path / "adapter")

    torch.manual_seed(0)
    plain = PeftModel.from_pretrained(ConvNet(), str(tmp_path / "adapter")).eval()
    torch.manual_seed(0)
    again = gradlora.load_adapter(ConvNet(), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.cat([plain(x) for x in batches]), want)
        torch.testing.assert_close(torch.cat([again(x) for x in batches]), want)
    for p, q in zip(
        again.base_model.model.conv.parameters(),
        model.base_model.model.conv.parameters(),
        strict=True,
    ):
        assert torch.equal(p, q)  # trained conv LoRA back at rank r, base untouched
