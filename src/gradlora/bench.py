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
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import GradLoraError
from .meter import measure
from .methods import METHODS, build, get_method
from .report import _write_json, best_lr, save_results, summarize
from .tasks import CLASSIFICATION, Task, load_task
from .train import evaluate, make_scheduler, train

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


def run_bench(cfg: BenchConfig, out_dir: str | Path, log: Callable[[str], None] = print):
    """Run (or resume) the benchmark; returns (results, Bench)."""
    bench = Bench(cfg, out_dir, log)
    return bench.run(), bench
