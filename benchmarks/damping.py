"""LoRA-One's damping sweep (issue 26, `benchmarks/lr_sweeps.sh damping` and `damping-seeds`):
the preconditioner's lambda in (B^T B + lambda I) and (A A^T + lambda I), lora-one at its best
rate (2e-3) on both causal-LM tasks, and on MiniLM at the causal-LM tasks' best lambda.

Each lambda's runs are in results/damping-<task>/lambda-<lambda>/ (seed 0; seeds 0-2 at the best
lambda once `damping-seeds` has run, also on MiniLM); the default, lambda = 1e-6, is the sweep's
own lora-one run at 2e-3 in results/lr-<task's sweep>/ (seeds 0-2: 2e-3 is lora-one's best rate on
all three tasks). The best lambda of a causal-LM task is the one with the lowest seed-0
validation loss, as for the rates.

The report gives, per task and lambda, the validation loss (seed 0, and mean ± std over the seeds
there), the test score (test loss on Hamlet, answer match on arithmetic) at every step budget
(25%, 50% and 100% of the steps; mean ± std) and the number of seeds; and each lambda against the
default paired by seed (benchmarks/paired.py: the mean of the per-seed differences, its 95%
t-interval and n pairs; ahead/behind only where the interval excludes 0, "-" with fewer than 2
pairs). The rule of issue 26: a lambda meets it if it is ahead of the default on the test score at
the end of training on both causal-LM tasks and not behind it on MiniLM. Whether the library's
default then changes is a decision, stated in docs/benchmarks.md. Standard library only
(lr_sweeps.sh calls ``python benchmarks/damping.py --best hamlet`` with any python).

    python benchmarks/damping.py --best hamlet  # prints the best lambda, e.g. 1e-2 (or 1e-6)
    python benchmarks/damping.py  # writes benchmarks/results/damping.{md,json}
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import paired
from _sweeps import RESULTS, load

TASKS = {  # task -> (its damping folder, its learning-rate sweep), as in lr_sweeps.sh
    "hamlet": ("damping-hamlet", "lr-smollm2-hamlet"),
    "arithmetic": ("damping-arithmetic", "lr-smollm2-arithmetic"),
    "minilm": ("damping-minilm", "lr-minilm"),
}
CAUSAL = ("hamlet", "arithmetic")  # swept at every lambda; MiniLM only checks the candidates
NAMES = {
    "hamlet": "SmolLM2 / Hamlet",
    "arithmetic": "SmolLM2 / arithmetic",
    "minilm": "MiniLM / Rotten Tomatoes",
}
DEFAULT = "1e-6"  # lora-one's default lambda: its runs are the learning-rate sweep's
EXPECTED = ["1e-4", "1e-2", "1"]  # the lambdas of `lr_sweeps.sh damping`
METHOD, LR = "lora-one", 2e-3


def _metric(results: dict) -> str:
    """The test score measured at every budget in a bench report (the ``test_<name>`` entry
    of its at_budgets: answer_match where the lead score is exact_match, else the lead)."""
    for entry in results["methods"].get(METHOD, {}).get("at_budgets", {}).values():
        for key in entry:
            if key.startswith("test_"):
                return key.removeprefix("test_")
    lead = results["test_metric"]
    return "answer_match" if lead == "exact_match" else lead


def lambdas(task: str, root: Path = RESULTS) -> dict[str, dict]:
    """Lambda (as written in its folder name; DEFAULT for the sweep's own runs) -> its runs of
    lora-one at LR, the task's step count and test metric; in increasing lambda."""
    damping, sweep = TASKS[task]
    found = {DEFAULT: load(sweep, root)}
    for folder in sorted((Path(root) / damping).glob("lambda-*")):
        found[folder.name.removeprefix("lambda-")] = load(f"{damping}/{folder.name}", root)
    out = {}
    for lam, results in found.items():
        if results is None:
            continue
        runs = [r for r in results["runs"] if r["method"] == METHOD and abs(r["lr"] - LR) < 1e-12]
        if runs:
            out[lam] = {
                "runs": runs,
                "steps": results["config"]["steps"],
                "metric": _metric(results),
            }
    return dict(sorted(out.items(), key=lambda kv: float(kv[0])))


def val_seed0(entry: dict) -> float | None:
    """The seed-0 validation loss of one lambda's runs (None if it diverged or is missing)."""
    for r in entry["runs"]:
        if r["seed"] == 0 and r["diverged_at"] is None and r["val"]:
            return r["val"]["loss"]
    return None


def best(found: dict[str, dict]) -> str | None:
    """The lambda with the lowest seed-0 validation loss (None if none has one)."""
    scored = [(v, float(lam), lam) for lam, e in found.items() if (v := val_seed0(e)) is not None]
    return min(scored)[2] if scored else None


def _stat(values: list[float]) -> dict | None:
    """Mean, sample std (0 for one value) and count of ``values``; None for none."""
    if not values:
        return None
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def _fmt(stat: dict | None) -> str:
    """mean ± std to 3 decimals (the mean alone for one seed, "-" for none)."""
    if not stat:
        return "-"
    return f"{stat['mean']:.3f}" + (f" ± {stat['std']:.3f}" if stat["n"] > 1 else "")


def summary(found: dict[str, dict]) -> dict:
    """Per lambda: seeds, validation loss (seed 0; mean ± std), test score by step (mean ±
    std) and, against the default, the paired comparison by step; plus the steps, metric and
    best lambda."""
    if not found:
        return {"lambdas": {}, "best": None}
    first = next(iter(found.values()))
    total, metric = first["steps"], first["metric"]
    steps = sorted({s for e in found.values() for r in e["runs"] for s in r["budgets"]}, key=int)
    steps = [s for s in steps if int(s) < total] + [str(total)]
    higher = metric != "loss"
    scores = {
        lam: {s: paired.by_seed(e["runs"], METHOD, LR, s, total, metric) for s in steps}
        for lam, e in found.items()
    }
    out = {}
    for lam, e in found.items():
        ok = [r for r in e["runs"] if r["diverged_at"] is None and r["val"]]
        out[lam] = {
            "seeds": sorted(r["seed"] for r in e["runs"]),
            "val_loss_seed0": val_seed0(e),
            "val_loss": _stat([r["val"]["loss"] for r in ok]),
            "test": {s: _stat(list(scores[lam][s].values())) for s in steps},
        }
        if lam != DEFAULT and DEFAULT in scores:
            pairs = {s: paired.compare(scores[lam][s], scores[DEFAULT][s], higher) for s in steps}
            out[lam]["paired"] = pairs
    return {"steps": steps, "metric": metric, "higher": higher, "lambdas": out, "best": best(found)}


def task_lines(task: str, s: dict) -> list[str]:
    """Markdown lines of one task's lambdas."""
    lines = [f"### {NAMES[task]}", ""]
    if not s["lambdas"]:
        return lines + ["No runs yet.", ""]
    steps, metric = s["steps"], s["metric"]
    chosen = (
        f"best lambda (lowest seed-0 validation loss): {s['best']}"
        if task in CAUSAL
        else "run at the causal-LM tasks' best lambda only"
    )
    lines += [
        f"Test score: {metric} ({'higher' if s['higher'] else 'lower'} is better); {chosen}. "
        f"Paired: lambda − {DEFAULT}, same seed.",
        "",
        "| lambda | seeds | val loss, seed 0 | val loss | "
        + " | ".join(f"test @{x}" for x in steps)
        + " | "
        + " | ".join(f"paired @{x}" for x in steps)
        + " |",
        "|---|---|---|---|" + "---|" * (2 * len(steps)),
    ]
    for lam, e in s["lambdas"].items():
        v0 = e["val_loss_seed0"]
        cells = [lam + (" (default)" if lam == DEFAULT else ""), str(len(e["seeds"]))]
        cells += ["diverged" if v0 is None else f"{v0:.3f}", _fmt(e["val_loss"])]
        cells += [_fmt(e["test"][x]) for x in steps]
        for x in steps:
            c = e.get("paired", {}).get(x)
            cells.append("-" if c is None else f"{c['verdict']} ({paired.fmt(c)})")
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


NOT_BEST = "not the best: seed 0 only"


def end_verdict(c: dict | None, is_best: bool) -> str:
    """One task's word on a lambda against the default at the end of training: the paired
    verdict with 2 or more pairs; else "not run" (no run there), "pending" (the task's best
    lambda, awaiting its seeds 1, 2) or NOT_BEST (seeds 1, 2 are run at the best lambda only)."""
    if c is None:
        return "not run"
    if c["n"] >= 2:
        return c["verdict"]
    return "pending" if is_best else NOT_BEST


def verdict(summaries: dict[str, dict]) -> tuple[list[str], dict]:
    """The rule of issue 26: a lambda meets it if it is ahead of the default (paired, test
    score at the end of training) on both causal-LM tasks and not behind it on MiniLM. Per
    lambda other than the default: the end-of-training comparison on each task and "yes", "no"
    (behind or tied on a causal-LM task, not its best lambda there, or behind on MiniLM) or
    "pending" (awaiting runs or seeds); provisional until every lambda of EXPECTED has its
    seed-0 run on both causal-LM tasks (the best lambda may change until then)."""
    lines = [
        "## Verdict",
        "",
        f"A lambda meets the rule if it is ahead of the default ({DEFAULT}) on both causal-LM",
        "tasks and not behind it on MiniLM: the paired 95% interval of the end-of-training test",
        "score (lambda − default, same seed) excludes 0 on the better side on both causal LMs,",
        "and does not exclude 0 on the worse side on MiniLM (run at the causal-LM best only).",
        "Whether the library's default changes is a decision, stated with its reason in",
        "docs/benchmarks.md (LoRA-One's damping).",
        "",
        "| lambda | " + " | ".join(NAMES[t] for t in summaries) + " | meets the rule |",
        "|---|" + "---|" * (len(summaries) + 1),
    ]
    others = sorted(
        {lam for s in summaries.values() for lam in s["lambdas"]} - {DEFAULT}, key=float
    )
    facts = {}
    for lam in others:
        ends, words, cells = {}, {}, []
        for t, s in summaries.items():
            e = s["lambdas"].get(lam)
            c = ends[t] = e.get("paired", {}).get(s["steps"][-1]) if e else None
            words[t] = end_verdict(c, t not in CAUSAL or lam == s["best"])
            cells.append(words[t] + (f" ({paired.fmt(c)})" if c and c["n"] else ""))
        causal = [words[t] for t in CAUSAL if t in words]
        guard = [w for t, w in words.items() if t not in CAUSAL]
        if any(w in ("behind", "tie", NOT_BEST) for w in causal) or "behind" in guard:
            meets = "no"
        elif all(w == "ahead" for w in causal) and all(w in ("ahead", "tie") for w in guard):
            meets = "yes"
        else:
            meets = "pending"
        facts[lam] = {"meets_rule": meets} | ends
        lines.append(f"| {lam} | " + " | ".join(cells) + f" | {meets} |")
    if not others:
        lines.append(
            "| - | " + " | ".join("no damping runs yet" for _ in summaries) + " | pending |"
        )
    done = all(set(EXPECTED) <= set(summaries[t]["lambdas"]) for t in CAUSAL if t in summaries)
    state = "final" if done else "provisional: the seed-0 damping sweep is not finished"
    lines += ["", f"({state}; the lambdas of lr_sweeps.sh: {', '.join(EXPECTED)}.)"]
    return lines + [""], facts


def main() -> None:
    """--best TASK: print TASK's best lambda; else write damping.{md,json} in --results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--best", choices=list(CAUSAL), help="print the task's best lambda only")
    parser.add_argument("--results", default=str(RESULTS), help="the results folder")
    args = parser.parse_args()
    root = Path(args.results)
    if args.best:
        lam = best(lambdas(args.best, root))
        if lam is None:
            print(f"no lora-one runs at lr {LR:g} for {args.best}: the default", file=sys.stderr)
        print(lam or DEFAULT)
        return
    summaries = {t: summary(lambdas(t, root)) for t in TASKS}
    lines = ["# LoRA-One's damping lambda (benchmarks/damping.py)", ""]
    lines += [
        f"lora-one at lr {LR:g}, seed 0 at every lambda, seeds 1 and 2 at each task's best;",
        f"{DEFAULT} (the default) is the learning-rate sweep's own run. Test scores: mean ± std",
        "over the seeds; paired: mean [95% t-interval] n pairs, ahead/behind only where the",
        "interval excludes 0.",
        "",
    ]
    for t, s in summaries.items():
        lines += task_lines(t, s)
    part, facts = verdict(summaries)
    lines += part
    (root / "damping.md").write_text("\n".join(lines))
    (root / "damping.json").write_text(json.dumps(summaries | {"verdict": facts}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
