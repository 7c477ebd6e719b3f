"""Tiny random models built from configs (no downloads) and helpers shared by the tests."""

from __future__ import annotations

import copy
import os
import warnings

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.utils import logging as hf_logging  # noqa: E402

hf_logging.set_verbosity_error()
warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
torch.set_num_threads(2)

VOCAB = 128
ARCHS = ("llama", "bert", "gpt2")
TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "bert": ["query", "key", "value", "dense"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


def wide_llama_config() -> LlamaConfig:
    """A tiny Llama 64 wide: bitsandbytes' 4-bit blocks need layers at least 64 wide."""
    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )


def tiny_llama_folder(folder):
    """A 1-layer random Llama with MiniLM's tokenizer, saved as a local model folder."""
    from transformers import AutoTokenizer

    from gradlora.cli.data import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_base(arch: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model; the same seed gives the same weights."""
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        model = LlamaForCausalLM(cfg)
    elif arch == "bert":
        cfg = BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            num_labels=2,
        )
        model = BertForSequenceClassification(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(arch)
    return model


def lora_config(arch: str, r: int = 4, **kw) -> LoraConfig:
    kw.setdefault("lora_alpha", 2 * r)
    kw.setdefault("lora_dropout", 0.0)
    if arch == "bert":
        kw.setdefault("task_type", "SEQ_CLS")
    return LoraConfig(r=r, target_modules=TARGETS[arch], **kw)


def tiny_peft(arch: str, r: int = 4, seed: int = 0, **kw):
    """(PeftModel, untouched deep copy of its base model before wrapping)."""
    base = tiny_base(arch, seed)
    original = copy.deepcopy(base)
    torch.manual_seed(seed + 1)
    return get_peft_model(base, lora_config(arch, r, **kw)), original


def make_batches(arch: str, n: int = 3, batch: int = 4, seq: int = 12, seed: int = 123):
    """n batches of dicts for model(**batch) that include labels."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
        mask = torch.ones_like(ids)
        labels = torch.randint(0, 2, (batch,), generator=g) if arch == "bert" else ids.clone()
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def model_snapshot(model: torch.nn.Module) -> dict:
    """Everything an init may touch: parameters and buffers, flags, modes, grads."""
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "training": {k: m.training for k, m in model.named_modules()},
        "grads": {
            k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()
        },
        "buffers": sorted(k for k, _ in model.named_buffers()),
        "disabled": {
            k: m._disable_adapters
            for k, m in model.named_modules()
            if hasattr(m, "_disable_adapters")
        },
    }


def assert_same_snapshot(a: dict, b: dict) -> None:
    assert a["requires_grad"] == b["requires_grad"]
    assert a["training"] == b["training"]
    assert a["buffers"] == b["buffers"]
    assert a["disabled"] == b["disabled"]
    assert a["tensors"].keys() == b["tensors"].keys()
    for k in a["tensors"]:
        assert torch.equal(a["tensors"][k], b["tensors"][k]), k
    for k in a["grads"]:
        ga, gb = a["grads"][k], b["grads"][k]
        assert (ga is None) == (gb is None), k
        if ga is not None:
            assert torch.equal(ga, gb), k


def reference_gradients(original: torch.nn.Module, batches, module_names, loss_fn=None) -> dict:
    """G = mean over batches of dL/dW by plain autograd on the unwrapped model, as (out, in)."""
    from transformers.pytorch_utils import Conv1D

    model = copy.deepcopy(original).train()
    modules = {name: model.get_submodule(name) for name in module_names}
    weights = [m.weight for m in modules.values()]
    total = [torch.zeros_like(w) for w in weights]
    for batch in batches:
        loss = loss_fn(model, batch) if loss_fn else model(**batch).loss
        for acc, g in zip(total, torch.autograd.grad(loss, weights), strict=True):
            acc += g
    out = {}
    for (name, m), acc in zip(modules.items(), total, strict=True):
        g = acc / len(batches)
        out[name] = g.T if isinstance(m, Conv1D) else g
    return out


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``).
    Tiny models gain nothing from 2 threads, and on a shared CPU the second thread's waits
    make every op several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


def train_steps(model, opt, batches, steps, sched=None, clip=None) -> list[float]:
    """``steps`` optimizer steps cycling over ``batches``; returns the losses."""
    model.train()
    losses = []
    for i in range(steps):
        opt.zero_grad()
        loss = model(**batches[i % len(batches)]).loss
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


def assert_resume_is_exact(model, make_opt, fresh_model, batches, before: int, after: int):
    """Train ``before`` steps, checkpoint (trainable weights + optimizer state through
    ``torch.load(weights_only=True)``), train ``after`` more; then restore the checkpoint into
    ``fresh_model`` with a new optimizer, train ``after`` steps: every parameter bit-identical."""
    import io

    opt = make_opt(model)
    train_steps(model, opt, batches, before)
    buf = io.BytesIO()
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.save({"opt": opt.state_dict(), "params": trainable}, buf)
    train_steps(model, opt, batches, after)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    with torch.no_grad():
        for n, p in fresh_model.named_parameters():
            if n in ckpt["params"]:
                p.copy_(ckpt["params"][n])
    opt2 = make_opt(fresh_model)
    opt2.load_state_dict(ckpt["opt"])
    train_steps(fresh_model, opt2, batches, after)
    pairs = zip(model.named_parameters(), fresh_model.named_parameters(), strict=True)
    for (n, p), (_, q) in pairs:
        assert torch.equal(p, q), n


def eval_logits(model, batches):
    """The model's logits on ``batches`` (labels dropped) in eval mode, without grad."""
    model.eval()
    with torch.no_grad():
        return torch.cat(
            [model(**{k: v for k, v in b.items() if k != "labels"}).logits for b in batches]
        )
