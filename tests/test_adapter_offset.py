"""The all-or-nothing write of init factors (adapter/offset.py): the in-place offset of a float32 base
weight, and every layer put back when the write is interrupted midway."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_snapshot, eval_logits, make_batches, model_snapshot, tiny_peft

import gradlora
import gradlora.adapter.offset
import gradlora.init.formulas
from gradlora.peft_view import supported_layers


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def weights(model) -> dict:
    return {t.name: t.weight_mn().detach().clone() for t in supported_layers(model)[0]}


def one_rounding(W: torch.Tensor, offset: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per entry, the spread two roundings of W - offset (computed in fp32) may differ by."""
    return torch.finfo(dtype).eps * (W.double().abs() + offset.double().abs())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # nn.Linear, and Conv1D (stored transposed)
def test_float32_offset_is_in_place_and_within_one_rounding(arch):
    """W' = W - s B0 A0 by one addmm_ on W's own storage, within one fp32 rounding per entry of
    inits.offset_weight (fp32 product, then the subtraction)."""
    model, _ = tiny_peft(arch)
    before = weights(model)
    storage = {t.name: t.weight.data_ptr() for t in supported_layers(model)[0]}
    gradlora.initialize(model, make_batches(arch), num_batches=2, progress=False)
    for t in supported_layers(model)[0]:
        A0, B0 = t.init_factors()
        W, Wp = before[t.name], t.weight_mn().detach()
        ref = gradlora.adapter.offset.offset_weight(W, A0, B0, t.scaling)
        offset = t.scaling * (B0.double() @ A0.double())
        assert t.weight.data_ptr() == storage[t.name]
        assert ((Wp.double() - ref.double()).abs() <= one_rounding(W, offset, W.dtype)).all()
        assert not torch.equal(Wp, W)


def fail_at(monkeypatch, module, name: str, call: int, fault: BaseException):
    """Make ``module.name`` raise ``fault`` on its ``call``-th call; returns the calls' args."""
    real, calls = getattr(module, name), []

    def failing(*args, **kw):
        calls.append(args)
        if len(calls) == call:
            raise fault
        return real(*args, **kw)

    monkeypatch.setattr(module, name, failing)
    return calls


@pytest.mark.parametrize("fault", [RuntimeError("out of memory (simulated)"), KeyboardInterrupt()])
def test_interrupted_write_puts_every_layer_back(monkeypatch, fault):
    """A fault while layer 5 is written (after its buffers): A, B, buffers and hooks exactly as
    before; layer 5 onwards byte-identical; layers 1-4, already offset, within one rounding; the
    exception is the original one, with a note that says so."""
    model, _ = tiny_peft("gpt2")
    batches = make_batches("gpt2")
    before, W = model_snapshot(model), weights(model)
    calls = fail_at(monkeypatch, gradlora.adapter.offset, "install_counter_term", 5, fault)
    with pytest.raises(type(fault)) as info:
        gradlora.initialize(model, batches, num_batches=2, progress=False)
    assert info.value is fault and len(calls) == 5
    assert "4 layer(s) already rewritten" in "".join(getattr(fault, "__notes__", []))
    after = model_snapshot(model)
    targets = supported_layers(model)[0]
    base = {f"{t.module_name}.base_layer.weight" for t in targets}
    exact = {k: v for k, v in before["tensors"].items() if k not in base}
    assert all(torch.equal(v, after["tensors"][k]) for k, v in exact.items())
    assert before["buffers"] == after["buffers"]
    for i, t in enumerate(targets):
        assert t.init_factors() is None and gradlora.adapter.offset.offset_mode(t) is None
        now = t.weight_mn().detach()
        if i >= 4:
            assert torch.equal(now, W[t.name]), t.name
        else:
            assert (now - W[t.name]).abs().max() <= 4 * torch.finfo(now.dtype).eps, t.name


def test_interrupted_bf16_write_puts_every_layer_back(monkeypatch):
    """bf16 bases go through inits.offset_weight (one call per layer, and one per undo)."""
    model, _ = tiny_peft("llama")
    model.to(torch.bfloat16)
    batches = make_batches("llama")
    W = weights(model)
    fault = RuntimeError("out of memory (simulated)")
    calls = fail_at(monkeypatch, gradlora.adapter.offset, "offset_weight", 3, fault)
    with pytest.raises(RuntimeError, match="simulated"):
        gradlora.initialize(model, batches, num_batches=2, progress=False, offset="weight")
    assert "2 layer(s) already rewritten" in "".join(fault.__notes__)
    for i, t in enumerate(supported_layers(model)[0]):
        now, was = t.weight_mn().detach(), W[t.name]
        assert t.init_factors() is None
        if i >= 2:
            assert torch.equal(now, was), t.name
        else:  # W' = round(W - s B0 A0), then round(W' + s B0 A0): two bf16 roundings
            _, A0, B0, s = calls[i]
            offset = s * (B0.double() @ A0.double())
            err = (now.double() - was.double()).abs()
            assert (err <= one_rounding(was, offset, torch.bfloat16)).all(), t.name
            assert not torch.equal(now, was)  # the bound is not vacuous: rounding did happen


@pytest.mark.parametrize("offset", ["weight", "adapter"])
def test_fault_in_the_first_layer_leaves_the_model_byte_identical(monkeypatch, offset):
    model, _ = tiny_peft("llama")
    before = model_snapshot(model)
    fault = RuntimeError("boom")
    fail_at(monkeypatch, gradlora.adapter.offset, "install_counter_term", 1, fault)
    with pytest.raises(RuntimeError, match="boom"):
        gradlora.initialize(
            model, make_batches("llama"), num_batches=2, progress=False, offset=offset
        )
    assert_same_snapshot(before, model_snapshot(model))
    assert not getattr(fault, "__notes__", None)


@pytest.mark.parametrize("offset", ["adapter", "weight"])
def test_raw_state_dict_round_trip(tmp_path, offset):
    """torch.save(model.state_dict()) after an init: a fresh PeftModel refuses it (strict=True)
    instead of silently losing the counter-term; a model initialized alike (another run of the
    same recipe, other data) loads it and computes what the saved model computed."""
    model, _ = tiny_peft("llama")
    batches = make_batches("llama")
    gradlora.initialize(model, batches, num_batches=2, progress=False, offset=offset)
    with torch.no_grad():  # a trained adapter: B A no longer equal to B0 A0
        for t in supported_layers(model)[0]:
            t.B.add_(0.01)
    want = eval_logits(model, batches)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert any(k.endswith("lora_A.default.gradlora_weight0") for k in saved)

    fresh, _ = tiny_peft("llama")
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*gradlora_weight0"):
        fresh.load_state_dict(saved)
    fresh.load_state_dict(saved, strict=False)  # what strict=True guards against:
    got = eval_logits(fresh, batches)
    if offset == "adapter":  # the counter-term is gone: other outputs
        assert not torch.allclose(got, want, atol=1e-4)
    else:  # the base weights carry the offset: the same outputs
        torch.testing.assert_close(got, want, rtol=0, atol=0)

    again, _ = tiny_peft("llama")
    other = make_batches("llama", seed=7)
    gradlora.initialize(again, other, num_batches=2, progress=False, offset=offset)
    again.load_state_dict(saved)
    torch.testing.assert_close(eval_logits(again, batches), want, rtol=0, atol=0)
