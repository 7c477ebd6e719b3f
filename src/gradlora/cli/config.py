"""The settings of a fine-tuning run, shared by ``gradlora train`` and ``gradlora bench``, and the
hash that keys a run: one dataclass, one warmup rule, one evaluation batch size, one hash."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from typing import Any, Self

import torch

from ..errors import GradLoraError
from .data import QUANTIZE
from .recipes import DAMPED, RECIPES
from .tasks import CLASSIFICATION, DataSource, Task, load_task

# bump when a change of the code changes what a bench run with the same settings computes
# 2: LoRA-Pro's damping 1e-8 (was 1e-6); randomized SVD q = 2k + 64, 8 iterations (was 2k, 4)
PROTOCOL_VERSION = 2
DEFAULT_METHODS = ["lora", "lora-ga", "lora-one", "lora-pro", "full"]
SCHEDULES = ("constant", "linear", "cosine")
EXPORTS = ("vllm", "merged")  # gradlora train --export: OUT/export-vllm, OUT/merged (bf16)


@dataclass
class RunConfig:
    """What both commands train with; a field left None gets its default for the task kind."""

    model: str = "minilm"  # built-in name or model folder
    data: str = "rotten-tomatoes"  # built-in name or data file
    steps: int = 150  # optimizer steps of every run
    batch_size: int | None = None  # examples per step; None: 32 classification, 8 causal LM
    max_length: int | None = None  # tokens per example (hamlet: per chunk); None: 64 / 128
    rank: int = 8  # LoRA r
    alpha: float = 16.0  # LoRA alpha
    init_batches: int = 8  # first training batches used by gradient inits
    weight_decay: float = 0.01  # AdamW's decoupled weight decay
    schedule: str = "cosine"  # constant, linear, cosine (after the linear warmup)
    warmup_steps: int | None = None  # None: 3% of the steps, rounded up
    val_size: float | None = None  # count or fraction; None: 500 (rotten-tomatoes) / 10%
    test_size: float | None = None  # count or fraction; None: 1,000 (rotten-tomatoes) / 10%
    num_layers: int | None = None  # keep only the first transformer blocks (tests, smoke runs)
    quantize: str | None = None  # "nf4" / "int8": a bitsandbytes base (QLoRA); None: fp32
    damping: float | None = (
        None  # lambda of the pair optimizers (preconditioned, lora-pro); None: theirs
    )
    device: str = "auto"  # "auto": cuda if available, else cpu
    progress: bool = True  # tqdm bars

    def validate(self) -> None:
        """Refuse a setting no run can use, naming its flag; called before anything is loaded."""
        _at_least("--steps", self.steps, 1)
        _at_least("--batch-size", self.batch_size, 1)
        _at_least("--max-length", self.max_length, 1)
        _at_least("--rank", self.rank, 1)
        _at_least("--init-batches", self.init_batches, 1)
        _at_least("--num-layers", self.num_layers, 1)
        _positive("--alpha", self.alpha)
        _positive("--val-size", self.val_size)
        _positive("--test-size", self.test_size)
        _positive("--damping", self.damping)
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise GradLoraError(
                f"--weight-decay must be a finite number >= 0; got {self.weight_decay:g}"
            )
        if self.quantize not in (None, *QUANTIZE):
            raise GradLoraError(f"--quantize must be one of {', '.join(QUANTIZE)}")
        if self.schedule not in SCHEDULES:
            raise GradLoraError(f"--schedule must be one of {', '.join(SCHEDULES)}")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps <= self.steps:
            raise GradLoraError(
                f"--warmup-steps must be between 0 and --steps ({self.steps}); "
                f"got {self.warmup_steps}"
            )

    def check_damping(self, methods: list[str]) -> None:
        """--damping needs every method to train with a pair optimizer that has a lambda."""
        undamped = [m for m in methods if m in RECIPES and RECIPES[m].optimizer not in DAMPED]
        if self.damping is not None and undamped:
            raise GradLoraError(
                f"--damping is the lambda of the pair optimizers ({', '.join(DAMPED)}); "
                f"{', '.join(undamped)} train(s) without one: drop --damping or those methods"
            )

    @property
    def warmup(self) -> int:
        """Linear warmup steps: ``warmup_steps``, or 3% of ``steps`` rounded up."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return math.ceil(0.03 * self.steps)

    def for_kind(self, kind: str):
        """A copy with batch size and length filled in for the task ``kind`` where None."""
        classification = kind == CLASSIFICATION
        return replace(
            self,
            batch_size=self.batch_size or (32 if classification else 8),
            max_length=self.max_length or (64 if classification else 128),
        )

    def load_task(self, source: DataSource) -> tuple[Self, Task]:
        """(this config for ``source``'s kind, the task it trains on: the model and the data
        split into train / val / test at this config's sizes and length)."""
        cfg = self.for_kind(source.kind)
        task = load_task(
            cfg.model,
            source,
            max_length=cfg.max_length,
            val_size=cfg.val_size,
            test_size=cfg.test_size,
            num_layers=cfg.num_layers,
        )
        return cfg, task

    def run_spec(self, task_identity: dict[str, Any], method: str, lr: float, seed: int) -> dict:
        """Everything that determines one run's result (its key is a hash of this)."""
        return {
            "task": task_identity,
            "method": method,
            "lr": lr,
            "seed": seed,
            "steps": self.steps,
            "batch_size": self.batch_size,
            "max_length": self.max_length,
            "rank": self.rank,
            "alpha": self.alpha,
            "init_batches": self.init_batches,
            "weight_decay": self.weight_decay,
            "schedule": self.schedule,
            "warmup_steps": self.warmup,
            # only when set, so that the keys of every earlier (fp32) run stay as they were
            **({"quantize": self.quantize} if self.quantize is not None else {}),
            **({"damping": self.damping} if self.damping is not None else {}),
        }


