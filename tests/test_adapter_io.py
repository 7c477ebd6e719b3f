import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    ARCHS,
    make_batches,
    tiny_base,
    tiny_peft,
)
from peft import LoraConfig, PeftModel
from transformers.pytorch_utils import Conv1D

import gradlora
from gradlora.peft_view import supported_layers

TESTS = Path(__file__).parent


def train_steps(model, batches, steps=3, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for i in range(steps):
        opt.zero_grad()
        model(**batches[i % len(batches)]).loss.backward()
        opt.step()


def logits(model, batches):
    model.eval()
    with torch.no_grad():
        return torch.cat(
            [model(**{k: v for k, v in b.items() if k != "labels"}).logits for b in batches]
        )


def test_targets_are_named_as_in_the_base_model(arch):
    model, original = tiny_peft(arch)
    targets = supported_layers(model)[0]
    assert len(targets) == {"llama": 14, "bert": 13, "gpt2": 8}[arch]
    for t in targets:
        m = original.get_submodule(t.name)
        assert isinstance(m, torch.nn.Linear | Conv1D)
        W = m.weight.T if isinstance(m, Conv1D) else m.weight
        assert tuple(W.shape) == t.shape and t.transposed == isinstance(m, Conv1D)
        assert torch.equal(t.weight_mn(), W)


@pytest.mark.parametrize(
    "method,rslora", [("lora-ga", False), ("lora-ga", True), ("lora-one", False)]
)
def test_saved_adapter_loads_with_plain_peft_in_a_fresh_process(tmp_path, method, rslora):
    """After init + training, a process that never imports gradlora loads the adapter on the
    original base model with PeftModel.from_pretrained and gets the same logits."""
    expected = {}
    for arch in ARCHS:
        model, _ = tiny_peft(arch, r=2, use_rslora=rslora)
        batches = make_batches(arch)
        gradlora.initialize(model, batches, method=method, num_batches=3, progress=False)
        train_steps(model, batches)
        gradlora.save_adapter(model, tmp_path / arch)
        expected[arch] = logits(model, batches)
        torch.save(batches, tmp_path / f"{arch}_batches.pt")
        cfg = json.loads((tmp_path / arch / "adapter_config.json").read_text())
        factor = 2 if method == "lora-ga" else 1
        assert cfg["r"] == 2 * factor
        alpha_factor = (math.sqrt(2) if rslora else 2) if method == "lora-ga" else 1
        assert cfg["lora_alpha"] == pytest.approx(4 * alpha_factor)
        assert cfg["init_lora_weights"] is True
    script = f"""
import sys, torch
sys.path.insert(0, {str(TESTS)!r})
from conftest import ARCHS, tiny_base
from peft import PeftModel
for arch in ARCHS:
    model = PeftModel.from_pretrained(tiny_base(arch), {str(tmp_path)!r} + "/" + arch).eval()
    batches = torch.load({str(tmp_path)!r} + f"/{{arch}}_batches.pt")
    with torch.no_grad():
        out = torch.cat([model(**{{k: v for k, v in b.items() if k != "labels"}}).logits for b in batches])
    torch.save(out, {str(tmp_path)!r} + f"/{{arch}}_logits.pt")
assert "gradlora" not in sys.modules
"""
    subprocess.run(
        [sys.executable, "-c", script], check=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""}
    )
    for arch in ARCHS:
        got = torch.load(tmp_path / f"{arch}_logits.pt")
        torch.testing.assert_close(got, expected[arch], rtol=1e-4, atol=1e-5, msg=arch)


def test_load_adapter_resumes_training_exactly(tmp_path, arch):
    model, _ = tiny_peft(arch, r=2)
    batches = make_batches(arch)
    gradlora.initialize(model, batches, num_batches=3, progress=False)
    train_steps(model, batches)
    gradlora.save_adapter(model, tmp_path)
    loaded = gradlora.load_adapter(tiny_base(arch), tmp_path)
    assert isinstance(loaded, PeftModel)
    for a, b in zip(supported_layers(model)[0], supported_layers(loaded)[0], strict=True):
        assert torch.equal(a.weight, b.weight), a.name  # same offset base weight, bit for bit
        assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)
        assert all(
            torch.equal(x, y) for x, y in zip(a.init_factors(), b.init_factors(), strict=True)
        )
        assert b.A.requires_grad and b.B.requires_grad
    torch.testing.assert_close(logits(loaded, batches), logits(model, batches), rtol=0, atol=0)
    torch.manual_seed(5)
    train_steps(model, batches)
    torch.manual_seed(5)
    train_steps(loaded, batches)
    torch.testing.assert_close(logits(loaded, batches), logits(model, batches), rtol=0, atol=0)


def test_load_adapter_on_a_different_model_is_refused(tmp_path):
    model, _ = tiny_peft("llama", r=2)
    batches = make_batches("llama")
    gradlora.initialize(model, batches, num_batches=3, progress=False)
    gradlora.save_adapter(model, tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    with pytest.raises(gradlora.GradLoraError, match="has shapes .* needs"):
        gradlora.load_adapter(other, tmp_path)


def test_save_errors(tmp_path):
    with pytest.raises(gradlora.GradLoraError, match="PeftModel"):
        gradlora.save_adapter(tiny_base("llama"), tmp_path)
    model, _ = tiny_peft("llama")
    gradlora.save_adapter(model, tmp_path)  # vanilla LoRA: saved as is
    sidecar = json.loads((tmp_path / "gradlora.json").read_text())
    assert sidecar["converted"] is False
    assert LoraConfig.from_pretrained(str(tmp_path)).r == 4
    assert not any(p.name.startswith(".gradlora-tmp") for p in tmp_path.iterdir())


def test_factors_only_load_refuses_a_folder_of_another_run(tmp_path):
    """A DeepSpeed resume restores A, B itself and takes only the offset from the checkpoint's
    portable adapter (``factors_only``). A folder holding other trained weights (a stale
    checkpoint of the same step) would give a foreign offset silently: refused, model untouched;
    the folder of this run loads."""
    from gradlora.adapter.io import load_converted_into
    from gradlora.peft_view import offset_layers, supported_layers

    batches = make_batches("llama", n=2)
    saved, _ = tiny_peft("llama", r=2)
    gradlora.initialize(saved, batches, progress=False)
    gradlora.save_adapter(saved, tmp_path / "adapter")
    stranger, _ = tiny_peft("llama", r=2)  # peft's init: not the saved A, B
    with pytest.raises(gradlora.GradLoraError, match="another run"):
        load_converted_into(stranger, tmp_path / "adapter", factors_only=True)
    assert not offset_layers(supported_layers(stranger)[0])
    resumed, _ = tiny_peft("llama", r=2)  # what DeepSpeed restores: the trained A, B
    with torch.no_grad():
        for t, s in zip(supported_layers(resumed)[0], supported_layers(saved)[0], strict=True):
            t.A.copy_(s.A)
            t.B.copy_(s.B)
    load_converted_into(resumed, tmp_path / "adapter", factors_only=True)
    assert offset_layers(supported_layers(resumed)[0])
    batch = {k: v for k, v in batches[0].items() if k != "labels"}
    torch.testing.assert_close(resumed(**batch).logits, saved(**batch).logits)
