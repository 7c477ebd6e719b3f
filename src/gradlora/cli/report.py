"""The report of ``gradlora bench``: best learning rate per method (on validation), the mean
and spread over seeds, the Markdown table and the plot of smoothed training-loss curves."""

from __future__ import annotations

import os
import platform
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write, write_json, write_text
from .config import BenchConfig
from .loop import first_step_at_or_below, smooth
from .lr_report import (
    at_budgets,
    budget_metric,
    budget_table,
    plot_lr,
    sweep_points,
    test_metric,
)
from .recipes import RECIPES
from .tasks import CLASSIFICATION, Task


def _score(run: dict[str, Any], select: str) -> float | None:
    if run["diverged_at"] is not None or not run["val"]:
        return None
    return -run["val"]["accuracy"] if select == "val-acc" else run["val"]["loss"]


def best_lr(runs: list[dict[str, Any]], method: str, seed: int, select: str) -> float | None:
    """The learning rate of ``method`` whose ``seed`` run scores best on validation."""
    scored = [
        (s, r["lr"])
        for r in runs
        if r["method"] == method and r["seed"] == seed
        for s in [_score(r, select)]
        if s is not None
    ]
    return min(scored)[1] if scored else None


def _mean_curve(curves: list[list[float]]) -> list[float]:
    n = min(len(c) for c in curves)
    return [statistics.fmean(c[i] for c in curves) for i in range(n)]


def _stat(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def budgets_for(steps: int) -> list[int]:
    return [b for b in (25, 50, 100, 200, 500, 1000) if b < steps] + [steps]


def summarize(
    runs: list[dict[str, Any]],
    cfg: BenchConfig,
    task: Task,
    failed: list[dict[str, Any]] | None = None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Per method: the sweep, the best lr (validation), and its seeds' mean and spread."""
    seed0 = cfg.seeds[0]
    budgets = budgets_for(cfg.steps)
    metric, _ = test_metric(runs)
    methods: dict[str, Any] = {}
    for method in cfg.methods:
        mine = [r for r in runs if r["method"] == method]
        if not mine:
            continue
        sweep = sorted((r for r in mine if r["seed"] == seed0), key=lambda r: r["lr"])
        best = best_lr(runs, method, seed0, cfg.select)
        grid = sorted({r["lr"] for r in sweep})
        at_best = [r for r in mine if r["lr"] == best and r["diverged_at"] is None]
        entry: dict[str, Any] = {
            "about": RECIPES[method].about,
            "grid": grid,
            "best_lr": best,
            "best_at_grid_edge": best is not None and len(grid) > 1 and best in (grid[0], grid[-1]),
            "sweep": [
                {
                    "lr": r["lr"],
                    "diverged_at": r["diverged_at"],
                    "val": r["val"],
                    "final_loss": smooth(r["losses"], cfg.smooth_window)[-1]
                    if r["losses"]
                    else None,
                }
                for r in sweep
            ],
            "seeds": sorted(r["seed"] for r in at_best),
            "lr_points": sweep_points(sweep, metric),
        }
        if at_best:
            curves = [smooth(r["losses"], cfg.smooth_window) for r in at_best]
            entry["curve_mean"] = _mean_curve(curves)
            entry["curve_min"] = [
                min(c[i] for c in curves) for i in range(len(entry["curve_mean"]))
            ]
            entry["curve_max"] = [
                max(c[i] for c in curves) for i in range(len(entry["curve_mean"]))
            ]
            entry["loss_at"] = {str(b): _stat([c[b - 1] for c in curves]) for b in budgets}
            for split in ("val", "test"):
                for name in ("loss", "accuracy", "exact_match", "answer_match"):
                    vals = [r[split][name] for r in at_best if name in r[split]]
                    if vals:
                        entry[f"{split}_{name}"] = _stat(vals)
            entry["at_budgets"] = at_budgets(at_best, cfg.steps, budget_metric(metric))
            for k in ("init_seconds", "train_seconds"):
                entry[k] = _stat([r[k] for r in at_best])
            entry["wall_seconds"] = _stat([r["init_seconds"] + r["train_seconds"] for r in at_best])
            entry["peak_mib"] = _stat([r["peak_bytes"] / 2**20 for r in at_best])
            entry["memory_metric"] = at_best[0]["memory_metric"]
        methods[method] = entry
    out: dict[str, Any] = {
        "config": asdict(cfg) | {"warmup_steps": cfg.warmup},
        "task": {"kind": task.kind, **task.identity, "label_names": task.label_names},
        "budgets": budgets,
        "test_metric": metric,
        "methods": methods,
        "failed": failed or [],
        "runs": runs,
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": str(device) if device is not None else None,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
        },
    }
    ref = methods.get("lora", {}).get("curve_mean")
    if ref:
        out["reference_loss"] = ref[-1]
        for entry in methods.values():
            if "curve_mean" in entry:
                entry["steps_to_reference"] = first_step_at_or_below(entry["curve_mean"], ref[-1])
    return out


def _fmt(stat: dict[str, float] | None, digits: int = 3) -> str:
    if not stat:
        return "-"
    if stat["n"] > 1:
        return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}"


