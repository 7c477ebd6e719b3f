"""gradlora.export_adapter: a plain adapter (scales folded into B, the LoRA-GA offset as rank 2r,
ranks zero-padded, r = lora_alpha) that plain peft loads on the ORIGINAL base with the trained
model's logits, checked before the folder appears."""

from __future__ import annotations

import json

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
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import gradlora
from gradlora.adapter import export
from gradlora.adapter.reference import shared_copy, strip_peft

pytestmark = pytest.mark.usefixtures("one_thread")

OPTIMIZERS = {
    "adamw": lambda m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2),
    "lora-pro": lambda m: gradlora.create_lora_pro_optimizer(m, lr=1e-2),
    "preconditioned": lambda m: gradlora.create_preconditioned_optimizer(m, lr=1e-2),
}


def trained(arch="llama", method="lora-ga", optimizer="adamw", r=4, offset="auto", **kw):
    """(PeftModel after an init and 2 steps, the untouched original base, batches)."""
    model, original = tiny_peft(arch, r=r, **kw)
    batches = make_batches(arch, n=2)
    if method is not None:
        gradlora.initialize(
            model, batches, method=method, num_batches=2, offset=offset, progress=False
        )
    opt = OPTIMIZERS[optimizer](model)
    model.train()
    for batch in batches:
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    return model, original, batches


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


CASES = {  # name: (trained(...) options, the exported rank R)
    "lora-ga weight offset": (dict(method="lora-ga"), 8),
    "lora-ga adapter offset, rsLoRA, LoRA-Pro": (
        dict(method="lora-ga", offset="adapter", use_rslora=True, optimizer="lora-pro"),
        8,
    ),
    "lora-one r=12, rsLoRA, preconditioned": (
        dict(method="lora-one", r=12, use_rslora=True, optimizer="preconditioned"),
        12,
    ),
    "lora-one, rank_pattern": (dict(method="lora-one", rank_pattern={"v_proj": 6}), 6),
    "peft init, LoRA-Pro, r=12, alpha_pattern": (
        dict(method=None, r=12, optimizer="lora-pro", alpha_pattern={"q_proj": 32}),
        12,
    ),
    "gpt2 (Conv1D), lora-ga, rank_pattern": (
        dict(arch="gpt2", method="lora-ga", rank_pattern={"c_fc": 2}),
        8,
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_export_loads_with_plain_peft_on_the_original_base(tmp_path, case):
    """Every init, offset mode, optimizer, rsLoRA, r = 12 and per-module ranks and alphas: the
    config is plain (r = lora_alpha = R, no rsLoRA, no patterns), plain peft on the original base
    gives the trained model's logits, and the live model is untouched."""
    options, rank = CASES[case]
    model, original, batches = trained(**options)
    live = eval_logits(model, batches)
    before = model_snapshot(model)
    returned = gradlora.export_adapter(model, tmp_path / "out")
    assert returned == tmp_path / "out"
    assert_same_snapshot(before, model_snapshot(model))
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]) == (rank, rank, False)
    assert not cfg["rank_pattern"] and not cfg["alpha_pattern"] and cfg["init_lora_weights"] is True
    assert not cfg["modules_to_save"] and cfg["bias"] == "none"
    weights = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert {w.shape[0] for k, w in weights.items() if "lora_A" in k} == {rank}
    assert all(w.dtype == torch.float32 for w in weights.values())
    assert rel(eval_logits(original, batches), live) > 1e-3  # the adapter matters
    plain = PeftModel.from_pretrained(original, tmp_path / "out")
    assert rel(eval_logits(plain, batches), live) < 1e-5


