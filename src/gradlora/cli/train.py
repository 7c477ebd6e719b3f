"""``gradlora train``: fine-tune with one method, checkpoint, resume, save a plain peft adapter.

A checkpoint (OUT/checkpoint.pt) holds the trainable weights (all weights for methods whose init
changes the base weights), the optimizer and scheduler state, the step, the losses so far and
the RNG state. The batches are a pure function of the seed, so a run resumed from a checkpoint
takes exactly the steps the uninterrupted run would have taken and ends at the same adapter.

Under torchrun (WORLD_SIZE > 1, see gradlora.cli.torchrun) every process builds the same model and the
same global batches, trains on its rows of each batch inside DistributedDataParallel, and the
gradient init is a collective (gradlora.initialize all-reduces). Rank 0 alone prints, shows
progress bars, evaluates and writes the checkpoint (with every rank's RNG state) and the
outputs; the others wait for it at a barrier before leaving the process group. ``--resume``
makes every process load the same checkpoint, which must have been written by as many
processes.

With ``--fsdp`` (torchrun only) the model is sharded with FSDP2 instead (gradlora.cli.fsdp)
after peft wraps it, before the gradient init and the optimizer; every process then evaluates
(forwards are collectives) and takes part in ``save_adapter``, which gathers the adapter and
lets rank 0 write it. No checkpoints under --fsdp yet (refused by TrainConfig.validate).

``--export vllm`` / ``--export merged`` then write OUT/export-vllm (``export_adapter``) and
OUT/merged (``export_merged``, bf16, with the tokenizer), each checked against the trained
model before it appears (docs/serving.md).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ..adapter.export import export_adapter
from ..adapter.io import save_adapter
from ..adapter.merged import export_merged
from ..atomic import atomic_write, write_json
from ..errors import GradLoraError
from ..parallel.collectives import synchronize
from . import fsdp, loop
from .config import TrainConfig, digest, eval_batch_size, resolve_device
from .recipes import build, get_recipe
from .tasks import CLASSIFICATION, read_data
from .torchrun import Ranks, start

CHECKPOINT = "checkpoint.pt"
INITIAL_ADAPTER = ".initial-adapter"  # peft's PiSSA / LoRA-GA conversion needs the init


def _state_names(model: torch.nn.Module, everything: bool) -> list[str]:
    if everything:
        return list(model.state_dict().keys())
    return [n for n, p in model.named_parameters() if p.requires_grad]


def save_checkpoint(
    path: Path, key: str, step: int, losses, model, optimizer, scheduler, everything, rank_rng=None
):
    """Write the checkpoint atomically. ``rank_rng``: every rank's (CPU, CUDA) RNG state under
    torchrun (then the checkpoint also records the number of processes)."""
    state = model.state_dict()
    data = {
        "config_key": key,
        "step": step,
        "losses": list(losses),
        "model": {n: state[n].detach().cpu().clone() for n in _state_names(model, everything)},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if rank_rng is not None and len(rank_rng) > 1:
        data |= {"world_size": len(rank_rng), "rank_rng": rank_rng}
    atomic_write(path, lambda tmp: torch.save(data, tmp))  # a kill keeps the previous one


def load_checkpoint(
    path: Path, key: str, model, optimizer, scheduler, rank: int = 0, world: int = 1
) -> tuple[int, list[float]]:
    """Restore model, optimizer, scheduler and this rank's RNG; (step, losses so far)."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    if data["config_key"] != key:
        raise GradLoraError(
            f"{path} was written by a run with different settings; resume with the same "
            "command, or use another --out"
        )
    written_by = data.get("world_size", 1)
    if written_by != world:
        raise GradLoraError(
            f"{path} was written by {written_by} process(es) and this run has {world}; resume "
            f"with as many (torchrun --nproc_per_node {written_by}"
            + (")" if written_by > 1 else ", or no torchrun)")
        )
    missing = [n for n in data["model"] if n not in model.state_dict()]
    if missing:
        raise GradLoraError(f"{path} does not fit this model (e.g. {missing[0]!r})")
    model.load_state_dict(data["model"], strict=False)
    optimizer.load_state_dict(data["optimizer"])
    scheduler.load_state_dict(data["scheduler"])
    rng, cuda_rng = (data["rng"], data["cuda_rng"]) if world == 1 else data["rank_rng"][rank]
    torch.set_rng_state(rng)
    if cuda_rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_rng)
    return int(data["step"]), list(data["losses"])


def _quiet(*args: Any, **kwargs: Any) -> None:
    """print on ranks other than 0."""


