"""One rank of the 2-process Trainer + DeepSpeed test (run by torchrun from
test_parallel_deepspeed.py).

Usage: python -m torch.distributed.run --standalone --nproc_per_node 2
_trainer_deepspeed_worker.py OUT
The HF Trainer under DeepSpeed ZeRO-3 (gloo, CPU; accelerate's state made first, as a CPU-only
test needs) with GradLoraCallback("lora-ga", transform="lora-pro") trains 4 steps of a tiny
Llama, checkpointing at steps 2 and 4, and saves a final adapter; a second Trainer resumes from
checkpoint-2 to step 4. TRL's SFTTrainer then trains under ZeRO-2 with LoRA-One's init and
preconditioner. Each rank writes OUT/rank{r}.pt.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _fsdp_worker import logits, rel  # noqa: E402
from accelerate import PartialState  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402
from conftest import lora_config, make_batches, tiny_base, tiny_peft  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

import gradlora  # noqa: E402
from gradlora.optim.transform import PairTransform  # noqa: E402

APPLIED = []  # one entry per pair-transform step, on this rank
_apply = PairTransform.apply
PairTransform.apply = lambda self, *a, **kw: APPLIED.append(self.method) or _apply(self, *a, **kw)

EVAL = make_batches("llama", n=1)[0]


def rows(n: int) -> list[dict]:
    return [{k: v[i] for k, v in b.items()} for b in make_batches("llama", n=n) for i in range(4)]


def ds_config(stage: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {
            "stage": stage,
            "stage3_param_persistence_threshold": 0,
            "stage3_gather_16bit_weights_on_model_save": True,
        },
    }


def arguments(out: Path, stage: int, **kw) -> dict:
    return dict(
        output_dir=str(out),
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        report_to="none",
        use_cpu=True,
        logging_strategy="no",
        disable_tqdm=True,
        deepspeed=ds_config(stage),
        accelerator_config={"use_configured_state": True},
        **kw,
    )


def fresh_accelerator_state() -> None:
    """A second Trainer in one process builds its own DeepSpeed plugin: accelerate allows that
    only once its AcceleratorState is reset (the gloo PartialState stays)."""
    AcceleratorState._reset_state(reset_partial_state=False)


def trainer_lora_ga(out: Path, result: dict, stage: int = 3) -> None:
    """LoRA-GA under ZeRO-``stage`` (result keys "zero<stage>/..."): 4 steps with checkpoints,
    the final adapter, a run resumed from checkpoint-2. ZeRO-3 keeps the offset in the adapter
    and runs the LoRA-Pro transform; ZeRO-2 (weights whole, fp32) rewrites the base weight
    (offset "weight"), which a resume must offset again from the checkpoint's factors."""
    key = f"zero{stage}"

    def run(resume: bool):
        fresh_accelerator_state()
        callback = gradlora.GradLoraCallback(
            "lora-ga", num_batches=2, progress=False, transform="lora-pro" if stage == 3 else None
        )
        model, _ = tiny_peft("llama", r=2)
        trainer = Trainer(
            model=model,
            args=TrainingArguments(**arguments(out, stage)),
            train_dataset=rows(8),
            callbacks=[callback],
        )
        trainer.train(resume_from_checkpoint=str(out / "checkpoint-2") if resume else None)
        return trainer, callback

    APPLIED.clear()
    first, callback = run(resume=False)
    result[f"{key}/applied"] = list(APPLIED)
    result[f"{key}/ranks"] = callback.report.ranks
    result[f"{key}/offset"] = callback.report.offset
    final = logits(first.model, EVAL)
    first.save_model(str(out / "final"))
    dist.barrier()  # rank 0 writes; the others read once it is done
    result[f"{key}/moved"] = rel(final, logits(tiny_peft("llama", r=2)[0], EVAL))
    loaded = PeftModel.from_pretrained(tiny_base("llama"), str(out / "final"))
    result[f"{key}/plain_peft"] = rel(logits(loaded, EVAL), final)
    result[f"{key}/files"] = sorted(p.name for p in (out / "final").iterdir())
    resumed, callback = run(resume=True)
    result[f"{key}/resumed_at"] = callback.resumed_at
    result[f"{key}/resume"] = rel(logits(resumed.model, EVAL), final)


def sft_zero2(out: Path, result: dict) -> None:
    from _trainer_ddp_worker import sft_parts  # noqa: PLC0415
    from trl import SFTConfig, SFTTrainer  # noqa: PLC0415

    tokenizer, data = sft_parts()
    fresh_accelerator_state()
    callback = gradlora.GradLoraCallback(
        "lora-one", num_batches=2, progress=False, transform="preconditioned"
    )
    args = SFTConfig(**arguments(out, 2, bf16=False, max_length=32))
    trainer = SFTTrainer(
        model=tiny_base("llama"),
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=lora_config("llama", r=2),
        callbacks=[callback],
    )
    start = logits(trainer.model, EVAL)
    APPLIED.clear()
    trainer.train()
    result["sft/applied"] = list(APPLIED)
    final = logits(trainer.model, EVAL)
    result["sft/moved"] = rel(final, start)
    trainer.save_model(str(out / "final"))
    dist.barrier()
    loaded = PeftModel.from_pretrained(tiny_base("llama"), str(out / "final"))
    result["sft/plain_peft"] = rel(logits(loaded, EVAL), final)
    result["sft/transform"] = callback.transform.method
    result["sft/ranks"] = callback.report.ranks


def accelerate_config_zero3(out: Path, result: dict) -> None:
    """ZeRO-3 from an accelerate DeepSpeed config (``ACCELERATE_DEEPSPEED_CONFIG_FILE``, what
    ``accelerate launch --config_file`` sets) instead of ``TrainingArguments(deepspeed=...)``:
    the init, the transform and the saved adapter."""
    out.mkdir(parents=True, exist_ok=True)
    config = out / "ds_config.json"
    if dist.get_rank() == 0:
        config.write_text(json.dumps(ds_config(3)))
    dist.barrier()
    os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(config)
    fresh_accelerator_state()
    APPLIED.clear()
    callback = gradlora.GradLoraCallback(
        "lora-ga", num_batches=2, progress=False, transform="preconditioned"
    )
    kw = arguments(out, 3) | {"max_steps": 2}
    kw.pop("deepspeed")
    model, _ = tiny_peft("llama", r=2)
    trainer = Trainer(
        model=model, args=TrainingArguments(**kw), train_dataset=rows(8), callbacks=[callback]
    )
    trainer.train()
    result["accelerate/deepspeed"] = type(trainer.model_wrapped).__name__
    result["accelerate/partitioned"] = all(hasattr(p, "ds_id") for p in trainer.model.parameters())
    result["accelerate/applied"] = list(APPLIED)
    final = logits(trainer.model, EVAL)
    trainer.save_model(str(out / "final"))
    dist.barrier()
    loaded = PeftModel.from_pretrained(tiny_base("llama"), str(out / "final"))
    result["accelerate/plain_peft"] = rel(logits(loaded, EVAL), final)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    PartialState(backend="gloo")
    rank = dist.get_rank()
    result: dict = {}
    failed = False
    try:
        trainer_lora_ga(out / "zero3", result, stage=3)
        trainer_lora_ga(out / "zero2", result, stage=2)
        sft_zero2(out / "sft", result)
        accelerate_config_zero3(out / "accelerate", result)
    except Exception:
        traceback.print_exc()
        failed = True
    torch.save(result, out / f"rank{rank}.pt")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
