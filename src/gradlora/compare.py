"""Fine-tune the bundled MiniLM on Rotten Tomatoes with several methods and compare them fairly.

Every method sees the same model, head init, batches, dropout draws, schedule and step count;
only its init, optimizer and learning rate differ (BENCHMARKS.md's protocol).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .api import initialize
from .bundled import load_minilm_classifier, load_minilm_lora, load_rotten_tomatoes, make_batches
from .meter import measure
from .optim import create_preconditioned_optimizer
from .train import evaluate, first_step_at_or_below, make_scheduler, smooth, train


@dataclass(frozen=True)
class Recipe:
    init: str | None  # gradlora init method, None for peft's default LoRA init
    optimizer: str  # "adamw" or "preconditioned"
    lr: float  # default learning rate (override per method with CompareConfig.lrs)
    about: str  # one line for tables and --help


RECIPES = {
    "lora": Recipe(None, "adamw", 1e-3, "peft's default LoRA init, AdamW"),
    "lora-ga": Recipe("lora-ga", "adamw", 5e-4, "LoRA-GA init (ArB2r, stable gamma=16), AdamW"),
    "lora-one": Recipe("lora-one", "adamw", 1e-3, "LoRA-One init (gamma=128), AdamW"),
    "lora-one-precond": Recipe(
        "lora-one", "preconditioned", 1e-3, "LoRA-One init, preconditioned AdamW"
    ),
}


@dataclass
class CompareConfig:
    methods: list[str] = field(default_factory=lambda: ["lora", "lora-ga"])  # names in RECIPES
    steps: int = 100  # optimizer steps per method
    batch_size: int = 32  # examples per step
    max_length: int = 64  # tokens per example after truncation
    rank: int = 8  # LoRA r
    alpha: float = 16.0  # LoRA alpha (s = alpha / r)
    lrs: dict[str, float] = field(default_factory=dict)  # per-method learning-rate overrides
    init_batches: int = 8  # first training batches used for the gradient estimate
    weight_decay: float = 0.01  # decoupled weight decay of AdamW
    schedule: str = "constant"  # constant, linear or cosine
    warmup_steps: int = 0  # linear warmup steps
    num_layers: int | None = None  # keep only the first layers of MiniLM (None: all 6)
    seed: int = 0  # one seed for head init, data order and dropout
    test_size: int = 1000  # held-out test examples
    smooth_window: int = 20  # trailing-mean window of the reported training loss
    progress: bool = True  # tqdm bars


def run_method(name: str, cfg: CompareConfig, train_batches, test_batches) -> dict[str, Any]:
    recipe = RECIPES[name]
    lr = cfg.lrs.get(name, recipe.lr)
    model, _ = load_minilm_lora(cfg.rank, cfg.alpha, cfg.num_layers, cfg.seed)
    init_report, init_seconds = None, 0.0
    if recipe.init is not None:
        start = time.perf_counter()
        init_report = initialize(
            model,
            train_batches,
            method=recipe.init,
            num_batches=cfg.init_batches,
            progress=cfg.progress,
        )
        init_seconds = time.perf_counter() - start
    if recipe.optimizer == "preconditioned":
        opt = create_preconditioned_optimizer(model, lr=lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=cfg.weight_decay
        )
    sched = make_scheduler(opt, cfg.schedule, cfg.steps, cfg.warmup_steps)
    torch.manual_seed(cfg.seed + 2)  # identical dropout draws for every method
    with measure(next(model.parameters()).device) as cost:
        result = train(
            model, train_batches[: cfg.steps], opt, sched, progress=cfg.progress, desc=name
        )
    metrics = evaluate(model, test_batches) if result.diverged_at is None else {}
    return {
        "method": name,
        "about": recipe.about,
        "lr": lr,
        "losses": result.losses,
        "smoothed": smooth(result.losses, cfg.smooth_window),
        "diverged_at": result.diverged_at,
        "test": metrics,
        "init_seconds": init_seconds,
        "init": None if init_report is None else init_report.summary(),
        "train_seconds": result.seconds,
        "train_peak_bytes": cost.peak_bytes,
        "memory_metric": cost.metric,
    }


def run_comparison(cfg: CompareConfig) -> dict[str, Any]:
    """Run every method of ``cfg`` and return a JSON-ready dict (config, runs, reference loss)."""
    unknown = [m for m in cfg.methods if m not in RECIPES]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(RECIPES)}")
    _, tokenizer = load_minilm_classifier(num_hidden_layers=1)
    train_data, test_data = load_rotten_tomatoes(cfg.test_size, cfg.seed)
    train_batches = make_batches(
        tokenizer, train_data, cfg.batch_size, cfg.max_length, cfg.steps, seed=cfg.seed
    )
    test_batches = make_batches(tokenizer, test_data, 64, cfg.max_length, shuffle=False)
    runs = [run_method(m, cfg, train_batches, test_batches) for m in cfg.methods]
    out = {
        "config": asdict(cfg),
        "runs": runs,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    reference = next((r for r in runs if r["method"] == "lora" and r["smoothed"]), None)
    if reference is not None:
        target = reference["smoothed"][-1]
        out["reference_loss"] = target
        for r in runs:
            r["steps_to_reference"] = first_step_at_or_below(r["smoothed"], target)
    return out


def format_table(results: dict[str, Any]) -> str:
    """A Markdown table: smoothed loss at several budgets, test metrics, time."""
    steps = results["config"]["steps"]
    budgets = [b for b in (25, 50, 100, 150, 200, 300, 500) if b < steps] + [steps]
    head = (
        ["method", "lr"]
        + [f"loss@{b}" for b in budgets]
        + ["test acc", "test loss", "steps to LoRA's final", "init s", "train s"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["runs"]:
        curve = r["smoothed"]
        cells = [r["method"], f"{r['lr']:g}"]
        cells += [f"{curve[b - 1]:.3f}" if len(curve) >= b else "diverged" for b in budgets]
        test = r["test"]
        cells += [
            f"{test['accuracy']:.3f}" if "accuracy" in test else "-",
            f"{test['loss']:.3f}" if test else "-",
        ]
        reach = r.get("steps_to_reference")
        cells += ["-" if "steps_to_reference" not in r else (str(reach) if reach else "never")]
        cells += [f"{r['init_seconds']:.1f}", f"{r['train_seconds']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_losses(results: dict[str, Any], path: str | Path) -> Path:
    """Smoothed training-loss curves of every run, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = results["config"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for r in results["runs"]:
        ax.plot(
            range(1, len(r["smoothed"]) + 1), r["smoothed"], label=f"{r['method']} (lr {r['lr']:g})"
        )
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (trailing mean of {cfg['smooth_window']})")
    ax.set_title(
        f"MiniLM on Rotten Tomatoes: r={cfg['rank']}, batch {cfg['batch_size']}, "
        f"{cfg['schedule']} lr, seed {cfg['seed']}",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def save_results(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write results.json, table.md and losses.png into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    (out_dir / "table.md").write_text(format_table(results) + "\n")
    return {
        "json": out_dir / "results.json",
        "table": out_dir / "table.md",
        "plot": plot_losses(results, out_dir / "losses.png"),
    }
