"""Adapters gradlora must not initialize over (issue 23): one whose peft init rewrote the base
(PiSSA, OLoRA, ...), one that is already trained, and ``load_adapter`` given a PeftModel. Each
was silently wrong before: the principal part or the trained adapter was lost without a word."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import (
    assert_same_snapshot,
    eval_logits,
    lora_config,
    make_batches,
    model_snapshot,
    tiny_base,
    tiny_peft,
    train_steps,
)
from peft import PeftModel, get_peft_model

import gradlora
from gradlora import GradLoraError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
@pytest.mark.parametrize("method", ["lora-ga", "lora-one"])
def test_a_peft_init_that_rewrote_the_base_is_refused(init, method):
    torch.manual_seed(0)
    model = get_peft_model(tiny_base("llama"), lora_config("llama", r=2, init_lora_weights=init))
    before = model_snapshot(model)
    with pytest.raises(GradLoraError, match=f"init_lora_weights='{init}'.*rewrites the base"):
        gradlora.initialize(model, make_batches("llama"), method=method, progress=False)
    assert_same_snapshot(before, model_snapshot(model))


@pytest.mark.parametrize("init", [True, "gaussian", "orthogonal"])
def test_peft_inits_that_keep_the_base_are_accepted(init):
    torch.manual_seed(0)
    model = get_peft_model(tiny_base("llama"), lora_config("llama", r=2, init_lora_weights=init))
    report = gradlora.initialize(model, make_batches("llama"), num_batches=2, progress=False)
    assert report.layers


def test_a_trained_adapter_is_refused_unless_overwrite_adapter():
    model, _ = tiny_peft("llama", r=2)
    batches = make_batches("llama")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    train_steps(model, opt, batches, 5)
    before = model_snapshot(model)
    with pytest.raises(GradLoraError, match="already changes the model.*overwrite_adapter=True"):
        gradlora.initialize(model, batches, num_batches=2, progress=False)
    assert_same_snapshot(before, model_snapshot(model))
    with pytest.raises(GradLoraError, match="already changes the model"):
        gradlora.initialize(model, batches, method="lora-one", num_batches=2, progress=False)
    report = gradlora.initialize(
        model, batches, num_batches=2, progress=False, overwrite_adapter=True
    )
    assert report.layers  # discarded on request: the init ran


def test_load_adapter_given_a_peft_model_names_the_base_model(tmp_path):
    model, _ = tiny_peft("llama", r=2)
    gradlora.initialize(model, make_batches("llama"), num_batches=2, progress=False)
    gradlora.save_adapter(model, tmp_path / "a")
    other, _ = tiny_peft("llama", r=2)
    before = model_snapshot(other)
    with pytest.raises(GradLoraError, match="onto the original base model.*PeftModel"):
        gradlora.load_adapter(other, tmp_path / "a")
    assert_same_snapshot(before, model_snapshot(other))


def _trained_default(steps: int = 4):
    """A tiny Llama PeftModel whose "default" adapter is trained (it changes the outputs), with
    a second, fresh adapter "second" made active; and the untouched base."""
    model, original = tiny_peft("llama", r=2)
    batches = make_batches("llama")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train_steps(model, opt, batches, steps)
    model.add_adapter("second", lora_config("llama", r=2))
    model.set_adapter("second")
    return model, original, batches


def test_a_second_adapter_is_initialized_without_touching_the_first(tmp_path):
    model, original, batches = _trained_default()
    model.set_adapter("default")
    default_before = eval_logits(model, batches)
    model.set_adapter("second")
    report = gradlora.initialize(model, batches, num_batches=2, progress=False)
    assert report.offset == "adapter"  # auto: a shared base is never rewritten
    second = eval_logits(model, batches)
    model.set_adapter("default")
    assert torch.equal(eval_logits(model, batches), default_before)

    model.save_pretrained(tmp_path / "both")  # peft's layout: default at the root, second/
    assert (tmp_path / "both" / "second" / "gradlora.json").exists()
    assert not (tmp_path / "both" / "gradlora.json").exists()
    for folder, expected in (("both", default_before), ("both/second", second)):
        loaded = PeftModel.from_pretrained(copy.deepcopy(original), str(tmp_path / folder))
        torch.testing.assert_close(eval_logits(loaded, batches), expected, rtol=1e-5, atol=1e-5)


def test_the_weight_offset_is_refused_when_another_adapter_shares_the_base():
    model, _, batches = _trained_default()
    before = model_snapshot(model)
    with pytest.raises(GradLoraError, match="other adapter.*'default'.*offset='adapter'"):
        gradlora.initialize(model, batches, num_batches=2, progress=False, offset="weight")
    assert_same_snapshot(before, model_snapshot(model))


def test_load_adapter_keeps_the_offset_where_it_was_saved(tmp_path):
    model, original = tiny_peft("llama", r=2)
    batches = make_batches("llama")
    gradlora.initialize(model, batches, num_batches=2, progress=False, offset="adapter")
    gradlora.save_adapter(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "gradlora.json").read_text())["offset"] == "adapter"
    base = copy.deepcopy(original)
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    loaded = gradlora.load_adapter(base, tmp_path / "a")  # offset="auto"
    now = {k.replace(".base_layer.", "."): v for k, v in base.state_dict().items()}
    assert all(torch.equal(now[k], v) for k, v in weights.items())  # the base kept as it was
    torch.testing.assert_close(
        eval_logits(loaded, batches), eval_logits(model, batches), rtol=1e-6, atol=1e-6
    )


def test_a_format_1_adapter_still_loads_exactly(tmp_path):
    """Adapters written before format 2 (A' = [A; A0], B' = [B, -B0], no exact factors)."""
    from safetensors.torch import load_file, save_file

    model, original = tiny_peft("llama", r=2)
    batches = make_batches("llama")
    gradlora.initialize(model, batches, num_batches=2, progress=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train_steps(model, opt, batches, 2)
    folder = gradlora.save_adapter(model, tmp_path / "a")
    weights, exact = load_file(folder / "adapter_model.safetensors"), {}
    for key, value in load_file(folder / "gradlora_factors.safetensors").items():
        exact[key] = value
    old = dict(weights)
    for key in weights:
        if key.endswith("lora_A.weight"):
            A0 = exact[f"{key}.A0"]
            old[key] = torch.cat([weights[key][: A0.shape[0]], A0])
        elif key.endswith("lora_B.weight"):
            r = weights[key].shape[1] // 2
            old[key] = torch.cat([exact[f"{key}.B"], -weights[key][:, r:]], dim=1)
    save_file(old, folder / "adapter_model.safetensors")
    (folder / "gradlora_factors.safetensors").unlink()
    sidecar = json.loads((folder / "gradlora.json").read_text())
    (folder / "gradlora.json").write_text(json.dumps(sidecar | {"format": 1}))
    loaded = gradlora.load_adapter(copy.deepcopy(original), folder)
    assert torch.equal(eval_logits(loaded, batches), eval_logits(model, batches))


def test_an_adapter_added_after_a_weight_offset_is_refused_not_saved_wrong(tmp_path):
    """A weight offset of "default" rewrote W; an adapter added afterwards sees W', so
    initializing or saving it would silently be relative to W' on the original base."""
    model, _ = tiny_peft("llama", r=2)
    batches = make_batches("llama")
    gradlora.initialize(model, batches, num_batches=2, progress=False, offset="weight")
    model.add_adapter("late", lora_config("llama", r=2))
    model.set_adapter("late")
    before = model_snapshot(model)
    with pytest.raises(GradLoraError, match="weight offset rewrote the base weight"):
        gradlora.initialize(model, batches, method="lora-one", num_batches=2, progress=False)
    assert_same_snapshot(before, model_snapshot(model))
    with pytest.raises(GradLoraError, match="adapter 'late' would be relative to W'"):
        gradlora.save_adapter(model, tmp_path / "late")
    with pytest.raises(GradLoraError, match="saving adapter 'late'"):
        model.save_pretrained(tmp_path / "both")
    assert not (tmp_path / "late").exists() and not (tmp_path / "both" / "late").exists()
