"""Gradient inits on bitsandbytes 4-bit (nf4) and 8-bit bases, and offset="adapter".

G_q, the gradient at the dequantized weights W_q the layers compute with, is computed
independently by autograd on a float copy whose target weights are W_q.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import (
    assert_same_snapshot,
    make_batches,
    model_snapshot,
    reference_gradients,
    wide_llama_config,
)
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import BitsAndBytesConfig, LlamaForCausalLM

import gradlora
from gradlora.cli.data import quantization_config
from gradlora.init.formulas import best_rank_approx
from gradlora.peft_view import supported_layers

pytest.importorskip("bitsandbytes", reason="install the quant extra: pip install bitsandbytes")
warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
warnings.filterwarnings("ignore", message=".*inputs will be cast.*")

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QUANT = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}
ETA = 1e-3


def small_llama() -> LlamaForCausalLM:
    """conftest's tiny Llama is 32 wide; bitsandbytes' CPU 4-bit kernels need blocks of 64."""
    torch.manual_seed(0)
    cfg = wide_llama_config()
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("small-llama")
    small_llama().save_pretrained(path)
    return path


def quantized_base(path, kind):
    return LlamaForCausalLM.from_pretrained(
        path, quantization_config=BitsAndBytesConfig(**QUANT[kind]), device_map="cpu"
    )


def lora(model, r=2):
    torch.manual_seed(1)
    return get_peft_model(
        model, LoraConfig(r=r, lora_alpha=4, lora_dropout=0.0, target_modules=PROJ)
    )


def dequantized_copy(path, peft_model):
    """The float model computing with W_q: the saved fp32 model, target weights replaced."""
    float_model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for t in supported_layers(peft_model)[0]:
            float_model.get_submodule(t.name).weight.copy_(t.weight_mn())
    return float_model


def eval_logits(model, batches):
    """Logits in train mode (no dropout here): in eval mode without grad bitsandbytes switches
    4-bit weights on CPU to an inference layout that passes no gradient back."""
    model.train()
    with torch.no_grad():
        return torch.cat(
            [model(**{k: v for k, v in b.items() if k != "labels"}).logits for b in batches]
        )


def packed(model):
    return {t.name: t.weight.detach().clone() for t in supported_layers(model)[0]}


def sgd_step(model, batches, lr):
    params = [p for t in supported_layers(model)[0] for p in (t.A, t.B)]
    model.train()
    loss = sum(model(**b).loss for b in batches) / len(batches)
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p.sub_(lr * g)


def effective_delta(t):
    """s (B A - B0 A0): what the adapter adds to W_q once the counter-term is subtracted."""
    A0, B0 = t.init_factors()
    return t.scaling * (t.B.detach() @ t.A.detach() - B0 @ A0)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_lora_ga_on_a_quantized_base(saved_llama, kind, tmp_path):
    model = lora(quantized_base(saved_llama, kind))
    batches = make_batches("llama", n=2)
    before_logits = eval_logits(model, batches)
    before_packed = packed(model)
    G = reference_gradients(
        dequantized_copy(saved_llama, model), batches, [t.name for t in supported_layers(model)[0]]
    )
    report = gradlora.initialize(model, batches, method="lora-ga", num_batches=2, progress=False)
    assert report.offset == "adapter"
    # the packed base weights are byte-identical; the function is unchanged
    for name, w in packed(model).items():
        assert torch.equal(w, before_packed[name]), name
    after = eval_logits(model, batches)
    assert ((after - before_logits).norm() / before_logits.norm()).item() < 1e-5
    # one SGD step moves each effective weight by -eta s^2 c^2 [G_q]_2r (first order in eta)
    sgd_step(model, batches, ETA)
    worst = 0.0
    for t in supported_layers(model)[0]:
        m = t.shape[0]
        c2 = m**0.5 / 16.0  # c = m^(1/4) / sqrt(gamma), gamma = 16
        want = -ETA * t.scaling**2 * c2 * best_rank_approx(G[t.name], 2 * t.rank)
        got = effective_delta(t)
        worst = max(worst, ((got - want).norm() / want.norm()).item())
    assert worst < (2e-2 if kind == "nf4" else 0.2), worst
    # the portable adapter loads with plain peft onto a fresh quantized base
    gradlora.save_adapter(model, tmp_path / "ga")
    plain = PeftModel.from_pretrained(quantized_base(saved_llama, kind), tmp_path / "ga")
    ours, theirs = eval_logits(model, batches), eval_logits(plain, batches)
    assert ((theirs - ours).norm() / ours.norm()).item() < 1e-5


def test_lora_one_on_a_4bit_base(saved_llama):
    model = lora(quantized_base(saved_llama, "nf4"))
    batches = make_batches("llama", n=2)
    before_packed = packed(model)
    G = reference_gradients(
        dequantized_copy(saved_llama, model), batches, [t.name for t in supported_layers(model)[0]]
    )
    gradlora.initialize(model, batches, method="lora-one", num_batches=2, progress=False)
    for t in supported_layers(model)[0]:
        assert torch.equal(t.weight, before_packed[t.name])
        sigma1 = torch.linalg.svdvals(G[t.name].double())[0].item()
        want = -t.scaling / (sigma1 * 128) * best_rank_approx(G[t.name], t.rank)
        got = t.scaling * t.B.detach() @ t.A.detach()
        assert ((got - want).norm() / want.norm()).item() < 2e-2, t.name


def test_offset_weight_on_a_quantized_base_is_refused_untouched(saved_llama):
    model = lora(quantized_base(saved_llama, "nf4"))
    before = {
        **packed(model),
        **{t.name + ".B": t.B.detach().clone() for t in supported_layers(model)[0]},
    }
    with pytest.raises(gradlora.GradLoraError, match="offset='adapter'"):
        gradlora.initialize(model, make_batches("llama", n=2), offset="weight", progress=False)
    after = {
        **packed(model),
        **{t.name + ".B": t.B.detach().clone() for t in supported_layers(model)[0]},
    }
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_offset_adapter_on_a_float_base_matches_offset_weight(tmp_path):
    """offset="adapter" leaves W untouched and gives the same outputs, first step and saved
    adapter as offset="weight"; peft's merge_and_unload and disable_adapter are right too."""
    batches = make_batches("llama", n=2)
    models = {}
    for mode in ("weight", "adapter"):
        model = lora(small_llama())
        base_w = {t.name: t.weight.detach().clone() for t in supported_layers(model)[0]}
        original = eval_logits(model, batches)
        gradlora.initialize(model, batches, offset=mode, num_batches=2, progress=False)
        torch.testing.assert_close(eval_logits(model, batches), original, rtol=1e-5, atol=1e-6)
        unchanged = all(torch.equal(t.weight, base_w[t.name]) for t in supported_layers(model)[0])
        assert unchanged == (mode == "adapter")
        sgd_step(model, batches, ETA)
        models[mode] = model
    for a, b in zip(
        supported_layers(models["weight"])[0], supported_layers(models["adapter"])[0], strict=True
    ):
        torch.testing.assert_close(a.A, b.A, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(a.B, b.B, rtol=1e-5, atol=1e-7)
    trained = models["adapter"]
    logits = eval_logits(trained, batches)
    gradlora.save_adapter(trained, tmp_path / "a")
    plain = PeftModel.from_pretrained(small_llama(), tmp_path / "a")
    torch.testing.assert_close(eval_logits(plain, batches), logits, rtol=1e-5, atol=1e-5)
    resumed = gradlora.load_adapter(small_llama(), tmp_path / "a", offset="adapter")
    torch.testing.assert_close(eval_logits(resumed, batches), logits, rtol=1e-5, atol=1e-5)
    with trained.disable_adapter():  # the original model, not W - s B0 A0
        torch.testing.assert_close(
            eval_logits(trained, batches), eval_logits(small_llama(), batches)
        )
    merged = copy.deepcopy(trained).merge_and_unload()
    torch.testing.assert_close(eval_logits(merged, batches), logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "name,kw",
    [("preconditioned", {}), ("lora-pro", {"mode": "efficient"}), ("lora-pro", {"mode": "full"})],
)
def test_optimizers_step_on_a_4bit_model(saved_llama, name, kw):
    """The pair optimizers find their pairs on bitsandbytes LoRA layers and train them; the
    packed base weights never change."""
    model = lora(quantized_base(saved_llama, "nf4"))
    batches = make_batches("llama", n=2)
    gradlora.initialize(model, batches, method="lora-ga", num_batches=2, progress=False)
    before = packed(model)
    opt = gradlora.create_optimizer(model, name, lr=1e-3, **kw)
    assert sum(len(g["params"]) for g in opt.param_groups if g["lora_pairs"]) == 2 * len(before)
    start = [(t.A.detach().clone(), t.B.detach().clone()) for t in supported_layers(model)[0]]
    losses = []
    for b in batches * 2:
        model.train()
        loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    for t, (A, B) in zip(supported_layers(model)[0], start, strict=True):
        assert torch.equal(t.weight, before[t.name])
        assert not torch.equal(t.A, A) and not torch.equal(t.B, B)
    assert all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_a_device_bitsandbytes_cannot_run_is_refused_untouched(saved_llama, kind, monkeypatch):
    """bitsandbytes lists the device types it has a backend for; a layer on another one (faked
    here by taking "cpu" off that list) is refused by name before the model is touched."""
    import bitsandbytes

    model = lora(quantized_base(saved_llama, kind))
    snapshot = model_snapshot(model)
    monkeypatch.setattr(bitsandbytes, "supported_torch_devices", {"cuda", "xpu"})
    with pytest.raises(gradlora.GradLoraError, match=r"on device 'cpu', where bitsandbytes has no"):
        gradlora.initialize(model, make_batches("llama", n=2), progress=False)
    assert_same_snapshot(snapshot, model_snapshot(model))
    with pytest.raises(gradlora.GradLoraError, match=r"--quantize nf4 is on device 'cpu'"):
        quantization_config("nf4", "cpu")
    monkeypatch.undo()
    quantization_config("nf4", "cpu")  # cpu is supported: no error
