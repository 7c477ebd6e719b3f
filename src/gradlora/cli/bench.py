"""``gradlora bench``: the protocol of docs/benchmarks.md, resumable.

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
import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..atomic import write_json
from ..errors import GradLoraError
from ..meter import measure
from . import loop
from .config import PROTOCOL_VERSION, BenchConfig, digest, eval_batch_size, resolve_device
from .recipes import RECIPES, build, get_recipe
from .report import best_lr, save_results, summarize
from .tasks import CLASSIFICATION, Task, read_data

BUDGET_FRACTIONS = (0.25, 0.5)  # of the steps: where a run is also evaluated (step budgets)


def run_spec(
    cfg: BenchConfig,
    task: Task,
    method: str,
    lr: float,
    seed: int,
    protocol: int = PROTOCOL_VERSION,
) -> dict[str, Any]:
    """Everything that determines one bench run's result (its key is a hash of this)."""
    spec = cfg.run_spec(task.identity, method, lr, seed)
    return {"protocol": protocol, **spec, "device": resolve_device(cfg.device).type}


def run_key(spec: dict[str, Any]) -> str:
    return digest(spec, 12)


def run_path(out_dir: Path, spec: dict[str, Any]) -> Path:
    name = f"{spec['method']}_lr{spec['lr']:g}_seed{spec['seed']}_{run_key(spec)}.json"
    return out_dir / "runs" / name