def _differing(model: torch.nn.Module, ranks: Ranks) -> list[str]:
    """Trainable weights that are not bit-identical on every rank (rank 0's are then copied to
    the others; after DDP training none should differ). Collective; [] in a single process."""
    if not ranks.active:
        return []
    named = [(n, p.data) for n, p in model.named_parameters() if p.requires_grad]
    return [named[i][0] for i in synchronize([t for _, t in named])]


def main_train(cfg: TrainConfig) -> int:
    """``gradlora train``: one process, or one of torchrun's (then the group is left at the end)."""
    cfg.validate()
    ranks = start(cfg.device)
    if cfg.fsdp and not ranks.active:
        raise GradLoraError(
            "--fsdp shards the model over torchrun's processes: launch with torchrun "
            "--nproc_per_node N (N >= 2), or drop --fsdp to train in one process"
        )
    try:
        return _main_train(cfg, ranks)
    finally:
        ranks.close()


def _main_train(cfg: TrainConfig, ranks: Ranks) -> int:
    method = get_recipe(cfg.method)
    say = print if ranks.main else _quiet
    label_column = cfg.label_column or "label"
    source = read_data(cfg.data, cfg.text_column, label_column, cfg.label_column is not None)
    cfg, task = cfg.load_task(source)
    lr = cfg.lr if cfg.lr is not None else method.default_lr(task.kind)
    device = ranks.device if ranks.active else resolve_device(cfg.device)
    if ranks.active and method.init == "peft-lora-ga":
        raise GradLoraError(
            "peft-lora-ga (peft's preprocess_loraga) estimates the gradient in each process "
            "alone; under torchrun use lora-ga (gradlora's init, averaged over all processes)"
        )
    if cfg.fsdp and (method.full or method.init not in (None, "lora-ga", "lora-one")):
        raise GradLoraError(
            f"--fsdp with method {method.name}: FSDP2 sharding supports the LoRA methods with "
            "gradlora's inits or none (lora, lora-ga, lora-one, lora-pro, ...); train "
            f"{method.name} without --fsdp"
        )
    _check_export(cfg, task)
    config = cfg.run_spec(task.identity, method.name, lr, cfg.seed)
    key = digest(config, 16)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / CHECKPOINT
    if ckpt.exists() and not cfg.resume:
        raise GradLoraError(f"{ckpt} exists: add --resume to continue it, or use another --out")
    progress = cfg.progress and ranks.main
    if task.label_names:
        say("labels: " + ", ".join(f"{i} = {n}" for i, n in enumerate(task.label_names)))
    say(
        f"{method.name} ({method.about}) on {task.model}, {task.data}: {task.kind}, "
        f"{len(task.splits['train'])} train / {len(task.splits['val'])} val / "
        f"{len(task.splits['test'])} test examples; lr {lr:g}, {cfg.steps} steps"
    )
    # the global batches, a pure function of the seed; this process trains on its rows of each
    batches = task.batches("train", cfg.batch_size, cfg.max_length, cfg.steps, seed=cfg.seed)
    batches = ranks.shard(batches, cfg.batch_size)
    if ranks.active:
        say(
            f"data-parallel: {ranks.world} processes ({torch.distributed.get_backend()}), "
            f"{cfg.batch_size // ranks.world} examples each per step"
            + (", model sharded with FSDP2" if cfg.fsdp else "")
        )
    built = build(
        method,
        task,
        lr=lr,
        seed=cfg.seed,
        train_batches=batches,
        rank=cfg.rank,
        alpha=cfg.alpha,
        init_batches=cfg.init_batches,
        weight_decay=cfg.weight_decay,
        device=device,
        progress=progress,
        quantize=cfg.quantize,
        damping=cfg.damping,
        shard=(lambda m: fsdp.shard(m, device)) if cfg.fsdp else None,
    )
    model, opt = built.model, built.optimizer
    if built.init_summary:
        say(built.init_summary)
    initial = out / INITIAL_ADAPTER
    first = (
        method.init in ("pissa", "peft-lora-ga") and not (initial / "adapter_config.json").exists()
    )
    if first and ranks.main:
        # peft converts such adapters to plain ones against this saved init (see save below)
        adapter = model.active_adapter
        init_weights = model.peft_config[adapter].init_lora_weights
        model.peft_config[adapter].init_lora_weights = True
        model.save_pretrained(str(initial))
        model.peft_config[adapter].init_lora_weights = init_weights
    sched = loop.make_scheduler(opt, cfg.schedule, cfg.steps, cfg.warmup)
    torch.manual_seed(cfg.seed + 2 + 1_000_003 * ranks.rank)  # dropout, as in gradlora bench
    start_step, losses = 0, []
    if cfg.resume and ckpt.exists():
        start_step, losses = load_checkpoint(ckpt, key, model, opt, sched, ranks.rank, ranks.world)
        say(f"resuming from {ckpt} at step {start_step}")
    ranks.same(start_step, "the step to resume from")
    # DistributedDataParallel under torchrun; the model itself alone or sharded with FSDP2
    net = model if cfg.fsdp else ranks.wrap(model)

    # the whole state when the init rewrote base weights; a quantized base is never rewritten
    rewrites = method.offsets_base and cfg.quantize is None

    def on_step(step: int, result) -> None:
        if cfg.save_every and (step % cfg.save_every == 0 or step == cfg.steps):
            rank_rng = ranks.rng_states() if ranks.active else None  # collective
            if ranks.main:
                save_checkpoint(
                    ckpt, key, step, result.losses, model, opt, sched, rewrites, rank_rng
                )

    result = loop.train(
        net,
        batches,
        opt,
        sched,
        progress=progress,
        desc=method.name,
        start_step=start_step,
        losses=losses,
        on_step=on_step,
        loss_value=ranks.mean if ranks.active else None,
    )
    if result.diverged_at is not None:
        raise GradLoraError(
            f"the loss became NaN/inf at step {result.diverged_at + 1}; lower --lr (was {lr:g})"
        )
    differing = [] if cfg.fsdp else _differing(model, ranks)  # FSDP2: no replicas to compare
    if ranks.main or cfg.fsdp:  # FSDP2: evaluating and saving are collectives
        _finish(cfg, task, method, model, built, config, result, out, differing, ranks)
    ranks.barrier()  # no process leaves before rank 0 has saved
    return 0


