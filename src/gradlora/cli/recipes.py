"""The recipes behind the methods of ``gradlora bench`` and ``gradlora train`` (``--method``).

A recipe = how the model is built and initialized (an init method of ``gradlora.initialize``,
peft's, or full fine-tuning) + which optimizer of ``gradlora.optim.create_optimizer``, with a
default learning rate and a 3-value grid around it per task kind (classification / causal LM).
The default rates come from the learning-rate sweeps of benchmarks/lr_sweeps.sh (see RECIPES).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, LoraGAConfig, get_peft_model
from peft.tuners.lora.loraga import preprocess_loraga
from torch import nn

from ..errors import GradLoraError
from ..init.capture import move_to
from ..init.initialize import initialize
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


def ladder_rungs(lr: float) -> list[float]:
    """The rungs of the 1-2-5 ladder (..., 1e-4, 2e-4, 5e-4, 1e-3, ...) from the decade below
    ``lr``'s to the decade above, ascending, each the float of its exact decimal."""
    exp = math.floor(math.log10(lr) + 1e-9)
    return [float(f"{c}e{e}") for e in (exp - 1, exp, exp + 1) for c in (1, 2, 5)]


def _ladder(lr: float) -> tuple[float, float, float]:
    """``lr`` and its two neighbours on the 1-2-5 ladder: the 3-value grid of a sweep around a
    default rate."""
    rungs = ladder_rungs(lr)
    i = next((i for i, x in enumerate(rungs) if math.isclose(x, lr, rel_tol=1e-9)), None)
    if i is None:
        raise ValueError(f"default rate {lr:g} is not on the 1-2-5 ladder")
    return rungs[i - 1], rungs[i], rungs[i + 1]


def _m(name, about, init, optimizer, cls_lr, lm_lr, **kw) -> Recipe:
    return Recipe(
        name,
        about,
        init,
        optimizer,
        {CLASSIFICATION: cls_lr, "causal-lm": lm_lr},
        {CLASSIFICATION: _ladder(cls_lr), "causal-lm": _ladder(lm_lr)},
        **kw,
    )


# Default rates: each swept method's best rate in the sweeps of benchmarks/lr_sweeps.sh
# (classification: MiniLM; causal LM: the geometric mean over Hamlet and arithmetic), as
# benchmarks/results/which_method.md lists them; tests/test_recipes_rates.py holds the swept
# methods to it. lora-one-init was swept afterwards (`benchmarks/lr_sweeps.sh one`): 2e-3 on
# all three tasks. The others (rslora, pissa, lora-ga-sketch, lora-ga-gamma64,
# lora-ga+lora-pro) were not swept: their causal-LM rate keeps their classification rate's
# ratio to a swept relative (rslora and pissa to lora, gamma64 to lora-ga, sketch and
# +lora-pro at lora-ga's).
RECIPES: dict[str, Recipe] = {
    m.name: m
    for m in [
        _m("full", "full fine-tuning, AdamW", "full", "adamw", cls_lr=2e-4, lm_lr=2e-4),
        _m("lora", "LoRA, peft's default init, AdamW", None, "adamw", cls_lr=2e-3, lm_lr=2e-3),
        _m(
            "rslora",
            "rsLoRA (s = alpha/sqrt(r)), AdamW",
            None,
            "adamw",
            cls_lr=5e-4,
            lm_lr=5e-4,
            rslora=True,
        ),
        _m(
            "pissa",
            "PiSSA init (peft, exact SVD of W), AdamW",
            "pissa",
            "adamw",
            cls_lr=2e-4,
            lm_lr=2e-4,
        ),
        _m(
            "peft-lora-ga",
            "peft's LoRA-GA init (preprocess_loraga), AdamW",
            "peft-lora-ga",
            "adamw",
            cls_lr=1e-3,
            lm_lr=5e-4,
        ),
        _m(
            "peft-riemannian",
            "LoRA, peft's Riemannian-preconditioned AdamW (reg 1e-2)",
            None,
            "riemannian",
            cls_lr=2e-3,
            lm_lr=2e-3,
        ),
        _m(
            "lora-ga",
            "gradlora LoRA-GA init (ArB2r, stable gamma=16), AdamW",
            "lora-ga",
            "adamw",
            cls_lr=5e-4,
            lm_lr=2e-4,
        ),
        _m(
            "lora-ga-sketch",
            "gradlora LoRA-GA init from the single-pass gradient sketch, AdamW",
            "lora-ga",
            "adamw",
            cls_lr=5e-4,
            lm_lr=2e-4,
            init_options=(("gradient", "sketch"),),
        ),
        _m(
            "lora-ga-gamma64",
            "gradlora LoRA-GA init with gamma=64 (a 2x smaller init), AdamW",
            "lora-ga",
            "adamw",
            cls_lr=1e-3,
            lm_lr=5e-4,
            init_options=(("gamma", 64),),
        ),
        _m(
            "lora-ga-matched",
            "gradlora LoRA-GA init, scale matched to LoRA's first AdamW step, AdamW",
            "lora-ga",
            "adamw",
            cls_lr=2e-3,
            lm_lr=1e-3,
            init_options=(("scale", "matched"),),
        ),
        _m(
            "lora-one",
            "gradlora LoRA-One init (gamma=128), preconditioned AdamW",
            "lora-one",
            "preconditioned",
            cls_lr=2e-3,
            lm_lr=2e-3,
        ),
        _m(
            "lora-one-init",
            "gradlora LoRA-One init (gamma=128), plain AdamW",
            "lora-one",
            "adamw",
            cls_lr=2e-3,
            lm_lr=2e-3,
        ),
        _m(
            "lora-pro",
            "LoRA, gradlora LoRA-Pro optimizer (efficient mode)",
            None,
            "lora-pro",
            cls_lr=1e-3,
            lm_lr=2e-3,
        ),
        _m(
            "lora-ga+lora-pro",
            "gradlora LoRA-GA init, LoRA-Pro optimizer (efficient mode)",
            "lora-ga",
            "lora-pro",
            cls_lr=5e-4,
            lm_lr=2e-4,
        ),
    ]
}


DAMPED = ("preconditioned", "lora-pro")  # the optimizers with a damping lambda


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
    damping: float | None = None,
) -> Built:
    """A fresh model of ``task`` prepared for ``method`` and its optimizer.

    The head (classification) is drawn from ``seed`` and LoRA's random A from ``seed + 1``, so
    every method of one seed starts from the same pretrained weights and head. Gradient inits
    use the first ``init_batches`` of ``train_batches``: the batches training starts with.
    ``shard`` (``gradlora train --fsdp``) is applied to the PeftModel before the init and the
    optimizer. ``damping`` replaces the pair optimizer's lambda (``preconditioned``, ``lora-pro``).
    """
    method = get_recipe(method) if isinstance(method, str) else method
    if damping is not None and method.optimizer not in DAMPED:
        raise GradLoraError(
            f"--damping is the lambda of the pair optimizers ({', '.join(DAMPED)}); method "
            f"{method.name} trains with {method.optimizer!r}: drop --damping"
        )
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

    extra = {} if damping is None else {"damping": damping}
    opt = create_optimizer(model, method.optimizer, lr=lr, weight_decay=weight_decay, **extra)
    return Built(model, opt, init_seconds, summary)