def format_table(results: dict[str, Any]) -> str:
    """Markdown: each method at its best lr (mean ± std over seeds), then the sweep."""
    cfg, budgets = results["config"], results["budgets"]
    classification = results["task"]["kind"] == CLASSIFICATION
    head = ["method", "best lr", "seeds"] + [f"loss@{b}" for b in budgets]
    em = results.get("test_metric") == "exact_match"
    head += ["val loss"] + (["test acc"] if classification else []) + ["test loss"]
    head += ["test exact match"] if em else []
    head += ["steps to LoRA's final", "init s", "wall s", "peak MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in results["methods"].items():
        lr = "diverged" if m["best_lr"] is None else f"{m['best_lr']:g}"
        if m.get("best_at_grid_edge"):
            lr += " (edge)"
        cells = [name, lr, str(len(m["seeds"]))]
        cells += [_fmt(m.get("loss_at", {}).get(str(b))) for b in budgets]
        cells += [_fmt(m.get("val_loss"))]
        cells += [_fmt(m.get("test_accuracy"))] if classification else []
        cells += [_fmt(m.get("test_loss"))]
        cells += [_fmt(m.get("test_exact_match"))] if em else []
        reach = m.get("steps_to_reference", "-") if "reference_loss" in results else "-"
        cells += ["never" if reach is None else str(reach)]
        cells += [_fmt(m.get("init_seconds"), 1), _fmt(m.get("wall_seconds"), 1)]
        cells += [_fmt(m.get("peak_mib"), 0)]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        "",
        f"{results['task']['model']}{_base(cfg)} on {results['task']['data']} "
        f"({results['task']['kind']}): "
        f"{cfg['steps']} steps, batch {cfg['batch_size']}, max length {cfg['max_length']}, "
        f"LoRA r={cfg['rank']} alpha={cfg['alpha']:g}, AdamW weight decay {cfg['weight_decay']:g}, "
        f"{cfg['schedule']} schedule with {cfg['warmup_steps']} warmup steps, "
        f"gradient inits from {cfg['init_batches']} batches; best lr by {cfg['select']} on the "
        f"validation split (seed {cfg['seeds'][0]}); loss@N = trailing {cfg['smooth_window']}-step "
        "mean of the training loss; mean ± std over seeds; wall = init + training; "
        f"peak memory: {_memory_metric(results)}.",
    ]
    if "reference_loss" in results:
        notes.append(
            f"LoRA's final smoothed loss (the target of 'steps to LoRA's final'): "
            f"{results['reference_loss']:.3f}."
        )
    notes += ["", "Sweep (seed " + str(cfg["seeds"][0]) + "):", ""]
    notes += [
        "| method | lr | final loss | val loss" + (" | val acc" if classification else "") + " |"
    ]
    notes += ["|---|---|---|---|" + ("---|" if classification else "")]
    for name, m in results["methods"].items():
        for s in m["sweep"]:
            mark = " **best**" if s["lr"] == m["best_lr"] else ""
            if s["diverged_at"] is not None:
                row = [name, f"{s['lr']:g}", f"diverged at step {s['diverged_at'] + 1}", "-"]
                row += ["-"] if classification else []
            else:
                row = [
                    name,
                    f"{s['lr']:g}{mark}",
                    f"{s['final_loss']:.3f}",
                    f"{s['val']['loss']:.3f}",
                ]
                row += [f"{s['val']['accuracy']:.3f}"] if classification else []
            notes.append("| " + " | ".join(row) + " |")
    budget_lines = budget_table(results)
    if budget_lines:
        notes += ["", "At smaller step budgets (each method at its best rate):", ""] + budget_lines
    for f in results["failed"]:
        last = f["error"].strip().splitlines()[-1]
        notes.append(f"\nFAILED {f['method']} lr={f['lr']:g} seed={f['seed']}: {last}")
    return "\n".join(lines + notes)


def _base(cfg: dict[str, Any]) -> str:
    """ " (nf4 base)" for a quantized run, "" otherwise."""
    return f" ({cfg['quantize']} base)" if cfg.get("quantize") else ""


def _memory_metric(results: dict[str, Any]) -> str:
    metrics = {m.get("memory_metric") for m in results["methods"].values()} - {None}
    if metrics == {"cuda_max_allocated"}:
        return "CUDA max allocated"
    return "process RSS high-water mark over build + training (includes the Python process)"


def plot_losses(results: dict[str, Any], path: str | Path) -> Path:
    """Smoothed training loss of every method at its best lr; the seeds' min-max shaded."""
    import matplotlib  # optional (the cli extra), heavy: loaded only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no display needed

    cfg = results["config"]
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for name, m in results["methods"].items():
        if "curve_mean" not in m:
            continue
        x = range(1, len(m["curve_mean"]) + 1)
        n = len(m["seeds"])
        label = f"{name} (lr {m['best_lr']:g}" + (f", {n} seeds)" if n > 1 else ")")
        (line,) = ax.plot(x, m["curve_mean"], label=label)
        if n > 1:
            ax.fill_between(x, m["curve_min"], m["curve_max"], color=line.get_color(), alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (trailing mean of {cfg['smooth_window']})")
    task = results["task"]
    ax.set_title(
        f"{task['model']}{_base(cfg)} on {task['data']}: r={cfg['rank']}, "
        f"batch {cfg['batch_size']}, "
        f"{cfg['schedule']} lr, best lr per method on validation",
        fontsize=9,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


def save_results(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write results.json, table.md, losses.png and lr_curves.png into ``out_dir``."""
    out_dir = Path(out_dir)
    write_json(out_dir / "results.json", results)
    table = write_text(out_dir / "table.md", format_table(results) + "\n")
    paths = {"json": out_dir / "results.json", "table": table}
    if any("curve_mean" in m for m in results["methods"].values()):
        paths["plot"] = plot_losses(results, out_dir / "losses.png")
    if any(len(m.get("lr_points", [])) > 1 for m in results["methods"].values()):
        paths["lr_plot"] = plot_lr(results, out_dir / "lr_curves.png")
    return paths