def test_heads_are_refused_naming_the_option_and_the_model_is_untouched(tmp_path):
    model, _, _ = trained("bert", method="lora-one")
    before = model_snapshot(model)
    with pytest.raises(gradlora.GradLoraError, match=r"modules_to_save='separate'.*export_merged"):
        gradlora.export_adapter(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert_same_snapshot(before, model_snapshot(model))


def test_separate_heads_load_into_the_base_before_the_adapter(tmp_path):
    """modules_to_save="separate": the trained classifier goes to modules_to_save.safetensors
    under the base model's names; loaded into the original base, then the adapter with plain
    peft, it gives the trained logits."""
    model, original, batches = trained("bert", method="lora-ga")
    live = eval_logits(model, batches)
    gradlora.export_adapter(model, tmp_path / "out", modules_to_save="separate")
    heads = load_file(tmp_path / "out" / export.HEADS)
    assert sorted(heads) == ["classifier.bias", "classifier.weight"]
    assert not torch.equal(heads["classifier.weight"], original.classifier.weight)
    original.load_state_dict(heads, strict=False)
    plain = PeftModel.from_pretrained(original, tmp_path / "out")
    assert rel(eval_logits(plain, batches), live) < 1e-5


def _flip_one_value(real):
    def save_file(tensors, path, metadata=None):
        if str(path).endswith("adapter_model.safetensors"):
            key = sorted(k for k in tensors if "lora_B" in k)[0]
            tensors = dict(tensors)
            tensors[key] = tensors[key].clone()
            tensors[key].view(-1)[0] += 1e-3
        real(tensors, path, metadata=metadata)

    return save_file


def _unfolded_config(real):
    def plain_config(config, rank, heads_apart):
        cfg = real(config, rank, heads_apart)
        cfg.lora_alpha = 2 * rank  # a reader's scale 2: B' carries s already
        return cfg

    return plain_config


@pytest.mark.parametrize("corruption", ["one weight", "scale"])
def test_a_corrupted_export_is_refused_and_leaves_no_folder(tmp_path, monkeypatch, corruption):
    model, _, _ = trained(method="lora-ga")
    if corruption == "one weight":
        monkeypatch.setattr(export, "save_file", _flip_one_value(export.save_file))
        match = "does not reproduce the trained one"
    else:
        monkeypatch.setattr(export, "plain_config", _unfolded_config(export.plain_config))
        match = "not plain"
    before = model_snapshot(model)
    with pytest.raises(gradlora.GradLoraError, match=match):
        gradlora.export_adapter(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary one
    assert_same_snapshot(before, model_snapshot(model))


def test_the_whole_model_check_catches_what_the_layer_check_cannot(tmp_path, monkeypatch):
    """A base the adapter does not fit (the weight offset not undone in the reference) is
    caught by the logits of plain peft on the original base."""
    model, _, _ = trained(method="lora-ga")
    monkeypatch.setattr(export, "original_base", _without_restore)
    with pytest.raises(gradlora.GradLoraError, match="loaded with plain peft on the original"):
        gradlora.export_adapter(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def _without_restore(inner, adapter, targets):
    ref = shared_copy(inner)
    strip_peft(ref, adapter, heads="original")
    return ref


def test_an_existing_folder_is_replaced_only_with_overwrite(tmp_path):
    model, original, batches = trained(method="lora-one")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    with pytest.raises(gradlora.GradLoraError, match="overwrite=True"):
        gradlora.export_adapter(model, out)
    assert (out / "notes.txt").read_text() == "keep"
    gradlora.export_adapter(model, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(dtype=torch.int8), "dtype"),
        (dict(modules_to_save="drop"), "'refuse' or 'separate'"),
        (dict(probe=[1, 2, 3]), "probe must be"),
        (dict(probe=torch.full((1, 4), 10_000)), "pass probe="),
    ],
)
def test_bad_arguments_are_refused_with_the_fix(tmp_path, bad, match):
    model, _, _ = trained(method=None)
    before = model_snapshot(model)
    with pytest.raises(gradlora.GradLoraError, match=match):
        gradlora.export_adapter(model, tmp_path / "out", **bad)
    assert not (tmp_path / "out").exists()
    assert_same_snapshot(before, model_snapshot(model))


@pytest.mark.parametrize(
    "lora_kw,match",
    [
        (dict(init_lora_weights="pissa"), "rewrote the base"),
        (dict(bias="all"), "export_merged"),
    ],
)
def test_adapters_no_plain_reader_can_apply_are_refused(tmp_path, lora_kw, match):
    model, _ = tiny_peft("llama", **lora_kw)
    with pytest.raises(gradlora.GradLoraError, match=match):
        gradlora.export_adapter(model, tmp_path / "out")
    with pytest.raises(gradlora.GradLoraError, match="PeftModel"):
        gradlora.export_adapter(tiny_base("llama"), tmp_path / "out")


def test_a_caller_probe_is_used(tmp_path, monkeypatch):
    model, _, batches = trained(method="lora-one")
    seen = []
    real = export.logits_of
    monkeypatch.setattr(export, "logits_of", lambda m, b, w: seen.append(b) or real(m, b, w))
    gradlora.export_adapter(model, tmp_path / "out", probe=batches[0])
    assert torch.equal(seen[0]["input_ids"], batches[0]["input_ids"])
    assert "labels" not in seen[0] and len(seen) == 2  # the live model, then plain peft


def test_bf16_base(tmp_path):
    """A bf16 base (LoRA weights in fp32, as peft keeps them), LoRA-GA's weight offset written in
    bf16: plain peft on the original bf16 base gives the trained logits within bf16 noise (the
    check's tolerance there is 5e-2; measured about 1e-2 on this model), and the file may be
    written in bf16 too."""
    model, original = tiny_peft("llama", r=4)
    model.base_model.model.to(torch.bfloat16)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    original.to(torch.bfloat16)
    batches = make_batches("llama", n=2)
    gradlora.initialize(model, batches, method="lora-ga", num_batches=2, progress=False)
    opt = OPTIMIZERS["adamw"](model)
    model.train()
    model(**batches[0]).loss.backward()
    opt.step()
    live = eval_logits(model, batches)
    gradlora.export_adapter(model, tmp_path / "fp32")
    gradlora.export_adapter(model, tmp_path / "bf16", dtype=torch.bfloat16)
    weights = load_file(tmp_path / "bf16" / "adapter_model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.bfloat16}
    for folder in ("fp32", "bf16"):
        plain = PeftModel.from_pretrained(tiny_base("llama").to(torch.bfloat16), tmp_path / folder)
        assert rel(eval_logits(plain, batches).float(), live.float()) < 3e-2


def test_a_skipped_embedding_layer_is_folded_and_padded_too(tmp_path):
    """LoRA on nn.Embedding (skip_unsupported=True: peft's init, plain AdamW) at rank 2 beside
    LoRA-GA layers: its scale is folded into lora_embedding_B and it is padded to rank 8."""
    base = tiny_base("llama")
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "embed_tokens"],
        rank_pattern={"embed_tokens": 2},
    )
    torch.manual_seed(1)
    model = get_peft_model(base, config)
    batches = make_batches("llama", n=2)
    gradlora.initialize(
        model, batches, method="lora-ga", num_batches=2, progress=False, skip_unsupported=True
    )
    opt = OPTIMIZERS["adamw"](model)
    model.train()
    for batch in batches:
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    live = eval_logits(model, batches)
    gradlora.export_adapter(model, tmp_path / "out")
    weights = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert weights["base_model.model.model.embed_tokens.lora_embedding_A"].shape[0] == 8
    plain = PeftModel.from_pretrained(tiny_base("llama"), tmp_path / "out")
    assert rel(eval_logits(plain, batches), live) < 1e-5
