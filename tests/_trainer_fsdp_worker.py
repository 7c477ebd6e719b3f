"""One rank of the 2-process Trainer + FSDP2 test (run by torchrun from test_parallel_fsdp.py).

Usage: python -m torch.distributed.run --standalone --nproc_per_node 2 _trainer_fsdp_worker.py OUT
On CPU accelerate 1.15 turns an FSDP config into plain DDP: it sets DistributedType.FSDP only
for GPU-like distributed types, and a gloo run is MULTI_CPU. So this test makes the gloo state
first and marks it MULTI_GPU (a CPU-only test fixture, not advice), after which the Trainer
really shards with FSDP2 (``fully_shard``: DTensor parameters). GradLoraCallback("lora-ga",
transform="lora-pro") then initializes, adjusts each step's gradients and trains 3 steps;
save_model writes the portable adapter. Each rank writes OUT/rank{r}.pt.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

os.environ["ACCELERATE_USE_FSDP"] = "true"

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from _fsdp_worker import logits, rel  # noqa: E402
from accelerate import PartialState  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402
from conftest import make_batches, tiny_base, tiny_peft  # noqa: E402
from peft import PeftModel  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

import gradlora  # noqa: E402
from gradlora.optim.transform import PairTransform  # noqa: E402

EVAL = make_batches("llama", n=1)[0]
APPLIED = []
_apply = PairTransform.apply
PairTransform.apply = lambda self, *a, **kw: APPLIED.append(self.method) or _apply(self, *a, **kw)


def run(out: Path, result: dict) -> None:
    rows = [{k: v[i] for k, v in b.items()} for b in make_batches("llama", n=4) for i in range(4)]
    model, _ = tiny_peft("llama", r=2)
    start = logits(model, EVAL)
    callback = gradlora.GradLoraCallback(
        "lora-ga", num_batches=2, progress=False, transform="lora-pro"
    )
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=2, max_steps=3, save_strategy="no",
        report_to="none", logging_strategy="no", disable_tqdm=True, use_cpu=True,
        fsdp="full_shard",
        fsdp_config={"fsdp_version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]},
        accelerator_config={"use_configured_state": True},
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback])
    trainer.train()
    lora = [p for n, p in trainer.model.named_parameters() if "lora_" in n]
    result["sharded"] = all(isinstance(p, DTensor) for p in lora) and bool(lora)
    result["ranks"], result["num_batches"] = callback.report.ranks, callback.report.num_batches
    result["offset"] = callback.report.offset
    result["applied"] = list(APPLIED)
    final = logits(trainer.model, EVAL)
    result["moved"] = rel(final, start)
    trainer.save_model(str(out / "final"))
    dist.barrier()
    loaded = PeftModel.from_pretrained(tiny_base("llama"), str(out / "final"))
    result["plain_peft"] = rel(logits(loaded, EVAL), final)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    PartialState(backend="gloo")
    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU  # module doc
    result: dict = {}
    failed = False
    try:
        run(out, result)
    except Exception:
        traceback.print_exc()
        failed = True
    torch.save(result, out / f"rank{dist.get_rank()}.pt")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
