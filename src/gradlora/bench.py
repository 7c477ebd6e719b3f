"""``gradlora bench``: the BENCHMARKS.md protocol, resumable.

Every (method, learning rate, seed) run sees the same model, head init, batches, dropout draws,
schedule and step count for its seed; only the method and its learning rate differ. Each method
is swept over its learning-rate grid with the first seed; the best rate is chosen on the
validation split (never the test set); the other seeds run only at that rate. Every finished
run is written at once to ``OUT/runs/<method>_lr<lr>_seed<seed>_<key>.json``, where ``key`` is a
hash of everything that determines the run, so an interrupted sweep resumes where it stopped,
a re-run only adds what is missing, and a changed setting never reuses a stale run.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import platform
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import GradLoraError
from .meter import measure
from .methods import METHODS, build, get_method
from .tasks import CLASSIFICATION, Task, load_task
from .train import evaluate, first_step_at_or_below, make_scheduler, smooth, train

# bump when a change of the code changes what a run with the same settings computes
PROTOCOL_VERSION = 1
DEFAULT_METHODS = ["lora", "lora-ga", "lora-one", "lora-pro", "full"]


@dataclass
class BenchConfig:
    model: str = "minilm"  # built-in name or model folder
    data: str = "rotten-tomatoes"  # built-in name or data file
    methods: list[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    steps: int = 150  # optimizer steps of every run
    batch_size: int = 32
    max_length: int = 64  # tokens per example (hamlet: tokens per chunk)
    rank: int = 8  # LoRA r
    alpha: float = 16.0  # LoRA alpha
    lrs: dict[str, list[float]] = field(default_factory=dict)  # per-method grids (override)
    sweep: bool = True  # False: each method at its default rate (or its single --lrs value)
    seeds: list[int] = field(default_factory=lambda: [0])  # first: the sweep; rest: best lr only
    extra_seeds_for: list[str] | None = None  # methods that get seeds[1:] (None: all)
    init_batches: int = 8  # first training batches used by gradient inits
    weight_decay: float = 0.01
    schedule: str = "cosine"  # constant, linear, cosine
    warmup_steps: int | None = None  # None: 3% of steps, rounded up
    val_size: float | None = None  # count or fraction; None: 500 (rotten-tomatoes) / 10%
    test_size: float | None = None  # count or fraction; None: 1,000 (rotten-tomatoes) / 10%
    num_layers: int | None = None  # keep only the first blocks (tests, smoke runs)
    select: str = "val-loss"  # "val-loss" (lowest) or "val-acc" (highest) picks the best lr
    smooth_window: int = 20  # trailing mean of the reported training loss
    device: str = "auto"  # "auto": cuda if available, else cpu
    progress: bool = True

    @property
    def warmup(self) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        return math.ceil(0.03 * self.steps)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def run_spec(cfg: BenchConfig, task: Task, method: str, lr: float, seed: int) -> dict[str, Any]:
    """Everything that determines one run's result (its key is a hash of this)."""
    return {
        "protocol": PROTOCOL_VERSION,
        "task": task.identity,
        "method": method,
        "lr": lr,
        "seed": seed,
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "max_length": cfg.max_length,
        "rank": cfg.rank,
        "alpha": cfg.alpha,
        "init_batches": cfg.init_batches,
        "weight_decay": cfg.weight_decay,
        "schedule": cfg.schedule,
        "warmup_steps": cfg.warmup,
        "device": resolve_device(cfg.device).type,
    }


