"""benchmarks/damping.py: the best lambda (what lr_sweeps.sh's damping-seeds runs), the paired
comparison against the default and the verdict rule, on a synthetic results tree."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
import damping  # noqa: E402

METRIC = {"hamlet": ("loss", 40), "arithmetic": ("answer_match", 32), "minilm": ("accuracy", 100)}
SWEEP = {
    "hamlet": "lr-smollm2-hamlet",
    "arithmetic": "lr-smollm2-arithmetic",
    "minilm": "lr-minilm",
}


def _run(task: str, seed: int, val: float, test: float, lr: float = 2e-3) -> dict:
    metric, steps = METRIC[task]
    half = str(steps // 2)
    return {
        "method": "lora-one",
        "lr": lr,
        "seed": seed,
        "diverged_at": None,
        "val": {"loss": val},
        "test": {"loss": test} if metric == "loss" else {"loss": 1.0, metric: test},
        "budgets": {half: {"val": {"loss": val + 0.1}, "test": {metric: test}}},
    }


def _write(root: Path, folder: str, task: str, runs: list[dict]) -> None:
    metric, steps = METRIC[task]
    lead = {"loss": "loss", "answer_match": "exact_match"}.get(metric, metric)
    at = {str(steps): {"val_loss": {}, f"test_{metric}": {}}}
    results = {
        "config": {"steps": steps},
        "test_metric": lead,
        "methods": {"lora-one": {"at_budgets": at}},
        "runs": runs,
    }
    (root / folder).mkdir(parents=True, exist_ok=True)
    (root / folder / "results.json").write_text(json.dumps(results))


@pytest.fixture
def tree(tmp_path):
    """Default (the sweep's runs, seeds 0-2; another rate and method beside), 1e-4 and 1e-2
    at seed 0 on both tasks, and 1e-2 (the best) with seeds 0-2: Hamlet's test loss lower by
    0.05 +- 0.002 on every seed, arithmetic's answer match higher by 0.10 +- 0.01; MiniLM:
    the default's seeds 0-2 and 1e-2's, accuracy within +-0.01 of the default's (a tie)."""
    ham = [_run("hamlet", s, 3.93 + 0.01 * s, 4.05 + 0.02 * s) for s in range(3)]
    ham += [_run("hamlet", 0, 3.5, 3.5, lr=5e-3)]  # another rate: not the default's
    _write(tmp_path, SWEEP["hamlet"], "hamlet", ham)
    ari = [_run("arithmetic", s, 0.16, 0.26 + 0.03 * s) for s in range(3)]
    _write(tmp_path, SWEEP["arithmetic"], "arithmetic", ari)
    for task, base, sign, gain in (("hamlet", ham, -1, 0.05), ("arithmetic", ari, 1, 0.10)):
        first = [{**base[0], "val": {"loss": base[0]["val"]["loss"] + 0.001}}]
        _write(tmp_path, f"damping-{task}/lambda-1e-4", task, first)
        best = []
        for s, r in enumerate(base[:3]):
            test = r["test"].get("answer_match", r["test"]["loss"])
            best.append(_run(task, s, r["val"]["loss"] - 0.02, test + sign * (gain + 0.002 * s)))
        _write(tmp_path, f"damping-{task}/lambda-1e-2", task, best)
    _minilm(tmp_path, [0.01, -0.01, 0.0])
    return tmp_path


def _minilm(root: Path, deltas: list[float]) -> None:
    """MiniLM's default (seeds 0-2) and lambda 1e-2 with accuracy default + deltas[seed]."""
    base = [0.77, 0.75, 0.78]
    _write(
        root, SWEEP["minilm"], "minilm", [_run("minilm", s, 0.47, a) for s, a in enumerate(base)]
    )
    runs = [
        _run("minilm", s, 0.47, a + d) for s, (a, d) in enumerate(zip(base, deltas, strict=True))
    ]
    _write(root, "damping-minilm/lambda-1e-2", "minilm", runs)


def test_lambdas_are_read_in_increasing_order_with_the_default_from_the_sweep(tree):
    found = damping.lambdas("hamlet", tree)
    assert list(found) == ["1e-6", "1e-4", "1e-2"]
    assert [r["seed"] for r in found["1e-6"]["runs"]] == [0, 1, 2]  # only lora-one at 2e-3
    assert found["1e-6"]["metric"] == "loss"
    assert damping.lambdas("arithmetic", tree)["1e-2"]["metric"] == "answer_match"


def test_best_is_the_lowest_seed0_validation_loss(tree):
    assert damping.best(damping.lambdas("hamlet", tree)) == "1e-2"
    assert damping.best({}) is None


@pytest.mark.parametrize("task", ["hamlet", "arithmetic"])
def test_the_cli_prints_the_folder_name_of_the_best(tree, task):
    out = subprocess.run(
        [sys.executable, str(BENCH / "damping.py"), "--best", task, "--results", str(tree)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout == "1e-2\n"


def test_without_runs_the_best_is_the_default(tmp_path):
    out = subprocess.run(
        [sys.executable, str(BENCH / "damping.py"), "--best", "hamlet", "--results", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout == "1e-6\n" and "the default" in out.stderr


def test_summary_pairs_each_lambda_with_the_default_by_seed(tree):
    s = damping.summary(damping.lambdas("hamlet", tree))
    assert s["steps"] == ["20", "40"] and s["best"] == "1e-2" and not s["higher"]
    best = s["lambdas"]["1e-2"]
    assert best["seeds"] == [0, 1, 2] and best["val_loss_seed0"] == pytest.approx(3.91)
    end = best["paired"]["40"]
    assert end["n"] == 3 and end["mean"] == pytest.approx(-0.052)
    assert end["verdict"] == "ahead" and end["high"] < 0
    assert s["lambdas"]["1e-4"]["paired"]["40"]["verdict"] == "-"  # one pair
    assert "paired" not in s["lambdas"]["1e-6"]


def test_a_lambda_ahead_on_both_causal_lms_and_tied_on_minilm_meets_the_rule(tree):
    summaries = {t: damping.summary(damping.lambdas(t, tree)) for t in damping.TASKS}
    assert summaries["minilm"]["lambdas"]["1e-2"]["paired"]["100"]["verdict"] == "tie"
    lines, facts = damping.verdict(summaries)
    assert facts["1e-2"]["meets_rule"] == "yes"
    assert facts["1e-4"]["meets_rule"] == "no"  # not the best anywhere: never seeded
    assert any("provisional" in line for line in lines)  # lambda = 1 not run yet


def test_a_tie_on_one_task_keeps_the_default(tree):
    runs = [_run("arithmetic", s, 0.14, 0.26 + 0.03 * s + (0.05 if s else -0.06)) for s in range(3)]
    _write(tree, "damping-arithmetic/lambda-1e-2", "arithmetic", runs)
    summaries = {t: damping.summary(damping.lambdas(t, tree)) for t in damping.TASKS}
    assert summaries["arithmetic"]["lambdas"]["1e-2"]["paired"]["32"]["verdict"] == "tie"
    _, facts = damping.verdict(summaries)
    assert facts["1e-2"]["meets_rule"] == "no"


def test_behind_on_minilm_fails_the_rule_and_no_minilm_runs_leave_it_pending(tree):
    _minilm(tree, [-0.05, -0.06, -0.055])
    summaries = {t: damping.summary(damping.lambdas(t, tree)) for t in damping.TASKS}
    assert summaries["minilm"]["lambdas"]["1e-2"]["paired"]["100"]["verdict"] == "behind"
    assert damping.verdict(summaries)[1]["1e-2"]["meets_rule"] == "no"
    (tree / "damping-minilm/lambda-1e-2/results.json").unlink()
    summaries = {t: damping.summary(damping.lambdas(t, tree)) for t in damping.TASKS}
    assert damping.verdict(summaries)[1]["1e-2"]["meets_rule"] == "pending"


def test_the_report_is_written(tree):
    subprocess.run(
        [sys.executable, str(BENCH / "damping.py"), "--results", str(tree)],
        capture_output=True,
        check=True,
    )
    text = (tree / "damping.md").read_text()
    assert "| 1e-2 | ahead (-0.052 [" in text and "MiniLM" in text
    assert json.loads((tree / "damping.json").read_text())["verdict"]["1e-2"]["meets_rule"] == "yes"
