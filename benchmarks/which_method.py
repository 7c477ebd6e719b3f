"""Which method when: the three learning-rate sweeps of benchmarks/lr_sweeps.sh read side by side.

For each task: every method at LoRA's best rate (a user who keeps the rate they know; seed 0 of
the sweep), every method at its own best rate at 25%, 50% and 100% of the steps (mean ± std
over seeds), and the goals of issue 15 checked on the test score. "Better by more than the seed
spread" means the difference of the means exceeds the larger of the two standard deviations.

    python benchmarks/which_method.py  # writes benchmarks/results/which_method.{md,json}
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from gradlora.cli.lr_report import budget_metric
from gradlora.cli.recipes import ladder_rungs

RESULTS = Path(__file__).parent / "results"
TASKS = {
    "MiniLM / Rotten Tomatoes": "lr-minilm",
    "SmolLM2 / Hamlet": "lr-smollm2-hamlet",
    "SmolLM2 / arithmetic": "lr-smollm2-arithmetic",
}
KINDS = {  # task kind (the recipes' default rates are per kind) -> its tasks
    "classification": ["MiniLM / Rotten Tomatoes"],
    "causal-lm": ["SmolLM2 / Hamlet", "SmolLM2 / arithmetic"],
}
SWEPT = ["full", "lora", "lora-ga", "lora-ga-matched", "lora-one", "lora-pro"]
SWEPT += ["peft-lora-ga", "peft-riemannian"]
SEEDS = 3  # at each method's best rate
OURS = ["lora-ga", "lora-ga-matched", "lora-one", "lora-pro"]
PEERS = {"lora-ga": "peft-lora-ga", "lora-one": "peft-riemannian"}


def load(folder: str) -> dict | None:
    path = RESULTS / folder / "results.json"
    return json.loads(path.read_text()) if path.exists() else None


def gain(a: dict, b: dict, higher: bool) -> float:
    """How much better mean a is than mean b (positive: a is better)."""
    return (a["mean"] - b["mean"]) * (1 if higher else -1)


def spread(a: dict, b: dict) -> float:
    return max(a["std"], b["std"])


def verdict(a: dict, b: dict, higher: bool) -> str:
    """ "better", "worse" or "tie": whether a beats b by more than the seed spread."""
    g, s = gain(a, b, higher), spread(a, b)
    return "better" if g > s else "worse" if g < -s else "tie"


def fmt(stat: dict | None, digits: int = 3) -> str:
    if not stat:
        return "-"
    if stat.get("n", 1) > 1:
        return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}"


def at_rate(results: dict, method: str, lr: float, metric: str) -> dict | None:
    """Seed-0 validation loss and test score of ``method`` at ``lr`` (None if not swept)."""
    for p in results["methods"].get(method, {}).get("lr_points", []):
        if abs(p["lr"] - lr) <= 1e-12 * lr:
            return p
    return None


def task_report(name: str, results: dict) -> tuple[list[str], dict]:
    # the score measured at every budget (answer_match for arithmetic: exact_match, by
    # generation, exists at the end only and is in the bench's own table)
    metric = budget_metric(results["test_metric"])
    higher = metric != "loss"
    key = f"test_{metric}"
    methods = results["methods"]
    lora = methods.get("lora", {})
    lines = [f"### {name}", ""]
    facts: dict = {"metric": metric}
    if not lora.get("at_budgets"):
        return lines + ["LoRA's sweep is not finished.", ""], facts
    lr_l = lora["best_lr"]
    steps = sorted(lora["at_budgets"], key=int)
    final = lora["at_budgets"][steps[-1]]
    lines += [
        f"Test score: {metric} ({'higher' if higher else 'lower'} is better). LoRA's best rate: "
        f"{lr_l:g}.",
        "",
        f"**At LoRA's best rate ({lr_l:g})**, seed 0 (LoRA: mean ± std of its seeds):",
        "",
        f"| method | val loss | test {metric} | vs LoRA |",
        "|---|---|---|---|",
    ]
    facts["at_lora_rate"] = {}
    for method in methods:
        p = at_rate(results, method, lr_l, metric)
        if method == "lora":
            cells = [fmt(final["val_loss"]), fmt(final.get(key)), "-"]
        elif p is None or p["val_loss"] is None:
            cells = ["-", "-", "not swept" if p is None else "diverged"]
        else:
            one = {"mean": p[key], "std": 0.0, "n": 1}
            v = verdict(one, final[key], higher)
            facts["at_lora_rate"][method] = v
            cells = [f"{p['val_loss']:.3f}", f"{p[key]:.3f}", v]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "**At each method's best rate** (test score, mean ± std over seeds, by step):",
        "",
        "| method | best lr | " + " | ".join(f"@{s}" for s in steps) + " |",
        "|---|---|" + "---|" * len(steps),
    ]
    facts["at_best"], facts["final"], facts["budgets_by_method"] = {}, {}, {}
    for method, m in methods.items():
        if row_final := m.get("at_budgets", {}).get(steps[-1], {}).get(key):
            facts["final"][method] = row_final
        row = m.get("at_budgets", {})
        facts["budgets_by_method"][method] = {
            s: row[s][key] for s in steps if key in row.get(s, {})
        }
        cells = []
        for s in steps:
            stat = row.get(s, {}).get(key)
            mark = ""
            if stat and method != "lora":
                v = verdict(stat, lora["at_budgets"][s][key], higher)
                facts["at_best"].setdefault(method, {})[s] = v
                mark = {"better": " (+)", "worse": " (-)", "tie": ""}[v]
            cells.append(fmt(stat) + mark)
        best = "-" if m.get("best_lr") is None else f"{m['best_lr']:g}"
        best += " (edge)" if m.get("best_at_grid_edge") else ""
        lines.append(f"| {method} | {best} | " + " | ".join(cells) + " |")
    lines += ["", "(+)/(-): better/worse than LoRA by more than the seed spread.", ""]
    facts["steps"], facts["higher"] = steps, higher
    return lines, facts


def complete(results: dict | None, only: list[str] = SWEPT) -> bool:
    """Whether every method of the sweep (or of ``only``) has its best rate and all its
    seeds there."""
    if results is None:
        return False
    methods = results["methods"]
    for m in only:
        budgets = methods.get(m, {}).get("at_budgets", {})
        if not budgets or budgets[max(budgets, key=int)]["val_loss"]["n"] < SEEDS:
            return False
    return True


def on_ladder(lr: float) -> float:
    """The nearest rate (in log scale) of the 1-2-5 ladder: ..., 1e-4, 2e-4, 5e-4, 1e-3, ...
    Halfway between two rungs (the geometric mean of 2e-4 and 5e-4 is exactly halfway) it takes
    the lower one, whatever the rounding: a rate too low costs steps, one too high can diverge."""
    return min(ladder_rungs(lr), key=lambda x: round(abs(math.log(x / lr)), 9))


def default_rates(all_results: dict[str, dict | None]) -> dict:
    """Per task kind: each method's default rate for ``gradlora methods`` (the geometric mean
    of its best rates over the kind's tasks, on the 1-2-5 ladder), and whether every sweep of
    the kind is complete (only then are the recipes' defaults held to it, by a test)."""
    out = {}
    for kind, tasks in KINDS.items():
        rates = {}
        for m in SWEPT:
            best = [
                r["methods"][m]["best_lr"]
                for t in tasks
                if (r := all_results.get(t)) and r["methods"].get(m, {}).get("best_lr")
            ]
            if len(best) == len(tasks):
                rates[m] = on_ladder(math.exp(sum(map(math.log, best)) / len(best)))
        done = all(complete(all_results.get(t)) for t in tasks)
        out[kind] = {"complete": done, "rates": rates}
    return out


def rates_section(rates: dict) -> list[str]:
    lines = [
        "## Default rates (`gradlora methods`)",
        "",
        "Each method's best validation rate, as a geometric mean over the tasks of its kind, on the",
        "1-2-5 ladder; `src/gradlora/cli/recipes.py` holds these once the kind's sweeps are",
        "complete (tests/test_recipes_rates.py checks it).",
        "",
        "| method | " + " | ".join(rates) + " |",
        "|---|" + "---|" * len(rates),
    ]
    for m in SWEPT:
        cells = [f"{rates[k]['rates'][m]:g}" if m in rates[k]["rates"] else "-" for k in rates]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    state = [f"{k}: {'complete' if v['complete'] else 'provisional'}" for k, v in rates.items()]
    return lines + ["", "(" + ", ".join(state) + ")", ""]


def goals(facts: dict[str, dict], all_complete: bool) -> list[str]:
    done = {t: f for t, f in facts.items() if "steps" in f}
    lines = ["## Goals of issue 15", ""]
    if not done:
        return lines + ["No finished sweep yet.", ""]
    state = "" if all_complete else " [sweeps not finished: provisional]"
    g1 = {t: f["at_lora_rate"].get("lora-ga-matched", "pending") for t, f in done.items()}
    ok1 = all(v in ("better", "tie") for v in g1.values())
    lines.append(
        f"1. LoRA-GA (matched) at LoRA's best rate no worse than LoRA beyond the seed spread: "
        f"{'met' if ok1 else 'not met'}{state} "
        f"({', '.join(f'{t}: {v}' for t, v in g1.items())})."
    )
    wins = {}
    for t, f in done.items():
        quarter, half, full = f["steps"][0], f["steps"][1], f["steps"][-1]
        wins[t] = [
            m
            for m in OURS
            if f["at_best"].get(m, {}).get(quarter) == "better"
            and f["at_best"].get(m, {}).get(half) == "better"
            and f["at_best"].get(m, {}).get(full) != "worse"
        ]
    ok2 = sum(bool(w) for w in wins.values()) >= 2
    lines.append(
        "2. A gradlora method beats LoRA beyond the spread at 25% and 50% and is not behind at "
        f"100%, on at least two tasks: {'met' if ok2 else 'not met'}{state} "
        "(" + ", ".join(f"{t}: {w or 'none'}" for t, w in wins.items()) + ")."
    )
    for ours, peer in PEERS.items():
        verdicts = {
            t: verdict(f["final"][ours], f["final"][peer], f["higher"])
            for t, f in done.items()
            if ours in f["final"] and peer in f["final"]
        }
        ok3 = bool(verdicts) and all(v != "worse" for v in verdicts.values())
        lines.append(
            f"3. {ours} >= {peer} at their best rates, end of training: "
            f"{'met' if ok3 else 'not met'}{state} ("
            + ", ".join(f"{t}: {v}" for t, v in verdicts.items())
            + ")."
        )
    return lines + [""]


MATCHED_INPUTS = ["lora", "lora-ga", "lora-ga-matched"]  # all the verdict below reads


def matched_section(facts: dict[str, dict], final: bool) -> list[str]:
    """Whether the sweeps support ``scale="matched"`` as LoRA-GA's default (issue 15): on every
    task it is no worse than the paper's gamma = 16 at each one's best rate at any budget, and
    no worse than LoRA at LoRA's best rate (the user who keeps the rate they know). Final once
    the three methods it reads are complete on every task, whatever the others' state."""
    done = {t: f for t, f in facts.items() if "steps" in f}
    lines = ['## `scale="matched"` as LoRA-GA\'s default', ""]
    if not done:
        return lines + ["No finished sweep yet.", ""]
    lines += [
        "| task | matched vs γ = 16, best rates, by step | matched vs LoRA at LoRA's rate |",
        "|---|---|---|",
    ]
    ok = True
    for t, f in done.items():
        gamma16 = f["budgets_by_method"].get("lora-ga", {})
        matched = f["budgets_by_method"].get("lora-ga-matched", {})
        by_step = {
            s: verdict(matched[s], gamma16[s], f["higher"])
            for s in f["steps"]
            if s in gamma16 and s in matched
        }
        at_lora = f["at_lora_rate"].get("lora-ga-matched", "pending")
        ok &= bool(by_step) and "worse" not in by_step.values() and at_lora in ("better", "tie")
        cells = ", ".join(f"@{s} {v}" for s, v in by_step.items()) or "pending"
        lines.append(f"| {t} | {cells} | {at_lora} |")
    state = "" if final else " [sweeps not finished: provisional]"
    verdict_line = "supported" if ok else "not supported"
    return lines + ["", f"Matched as the default: {verdict_line}{state}.", ""]


DIAGNOSTIC = {  # task -> the lora-one-init sweep of `benchmarks/lr_sweeps.sh one`
    "MiniLM / Rotten Tomatoes": "lr-lora-one-init-minilm",
    "SmolLM2 / Hamlet": "lr-lora-one-init-hamlet",
    "SmolLM2 / arithmetic": "lr-lora-one-init-arithmetic",
}


def diagnostic_section(facts: dict[str, dict], all_results: dict[str, dict | None]) -> list[str]:
    """LoRA-One's init with plain AdamW (``lora-one-init``), swept after the eight methods with
    the same protocol to tell whether lora-one's init or its preconditioned AdamW is behind:
    its test score at its best rate at every budget and at LoRA's best rate, against LoRA's
    (verdicts as above), next to lora-one's. Not one of the issue's methods: not in the goals."""
    lines = [
        "## Diagnostic: LoRA-One's init with plain AdamW (`benchmarks/lr_sweeps.sh one`)",
        "",
        "Swept after the eight methods, same protocol; not counted in the goals above.",
        "",
        "| task | method | best lr | test score by step (vs LoRA) | at LoRA's rate, seed 0 |",
        "|---|---|---|---|---|",
    ]
    for task, folder in DIAGNOSTIC.items():
        f, main, diag = facts.get(task, {}), all_results.get(task), load(folder)
        if "steps" not in f or not main or not diag or not complete(diag, ["lora-one-init"]):
            lines.append(f"| {task} | lora-one-init | - | not finished | - |")
            continue
        key, lora_lr = f"test_{f['metric']}", main["methods"]["lora"]["best_lr"]
        lora = f["budgets_by_method"]["lora"]
        for method, results in (("lora-one-init", diag), ("lora-one", main)):
            m = results["methods"][method]
            cells = []
            for s in f["steps"]:
                stat = m["at_budgets"][s][key]
                cells.append(f"@{s} {fmt(stat)} ({verdict(stat, lora[s], f['higher'])})")
            p = at_rate(results, method, lora_lr, f["metric"])
            if p is None or p["val_loss"] is None:
                at_lora = "-"
            else:
                one = {"mean": p[key], "std": 0.0, "n": 1}
                at_lora = f"{p[key]:.3f} ({verdict(one, f['final']['lora'], f['higher'])})"
            lines.append(
                f"| {task} | {method} | {m['best_lr']:g} | " + ", ".join(cells) + f" | {at_lora} |"
            )
    return lines + [""]


def cost_section(all_results: dict[str, dict | None]) -> list[str]:
    """What each sweep has cost so far: one-thread process time summed over its stored runs
    (build with the init, training, evaluations), as measured while sharing the 2 cores."""
    lines = [
        "## Cost of the sweeps (one-thread process time, summed over the stored runs)",
        "",
        "| task | runs | hours | training | evaluations | median min / run |",
        "|---|---|---|---|---|---|",
    ]
    for name, results in all_results.items():
        if not results:
            continue
        runs = results["runs"]
        each = [r["build_seconds"] + r["train_seconds"] + r["eval_seconds"] for r in runs]
        train = sum(r["train_seconds"] for r in runs) / 3600
        evals = sum(r["eval_seconds"] for r in runs) / 3600
        median = statistics.median(each) / 60
        lines.append(
            f"| {name} | {len(runs)} | {sum(each) / 3600:.1f} | {train:.1f} | {evals:.1f} | "
            f"{median:.1f} |"
        )
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS / "which_method"))
    args = parser.parse_args()
    lines = ["# Which method when (benchmarks/which_method.py)", ""]
    facts, all_results = {}, {}
    for name, folder in TASKS.items():
        results = all_results[name] = load(folder)
        if results is None:
            lines += [f"### {name}", "", f"No results yet in benchmarks/results/{folder}.", ""]
            continue
        part, facts[name] = task_report(name, results)
        lines += part
    all_complete = all(complete(r) for r in all_results.values())
    lines += goals(facts, all_complete)
    matched_final = all(complete(r, MATCHED_INPUTS) for r in all_results.values())
    lines += matched_section(facts, matched_final)
    rates = default_rates(all_results)
    lines += rates_section(rates)
    lines += diagnostic_section(facts, all_results)
    lines += cost_section(all_results)
    Path(args.out + ".md").write_text("\n".join(lines))
    Path(args.out + ".json").write_text(json.dumps(facts | {"default_rates": rates}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