def run_key(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def run_path(out_dir: Path, spec: dict[str, Any]) -> Path:
    name = f"{spec['method']}_lr{spec['lr']:g}_seed{spec['seed']}_{run_key(spec)}.json"
    return out_dir / "runs" / name


def _write_json(path: Path, data: Any) -> None:
    """Write atomically: a reader (or an interrupted run) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


class Bench:
    """One benchmark: the task, its fixed batches, and the run store under ``out_dir``."""

    def __init__(self, cfg: BenchConfig, out_dir: str | Path, log: Callable[[str], None] = print):
        unknown = [m for m in cfg.methods if m not in METHODS]
        if unknown or not cfg.methods:
            raise GradLoraError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
        bad_lrs = [m for m in cfg.lrs if m not in METHODS]
        if bad_lrs:
            raise GradLoraError(f"--lrs names unknown method(s) {bad_lrs}")
        if cfg.select not in ("val-loss", "val-acc"):
            raise GradLoraError(f"--select must be val-loss or val-acc, not {cfg.select!r}")
        if not cfg.seeds:
            raise GradLoraError("--seeds needs at least one seed")
        self.cfg, self.out_dir, self.log = cfg, Path(out_dir), log
        self.device = resolve_device(cfg.device)
        self.task = load_task(
            cfg.model,
            cfg.data,
            max_length=cfg.max_length,
            val_size=cfg.val_size,
            test_size=cfg.test_size,
            num_layers=cfg.num_layers,
        )
        if cfg.select == "val-acc" and self.task.kind != CLASSIFICATION:
            raise GradLoraError("--select val-acc needs a classification task; use val-loss")
        for split in ("val", "test"):
            if len(self.task.splits[split]) == 0:
                raise GradLoraError(f"the {split} split is empty; raise --{split}-size")
        eval_bs = 64 if self.task.kind == CLASSIFICATION else cfg.batch_size
        self.val_batches = self.task.eval_batches("val", cfg.max_length, eval_bs)
        self.test_batches = self.task.eval_batches("test", cfg.max_length, eval_bs)
        self._train_batches: dict[int, list] = {}
        self.runs: list[dict[str, Any]] = []  # every run of the current config, in order
        self.failed: list[dict[str, Any]] = []  # runs that raised (not stored: retried next time)
        self.computed = 0  # runs computed by this process (the rest came from the store)

    def train_batches(self, seed: int) -> list:
        if seed not in self._train_batches:
            self._train_batches[seed] = self.task.batches(
                "train", self.cfg.batch_size, self.cfg.max_length, self.cfg.steps, seed=seed
            )
        return self._train_batches[seed]

    def grid(self, method: str) -> list[float]:
        m = get_method(method)
        if method in self.cfg.lrs:
            return list(self.cfg.lrs[method])
        if self.cfg.sweep:
            return list(m.lr_grid(self.task.kind))
        return [m.default_lr(self.task.kind)]

    # ------------------------------------------------------------------ one run

    def get_or_run(self, method: str, lr: float, seed: int) -> dict[str, Any] | None:
        spec = run_spec(self.cfg, self.task, method, lr, seed)
        path = run_path(self.out_dir, spec)
        if path.exists():
            record = json.loads(path.read_text())
            self.log(f"[stored] {method} lr={lr:g} seed={seed}: {path.name}")
        else:
            self.log(f"[run] {method} lr={lr:g} seed={seed}")
            try:
                record = self._run(method, lr, seed, spec)
            except (KeyboardInterrupt, GradLoraError):
                raise
            except Exception as err:  # one broken run must not stop a long sweep
                self.log(f"[failed] {method} lr={lr:g} seed={seed}: {type(err).__name__}: {err}")
                self.failed.append(
                    {"method": method, "lr": lr, "seed": seed, "error": traceback.format_exc()}
                )
                return None
            _write_json(path, record)
            self.computed += 1
        self.runs.append(record)
        return record

    def _run(self, method: str, lr: float, seed: int, spec: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg
        batches = self.train_batches(seed)
        gc.collect()
        with measure(self.device) as cost:
            built = build(
                method,
                self.task,
                lr=lr,
                seed=seed,
                train_batches=batches,
                rank=cfg.rank,
                alpha=cfg.alpha,
                init_batches=cfg.init_batches,
                weight_decay=cfg.weight_decay,
                device=self.device,
                progress=False,
            )
            sched = make_scheduler(built.optimizer, cfg.schedule, cfg.steps, cfg.warmup)
            torch.manual_seed(seed + 2)  # identical dropout draws for every method
            result = train(
                built.model,
                batches,
                built.optimizer,
                sched,
                progress=cfg.progress,
                desc=f"{method} lr={lr:g} seed={seed}",
            )
        start = time.perf_counter()
        diverged = result.diverged_at is not None
        val = {} if diverged else evaluate(built.model, self.val_batches)
        test = {} if diverged else evaluate(built.model, self.test_batches)
        eval_seconds = time.perf_counter() - start
        init_seconds, init_summary = built.init_seconds, built.init_summary
        del built
        return {
            "key": run_key(spec),
            "spec": spec,
            "method": method,
            "lr": lr,
            "seed": seed,
            "losses": result.losses,
            "diverged_at": result.diverged_at,
            "val": val,
            "test": test,
            "init_seconds": init_seconds,
            "init": init_summary,
            "build_seconds": max(cost.seconds - result.seconds, 0.0),
            "train_seconds": result.seconds,
            "eval_seconds": eval_seconds,
            "peak_bytes": cost.peak_bytes,
            "memory_metric": cost.metric,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }

    # ------------------------------------------------------------------ the sweep

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        extra = cfg.methods if cfg.extra_seeds_for is None else cfg.extra_seeds_for
        for method in cfg.methods:
            for lr in self.grid(method):
                self.get_or_run(method, lr, cfg.seeds[0])
            best = best_lr(self.runs, method, cfg.seeds[0], cfg.select)
            if best is not None and method in extra:
                for seed in cfg.seeds[1:]:
                    self.get_or_run(method, best, seed)
            self.save()  # the report so far: worth looking at while the sweep goes on
        return self.save()

    def results(self) -> dict[str, Any]:
        return summarize(self.runs, self.cfg, self.task, self.failed, self.device)

    def save(self) -> dict[str, Any]:
        results = self.results()
        save_results(results, self.out_dir)
        return results


# ---------------------------------------------------------------------- summarizing


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
            "about": METHODS[method].about,
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
                for metric in ("loss", "accuracy"):
                    vals = [r[split][metric] for r in at_best if metric in r[split]]
                    if vals:
                        entry[f"{split}_{metric}"] = _stat(vals)
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
    head += ["val loss"] + (["test acc"] if classification else []) + ["test loss"]
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
        reach = m.get("steps_to_reference", "-") if "reference_loss" in results else "-"
        cells += ["never" if reach is None else str(reach)]
        cells += [_fmt(m.get("init_seconds"), 1), _fmt(m.get("wall_seconds"), 1)]
        cells += [_fmt(m.get("peak_mib"), 0)]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        "",
        f"{results['task']['model']} on {results['task']['data']} ({results['task']['kind']}): "
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
    for f in results["failed"]:
        last = f["error"].strip().splitlines()[-1]
        notes.append(f"\nFAILED {f['method']} lr={f['lr']:g} seed={f['seed']}: {last}")
    return "\n".join(lines + notes)


def _memory_metric(results: dict[str, Any]) -> str:
    metrics = {m.get("memory_metric") for m in results["methods"].values()} - {None}
    if metrics == {"cuda_max_allocated"}:
        return "CUDA max allocated"
    return "process RSS high-water mark over build + training (includes the Python process)"


def plot_losses(results: dict[str, Any], path: str | Path) -> Path:
    """Smoothed training loss of every method at its best lr; the seeds' min-max shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        f"{task['model']} on {task['data']}: r={cfg['rank']}, batch {cfg['batch_size']}, "
        f"{cfg['schedule']} lr, best lr per method on validation",
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
    _write_json(out_dir / "results.json", results)
    table = out_dir / "table.md"
    table.write_text(format_table(results) + "\n")
    paths = {"json": out_dir / "results.json", "table": table}
    if any("curve_mean" in m for m in results["methods"].values()):
        paths["plot"] = plot_losses(results, out_dir / "losses.png")
    return paths


def run_bench(cfg: BenchConfig, out_dir: str | Path, log: Callable[[str], None] = print):
    """Run (or resume) the benchmark; returns (results, Bench)."""
    bench = Bench(cfg, out_dir, log)
    return bench.run(), bench
