"""gradlora.export_merged: W + s (B A - B0 A0) relative to the ORIGINAL base, written as a plain
transformers checkpoint (bitsandbytes bases dequantized) and checked before the folder appears;
and export_adapter / export_merged on 4-bit and 8-bit bases (QLoRA)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import (
    assert_same_snapshot,
    eval_logits,
    make_batches,
    model_snapshot,
    wide_llama_config,
)
from peft import LoraConfig, PeftModel, get_peft_model
from test_adapter_export import rel, trained
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BitsAndBytesConfig,
    LlamaForCausalLM,
)

import gradlora
from gradlora.adapter import merged
from gradlora.peft_view import supported_layers

pytestmark = pytest.mark.usefixtures("one_thread")
warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")

CASES = {
    "lora-ga weight offset": dict(method="lora-ga"),
    "lora-ga adapter offset, rsLoRA, rank_pattern": dict(
        method="lora-ga", offset="adapter", use_rslora=True, rank_pattern={"v_proj": 2}
    ),
    "lora-one, LoRA-Pro": dict(method="lora-one", optimizer="lora-pro"),
    "gpt2 (Conv1D), lora-ga": dict(arch="gpt2", method="lora-ga"),
}


def expected_weight(t, original) -> torch.Tensor:
    """W + s (B A - B0 A0) from the untouched base and the live factors, (m, n), float64."""
    W = original.get_submodule(t.name).weight.detach().double()
    W = W.T if t.transposed else W
    delta = t.B.detach().double() @ t.A.detach().double()
    if t.init_factors() is not None:
        A0, B0 = (f.double() for f in t.init_factors())
        delta -= B0 @ A0
    return W + t.scaling * delta


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES)
def test_merged_checkpoint_loads_without_peft_and_matches(tmp_path, case, dtype):
    """The checkpoint loads with AutoModelForCausalLM; every adapted weight is W + s(BA - B0A0)
    of the ORIGINAL base rounded once to ``dtype``; its logits are the trained model's (fp32:
    1e-5; bf16 weights, computed in bf16: measured 4.7e-3 to 5.0e-3 here, asserted 2e-2); the live
    model is untouched."""
    model, original, batches = trained(**CASES[case])
    live = eval_logits(model, batches)
    before = model_snapshot(model)
    assert gradlora.export_merged(model, tmp_path / "m", dtype=dtype) == tmp_path / "m"
    assert_same_snapshot(before, model_snapshot(model))
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (
        config["dtype"] == str(dtype).removeprefix("torch.") and "quantization_config" not in config
    )
    assert not (tmp_path / "m" / "adapter_config.json").exists()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=dtype)
    eps = torch.finfo(dtype).eps
    for t in supported_layers(model)[0]:
        stored = plain.get_submodule(t.name).weight.detach()
        assert stored.dtype == dtype
        want, got = expected_weight(t, original), stored.double()
        got = got.T if t.transposed else got
        assert ((got - want).abs() <= 0.5 * eps * want.abs() + 1e-6).all(), t.name
    assert rel(eval_logits(plain, batches).float(), live) < (
        1e-5 if dtype == torch.float32 else 2e-2
    )


def test_a_classifier_head_is_merged_as_trained(tmp_path):
    model, _, batches = trained("bert", method="lora-ga")
    live = eval_logits(model, batches)
    gradlora.export_merged(model, tmp_path / "m", dtype=torch.float32)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m")
    assert rel(eval_logits(plain, batches), live) < 1e-5


def _off_by(amount):
    real = merged.merged_weight

    def merged_weight(t):
        W = real(t)
        if t.name.endswith("layers.1.mlp.down_proj"):
            W[0, 0] += amount
        return W

    return merged_weight


def _no_counter_term(t):
    W = t.weight_mn().detach().float()
    return W + t.scaling * (t.B.detach() @ t.A.detach())


@pytest.mark.parametrize("corruption", ["one entry off by 1e-3 (bf16)", "no counter-term"])
def test_a_wrong_merge_is_refused_and_leaves_no_folder(tmp_path, monkeypatch, corruption):
    """One entry 1e-3 off (5% of it; far inside the bf16 logits tolerance) is caught by the
    entry-by-entry check; a merge without the counter-term of offset="adapter" by both."""
    model, _, _ = trained(method="lora-ga", offset="adapter")
    if corruption.startswith("one entry"):
        monkeypatch.setattr(merged, "merged_weight", _off_by(1e-3))
    else:
        monkeypatch.setattr(merged, "merged_weight", _no_counter_term)
    before = model_snapshot(model)
    with pytest.raises(gradlora.GradLoraError, match="merge rounded to|logits"):
        gradlora.export_merged(model, tmp_path / "m", dtype=torch.bfloat16)
    assert list(tmp_path.iterdir()) == []
    assert_same_snapshot(before, model_snapshot(model))


# ---- QLoRA: bitsandbytes 4-bit and 8-bit bases ----

QUANT = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    """A 64-wide Llama saved once; skips the QLoRA tests where bitsandbytes cannot load it."""
    pytest.importorskip("bitsandbytes", reason="install the quant extra: pip install bitsandbytes")
    path = tmp_path_factory.mktemp("wide-llama")
    torch.manual_seed(0)
    LlamaForCausalLM(wide_llama_config()).save_pretrained(path)
    try:
        quantized(path, "nf4")
    except Exception as e:  # no bitsandbytes backend for this machine
        pytest.skip(f"bitsandbytes cannot load a 4-bit model here: {e}")
    return path


def quantized(path, kind):
    config = BitsAndBytesConfig(**QUANT[kind])
    return LlamaForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")


def train_logits(model, batches):
    """Logits in train mode (no dropout here): bitsandbytes' eval-mode repack is tested apart."""
    model.train()
    with torch.no_grad():
        return torch.cat([model(input_ids=b["input_ids"]).logits for b in batches])


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_qlora_exports(saved_llama, tmp_path, kind):
    """After a LoRA-GA init (offset in the adapter) and a step on a quantized base: the plain
    adapter on a fresh quantized base, and the merged checkpoint (dequantized, nn.Linear, no
    quantization_config) without bitsandbytes, give the trained logits."""
    torch.manual_seed(1)
    config = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=PROJ)
    model = get_peft_model(quantized(saved_llama, kind), config)
    batches = make_batches("llama", n=2)
    gradlora.initialize(model, batches, method="lora-ga", num_batches=2, progress=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()  # in eval mode bitsandbytes would switch to its inference layout
    model(**batches[0]).loss.backward()
    opt.step()
    live = train_logits(model, batches)
    before = model_snapshot(model)
    gradlora.export_adapter(model, tmp_path / "a")
    gradlora.export_merged(model, tmp_path / "m", dtype=torch.float32)
    assert_same_snapshot(before, model_snapshot(model))
    plain = PeftModel.from_pretrained(quantized(saved_llama, kind), tmp_path / "a")
    assert rel(train_logits(plain, batches), live) < 1e-5
    dense = LlamaForCausalLM.from_pretrained(tmp_path / "m")
    assert type(dense.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert "quantization_config" not in json.loads((tmp_path / "m" / "config.json").read_text())
    assert rel(train_logits(dense, batches), live) < 1e-5
    # training goes on: the exports changed nothing bitsandbytes computes with
    model(**batches[0]).loss.backward()
    assert all(
        t.A.grad is not None and t.A.grad.abs().sum() > 0 for t in supported_layers(model)[0]
    )


def test_4bit_weights_in_the_cpu_inference_layout_are_unpacked(saved_llama, tmp_path):
    """An eval-mode forward without grad switches 4-bit weights on an AVX512-BF16 CPU to
    bitsandbytes' inference layout (bf16 scales and compute); the merged export dequantizes
    from it and matches the model as it now computes (bf16 tolerance)."""
    bnb = pytest.importorskip("bitsandbytes.nn.modules")
    if not bnb.has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes never switches the layout")
    torch.manual_seed(1)
    config = LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=PROJ)
    model = get_peft_model(quantized(saved_llama, "nf4"), config)
    batches = make_batches("llama", n=1)
    live = eval_logits(model, batches)  # switches the layout
    t = supported_layers(model)[0][0]
    assert t.weight.quant_state.packing_format_for_cpu
    gradlora.export_merged(model, tmp_path / "m", dtype=torch.float32)
    dense = LlamaForCausalLM.from_pretrained(tmp_path / "m")
    assert rel(eval_logits(dense, batches), live) < 1e-2
    fresh = supported_layers(get_peft_model(quantized(saved_llama, "nf4"), config))[0][0]
    want = fresh.weight_mn()  # the original layout's dequantized weight
    got = dense.get_submodule(t.name).weight.detach()
    assert 0 < rel(got, want) < 5e-3  # the layout's bf16 scales: a rounding, no more
