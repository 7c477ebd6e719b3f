"""The recipes behind the methods of ``gradlora bench`` and ``gradlora train`` (``--method``).

A recipe = how the model is built and initialized (an init method of ``gradlora.initialize``,
peft's, or full fine-tuning) + which optimizer of ``gradlora.optim.create_optimizer``, with a
default learning rate and a 3-value grid per task kind (classification / causal LM). The classification rates
come from the MiniLM / Rotten Tomatoes measurements in docs/benchmarks.md; the causal-LM ones are
set one notch lower (larger model, token-level loss) and are guesses until swept.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, LoraGAConfig, get_peft_model
from peft.tuners.lora.loraga import preprocess_loraga
from torch import nn

from ..capture import move_to
from ..errors import GradLoraError
from ..initialization import initialize
from ..optim import create_optimizer
from .tasks import CLASSIFICATION, Task


@dataclass(frozen=True)
class Recipe:
    name: str
    about: str  # one line for tables and --help
    init: str | None  # None (peft default), "pissa", "peft-lora-ga", "lora-ga", "lora-one"; "full"
    optimizer: str  # "adamw", "preconditioned", "riemannian", "lora-pro"
    lr: dict[str, float]  # task kind -> default learning rate
    grid: dict[str, tuple[float, ...]]  # task kind -> learning rates of a sweep
    rslora: bool = False
    init_options: tuple[tuple[str, Any], ...] = ()  # extra gradlora.initialize options

    @property
    def full(self) -> bool:
        return self.init == "full"

    @property
    def offsets_base(self) -> bool:
        """Whether the init changes the frozen base weights (a checkpoint must keep them)."""
        return self.init in ("pissa", "peft-lora-ga", "lora-ga")

    def default_lr(self, kind: str) -> float:
        return self.lr[kind]

    def lr_grid(self, kind: str) -> tuple[float, ...]:
        return self.grid[kind]


def _m(name, about, init, optimizer, cls_lr, cls_grid, lm_lr, lm_grid, **kw) -> Recipe:
    return Recipe(
        name,
        about,
        init,
        optimizer,
        {CLASSIFICATION: cls_lr, "causal-lm": lm_lr},
        {CLASSIFICATION: cls_grid, "causal-lm": lm_grid},
        **kw,
    )


# Classification rates: the MiniLM sweep of benchmarks/lr_sweeps.sh (benchmarks/results/
# which_method.md; tests/test_recipes_rates.py holds the swept methods to it). The causal-LM
# rates are the earlier hand-picked ones until the two SmolLM2 sweeps are complete.
HIGH_GRID = (1e-3, 2e-3, 5e-3)
LORA_GRID = (5e-4, 1e-3, 2e-3)
LOW_GRID = (2e-4, 5e-4, 1e-3)
LM_GRID = (2e-4, 5e-4, 1e-3)
LM_LOW_GRID = (1e-4, 2e-4, 5e-4)

RECIPES: dict[str, Recipe] = {
    m.name: m
    for m in [
        _m(
            "full",
            "full fine-tuning, AdamW",
            "full",
            "adamw",
            2e-4,
            (1e-4, 2e-4, 5e-4),
            3e-5,
            (1e-5, 3e-5, 1e-4),
        ),
        _m(
            "lora",
            "LoRA, peft's default init, AdamW",
            None,
            "adamw",
            2e-3,
            HIGH_GRID,
            5e-4,
            LM_GRID,
        ),
        _m(
            "rslora",
            "rsLoRA (s = alpha/sqrt(r)), AdamW",
            None,
            "adamw",
            5e-4,
            LOW_GRID,
            2e-4,
            LM_LOW_GRID,
            rslora=True,
        ),
        _m(
            "pissa",
            "PiSSA init (peft, exact SVD of W), AdamW",
            "pissa",
            "adamw",
            2e-4,
            (1e-4, 2e-4, 5e-4),
            1e-4,
            (5e-5, 1e-4, 2e-4),
        ),
        _m(
            "peft-lora-ga",
            "peft's LoRA-GA init (preprocess_loraga), AdamW",
            "peft-lora-ga",
            "adamw",
            1e-3,
            LORA_GRID,
            2e-4,
            LM_LOW_GRID,
        ),
        _m(
            "peft-riemannian",
            "LoRA, peft's Riemannian-preconditioned AdamW (reg 1e-2)",
            None,
            "riemannian",
            2e-3,
            HIGH_GRID,
            5e-4,
            LM_GRID,
        ),
        _m(
            "lora-ga",
            "gradlora LoRA-GA init (ArB2r, stable gamma=16), AdamW",
            "lora-ga",
            "adamw",
            5e-4,
            LOW_GRID,
            2e-4,
            LM_LOW_GRID,
        ),
        _m(
            "lora-ga-sketch",
            "gradlora LoRA-GA init from the single-pass gradient sketch, AdamW",
            "lora-ga",
            "adamw",
            5e-4,
            LOW_GRID,
            2e-4,
            LM_LOW_GRID,
            init_options=(("gradient", "sketch"),),
        ),
        _m(
            "lora-ga-gamma64",
            "gradlora LoRA-GA init with gamma=64 (a 2x smaller init), AdamW",
            "lora-ga",
            "adamw",
            1e-3,
            LORA_GRID,
            5e-4,
            LM_GRID,
            init_options=(("gamma", 64),),
        ),
        _m(
            "lora-ga-matched",
            "gradlora LoRA-GA init, scale matched to LoRA's first AdamW step, AdamW",
            "lora-ga",
            "adamw",
            2e-3,
            HIGH_GRID,
            5e-4,
            LM_GRID,
            init_options=(("scale", "matched"),),
        ),
        _m(
            "lora-one",
            "gradlora LoRA-One init (gamma=128), preconditioned AdamW",
            "lora-one",
            "preconditioned",
            2e-3,
            HIGH_GRID,
            5e-4,
            LM_GRID,
        ),
        _m(
            "lora-one-init",
            "gradlora LoRA-One init (gamma=128), plain AdamW",
            "lora-one",
            "adamw",
            1e-3,
            LORA_GRID,
            5e-4,
            LM_GRID,
        ),
        _m(
            "lora-pro",
            "LoRA, gradlora LoRA-Pro optimizer (efficient mode)",
            None,
            "lora-pro",
            1e-3,
            LORA_GRID,
            5e-4,
            LM_GRID,
        ),
        _m(
            "lora-ga+lora-pro",
            "gradlora LoRA-GA init, LoRA-Pro optimizer (efficient mode)",
            "lora-ga",
            "lora-pro",
            5e-4,
            LOW_GRID,
            2e-4,
            LM_LOW_GRID,
        ),
    ]
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise GradLoraError(f"unknown method {name!r}; choose from {', '.join(RECIPES)}")
    return RECIPES[name]


@dataclass
class Built:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    init_seconds: float  # gradient estimate + SVD (0 for data-free inits; PiSSA's SVD counts)
    init_summary: str | None  # gradlora's InitReport.summary(), when there is one


def lora_config(task: Task, method: Recipe, rank: int, alpha: float, dropout: float = 0.0):
    kwargs: dict[str, Any] = dict(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=task.targets,
        task_type=task.task_type,
        use_rslora=method.rslora,
    )
    if method.init == "pissa":
        kwargs["init_lora_weights"] = "pissa"
    elif method.init == "peft-lora-ga":
        kwargs["init_lora_weights"] = "lora_ga"
        kwargs["lora_ga_config"] = LoraGAConfig()
    return LoraConfig(**kwargs)


def build(
    method: Recipe | str,
    task: Task,
    *,
    lr: float,
    seed: int,
    train_batches: Sequence[dict[str, Any]],
    rank: int = 8,
    alpha: float = 16.0,
    init_batches: int = 8,
    weight_decay: float = 0.01,
    device: str | torch.device = "cpu",
    progress: bool = False,
    quantize: str | None = None,
    shard: Callable[[nn.Module], Any] | None = None,
) -> Built:
    """A fresh model of ``task`` prepared for ``method`` and its optimizer.

    The head (classification) is drawn from ``seed`` and LoRA's random A from ``seed + 1``, so
    every method of one seed starts from the same pretrained weights and head. Gradient inits
    use the first ``init_batches`` of ``train_batches``: the batches training starts with.
    ``shard`` (``gradlora train --fsdp``) is applied to the PeftModel before the init and the
    optimizer.
    """
    method = get_recipe(method) if isinstance(method, str) else method
    if quantize is not None and method.init not in (None, "lora-ga", "lora-one"):
        raise GradLoraError(
            f"--quantize {quantize} with method {method.name}: full fine-tuning, PiSSA and peft's "
            "LoRA-GA need float base weights; use lora, lora-ga, lora-one or lora-pro"
        )
    model = task.load_base(seed, quantize, device)
    init_seconds, summary = 0.0, None
    if method.full:
        model.train()
        opt = create_optimizer(model, "adamw", lr=lr, weight_decay=weight_decay)
        return Built(model, opt, 0.0, None)

    config = lora_config(task, method, rank, alpha)
    start = time.perf_counter()
    if method.init == "peft-lora-ga":

        def train_step() -> None:
            for batch in train_batches[:init_batches]:
                model(**move_to(batch, torch.device(device))).loss.backward()

        with warnings.catch_warnings():  # peft's counting hooks fire on frozen inputs: expected
            warnings.filterwarnings("ignore", message=".*Full backward hook.*")
            preprocess_loraga(model, config, train_step)
    torch.manual_seed(seed + 1)
    model = get_peft_model(model, config)
    if shard is not None:
        shard(model)
    if method.init in ("lora-ga", "lora-one"):
        report = initialize(
            model,
            train_batches,
            method=method.init,
            num_batches=init_batches,
            progress=progress,
            **dict(method.init_options),
        )
        summary = report.summary()
    init_seconds = time.perf_counter() - start if method.init is not None else 0.0

    opt = create_optimizer(model, method.optimizer, lr=lr, weight_decay=weight_decay)
    return Built(model, opt, init_seconds, summary)