def rate_seeds(text: str | None) -> tuple[float, list[int]] | None:
    """(lr, seeds) from ``LR=SEED,SEED,...`` (``--seeds-at-rate``); None for None."""
    if text is None:
        return None
    lr, _, seeds = text.partition("=")
    try:
        return float(lr), [int(v) for v in seeds.split(",") if v.strip()]
    except ValueError:
        raise GradLoraError(f"--seeds-at-rate takes LR=SEED[,SEED...]; got {text!r}") from None


@dataclass
class BenchConfig(RunConfig):
    """``gradlora bench``: the methods, their learning-rate grids, seeds and rate selection."""

    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    lrs: dict[str, list[float]] = field(default_factory=dict)  # per-method grids (override)
    sweep: bool = True  # False: each method at its default rate (or its single --lrs value)
    seeds: list[int] = field(default_factory=lambda: [0])  # first: the sweep; rest: best lr only
    extra_seeds_for: list[str] | None = None  # methods that get seeds[1:] (None: all)
    seeds_for: dict[str, list[int]] = field(default_factory=dict)  # per-method seeds (override)
    # (lr, seeds): every method whose grid holds lr also runs these seeds there, e.g. LoRA's best
    # rate, so that a user's untuned rate is compared paired by seed, not on seed 0 alone
    seeds_at_rate: tuple[float, list[int]] | None = None
    select: str = "val-loss"  # "val-loss" (lowest) or "val-acc" (highest) picks the best lr
    smooth_window: int = 20  # trailing mean of the reported training loss

    def validate(self) -> None:
        super().validate()
        self.check_damping(self.methods)
        for method, seeds in self.seeds_for.items():
            if not seeds or seeds[0] != self.seeds[0]:
                raise GradLoraError(
                    f"--seeds-for {method}: its seeds must start with the sweep seed "
                    f"{self.seeds[0]} (the first of --seeds), so that every method is swept on "
                    f"the same seed; got {seeds}"
                )
        if self.seeds_at_rate is not None:
            lr, seeds = self.seeds_at_rate
            if not (math.isfinite(lr) and lr > 0) or not seeds:
                raise GradLoraError(
                    f"--seeds-at-rate takes LR=SEED[,SEED...] with LR > 0; got {lr:g} and {seeds}"
                )
        for method, grid in self.lrs.items():
            bad = [lr for lr in grid if not (math.isfinite(lr) and lr > 0)]
            if bad:
                raise GradLoraError(
                    f"--lrs {method}: learning rates must be finite numbers > 0; got {bad[0]:g}"
                )


