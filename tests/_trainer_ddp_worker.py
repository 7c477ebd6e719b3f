"""One rank of the 2-process Trainer tests (run by torchrun from
test_integrations_transformers_ddp.py).

Usage: GRADLORA_TEST_CASE=trainer|sft python -m torch.distributed.run --standalone
--nproc_per_node 2 _trainer_ddp_worker.py OUT
A Trainer ("trainer") or TRL's SFTTrainer building the PeftModel from a peft_config ("sft"),
with GradLoraCallback("lora-ga", num_batches=2), trains 4 shuffled steps on a tiny Llama under
DDP (gloo, CPU), checkpointing at steps 2 and 4, then saves a final adapter; a second Trainer
resumes from checkpoint-2 to step 4. "trainer" also runs an IterableDataset (accelerate's
DataLoaderDispatcher). Each rank writes OUT/rank{r}.pt: its tensors, the batches it saw, the
adapter saves it made and the init summaries it logged.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.state import GradientState
from conftest import VOCAB, lora_config, make_batches, tiny_base, tiny_peft
from test_integrations_transformers import Probe, logits
from transformers import Trainer, TrainerCallback, TrainingArguments

import gradlora
import gradlora.adapter.portable_save as portable_save
from gradlora.peft_view import supported_layers

CASE = os.environ.get("GRADLORA_TEST_CASE", "trainer")
EVAL = make_batches("llama", n=2)


def rows(n: int) -> list[dict]:
    """The rows of make_batches("llama", n), in order (the default collator stacks them back)."""
    return [{k: v[i] for k, v in b.items()} for b in make_batches("llama", n=n) for i in range(4)]


class Rows(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield from rows(8)


def tensors(model) -> dict[str, torch.Tensor]:
    out = {}
    for t in supported_layers(model)[0]:
        for key, x in (("A", t.A), ("B", t.B), ("W", t.weight)):
            out[f"{t.name}.{key}"] = x.detach().clone()
    return out


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


class AfterInit(TrainerCallback):
    """Placed after GradLoraCallback: whether accelerate's gradient state still holds a dataloader."""

    in_dataloader = None

    def on_train_begin(self, args, state, control, **kw):
        self.in_dataloader = GradientState().in_dataloader


def sft_parts():
    """A word-level tokenizer for the tiny vocabulary and a text dataset for SFTTrainer."""
    from datasets import Dataset  # noqa: PLC0415  (trl's dependency: the "sft" case only)
    from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    g = torch.Generator().manual_seed(5)
    texts = [
        " ".join(f"w{int(i)}" for i in torch.randint(2, VOCAB, (int(n),), generator=g))
        for n in torch.randint(6, 12, (32,), generator=g)
    ]
    return tokenizer, Dataset.from_dict({"text": texts})


def make_trainer(out: Path, callbacks: list, **kw):
    common = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        report_to="none",
        use_cpu=True,
        logging_strategy="no",
        disable_tqdm=True,
    )
    common.update(kw)
    if CASE == "trainer":  # shuffled by a generator that accelerate syncs from rank 0
        args = TrainingArguments(**common, accelerator_config={"use_seedable_sampler": False})
        model, _ = tiny_peft("llama", r=2)
        return Trainer(model=model, args=args, train_dataset=rows(8), callbacks=callbacks)
    from trl import SFTConfig, SFTTrainer  # noqa: PLC0415  (optional: the test skips without trl)

    tokenizer, data = sft_parts()
    args = SFTConfig(**common, bf16=False, max_length=32)  # gradient checkpointing: TRL's default
    return SFTTrainer(
        model=tiny_base("llama"),
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=lora_config("llama", r=2),
        callbacks=callbacks,
    )


def record_batches(trainer) -> list[dict]:
    """Every batch the Trainer's collator builds on this rank, in order."""
    seen, collate = [], trainer.data_collator

    def recording(features):
        batch = collate(features)
        seen.append({k: v.clone() for k, v in batch.items()})
        return batch

    trainer.data_collator = recording
    return seen


def iterable_run(out: Path) -> dict:
    """An IterableDataset: accelerate's DataLoaderDispatcher, rank 0 reads and scatters."""
    model, _ = tiny_peft("llama", r=2)
    seen = []  # input_ids of every forward: the init's, then training's
    model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["input_ids"].clone()), with_kwargs=True
    )
    callback, after = (
        gradlora.GradLoraCallback("lora-ga", num_batches=2, progress=False),
        AfterInit(),
    )
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(out),
            per_device_train_batch_size=4,
            max_steps=2,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            logging_strategy="no",
            disable_tqdm=True,
        ),
        train_dataset=Rows(),
        callbacks=[callback, after],
    )
    trainer.train()
    return {
        "loader": type(trainer.callback_handler.train_dataloader).__name__,
        "seen": seen,
        "num_batches": callback.report.num_batches,
        "in_dataloader_after_init": after.in_dataloader,
    }


def main(out: Path) -> None:
    torch.set_num_threads(1)
    saves: list[str] = []
    real_save = portable_save.save_adapter

    def recording_save(model, path, **kwargs):
        saves.append(Path(path).name)
        return real_save(model, path, **kwargs)

    portable_save.save_adapter = recording_save  # what the portable save_pretrained calls
    records = Records()
    logging.getLogger("gradlora.integrations.transformers").addHandler(records)

    callback = gradlora.GradLoraCallback("lora-ga", num_batches=2, progress=False)
    probe = Probe(EVAL)
    first = make_trainer(out / "a", [callback, probe])
    seen = record_batches(first)
    first.train()
    first.save_model(str(out / "a" / "final"))
    rank = dist.get_rank()  # what a Trainer whose ranks all save calls: only the main one writes
    first.model.save_pretrained(str(out / f"direct{rank}"), is_main_process=rank == 0)
    result = {
        "world": dist.get_world_size(),
        "wrapper": type(first.model_wrapped).__name__,
        "init": probe.first,
        "batches": seen,
        "ranks": callback.report.ranks,
        "num_batches": callback.report.num_batches,
        "trained": tensors(first.model),
        "saved_logits": probe.saved,
        "final_logits": logits(first.model, EVAL),
        "saves": list(saves),
        "summaries": [m for m in records.messages if "init of" in m],
    }

    resumed = gradlora.GradLoraCallback("lora-ga", num_batches=2, progress=False)
    second = make_trainer(out / "b", [resumed])
    second.train(resume_from_checkpoint=str(out / "a" / "checkpoint-2"))
    result["resumed"] = tensors(second.model)
    result["resumed_at"], result["resumed_report"] = resumed.resumed_at, resumed.report
    if CASE == "trainer":
        result["iterable"] = iterable_run(out / "c")
    torch.save(result, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
