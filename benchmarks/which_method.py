"""Which method when: the three learning-rate sweeps of benchmarks/lr_sweeps.sh read side by side.

For each task: every method at LoRA's best rate (a user who keeps the rate they know; seed 0 of
the sweep, and seeds 1 and 2 from ``--seeds-at-rate``), every method at its own best rate at
25%, 50% and 100% of the steps (mean ± std over seeds), and the goals of issue 15 checked on
the test score.

Every comparison is paired by seed (issue 26, benchmarks/paired.py): the per-seed difference of
the two test scores, each configuration at its rate, over the seeds both have; the report shows
its mean, 95% Student t-interval and number of pairs n, and the verdict is "ahead"/"behind"
only where the interval excludes 0, else "tie". Where a comparison has fewer than 2 pairs (a
method run at LoRA's rate with seed 0 only), the verdict is the earlier spread rule, marked †:
ahead/behind where the difference of the means exceeds the larger of the two seed standard
deviations. The means ± std in the tables are unchanged.

    python benchmarks/which_method.py  # writes benchmarks/results/which_method.{md,json}
    python benchmarks/which_method.py --results DIR  # another results folder (output in DIR)
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import paired
from _sweeps import (
    DIAGNOSTIC,
    RESULTS,
    SPREAD_NOTE,
    SWEPT,
    TASKS,
    at_rate,
    cell,
    complete,
    cost_section,
    fmt,
    load,
    seed_scores,
    versus,
    word,
)

from gradlora.cli.lr_report import budget_metric
from gradlora.cli.recipes import ladder_rungs

KINDS = {  # task kind (the recipes' default rates are per kind) -> its tasks
    "classification": ["MiniLM / Rotten Tomatoes"],
    "causal-lm": ["SmolLM2 / Hamlet", "SmolLM2 / arithmetic"],
}
OURS = ["lora-ga", "lora-ga-matched", "lora-one", "lora-pro"]
PEERS = {"lora-ga": "peft-lora-ga", "lora-one": "peft-riemannian"}


def task_report(name: str, results: dict) -> tuple[list[str], dict]:
    """One task's section: every method at LoRA's best rate (seed 0 of its sweep) and at its
    own best rate by step, each against LoRA (paired by seed where possible), and the facts
    the goals read: verdicts, paired comparisons, scores by seed and their means ± std."""
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
    by_seed = {m: seed_scores(results, m, e.get("best_lr"), steps, key) for m, e in methods.items()}
    lines += [
        f"Test score: {metric} ({'higher' if higher else 'lower'} is better). LoRA's best rate: "
        f"{lr_l:g}.",
        "",
        f"**At LoRA's best rate ({lr_l:g})**, seed 0 (LoRA: mean ± std of its seeds); paired: "
        "method − LoRA, same seed, both at this rate (mean [95% t-interval] n pairs):",
        "",
        f"| method | val loss | test {metric} | vs LoRA | paired Δ test {metric} |",
        "|---|---|---|---|---|",
    ]
    facts["at_lora_rate"], facts["at_lora_rate_paired"] = {}, {}
    for method in methods:
        p = at_rate(results, method, lr_l)
        if method == "lora":
            cells = [fmt(final["val_loss"]), fmt(final.get(key)), "-", "-"]
        elif p is None or p["val_loss"] is None:
            cells = ["-", "-", "not swept" if p is None else "diverged", "-"]
        else:
            one = {"mean": p[key], "std": 0.0, "n": 1}
            mine = seed_scores(results, method, lr_l, steps[-1:], key)[steps[-1]]
            c = versus(mine, by_seed["lora"][steps[-1]], higher, one, final[key])
            facts["at_lora_rate"][method] = c["verdict"]
            facts["at_lora_rate_paired"][method] = c
            cells = [f"{p['val_loss']:.3f}", f"{p[key]:.3f}", word(c), paired.fmt(c)]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "**At each method's best rate** (test score, mean ± std over seeds, by step):",
        "",
        "| method | best lr | " + " | ".join(f"@{s}" for s in steps) + " |",
        "|---|---|" + "---|" * len(steps),
    ]
    facts["at_best"], facts["at_best_paired"], facts["final"] = {}, {}, {}
    facts["budgets_by_method"], facts["by_seed"] = {}, by_seed
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
                lora_stat = lora["at_budgets"][s][key]
                c = versus(by_seed[method][s], by_seed["lora"][s], higher, stat, lora_stat)
                facts["at_best"].setdefault(method, {})[s] = c["verdict"]
                facts["at_best_paired"].setdefault(method, {})[s] = c
                mark = {"ahead": " (+)", "behind": " (-)"}.get(c["verdict"], "")
                mark += "†" if mark and c["rule"] == "spread" else ""
            cells.append(fmt(stat) + mark)
        best = "-" if m.get("best_lr") is None else f"{m['best_lr']:g}"
        best += " (edge)" if m.get("best_at_grid_edge") else ""
        lines.append(f"| {method} | {best} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "(+)/(-): ahead of/behind LoRA, paired by seed (the 95% interval below excludes 0).",
        "",
        f"**Paired differences to LoRA at each one's best rate** (test {metric}, method − LoRA, "
        "same seed; mean [95% t-interval] n pairs):",
        "",
        "| method | " + " | ".join(f"@{s}" for s in steps) + " |",
        "|---|" + "---|" * len(steps),
    ]
    for method, row in facts["at_best_paired"].items():
        lines.append(f"| {method} | " + " | ".join(cell(row.get(s)) for s in steps) + " |")
    lines += ["", SPREAD_NOTE, ""]
    facts["steps"], facts["higher"] = steps, higher
    return lines, facts


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
    """Markdown lines: the default rates per method and task kind, and whether each is final."""
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
    """The goals of issue 15, each verdict paired by seed (see the module's docstring), with
    the paired difference, its 95% interval and n pairs behind every verdict."""
    done = {t: f for t, f in facts.items() if "steps" in f}
    lines = ["## Goals of issue 15", ""]
    if not done:
        return lines + ["No finished sweep yet.", ""]
    state = "" if all_complete else " [sweeps not finished: provisional]"
    g1 = {t: f["at_lora_rate_paired"].get("lora-ga-matched") for t, f in done.items()}
    ok1 = all(c and c["verdict"] in ("ahead", "tie") for c in g1.values())
    lines.append(
        f"1. LoRA-GA (matched) at LoRA's best rate not behind LoRA: "
        f"{'met' if ok1 else 'not met'}{state} "
        f"({'; '.join(f'{t}: {cell(c)}' for t, c in g1.items())})."
    )
    lines += [
        "2. A gradlora method ahead of LoRA at 25% and 50% and not behind at 100%, on at least two",
        "   tasks (each at its best rate; test score, method − LoRA, paired):",
        "",
        "| task | method | @25% | @50% | @100% | meets |",
        "|---|---|---|---|---|---|",
    ]
    wins = {}
    for t, f in done.items():
        quarter, half, full = f["steps"][0], f["steps"][1], f["steps"][-1]
        wins[t] = []
        for m in OURS:
            row = f["at_best_paired"].get(m, {})
            verdicts = [row[s]["verdict"] if s in row else "pending" for s in (quarter, half, full)]
            meets = verdicts[0] == verdicts[1] == "ahead" and verdicts[2] in ("ahead", "tie")
            wins[t] += [m] if meets else []
            cells = [cell(row.get(s)) for s in (quarter, half, full)]
            lines.append(f"| {t} | {m} | " + " | ".join(cells) + f" | {'yes' if meets else 'no'} |")
    ok2 = sum(bool(w) for w in wins.values()) >= 2
    lines += [
        "",
        f"   Goal 2: {'met' if ok2 else 'not met'}{state} ("
        + ", ".join(f"{t}: {w or 'none'}" for t, w in wins.items())
        + ").",
    ]
    for ours, peer in PEERS.items():
        found = {
            t: versus(
                f["by_seed"][ours][f["steps"][-1]],
                f["by_seed"][peer][f["steps"][-1]],
                f["higher"],
                f["final"][ours],
                f["final"][peer],
            )
            for t, f in done.items()
            if ours in f["final"] and peer in f["final"]
        }
        ok3 = bool(found) and all(c["verdict"] != "behind" for c in found.values())
        lines.append(
            f"3. {ours} not behind {peer} at their best rates, end of training ({ours} − {peer}): "
            f"{'met' if ok3 else 'not met'}{state} ("
            + "; ".join(f"{t}: {cell(c)}" for t, c in found.items())
            + ")."
        )
    return lines + ["", SPREAD_NOTE, ""]


MATCHED_INPUTS = ["lora", "lora-ga", "lora-ga-matched"]  # all the verdict below reads


def matched_section(facts: dict[str, dict], final: bool) -> list[str]:
    """Whether the sweeps support ``scale="matched"`` as LoRA-GA's default (issue 15): on every
    task it is not behind the paper's gamma = 16 at each one's best rate at any budget, and
    not behind LoRA at LoRA's best rate (the user who keeps the rate they know); paired by seed.
    Final once the three methods it reads are complete on every task, whatever the others'
    state."""
    done = {t: f for t, f in facts.items() if "steps" in f}
    lines = ['## `scale="matched"` as LoRA-GA\'s default', ""]
    if not done:
        return lines + ["No finished sweep yet.", ""]
    lines += [
        "Paired by seed: matched − γ = 16 and matched − LoRA (mean [95% t-interval] n pairs).",
        "",
        "| task | matched vs γ = 16, best rates, by step | matched vs LoRA at LoRA's rate |",
        "|---|---|---|",
    ]
    ok = True
    for t, f in done.items():
        gamma16 = f["by_seed"].get("lora-ga", {})
        matched = f["by_seed"].get("lora-ga-matched", {})
        stats16 = f["budgets_by_method"].get("lora-ga", {})
        stats_m = f["budgets_by_method"].get("lora-ga-matched", {})
        by_step = {
            s: versus(matched[s], gamma16[s], f["higher"], stats_m[s], stats16[s])
            for s in f["steps"]
            if s in stats16 and s in stats_m
        }
        at_lora = f["at_lora_rate_paired"].get("lora-ga-matched")
        ok &= bool(by_step) and all(c["verdict"] != "behind" for c in by_step.values())
        ok &= bool(at_lora) and at_lora["verdict"] in ("ahead", "tie")
        cells = ", ".join(f"@{s} {cell(c)}" for s, c in by_step.items()) or "pending"
        lines.append(f"| {t} | {cells} | {cell(at_lora)} |")
    state = "" if final else " [sweeps not finished: provisional]"
    verdict_line = "supported" if ok else "not supported"
    return lines + ["", f"Matched as the default: {verdict_line}{state}.", "", SPREAD_NOTE, ""]


def diagnostic_section(
    facts: dict[str, dict], all_results: dict[str, dict | None], root: Path = RESULTS
) -> list[str]:
    """LoRA-One's init with plain AdamW (``lora-one-init``), swept after the eight methods with
    the same protocol to tell whether lora-one's init or its preconditioned AdamW is behind:
    its test score at its best rate at every budget and at LoRA's best rate, against LoRA's
    (paired by seed, verdicts as above), next to lora-one's. Not one of the issue's methods:
    not in the goals."""
    lines = [
        "## Diagnostic: LoRA-One's init with plain AdamW (`benchmarks/lr_sweeps.sh one`)",
        "",
        "Swept after the eight methods, same protocol; not counted in the goals above. Verdicts",
        "against LoRA, paired by seed (method − LoRA: mean [95% t-interval] n pairs).",
        "",
        "| task | method | best lr | test score by step (vs LoRA) | at LoRA's rate: seed 0, paired vs LoRA |",
        "|---|---|---|---|---|",
    ]
    for task, folder in DIAGNOSTIC.items():
        f, main, diag = facts.get(task, {}), all_results.get(task), load(folder, root)
        if "steps" not in f or not main or not diag or not complete(diag, ["lora-one-init"]):
            lines.append(f"| {task} | lora-one-init | - | not finished | - |")
            continue
        key, lora_lr = f"test_{f['metric']}", main["methods"]["lora"]["best_lr"]
        lora, lora_seeds, end = f["budgets_by_method"]["lora"], f["by_seed"]["lora"], f["steps"][-1]
        for method, results in (("lora-one-init", diag), ("lora-one", main)):
            m = results["methods"][method]
            mine = seed_scores(results, method, m["best_lr"], f["steps"], key)
            cells = []
            for s in f["steps"]:
                stat = m["at_budgets"][s][key]
                c = versus(mine[s], lora_seeds[s], f["higher"], stat, lora[s])
                cells.append(f"@{s} {fmt(stat)}: {cell(c)}")
            p = at_rate(results, method, lora_lr)
            if p is None or p["val_loss"] is None:
                at_lora = "-"
            else:
                one = {"mean": p[key], "std": 0.0, "n": 1}
                there = seed_scores(results, method, lora_lr, [end], key)[end]
                c = versus(there, lora_seeds[end], f["higher"], one, f["final"]["lora"])
                at_lora = f"{p[key]:.3f}: {cell(c)}"
            lines.append(
                f"| {task} | {method} | {m['best_lr']:g} | " + ", ".join(cells) + f" | {at_lora} |"
            )
    return lines + ["", SPREAD_NOTE, ""]


def main() -> None:
    """Write which_method.{md,json} (in --results, or at --out) from the sweeps' reports."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(RESULTS), help="the sweeps' results folder")
    parser.add_argument("--out", help="output path without suffix (default RESULTS/which_method)")
    args = parser.parse_args()
    root = Path(args.results)
    out = args.out or str(root / "which_method")
    lines = ["# Which method when (benchmarks/which_method.py)", ""]
    facts, all_results = {}, {}
    for name, folder in TASKS.items():
        results = all_results[name] = load(folder, root)
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
    lines += diagnostic_section(facts, all_results, root)
    lines += cost_section(all_results)
    Path(out + ".md").write_text("\n".join(lines))
    Path(out + ".json").write_text(json.dumps(facts | {"default_rates": rates}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
