"""Reading the learning-rate sweeps of benchmarks/lr_sweeps.sh (each folder's results.json, as
written by ``gradlora bench``): the tasks and their folders, completeness, the comparisons of
benchmarks/which_method.py and benchmarks/lr_windows.py, and what the sweeps cost. Standard
library only."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import paired

RESULTS = Path(__file__).parent / "results"
TASKS = {
    "MiniLM / Rotten Tomatoes": "lr-minilm",
    "SmolLM2 / Hamlet": "lr-smollm2-hamlet",
    "SmolLM2 / arithmetic": "lr-smollm2-arithmetic",
}
DIAGNOSTIC = {  # task -> the lora-one-init sweep of `benchmarks/lr_sweeps.sh one`
    "MiniLM / Rotten Tomatoes": "lr-lora-one-init-minilm",
    "SmolLM2 / Hamlet": "lr-lora-one-init-hamlet",
    "SmolLM2 / arithmetic": "lr-lora-one-init-arithmetic",
}
SWEPT = ["full", "lora", "lora-ga", "lora-ga-matched", "lora-one", "lora-pro"]
SWEPT += ["peft-lora-ga", "peft-riemannian"]
SEEDS = 3  # at each method's best rate (at least: issue 26 gives five to some)


def load(folder: str, root: Path = RESULTS) -> dict | None:
    """The results.json of ``root/folder``, None if there is none yet."""
    path = Path(root) / folder / "results.json"
    return json.loads(path.read_text()) if path.exists() else None


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


def fmt(stat: dict | None, digits: int = 3) -> str:
    """mean ± std (over seeds), the mean alone for one seed, "-" for none."""
    if not stat:
        return "-"
    if stat.get("n", 1) > 1:
        return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}"


def at_rate(results: dict, method: str, lr: float) -> dict | None:
    """Seed-0 validation loss and test scores of ``method`` at ``lr`` (None if not swept)."""
    for p in results["methods"].get(method, {}).get("lr_points", []):
        if abs(p["lr"] - lr) <= 1e-12 * lr:
            return p
    return None


def spread_verdict(a: dict, b: dict, higher: bool) -> str:
    """The rule of thumb for means ± std (no pairing): "ahead" where mean a beats mean b by
    more than the larger of the two standard deviations, "behind" where it trails by more,
    else "tie"."""
    gain = (a["mean"] - b["mean"]) * (1 if higher else -1)
    spread = max(a["std"], b["std"])
    return "ahead" if gain > spread else "behind" if gain < -spread else "tie"


def versus(
    a: dict[int, float],
    b: dict[int, float],
    higher: bool,
    a_stat: dict | None = None,
    b_stat: dict | None = None,
) -> dict:
    """The paired comparison of a against b (seed -> score each; see paired.compare), with
    ``rule`` "paired". Where it has fewer than 2 pairs and the means ± std are given, its
    verdict is the spread rule's instead (:func:`spread_verdict`), with ``rule`` "spread"."""
    c = paired.compare(a, b, higher) | {"rule": "paired"}
    if c["n"] < 2 and a_stat and b_stat:
        return c | {"verdict": spread_verdict(a_stat, b_stat, higher), "rule": "spread"}
    return c


def word(c: dict | None) -> str:
    """A comparison's verdict, marked † where it comes from the spread rule."""
    if not c:
        return "pending"
    return c["verdict"] + ("†" if c.get("rule") == "spread" else "")


def cell(c: dict | None) -> str:
    """A comparison as one table cell: verdict, then the paired difference and interval."""
    if not c:
        return "pending"
    return f"{word(c)} ({paired.fmt(c)})"


def seed_scores(
    results: dict, method: str, lr: float | None, steps: list[str], key: str
) -> dict[str, dict[int, float]]:
    """Step -> seed -> test score ``key`` ("test_<metric>") of ``method``'s stored runs at
    ``lr`` (empty without a rate), at each of ``steps`` (the last: the end of training)."""
    if lr is None:
        return {s: {} for s in steps}
    metric, runs = key.removeprefix("test_"), results["runs"]
    total = results["config"]["steps"]
    return {s: paired.by_seed(runs, method, lr, s, total, metric) for s in steps}


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


SPREAD_NOTE = (
    "Verdicts: ahead/behind where the paired 95% t-interval of the per-seed difference excludes "
    "0, else tie; † marks a comparison with fewer than 2 pairs, judged by the spread rule "
    "instead (the difference of the means beyond the larger seed std)."
)