def _finish(cfg, task, method, model, built, config, result, out, differing, ranks) -> None:
    """Evaluate, save the adapter (or model), the tokenizer and train.json; print the summary.
    Rank 0 alone, or every rank under --fsdp (then rank 0 alone writes and prints)."""
    initial = out / INITIAL_ADAPTER
    eval_bs = eval_batch_size(task.kind, cfg.batch_size)
    metrics = {
        split: loop.evaluate(model, task.eval_batches(split, cfg.max_length, eval_bs))
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
        where = save_adapter(model, out / "adapter")  # a collective under --fsdp
    if not ranks.main:
        return
    world = ranks.world
    task.tokenizer.save_pretrained(str(where))
    exported = _export(cfg, task, model, out, eval_bs)
    record = {
        "config": config | {"model": task.model, "data": task.data, "model_path": task.model_path},
        "kind": task.kind,
        "label_names": task.label_names,
        "losses": result.losses,
        "final_smoothed_loss": loop.smooth(result.losses)[-1] if result.losses else None,
        "metrics": metrics,
        "init": built.init_summary,
        "init_seconds": built.init_seconds,
        "saved": str(where),
        **({"exported": exported} if exported else {}),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if world > 1:
        record |= {"processes": world, "ranks_differed": differing, "fsdp": cfg.fsdp}
        if differing:
            print(
                f"warning: {len(differing)} weights differed across processes (e.g. "
                f"{differing[0]}); rank 0's were saved"
            )
    write_json(out / "train.json", record)
    parts = [f"final training loss (20-step mean) {record['final_smoothed_loss']:.4f}"]
    for split, m in metrics.items():
        parts.append(
            f"{split} loss {m['loss']:.4f}"
            + (f", {split} accuracy {m['accuracy']:.3f}" if "accuracy" in m else "")
        )
    print("; ".join(parts))
    print(f"saved {where} and {out / 'train.json'}")
    for path in exported:
        print(f"exported {path} (checked against the trained model)")


def _check_export(cfg: TrainConfig, task) -> None:
    """Before training: --export vllm cannot carry a classification head."""
    if "vllm" in cfg.export and task.kind == CLASSIFICATION:
        raise GradLoraError(
            "--export vllm on a classification task: its head is trained whole "
            "(modules_to_save), which vLLM's LoRA refuses; use --export merged"
        )


def _export(cfg: TrainConfig, task, model, out: Path, eval_bs: int) -> list[str]:
    """--export: OUT/export-vllm (a plain adapter) and / or OUT/merged (bf16, with the
    tokenizer), each checked on the first validation batch (or the exporters' own probe)."""
    val = task.eval_batches("val", cfg.max_length, eval_bs) if cfg.export else []
    probe = val[0] if val else None
    written = []
    if "vllm" in cfg.export:
        path = export_adapter(model, out / "export-vllm", probe=probe, overwrite=True)
        written.append(str(path))
    if "merged" in cfg.export:
        path = export_merged(
            model, out / "merged", probe=probe, tokenizer=task.tokenizer, overwrite=True
        )
        written.append(str(path))
    return written
