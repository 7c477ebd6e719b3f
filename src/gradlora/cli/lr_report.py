"""The learning-rate side of the ``gradlora bench`` report: scores against the rate, one line
per method (``lr_curves.png``), and each method at its best rate at smaller step budgets
(validation and test measured at 25% and 50% of the steps, and at the end)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from ..atomic import atomic_write


def test_metric(runs: list[dict[str, Any]]) -> tuple[str, bool]:
    """(name, higher is better) of the test score that the report leads with: exact match of
    generations where measured, else accuracy (classifiers), else loss."""
    keys = set().union(*(r["test"].keys() for r in runs if r.get("test")))
    for name in ("exact_match", "accuracy"):
        if name in keys:
            return name, True
    return "loss", False


def budget_metric(metric: str) -> str:
    """The test score measured at every step budget: ``answer_match`` (one forward) where the
    lead score is ``exact_match`` (by generation, at the end only), else the lead score."""
    return "answer_match" if metric == "exact_match" else metric


def _stat(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def at_budgets(at_best: list[dict[str, Any]], steps: int, metric: str) -> dict[str, Any]:
    """Step -> {"val_loss", "test_<metric>"} mean ± std over the runs (seeds) at the best rate,
    at each measured budget and at the end; budgets missing from any run are left out."""
    out: dict[str, Any] = {}
    measured = [
        r.get("budgets", {}) | {str(steps): {"val": r["val"], "test": r["test"]}} for r in at_best
    ]
    common = set.intersection(*(set(m) for m in measured)) if measured else set()
    for step in sorted(common, key=int):
        points = [m[step] for m in measured]
        entry = {"val_loss": _stat([p["val"]["loss"] for p in points])}
        if all(metric in p["test"] for p in points):
            entry[f"test_{metric}"] = _stat([p["test"][metric] for p in points])
        out[step] = entry
    return out


def sweep_points(sweep: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Per rate of a method's sweep: validation loss and the test scores (None if diverged)."""
    names = dict.fromkeys([metric, budget_metric(metric)])
    return [
        {"lr": r["lr"], "val_loss": r["val"].get("loss") if r["val"] else None}
        | {f"test_{m}": r["test"].get(m) if r["test"] else None for m in names}
        for r in sweep
    ]


def _fmt(stat: dict[str, float] | None, scale: float = 1.0, digits: int = 3) -> str:
    if not stat:
        return "-"
    mean, std = stat["mean"] * scale, stat["std"] * scale
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if stat["n"] > 1 else f"{mean:.{digits}f}"


def budget_table(results: dict[str, Any]) -> list[str]:
    """Markdown lines: every method at its best rate, validation loss and the test score at
    each step budget (mean ± std over seeds)."""
    metric = budget_metric(results.get("test_metric", "loss"))
    rows = {name: m.get("at_budgets", {}) for name, m in results["methods"].items()}
    steps = sorted({s for r in rows.values() for s in r}, key=int)
    if not steps:
        return []
    head = ["method", "best lr", "seeds"]
    head += [f"val loss @{s}" for s in steps] + [f"test {metric} @{s}" for s in steps]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in results["methods"].items():
        r = rows[name]
        cells = [name, "-" if m["best_lr"] is None else f"{m['best_lr']:g}", str(len(m["seeds"]))]
        cells += [_fmt(r.get(s, {}).get("val_loss")) for s in steps]
        cells += [_fmt(r.get(s, {}).get(f"test_{metric}")) for s in steps]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot_lr(results: dict[str, Any], path: str | Path) -> Path:
    """Validation loss (left) and the test score (right) against the learning rate, one line
    per method (seed of the sweep); the best rate of each method is marked."""
    import matplotlib  # optional (the cli extra), heavy: loaded only when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg"): no display needed

    metric = results.get("test_metric", "loss")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for name, m in results["methods"].items():
        points = [p for p in m.get("lr_points", []) if p["val_loss"] is not None]
        if not points:
            continue
        lrs = [p["lr"] for p in points]
        (line,) = axes[0].plot(lrs, [p["val_loss"] for p in points], marker="o", ms=3, label=name)
        scores = [p[f"test_{metric}"] for p in points]
        axes[1].plot(lrs, scores, marker="o", ms=3, color=line.get_color(), label=name)
        if m["best_lr"] in lrs:
            i = lrs.index(m["best_lr"])
            axes[0].plot(lrs[i], points[i]["val_loss"], "*", ms=10, color=line.get_color())
            axes[1].plot(lrs[i], scores[i], "*", ms=10, color=line.get_color())
    task, cfg = results["task"], results["config"]
    labels = ["validation loss (selects the rate: *)", f"test {metric}"]
    for ax, label in zip(axes, labels, strict=True):
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(
        f"{task['model']} on {task['data']}: {cfg['steps']} steps, batch {cfg['batch_size']}, "
        f"seed {cfg['seeds'][0]}",
        fontsize=9,
    )
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
