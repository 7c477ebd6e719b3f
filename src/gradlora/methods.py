"""The fine-tuning methods compared by ``gradlora bench`` and offered by ``gradlora train``.

A method = how the model is built and initialized + which optimizer, with a default learning
rate and a 3-value grid per task kind (classification / causal LM). The classification rates
come from the MiniLM / Rotten Tomatoes measurements in BENCHMARKS.md; the causal-LM ones are
set one notch lower (larger model, token-level loss) and are guesses until swept.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import GradLoraError
from .tasks import CLASSIFICATION, Task


@dataclass(frozen=True)
class Method:
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


def _m(name, about, init, optimizer, cls_lr, cls_grid, lm_lr, lm_grid, **kw) -> Method:
    return Method(
        name,
        about,
        init,
        optimizer,
        {CLASSIFICATION: cls_lr, "causal-lm": lm_lr},
        {CLASSIFICATION: cls_grid, "causal-lm": lm_grid},
        **kw,
    )


LORA_GRID = (5e-4, 1e-3, 2e-3)
LOW_GRID = (2e-4, 5e-4, 1e-3)
LM_GRID = (2e-4, 5e-4, 1e-3)
LM_LOW_GRID = (1e-4, 2e-4, 5e-4)

METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        _m(
            "full",
            "full fine-tuning, AdamW",
            "full",
            "adamw",
            5e-5,
            (2e-5, 5e-5, 1e-4),
            3e-5,
            (1e-5, 3e-5, 1e-4),
        ),
        _m(
            "lora",
            "LoRA, peft's default init, AdamW",
            None,
            "adamw",
            1e-3,
            LORA_GRID,
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
            5e-4,
            LOW_GRID,
            2e-4,
            LM_LOW_GRID,
        ),
        _m(
            "peft-riemannian",
            "LoRA, peft's Riemannian-preconditioned AdamW (reg 1e-2)",
            None,
            "riemannian",
            1e-3,
            LORA_GRID,
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
            "lora-one",
            "gradlora LoRA-One init (gamma=128), preconditioned AdamW",
            "lora-one",
            "preconditioned",
            1e-3,
            LORA_GRID,
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


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise GradLoraError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]


@dataclass
class Built:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    init_seconds: float  # gradient estimate + SVD (0 for data-free inits; PiSSA's SVD counts)
    init_summary: str | None  # gradlora's InitReport.summary(), when there is one


def lora_config(task: Task, method: Method, rank: int, alpha: float, dropout: float = 0.0):
    from peft import LoraConfig, LoraGAConfig

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
    method: Method | str,
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
) -> Built:
    """A fresh model of ``task`` prepared for ``method`` and its optimizer.

    The head (classification) is drawn from ``seed`` and LoRA's random A from ``seed + 1``, so
    every method of one seed starts from the same pretrained weights and head. Gradient inits
    use the first ``init_batches`` of ``train_batches``: the batches training starts with.
    """
    from peft import get_peft_model

    method = get_method(method) if isinstance(method, str) else method
    model = task.load_base(seed).to(device)
    init_seconds, summary = 0.0, None
    if method.full:
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        return Built(model, opt, 0.0, None)

    config = lora_config(task, method, rank, alpha)
    start = time.perf_counter()
    if method.init == "peft-lora-ga":
        from peft.tuners.lora.loraga import preprocess_loraga

        from .capture import move_to

        def train_step() -> None:
            for batch in train_batches[:init_batches]:
                model(**move_to(batch, torch.device(device))).loss.backward()

        with warnings.catch_warnings():  # peft's counting hooks fire on frozen inputs: expected
            warnings.filterwarnings("ignore", message=".*Full backward hook.*")
            preprocess_loraga(model, config, train_step)
    torch.manual_seed(seed + 1)
    model = get_peft_model(model, config)
    if method.init in ("lora-ga", "lora-one"):
        from .api import initialize

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

    if method.optimizer == "adamw":
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    elif method.optimizer == "preconditioned":
        from .optim import create_preconditioned_optimizer

        opt = create_preconditioned_optimizer(model, lr=lr, weight_decay=weight_decay)
    elif method.optimizer == "riemannian":
        from peft.optimizers import create_riemannian_optimizer

        opt = create_riemannian_optimizer(
            model, torch.optim.AdamW, lr=lr, weight_decay=weight_decay
        )
    elif method.optimizer == "lora-pro":
        from .optim import create_lora_pro_optimizer

        opt = create_lora_pro_optimizer(model, lr=lr, mode="efficient", weight_decay=weight_decay)
    else:  # pragma: no cover - the registry above is the only source of methods
        raise GradLoraError(f"unknown optimizer {method.optimizer!r}")
    return Built(model, opt, init_seconds, summary)