@dataclass
class TrainConfig(RunConfig):
    """``gradlora train``: one method at one rate, its data columns, checkpoints and output."""

    steps: int = 200
    method: str = "lora-one"  # a recipe name from `gradlora methods`
    lr: float | None = None  # None: the method's documented rate for the task kind
    seed: int = 0  # head init, data order, dropout
    text_column: str = "text"
    label_column: str | None = None  # None: "label" if the file has one, else causal LM
    save_every: int = 0  # checkpoint every N steps (0: never)
    resume: bool = False  # continue from OUT/checkpoint.pt if it exists
    out: str = "runs/train"  # output folder
    fsdp: bool = False  # under torchrun: shard the model with FSDP2 instead of DDP
    export: tuple[str, ...] = ()  # after training: "vllm" (OUT/export-vllm), "merged" (OUT/merged)

    def validate(self) -> None:
        super().validate()
        self.check_damping([self.method])
        _positive("--lr", self.lr)
        _at_least("--save-every", self.save_every, 0, "(0: never)")
        if self.fsdp and (self.save_every or self.resume):
            raise GradLoraError(
                "--fsdp does not checkpoint yet: drop --save-every and --resume (the final "
                "adapter is saved), or train data-parallel without --fsdp to checkpoint"
            )
        self.check_export()
        if self.fsdp and self.quantize is not None:
            raise GradLoraError(
                "--fsdp with --quantize: FSDP2 does not shard bitsandbytes' packed weights; "
                "drop one of them"
            )

    def check_export(self) -> None:
        """--export: known kinds, a LoRA method whose live base is the original, no --fsdp."""
        bad = [e for e in self.export if e not in EXPORTS]
        if bad:
            raise GradLoraError(f"--export {bad[0]}: choose from {', '.join(EXPORTS)}")
        recipe = RECIPES.get(self.method)
        if not self.export or recipe is None:
            return
        if recipe.full:
            raise GradLoraError(
                "--export with method full: OUT/model is already a plain transformers "
                "checkpoint; drop --export"
            )
        if recipe.init in ("pissa", "peft-lora-ga"):
            raise GradLoraError(
                f"--export with {self.method}: peft's init rewrote the base weights; load "
                "OUT/adapter onto the original base with PeftModel.from_pretrained and call "
                "gradlora.export_adapter / export_merged on it, or train lora-ga instead"
            )
        if self.fsdp:
            raise GradLoraError(
                "--export with --fsdp: exporting from an FSDP2-sharded model is not supported "
                "yet; load OUT/adapter with gradlora.load_adapter in one process and export there"
            )


def _at_least(flag: str, value: int | None, low: int, note: str = "") -> None:
    """A whole-number setting (None: its default) must be >= ``low``."""
    if value is not None and value < low:
        raise GradLoraError(f"{flag} must be >= {low}{' ' + note if note else ''}; got {value}")


def _positive(flag: str, value: float | None) -> None:
    """A real setting (None: its default) must be a finite number > 0."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise GradLoraError(f"{flag} must be a finite number > 0; got {value:g}")


def digest(spec: dict[str, Any], length: int) -> str:
    """The first ``length`` hex digits of the SHA-256 of ``spec`` as sorted-key JSON."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:length]


def resolve_device(device: str) -> torch.device:
    """--device: "auto" is cuda if available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def eval_batch_size(kind: str, batch_size: int) -> int:
    """Batch size of validation and test passes: 64 for classification, the training batch
    size for causal LM (whose sequences are longer)."""
    return 64 if kind == CLASSIFICATION else batch_size
