"""What to fine-tune on what: a model (built-in name or local folder) and data (built-in name or a
CSV/JSONL file) resolved into one ``Task`` with fixed train/validation/test splits.

Built-in models: ``minilm`` (classification), ``smollm2`` (causal LM; classification heads work
too). Built-in data: ``rotten-tomatoes`` (fresh vs rotten), ``hamlet`` (causal LM text chunks),
``arithmetic`` (word problems: trained on the answers, scored by exact match of generations).
A file with columns ``text`` and ``label`` is a classification task (labels may be integers or
strings such as "pos"/"neg", which are numbered in sorted order); a file with only ``text`` is a
causal LM task.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer

from ..errors import GradLoraError
from .arithmetic import NUM_PROBLEMS, SEED, final_answer, make_problems
from .data import (
    LLAMA_TARGETS,
    MINILM_TARGETS,
    TextData,
    hamlet_text,
    load_pretrained,
    load_rotten_tomatoes,
    make_batches,
    minilm_path,
    smollm2_path,
)
from .datafile import file_digest, read_data_file

MODELS = {
    "minilm": "all-MiniLM-L6-v2 (BERT encoder, 22.7M), classification",
    "smollm2": "SmolLM2-135M-Instruct (Llama, 134.5M), causal LM",
}
DATASETS = {
    "rotten-tomatoes": "Rotten Tomatoes critic snippets, fresh (1) vs rotten (0), ~12,750",
    "hamlet": "the text of Hamlet cut into chunks of --max-length tokens (causal LM)",
    "arithmetic": "2-3 step arithmetic word problems, seeded (causal LM, scored by exact match)",
}
CLASSIFICATION, CAUSAL_LM = "classification", "causal-lm"
# a folder holds a tokenizer if it has one of these (tokenizer.save_pretrained writes the first
# two; older models ship only their vocabulary files)
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
)


@dataclass
class Task:
    kind: str  # CLASSIFICATION or CAUSAL_LM
    model: str  # what was asked for ("minilm", "smollm2" or a folder)
    model_path: str  # the folder transformers loads
    data: str  # what was asked for ("rotten-tomatoes", "hamlet" or a file)
    tokenizer: Any
    splits: dict[str, TextData]  # "train", "val", "test"
    targets: list[str] | str | None  # LoRA target_modules (None: peft's default for the type)
    num_labels: int | None = None
    label_names: list[str] | None = None  # label id -> name, for files with string labels
    num_layers: int | None = None  # keep only the first transformer blocks (fast tests)
    identity: dict[str, Any] = field(default_factory=dict)  # what defines the task, for run keys
    # tasks with answers: the final answer in an answer or a generation (exact-match scoring)
    final_answer: Callable[[str], int | None] | None = None

    @property
    def task_type(self) -> str:
        return "SEQ_CLS" if self.kind == CLASSIFICATION else "CAUSAL_LM"

    def load_base(
        self, seed: int = 0, quantize: str | None = None, device: torch.device | str = "cpu"
    ) -> nn.Module:
        """A fresh pretrained model on ``device``; a new classification head is drawn from
        ``seed``; ``quantize`` as ``data.load_pretrained``."""
        model = load_pretrained(
            self.model_path,
            self.kind == CLASSIFICATION,
            self.num_labels,
            self.num_layers,
            seed,
            quantize,
            device,
        )
        if quantize is None:
            model = model.to(device)
        if self.kind == CLASSIFICATION and model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        if self.label_names:
            model.config.id2label = dict(enumerate(self.label_names))
            model.config.label2id = {n: i for i, n in enumerate(self.label_names)}
        return model

    def batches(
        self,
        split: str,
        batch_size: int,
        max_length: int,
        num_batches: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
    ) -> list[dict[str, torch.Tensor]]:
        return make_batches(
            self.tokenizer, self.splits[split], batch_size, max_length, num_batches, seed, shuffle
        )

    def eval_batches(self, split: str, max_length: int, batch_size: int = 32):
        """Every example of ``split`` once, in order (empty list if the split is empty)."""
        if len(self.splits[split]) == 0:
            return []
        return self.batches(split, batch_size, max_length, shuffle=False)


def _split(data: TextData, val: int, test: int, seed: int = 0) -> dict[str, TextData]:
    """Seeded shuffle, then test = first ``test``, val = next ``val``, train = the rest."""
    idx = list(range(len(data)))
    random.Random(seed).shuffle(idx)

    def take(ids: list[int]) -> TextData:
        return TextData(
            [data.texts[i] for i in ids],
            None if data.labels is None else [data.labels[i] for i in ids],
            None if data.answers is None else [data.answers[i] for i in ids],
        )

    return {
        "test": take(idx[:test]),
        "val": take(idx[test : test + val]),
        "train": take(idx[test + val :]),
    }


def _held_out(n: int, size: int | float) -> int:
    """A count from an absolute size (>= 1) or a fraction (< 1) of n."""
    return int(size) if size >= 1 else int(round(size * n))


def load_tokenizer(model_path: str):
    """The tokenizer saved in the model folder (a pad token set to EOS where it has none).

    transformers builds an empty tokenizer for some architectures from config.json alone, so a
    folder without tokenizer files is refused here rather than trained on garbage tokens."""
    fix = f"save the model's tokenizer there with tokenizer.save_pretrained({model_path!r})"
    if not any((Path(model_path) / name).is_file() for name in TOKENIZER_FILES):
        raise GradLoraError(
            f"{model_path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); {fix}"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError, TypeError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise GradLoraError(
            f"the tokenizer in {model_path} does not load ({reason}); {fix}"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _chunk_text(tokenizer, text: str, max_length: int) -> list[str]:
    """Cut ``text`` into consecutive pieces of ``max_length`` tokens (decoded back to text)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [
        tokenizer.decode(ids[i : i + max_length])
        for i in range(0, len(ids) - max_length // 2, max_length)
    ]


# ---------------------------------------------------------------------------- resolving


def resolve_model(model: str) -> tuple[str, str | None, list[str] | str | None]:
    """(folder, built-in name or None, default LoRA targets) of a built-in name or local folder."""
    if model == "minilm":
        return minilm_path(), "minilm", list(MINILM_TARGETS)
    if model == "smollm2":
        return smollm2_path(), "smollm2", list(LLAMA_TARGETS)
    path = Path(model).expanduser()
    if not path.exists():
        raise GradLoraError(
            f"model not found: {model!r} is neither a built-in ({', '.join(MODELS)}) nor a folder"
        )
    if not (path / "config.json").is_file():
        raise GradLoraError(f"{path} is not a Hugging Face model folder (no config.json)")
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type == "llama":
        return str(path), None, list(LLAMA_TARGETS)
    if model_type == "bert":
        return str(path), None, list(MINILM_TARGETS)
    return str(path), None, None  # peft's default targets for the architecture


@dataclass
class DataSource:
    """Data as read, once: its kind and examples, before any split or tokenization."""

    name: str  # what was asked for ("rotten-tomatoes", "hamlet" or a file)
    kind: str  # CLASSIFICATION or CAUSAL_LM
    full: TextData | None  # every example; None for hamlet (chunked with the model's tokenizer)
    label_names: list[str] | None = None  # label id -> name, for files with string labels
    columns: list[str] | None = None  # a file's columns (for error messages)
    label_column: str | None = "label"
    identity: dict[str, Any] = field(default_factory=dict)  # what defines the data, for run keys
    final_answer: Callable[[str], int | None] | None = None  # data with answers: see Task


def read_data(
    data: str,
    text_column: str = "text",
    label_column: str = "label",
    label_required: bool = False,
    split_seed: int = 0,
) -> DataSource:
    """Read a built-in data set or a data file once. ``hamlet`` and text-only files are causal
    LM data; ``rotten-tomatoes`` and files with a label column are classification."""
    if data == "rotten-tomatoes":
        # first 1,000 of the fixed shuffle are the test set, as in every earlier measurement
        train, test = load_rotten_tomatoes(1000, seed=split_seed)
        full = TextData(test.texts + train.texts, test.labels + train.labels)
        return DataSource(data, CLASSIFICATION, full)
    if data == "hamlet":
        return DataSource(data, CAUSAL_LM, None)
    if data == "arithmetic":
        full = make_problems()
        text = json.dumps([full.texts, full.answers]).encode()
        identity = {"problems": [NUM_PROBLEMS, SEED, hashlib.sha256(text).hexdigest()[:16]]}
        identity["scores"] = ["answer_match", "exact_match"]  # what a run measures (bench)
        return DataSource(data, CAUSAL_LM, full, identity=identity, final_answer=final_answer)
    path = Path(data).expanduser()
    if not path.exists():
        raise GradLoraError(
            f"data not found: {data!r} is neither a built-in ({', '.join(DATASETS)}) nor a file"
        )
    full, label_names, columns = read_data_file(path, text_column, label_column, label_required)
    return DataSource(
        data,
        CLASSIFICATION if full.labels is not None else CAUSAL_LM,
        full,
        label_names,
        columns,
        label_column,
        {"file_sha256": file_digest(path), "columns": [text_column, label_column]},
    )


def load_task(
    model: str,
    data: str | DataSource,
    *,
    max_length: int = 64,
    val_size: int | float | None = None,
    test_size: int | float | None = None,
    num_layers: int | None = None,
    text_column: str = "text",
    label_column: str = "label",
    label_required: bool = False,
    targets: list[str] | str | None = None,
    split_seed: int = 0,
) -> Task:
    """Resolve ``model`` and ``data`` (a name, or a ``read_data`` result) into a Task with fixed
    (``split_seed``) splits.

    Sizes are counts (>= 1) or fractions (< 1) of the data; None: 500 validation and 1,000 test
    examples of rotten-tomatoes, 10% and 10% of anything else.
    """
    source = data if isinstance(data, DataSource) else None
    if source is None:
        source = read_data(data, text_column, label_column, label_required, split_seed)
    data, kind, full = source.name, source.kind, source.full
    if val_size is None:
        val_size = 500 if data == "rotten-tomatoes" else 0.1
    if test_size is None:
        test_size = 1000 if data == "rotten-tomatoes" else 0.1
    identity: dict[str, Any] = {"model": model, "data": data, "num_layers": num_layers}
    identity |= source.identity
    splits = None  # hamlet: chunked with the model's tokenizer below
    if data == "rotten-tomatoes":
        test_n, val_n = _held_out(len(full), test_size), _held_out(len(full), val_size)
        splits = {
            "test": TextData(full.texts[:test_n], full.labels[:test_n]),
            "val": TextData(
                full.texts[test_n : test_n + val_n], full.labels[test_n : test_n + val_n]
            ),
            "train": TextData(full.texts[test_n + val_n :], full.labels[test_n + val_n :]),
        }
    elif full is not None:
        splits = _split(
            full, _held_out(len(full), val_size), _held_out(len(full), test_size), split_seed
        )
        if len(splits["train"]) == 0:
            raise GradLoraError(
                f"{data}: {len(full)} rows leave nothing to train on after holding out "
                "validation and test examples; lower --val-size/--test-size"
            )

    model_path, builtin, default_targets = resolve_model(model)
    if builtin == "minilm" and kind == CAUSAL_LM:
        found = (
            f" ({data} has no {source.label_column!r} column; its columns are {source.columns})"
            if source.columns is not None
            else ""
        )
        raise GradLoraError(
            "minilm is an encoder (classification only) and this data has no labels"
            + found
            + "; give the label column with --label-column, or use a causal LM such as --model smollm2"
        )
    tokenizer = load_tokenizer(model_path)
    if splits is None:  # hamlet
        chunks = _chunk_text(tokenizer, hamlet_text(), max_length)
        splits = _split(
            TextData(chunks),
            _held_out(len(chunks), val_size),
            _held_out(len(chunks), test_size),
            split_seed,
        )
    label_names = source.label_names
    num_labels = None
    if kind == CLASSIFICATION:
        labels = splits["train"].labels + splits["val"].labels + splits["test"].labels
        num_labels = len(label_names) if label_names else max(labels) + 1
        if num_labels < 2:
            raise GradLoraError(f"classification needs at least 2 classes; {data} has {num_labels}")
    identity |= {"max_length_chunks": max_length if data == "hamlet" else None}
    identity |= {"sizes": {k: len(v) for k, v in splits.items()}, "split_seed": split_seed}
    return Task(
        kind=kind,
        model=model,
        model_path=model_path,
        data=data,
        tokenizer=tokenizer,
        splits=splits,
        targets=targets if targets is not None else default_targets,
        num_labels=num_labels,
        label_names=label_names,
        num_layers=num_layers,
        identity=identity,
        final_answer=source.final_answer,
    )
