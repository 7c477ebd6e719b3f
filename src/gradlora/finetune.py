"""``gradlora train``: fine-tune with one method, checkpoint, resume, save a plain peft adapter.

A checkpoint (OUT/checkpoint.pt) holds the trainable weights (all weights for methods whose init
changes the base weights), the optimizer and scheduler state, the step, the losses so far and
the RNG state. The batches are a pure function of the seed, so a run resumed from a checkpoint
takes exactly the steps the uninterrupted run would have taken and ends at the same adapter.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from .errors import GradLoraError
from .methods import get_method
from .tasks import CLASSIFICATION, load_task
from .train import evaluate, make_scheduler, smooth, train

CHECKPOINT = "checkpoint.pt"
INITIAL_ADAPTER = ".initial-adapter"  # peft's PiSSA / LoRA-GA conversion needs the init


def _config_key(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _state_names(model: torch.nn.Module, everything: bool) -> list[str]:
    if everything:
        return list(model.state_dict().keys())
    return [n for n, p in model.named_parameters() if p.requires_grad]


def save_checkpoint(path: Path, key: str, step: int, losses, model, optimizer, scheduler, method):
    state = model.state_dict()
    data = {
        "config_key": key,
        "step": step,
        "losses": list(losses),
        "model": {
            n: state[n].detach().cpu().clone() for n in _state_names(model, method.offsets_base)
        },
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(data, tmp)
    os.replace(tmp, path)  # a kill mid-write leaves the previous checkpoint intact


def load_checkpoint(path: Path, key: str, model, optimizer, scheduler) -> tuple[int, list[float]]:
    data = torch.load(path, map_location="cpu", weights_only=True)
    if data["config_key"] != key:
        raise GradLoraError(
            f"{path} was written by a run with different settings; resume with the same "
            "command, or use another --out"
        )
    missing = [n for n in data["model"] if n not in model.state_dict()]
    if missing:
        raise GradLoraError(f"{path} does not fit this model (e.g. {missing[0]!r})")
    model.load_state_dict(data["model"], strict=False)
    optimizer.load_state_dict(data["optimizer"])
    scheduler.load_state_dict(data["scheduler"])
    torch.set_rng_state(data["rng"])
    if data["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(data["cuda_rng"])
    return int(data["step"]), list(data["losses"])


def main_train(args, defaults_for, guess_kind) -> int:
    from .bench import resolve_device
    from .methods import build

    method = get_method(args.method)
    label_column = args.label_column or "label"
    defaults_for(args, guess_kind(args.data, args.text_column, label_column))
    task = load_task(
        args.model,
        args.data,
        max_length=args.max_length,
        val_size=args.val_size,
        test_size=args.test_size,
        num_layers=args.num_layers,
        text_column=args.text_column,
        label_column=label_column,
        label_required=args.label_column is not None,
    )
    lr = args.lr if args.lr is not None else method.default_lr(task.kind)
    device = resolve_device(args.device)
    warmup = args.warmup_steps if args.warmup_steps is not None else -(-3 * args.steps // 100)
    config = {
        "task": task.identity,
        "method": method.name,
        "lr": lr,
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "rank": args.rank,
        "alpha": args.alpha,
        "init_batches": args.init_batches,
        "weight_decay": args.weight_decay,
        "schedule": args.schedule,
        "warmup_steps": warmup,
    }
    key = _config_key(config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / CHECKPOINT
    if ckpt.exists() and not args.resume:
        raise GradLoraError(f"{ckpt} exists: add --resume to continue it, or use another --out")
    progress = not args.no_progress
    if task.label_names:
        print("labels: " + ", ".join(f"{i} = {n}" for i, n in enumerate(task.label_names)))
    print(
        f"{method.name} ({method.about}) on {task.model}, {task.data}: {task.kind}, "
        f"{len(task.splits['train'])} train / {len(task.splits['val'])} val / "
        f"{len(task.splits['test'])} test examples; lr {lr:g}, {args.steps} steps"
    )

    batches = task.batches("train", args.batch_size, args.max_length, args.steps, seed=args.seed)
    built = build(
        method,
        task,
        lr=lr,
        seed=args.seed,
        train_batches=batches,
        rank=args.rank,
        alpha=args.alpha,
        init_batches=args.init_batches,
        weight_decay=args.weight_decay,
        device=device,
        progress=progress,
    )
    model, opt = built.model, built.optimizer
    if built.init_summary:
        print(built.init_summary)
    initial = out / INITIAL_ADAPTER
    if method.init in ("pissa", "peft-lora-ga") and not (initial / "adapter_config.json").exists():
        # peft converts such adapters to plain ones against this saved init (see save below)
        adapter = model.active_adapter
        init_weights = model.peft_config[adapter].init_lora_weights
        model.peft_config[adapter].init_lora_weights = True
        model.save_pretrained(str(initial))
        model.peft_config[adapter].init_lora_weights = init_weights
    sched = make_scheduler(opt, args.schedule, args.steps, warmup)
    torch.manual_seed(args.seed + 2)  # dropout draws, as in gradlora bench
    start_step, losses = 0, []
    if args.resume and ckpt.exists():
        start_step, losses = load_checkpoint(ckpt, key, model, opt, sched)
        print(f"resuming from {ckpt} at step {start_step}")

    def on_step(step: int, result) -> None:
        if args.save_every and (step % args.save_every == 0 or step == args.steps):
            save_checkpoint(ckpt, key, step, result.losses, model, opt, sched, method)

    result = train(
        model,
        batches,
        opt,
        sched,
        progress=progress,
        desc=method.name,
        start_step=start_step,
        losses=losses,
        on_step=on_step,
    )
    if result.diverged_at is not None:
        raise GradLoraError(
            f"the loss became NaN/inf at step {result.diverged_at + 1}; lower --lr (was {lr:g})"
        )
    eval_bs = 64 if task.kind == CLASSIFICATION else args.batch_size
    metrics = {
        split: evaluate(model, task.eval_batches(split, args.max_length, eval_bs))
        for split in ("val", "test")
        if len(task.splits[split])
    }
    if method.full:
        where = out / "model"
        model.save_pretrained(str(where))
    elif method.init in ("pissa", "peft-lora-ga"):
        where = out / "adapter"
        model.save_pretrained(str(where), path_initial_model_for_weight_conversion=str(initial))
    else:
        from .peft_bridge import save_adapter

        where = save_adapter(model, out / "adapter")
    task.tokenizer.save_pretrained(str(where))
    record = {
        "config": config | {"model": task.model, "data": task.data, "model_path": task.model_path},
        "kind": task.kind,
        "label_names": task.label_names,
        "losses": result.losses,
        "final_smoothed_loss": smooth(result.losses)[-1] if result.losses else None,
        "metrics": metrics,
        "init": built.init_summary,
        "init_seconds": built.init_seconds,
        "saved": str(where),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    (out / "train.json").write_text(json.dumps(record, indent=1))
    parts = [f"final training loss (20-step mean) {record['final_smoothed_loss']:.4f}"]
    for split, m in metrics.items():
        parts.append(
            f"{split} loss {m['loss']:.4f}"
            + (f", {split} accuracy {m['accuracy']:.3f}" if "accuracy" in m else "")
        )
    print("; ".join(parts))
    print(f"saved {where} and {out / 'train.json'}")
    return 0
