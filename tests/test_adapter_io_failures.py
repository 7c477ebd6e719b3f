"""``load_adapter`` on missing, corrupt or foreign checkpoints: a clear GradLoraError and the
base model exactly as it was (no LoRA layers injected, flags restored)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import (
    assert_same_snapshot,
    lora_config,
    make_batches,
    model_snapshot,
    tiny_base,
    tiny_peft,
)
from conftest import (
    eval_logits as logits,
)

import gradlora
from gradlora.peft_view import supported_layers

# --- load_adapter: missing, corrupt or foreign checkpoints --------------------------------------


@pytest.fixture
def saved_ga(tmp_path):
    """A LoRA-GA adapter of tiny llama written by save_adapter (converted, with sidecar)."""
    model, _ = tiny_peft("llama", r=2)
    gradlora.initialize(model, make_batches("llama"), num_batches=3, progress=False)
    gradlora.save_adapter(model, tmp_path / "ga")
    return tmp_path / "ga"


def load_fails_untouched(base, path, match):
    before = model_snapshot(base)
    with pytest.raises(gradlora.GradLoraError, match=match):
        gradlora.load_adapter(base, path)
    assert_same_snapshot(before, model_snapshot(base))
    assert not hasattr(base, "peft_config")
    assert not any("lora" in name for name, _ in base.named_modules())


def test_truncated_safetensors(saved_ga):
    file = saved_ga / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    load_fails_untouched(tiny_base("llama"), saved_ga, r"cannot read .*safetensors.*truncated")


def test_adapter_of_another_architecture(saved_ga):
    load_fails_untouched(tiny_base("gpt2"), saved_ga, r"does not fit this model.*not found")


def test_converted_adapter_of_a_wider_model_leaves_base_untouched(saved_ga):
    """get_peft_model succeeds here and the shape check fails after it: the injected LoRA
    layers must be taken out again."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    load_fails_untouched(LlamaForCausalLM(cfg), saved_ga, r"has shapes .* needs")


def test_plain_peft_adapter_of_another_model_leaves_base_untouched(tmp_path):
    model, _ = tiny_peft("llama")
    model.save_pretrained(tmp_path)
    load_fails_untouched(tiny_base("gpt2"), tmp_path, r"does not fit this model")


def test_corrupt_or_future_sidecar(saved_ga):
    sidecar = saved_ga / "gradlora.json"
    sidecar.write_text("{not json")
    load_fails_untouched(tiny_base("llama"), saved_ga, r"gradlora.json is not valid JSON")
    sidecar.write_text(json.dumps({"format": 3, "converted": True}))  # a future format
    load_fails_untouched(
        tiny_base("llama"), saved_ga, r"has format 3; this gradlora reads formats \(1, 2\)"
    )


def test_missing_folder(tmp_path):
    load_fails_untouched(tiny_base("llama"), tmp_path / "nope", r"no adapter at .*adapter_config")


def test_plain_peft_adapter_without_sidecar_loads_as_is(tmp_path):
    """No sidecar means a plain peft adapter (e.g. model.save_pretrained of vanilla LoRA): it is
    loaded as it is, trainable, and gives the saved model's outputs."""
    model, _ = tiny_peft("gpt2")
    for t in supported_layers(model)[0]:  # make the adapter non-trivial
        torch.nn.init.normal_(t.B, std=0.1)
    model.save_pretrained(tmp_path)
    assert not (tmp_path / "gradlora.json").exists()
    batches = make_batches("gpt2")
    loaded = gradlora.load_adapter(tiny_base("gpt2"), tmp_path)
    torch.testing.assert_close(logits(loaded, batches), logits(model, batches), rtol=0, atol=0)
    assert all(t.A.requires_grad and t.B.requires_grad for t in supported_layers(loaded)[0])
    assert all(t.init_factors() is None for t in supported_layers(loaded)[0])


def test_save_adapter_on_a_bare_module_with_lora_layers(tmp_path):
    """inject_adapter_in_model gives LoRA layers but no PeftModel (no config to write)."""
    from peft import inject_adapter_in_model

    model = inject_adapter_in_model(lora_config("llama"), tiny_base("llama"))
    with pytest.raises(gradlora.GradLoraError, match=r"save_adapter needs a peft.PeftModel"):
        gradlora.save_adapter(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()
