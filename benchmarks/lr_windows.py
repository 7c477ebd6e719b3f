"""The learning-rate window of every method on the three sweeps of benchmarks/lr_sweeps.sh
(issue 26): how far the rate may move before the method gets measurably worse.

A method's window is the range of swept rates, contiguous around its best, whose seed-0
validation loss (the score that picks the best rate) is within a tolerance of that method's
best. The tolerance is per task: 2% of the gap between the untrained model's validation loss
and LoRA's best, where the untrained score is stored (``benchmarks/base_score.py`` writes
``base_score_<model>_<data>.json``; used only if it was measured with the sweep's sizes), else
2% of LoRA's best validation loss, as the report says. Each window's width is log2(high / low)
(factors of 2; 0 for a single rate; a lower bound where the window reaches the end of the grid,
marked "edge"), and it sits relative to LoRA's by the ratio of the geometric centres and
whether the two overlap. The lora-one-init diagnostic sweep is shown with its task.

    python benchmarks/lr_windows.py  # writes benchmarks/results/lr_windows.{md,json} and
                                     # benchmarks/results/<task folder>/lr_windows.png
    python benchmarks/lr_windows.py --results DIR  # another results folder (output in DIR)
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from _sweeps import DIAGNOSTIC, RESULTS, TASKS, load

SHARE = 0.02  # of LoRA's best-to-untrained gap (or of LoRA's best) on each task
SHARES = (0.01, 0.02, 0.05)  # the tolerances of the sensitivity table: how much rests on SHARE
SIZES = ("max_length", "val_size", "test_size")  # the base score must be measured on these


def window(points: list[tuple[float, float | None]], tol: float) -> dict | None:
    """The window of one seed-0 sweep, ``points`` = (rate, validation loss; None if diverged):
    the contiguous run of swept rates around the best (lowest loss) whose loss is at most
    best + ``tol``; ``low``/``high`` its ends, ``width`` = log2(high / low), ``at_edge`` whether
    it reaches the lowest or highest swept rate (then the true window may be wider), and
    ``outside`` the rates within the tolerance but cut off from the best by a worse one.
    None if every run diverged."""
    points = sorted(points)
    scored = [i for i, (_, v) in enumerate(points) if v is not None]
    if not scored:
        return None
    best = min(scored, key=lambda i: points[i][1])
    limit = points[best][1] + tol

    def inside(i: int) -> bool:  # a swept, not diverged rate within the tolerance
        return 0 <= i < len(points) and points[i][1] is not None and points[i][1] <= limit

    lo = hi = best
    while inside(lo - 1):
        lo -= 1
    while inside(hi + 1):
        hi += 1
    low, high = points[lo][0], points[hi][0]
    return {
        "best_lr": points[best][0],
        "best": points[best][1],
        "low": low,
        "high": high,
        "width": math.log2(high / low),
        "at_edge": lo == 0 or hi == len(points) - 1,
        "outside": [points[i][0] for i in scored if inside(i) and not lo <= i <= hi],
    }


def tolerance(lora_best: float, untrained: float | None, share: float = SHARE) -> float:
    """``share`` of LoRA's best-to-untrained gap in validation loss, or of LoRA's best
    validation loss where no untrained score is known."""
    return share * (untrained - lora_best if untrained is not None else lora_best)


def relative(win: dict, lora: dict) -> dict:
    """Where ``win`` sits against LoRA's window: the ratio of the geometric centres
    √(low·high) / √(low_L·high_L) (above 1: at higher rates) and whether they overlap."""
    centre = math.sqrt(win["low"] * win["high"] / (lora["low"] * lora["high"]))
    return {
        "centre_ratio": centre,
        "overlap": win["low"] <= lora["high"] and lora["low"] <= win["high"],
    }


def untrained_val(results: dict, root: Path) -> tuple[float | None, str]:
    """The untrained model's validation loss on the sweep's task (from base_score.py) and a
    sentence saying where it came from, or why there is none."""
    cfg = results["config"]
    path = Path(root) / f"base_score_{cfg['model']}_{cfg['data']}.json"
    if not path.exists():
        return None, f"no untrained score stored for this task (no {path.name})"
    base = json.loads(path.read_text())
    if any(float(base["args"].get(k) or 0) != float(cfg.get(k) or 0) for k in SIZES):
        return None, f"{path.name} was measured with other sizes than the sweep's"
    return base["val"]["loss"], f"untrained validation loss {base['val']['loss']:.3f} ({path.name})"


def task_windows(results: dict, diag: dict | None, root: Path) -> dict | None:
    """Tolerance and every method's window on one task (None before LoRA's sweep has a best):
    ``windows`` method -> window plus its place against LoRA's."""
    curves = {
        m: [(p["lr"], p["val_loss"]) for p in e.get("lr_points", [])]
        for src in (results, diag or {"methods": {}})
        for m, e in src["methods"].items()
    }
    lora = window(curves.get("lora", []), 0.0)
    if lora is None:
        return None
    untrained, source = untrained_val(results, root)
    tol = tolerance(lora["best"], untrained)
    if untrained is None:
        basis = f"{source}; instead {SHARE:.0%} of LoRA's best validation loss ({lora['best']:.3f})"
    else:
        basis = f"{SHARE:.0%} of the gap between the {source} and LoRA's best ({lora['best']:.3f})"
    sensitivity = {}
    for share in sorted({*SHARES, SHARE}):
        t = tolerance(lora["best"], untrained, share)
        at = {m: w for m, c in curves.items() if (w := window(c, t))}
        sensitivity[f"{share:g}"] = {m: w | relative(w, at["lora"]) for m, w in at.items()}
    windows = sensitivity[f"{SHARE:g}"]  # the main table's tolerance, tol
    return {
        "tolerance": tol,
        "basis": basis,
        "untrained_val_loss": untrained,
        "windows": windows,
        "sensitivity": sensitivity,
    }