class Bench:
    """One benchmark: the task, its fixed batches, and the run store under ``out_dir``."""

    def __init__(self, cfg: BenchConfig, out_dir: str | Path, log: Callable[[str], None] = print):
        cfg.validate()
        unknown = [m for m in cfg.methods if m not in RECIPES]
        if unknown or not cfg.methods:
            raise GradLoraError(f"unknown method(s) {unknown}; choose from {', '.join(RECIPES)}")
        bad_lrs = [m for m in cfg.lrs if m not in RECIPES]
        if bad_lrs:
            raise GradLoraError(f"--lrs names unknown method(s) {bad_lrs}")
        bad_seeds = [m for m in cfg.seeds_for if m not in cfg.methods]
        if bad_seeds:
            raise GradLoraError(f"--seeds-for names method(s) {bad_seeds} not in --methods")
        if cfg.select not in ("val-loss", "val-acc"):
            raise GradLoraError(f"--select must be val-loss or val-acc, not {cfg.select!r}")
        if not cfg.seeds:
            raise GradLoraError("--seeds needs at least one seed")
        cfg, self.task = cfg.load_task(read_data(cfg.data))
        self.cfg, self.out_dir, self.log = cfg, Path(out_dir), log
        self.device = resolve_device(cfg.device)
        if cfg.select == "val-acc" and self.task.kind != CLASSIFICATION:
            raise GradLoraError("--select val-acc needs a classification task; use val-loss")
        for split in ("val", "test"):
            if len(self.task.splits[split]) == 0:
                raise GradLoraError(f"the {split} split is empty; raise --{split}-size")
        eval_bs = eval_batch_size(self.task.kind, cfg.batch_size)
        self.val_batches = self.task.eval_batches("val", cfg.max_length, eval_bs)
        self.test_batches = self.task.eval_batches("test", cfg.max_length, eval_bs)
        answers, tokenizer = self.task.splits["test"].answers, self.task.tokenizer
        self._longest_answer = max(  # in tokens: the generation budget of exact_match
            (len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers or []),
            default=0,
        )
        self._train_batches: dict[int, list] = {}
        self.planned: dict[str, dict[str, Any]] = {}  # run path -> its record, in plan order
        self.failed: list[dict[str, Any]] = []  # runs that raised (not stored: retried next time)
        self.computed = 0  # runs computed by this process (the rest came from the store)

    @property
    def budget_steps(self) -> list[int]:
        """Steps (25% and 50% of the run) after which validation and test are also measured,
        for the comparison at smaller step budgets; the full run's are measured at its end.
        Not on a quantized base: bitsandbytes' CPU layers change layout on an eval pass."""
        if self.cfg.quantize is not None:
            return []
        return sorted(
            {max(1, round(f * self.cfg.steps)) for f in BUDGET_FRACTIONS} - {self.cfg.steps}
        )

    def evaluate(self, model: torch.nn.Module, final: bool = True) -> dict[str, dict[str, float]]:
        """Validation and test loss (accuracy for classifiers). For a task with answers
        (``arithmetic``), on the test split: ``answer_match``, the share whose greedy decoding
        writes the worked answer itself (one forward), and at the end of a run (``final``)
        ``exact_match``, the share whose greedy decoding ends in the right final number (by
        generation, only for the examples that do not write the worked answer itself)."""
        out = {"val": loop.evaluate(model, self.val_batches)}
        matches: list[bool] = []
        out["test"] = loop.evaluate(model, self.test_batches, matches=matches)
        test = self.task.splits["test"]
        if test.answers is None:
            return out
        out["test"]["answer_match"] = sum(matches) / len(matches)
        if final:
            out["test"]["exact_match"] = loop.exact_match(
                model,
                self.task.tokenizer,
                test.texts,
                test.answers,
                self.task.final_answer,
                batch_size=64,
                max_new_tokens=self._longest_answer + 2,  # its EOS and one more
                known=matches,
            )
        return out

    def train_batches(self, seed: int) -> list:
        if seed not in self._train_batches:
            self._train_batches[seed] = self.task.batches(
                "train", self.cfg.batch_size, self.cfg.max_length, self.cfg.steps, seed=seed
            )
        return self._train_batches[seed]

    def grid(self, method: str) -> list[float]:
        m = get_recipe(method)
        if method in self.cfg.lrs:
            return list(self.cfg.lrs[method])
        if self.cfg.sweep:
            return list(m.lr_grid(self.task.kind))
        return [m.default_lr(self.task.kind)]

    # ------------------------------------------------------------------ one run

    def get_or_run(self, method: str, lr: float, seed: int) -> dict[str, Any] | None:
        spec = run_spec(self.cfg, self.task, method, lr, seed)
        path = run_path(self.out_dir, spec)
        if str(path) in self.planned:  # asked twice by the plan (a --seeds-at-rate on a grid rate)
            return self.planned[str(path)]
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
            write_json(path, record)
            self.computed += 1
        self.planned[str(path)] = record
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
                quantize=cfg.quantize,
                damping=cfg.damping,
            )
            sched = loop.make_scheduler(built.optimizer, cfg.schedule, cfg.steps, cfg.warmup)
            budgets: dict[str, Any] = {}  # step -> val and test metrics part way
            eval_seconds = 0.0

            def at_budget(step: int, _result, model=built.model) -> None:
                nonlocal eval_seconds
                if step in self.budget_steps:
                    start = time.perf_counter()
                    budgets[str(step)] = self.evaluate(model, final=False)
                    eval_seconds += time.perf_counter() - start

            torch.manual_seed(seed + 2)  # identical dropout draws for every method
            result = loop.train(
                built.model,
                batches,
                built.optimizer,
                sched,
                progress=cfg.progress,
                desc=f"{method} lr={lr:g} seed={seed}",
                on_step=at_budget,
            )
            train_seconds = result.seconds - eval_seconds
        start = time.perf_counter()
        diverged = result.diverged_at is not None
        final = {"val": {}, "test": {}} if diverged else self.evaluate(built.model)
        val, test = final["val"], final["test"]
        eval_seconds += time.perf_counter() - start
        init_seconds, init_summary = built.init_seconds, built.init_summary
        del built, at_budget
        return {
            "key": run_key(spec),
            "spec": spec,
            "method": method,
            "lr": lr,
            "seed": seed,
            "losses": result.losses,
            "budgets": budgets,
            "diverged_at": result.diverged_at,
            "val": val,
            "test": test,
            "init_seconds": init_seconds,
            "init": init_summary,
            "build_seconds": max(cost.seconds - result.seconds, 0.0),
            "train_seconds": train_seconds,
            "eval_seconds": eval_seconds,
            "peak_bytes": cost.peak_bytes,
            "memory_metric": cost.metric,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }

    # ------------------------------------------------------------------ the sweep

    def seeds(self, method: str) -> list[int]:
        """``method``'s seeds: the sweep seed first, then those run only at its best rate."""
        cfg = self.cfg
        if method in cfg.seeds_for:
            return list(cfg.seeds_for[method])
        extra = cfg.methods if cfg.extra_seeds_for is None else cfg.extra_seeds_for
        return list(cfg.seeds) if method in extra else list(cfg.seeds[:1])

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        for method in cfg.methods:
            seeds = self.seeds(method)
            for lr in self.grid(method):
                self.get_or_run(method, lr, seeds[0])
            best = best_lr(self.runs, method, seeds[0], cfg.select)
            if best is not None:
                for seed in seeds[1:]:
                    self.get_or_run(method, best, seed)
            self.save()  # the report so far: worth looking at while the sweep goes on
        if cfg.seeds_at_rate is not None:
            target, seeds = cfg.seeds_at_rate
            for method in cfg.methods:
                for lr in self.grid(method):
                    if abs(lr - target) <= 1e-9 * target:  # the grid's own value: the same run key
                        for seed in seeds:
                            self.get_or_run(method, lr, seed)
        return self.save()

    @property
    def runs(self) -> list[dict[str, Any]]:
        """Every run of the current config, in plan order, each once."""
        return list(self.planned.values())

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
