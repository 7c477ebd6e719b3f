"""The portable adapter records a signature of the base weights it is relative to, and
``load_adapter`` refuses a base that does not match (an already-offset base, another model)."""

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

import gradlora
from gradlora.adapter.format import MAX_RELATIVE_DIFFERENCE, relative_difference
from gradlora.adapter.offset import weight_signature


@pytest.mark.parametrize("shape", [(64, 48), (300, 20)])
def test_signature_estimates_the_relative_frobenius_difference(shape):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(*shape, generator=g)
    sig = weight_signature(W, "layer")
    assert weight_signature(W.clone(), "layer") == sig  # deterministic per name
    for size in (0.05, 0.2):
        D = torch.randn(*shape, generator=g)
        D *= size * W.norm() / D.norm()
        est = relative_difference(sig, weight_signature(W + D, "layer"))
        assert 0.4 * size < est < 1.8 * size, (size, est)
    bf16 = relative_difference(sig, weight_signature(W.bfloat16(), "layer"))
    assert bf16 < MAX_RELATIVE_DIFFERENCE / 2


@pytest.fixture
def saved_ga(tmp_path):
    model, _ = tiny_peft("llama", r=2)
    gradlora.initialize(model, make_batches("llama"), num_batches=2, progress=False)
    gradlora.save_adapter(model, tmp_path / "ga")
    return model, tmp_path / "ga"


def test_already_offset_base_is_refused_untouched(saved_ga):
    """model.unload() after a LoRA-GA init gives the offset base W - s B0 A0: loading the
    converted adapter onto it would offset twice."""
    model, path = saved_ga
    offset_base = model.unload()
    before = model_snapshot(offset_base)
    with pytest.raises(gradlora.GradLoraError, match="does not match.*check_base=False"):
        gradlora.load_adapter(offset_base, path)
    assert_same_snapshot(before, model_snapshot(offset_base))
    assert not any("lora" in name for name, _ in offset_base.named_modules())


def test_original_base_loads_also_in_bf16(saved_ga):
    model, path = saved_ga
    batches = make_batches("llama")
    loaded = gradlora.load_adapter(tiny_base("llama"), path)
    torch.testing.assert_close(eval_logits(loaded, batches), eval_logits(model, batches))
    gradlora.load_adapter(tiny_base("llama").to(torch.bfloat16), path)  # a cast is not a change


def test_plain_adapter_on_another_model_is_refused(tmp_path):
    model, _ = tiny_peft("llama", r=2)
    gradlora.initialize(
        model, make_batches("llama"), method="lora-one", num_batches=2, progress=False
    )
    gradlora.save_adapter(model, tmp_path / "one")
    other = tiny_base("llama", seed=1)
    before = model_snapshot(other)
    with pytest.raises(gradlora.GradLoraError, match="does not match"):
        gradlora.load_adapter(other, tmp_path / "one")
    assert_same_snapshot(before, model_snapshot(other))
    assert isinstance(
        gradlora.load_adapter(other, tmp_path / "one", check_base=False), torch.nn.Module
    )


def test_trainer_style_load_into_refuses_an_offset_model(saved_ga):
    """The PeftModel load path (Trainer resume) checks the base too."""
    from gradlora.adapter.io import load_converted_into

    model, path = saved_ga
    wrong = tiny_peft("llama", r=2, seed=1)[0]
    with pytest.raises(gradlora.GradLoraError, match="does not match"):
        load_converted_into(wrong, path)