def sensitivity_table(found: dict) -> list[str]:
    """Markdown lines: every method's window width (and overlap with LoRA's) at each
    tolerance of SHARES, so that a claim about widths can be read against the choice of 2%."""
    shares = list(found["sensitivity"])
    lines = [
        f"Sensitivity: width (×2) at {', '.join(f'{float(x):.0%}' for x in shares)} instead of "
        f"{SHARE:.0%} (✓: overlaps LoRA's window at that tolerance).",
        "",
        "| method | " + " | ".join(f"width @ {float(x):.0%}" for x in shares) + " |",
        "|---|" + "---|" * len(shares),
    ]
    for m in found["windows"]:
        cells = []
        for x in shares:
            w = found["sensitivity"][x].get(m)
            if w is None:
                cells.append("-")
                continue
            lap = "" if m == "lora" else " ✓" if w["overlap"] else ""
            cells.append(("≥ " if w["at_edge"] else "") + f"{w['width']:.2f}{lap}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines + [""]


def table(name: str, found: dict | None) -> list[str]:
    """Markdown lines of one task's windows."""
    lines = [f"### {name}", ""]
    if found is None:
        return lines + ["LoRA's sweep is not finished.", ""]
    lines += [
        f"Tolerance {found['tolerance']:.4f} in validation loss: {found['basis']}.",
        "",
        "| method | best lr | best val loss | window | width (×2) | centre / LoRA's | overlaps LoRA's |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, w in found["windows"].items():
        span = f"{w['low']:g}" + (f" – {w['high']:g}" if w["high"] > w["low"] else "")
        span += " (edge)" if w["at_edge"] else ""
        span += (
            f"; also within: {', '.join(f'{x:g}' for x in w['outside'])}" if w["outside"] else ""
        )
        width = ("≥ " if w["at_edge"] else "") + f"{w['width']:.2f}"
        lap = "-" if m == "lora" else "yes" if w["overlap"] else "no"
        lines.append(
            f"| {m} | {w['best_lr']:g} | {w['best']:.3f} | {span} | {width} | "
            f"{w['centre_ratio']:.2f} | {lap} |"
        )
    return lines + [""]


def plot(name: str, results: dict, diag: dict | None, found: dict, path: Path) -> None:
    """Seed-0 validation loss against the rate for every method, its window drawn thick over
    the curve (top); every window as a bar, LoRA's shaded across both panels (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    windows = found["windows"]
    fig, (top, bars) = plt.subplots(
        2, 1, figsize=(8, 7), dpi=120, sharex=True, gridspec_kw={"height_ratios": [3, 2]}
    )
    for ax in (top, bars):
        ax.axvspan(windows["lora"]["low"], windows["lora"]["high"], color="0.85", zorder=0)
    for row, (m, w) in enumerate(windows.items()):
        src = results if m in results["methods"] else diag
        pts = [(p["lr"], p["val_loss"]) for p in src["methods"][m]["lr_points"]]
        pts = sorted(p for p in pts if p[1] is not None)
        (line,) = top.plot(*zip(*pts, strict=True), marker="o", ms=3, lw=1, label=m)
        inside = [p for p in pts if w["low"] <= p[0] <= w["high"]]
        top.plot(*zip(*inside, strict=True), lw=5, alpha=0.35, color=line.get_color())
        top.plot(w["best_lr"], w["best"], "*", ms=10, color=line.get_color())
        bars.plot(
            [w["low"], w["high"]], [row, row], lw=6, color=line.get_color(), solid_capstyle="butt"
        )
        bars.plot([w["low"], w["high"]], [row, row], "|", ms=12, color=line.get_color())
        bars.plot(w["best_lr"], row, "o", ms=5, color="black")
    ticks = [m + (" (edge)" if w["at_edge"] else "") for m, w in windows.items()]
    bars.set_yticks(range(len(windows)), ticks)
    bars.invert_yaxis()
    bars.set_xlabel("learning rate (grey: LoRA's window; dot: best rate)")
    bars.set_xscale("log")
    top.set_ylabel("validation loss, seed 0 (* best)")
    top.legend(fontsize=7)
    for ax in (top, bars):
        ax.grid(alpha=0.3)
    top.set_title(
        f"{name}: learning-rate windows (within {found['tolerance']:.4f} of each method's best)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    """Write lr_windows.{md,json} in --results and each task's lr_windows.png in its folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(RESULTS), help="the sweeps' results folder")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args()
    root = Path(args.results)
    lines = [
        "# Learning-rate windows (benchmarks/lr_windows.py)",
        "",
        "Window: the swept rates, contiguous around a method's best, whose seed-0 validation loss",
        "is within the task's tolerance of that method's best; width in factors of 2 (log2 of",
        "high / low; the grids step by 2-2.5x, so widths come in those steps, and 'edge' marks a",
        "window that reaches the end of the grid: its width is a lower bound); centre / LoRA's:",
        "ratio of the geometric centres (above 1: at higher rates). One seed: a rate at the",
        "border may fall either side with another seed.",
        "",
    ]
    out = {}
    for name, folder in TASKS.items():
        results = load(folder, root)
        if results is None:
            lines += [f"### {name}", "", f"No results yet in {folder}.", ""]
            continue
        diag = load(DIAGNOSTIC[name], root)
        found = out[name] = task_windows(results, diag, root)
        lines += table(name, found) + (sensitivity_table(found) if found else [])
        if found and not args.no_plots:
            plot(name, results, diag, found, root / folder / "lr_windows.png")
    (root / "lr_windows.md").write_text("\n".join(lines))
    (root / "lr_windows.json").write_text(json.dumps(out, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
