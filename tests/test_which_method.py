"""benchmarks/which_method.py: the default rates it derives from the sweeps, and its verdicts
(paired by seed where there are pairs, else the spread rule)."""

import math
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import which_method  # noqa: E402


@pytest.mark.parametrize(
    "lr, rung",
    [(1.7e-4, 2e-4), (3e-4, 2e-4), (4e-4, 5e-4), (7.5e-4, 1e-3), (1e-3, 1e-3), (9e-6, 1e-5)],
)
def test_on_ladder_takes_the_nearest_rung_in_log_scale(lr, rung):
    assert which_method.on_ladder(lr) == rung


@pytest.mark.parametrize("low, high", [(2e-4, 5e-4), (2e-3, 5e-3), (5e-5, 1e-4), (1e-3, 2e-3)])
def test_on_ladder_breaks_a_halfway_tie_downwards(low, high):
    # the geometric mean of two neighbouring rungs, computed both ways (default_rates takes
    # exp of the mean log; most of these land a hair above halfway): which side float rounding
    # lands on must not decide the default rate
    for mean in (math.sqrt(low * high), math.exp((math.log(high) + math.log(low)) / 2)):
        assert which_method.on_ladder(mean) == low


def _sweep(best: dict[str, float], seeds: int = 3) -> dict:
    stat = {"mean": 1.0, "std": 0.0, "n": seeds}
    return {
        "methods": {
            m: {"best_lr": lr, "at_budgets": {"40": {"val_loss": stat}}} for m, lr in best.items()
        }
    }


def test_default_rates_are_the_geometric_mean_per_kind_and_complete_only_when_all_are():
    every = dict.fromkeys(which_method.SWEPT, 1e-3)
    hamlet = _sweep(every | {"lora": 5e-3, "lora-ga": 5e-4})
    arithmetic = _sweep(every | {"lora": 2e-3, "lora-ga": 2e-4})
    rates = which_method.default_rates(
        {"SmolLM2 / Hamlet": hamlet, "SmolLM2 / arithmetic": arithmetic}
    )
    assert rates["causal-lm"]["complete"]
    assert rates["causal-lm"]["rates"]["lora"] == 2e-3
    assert rates["causal-lm"]["rates"]["lora-ga"] == 2e-4
    assert rates["causal-lm"]["rates"]["full"] == 1e-3
    assert not rates["classification"]["complete"] and rates["classification"]["rates"] == {}

    one_seed_short = _sweep(every | {"lora": 2e-3}, seeds=2)
    rates = which_method.default_rates(
        {"SmolLM2 / Hamlet": hamlet, "SmolLM2 / arithmetic": one_seed_short}
    )
    assert not rates["causal-lm"]["complete"]


def _stat(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values), "n": len(values)}


def _run(method: str, lr: float, seed: int, loss: float) -> dict:
    """A stored run of 40 steps whose test loss is ``loss`` at the end and ``loss + 0.3`` at
    step 20 (the budget)."""
    return {
        "method": method,
        "lr": lr,
        "seed": seed,
        "diverged_at": None,
        "val": {"loss": loss},
        "test": {"loss": loss},
        "budgets": {"20": {"val": {"loss": loss + 0.3}, "test": {"loss": loss + 0.3}}},
    }


def _task(lora: list[float], ga: list[float], ga_at_lora_rate: float) -> dict:
    """A causal-LM sweep of two methods: LoRA at 2e-3 and LoRA-GA at 5e-4 (their best rates,
    one test loss per seed), and LoRA-GA's seed-0 sweep run at LoRA's rate."""
    runs = [_run("lora", 2e-3, s, v) for s, v in enumerate(lora)]
    runs += [_run("lora-ga", 5e-4, s, v) for s, v in enumerate(ga)]
    runs += [_run("lora-ga", 2e-3, 0, ga_at_lora_rate)]

    def method(lr: float, values: list[float], points: list[tuple[float, float]]) -> dict:
        budgets = {
            "20": {"val_loss": _stat([v + 0.3 for v in values])},
            "40": {"val_loss": _stat(values)},
        }
        for step, shift in (("20", 0.3), ("40", 0.0)):
            budgets[step]["test_loss"] = _stat([v + shift for v in values])
        return {
            "best_lr": lr,
            "best_at_grid_edge": False,
            "at_budgets": budgets,
            "lr_points": [{"lr": x, "val_loss": v, "test_loss": v} for x, v in points],
        }

    return {
        "test_metric": "loss",
        "config": {"steps": 40},
        "runs": runs,
        "methods": {
            "lora": method(2e-3, lora, [(2e-3, lora[0])]),
            "lora-ga": method(5e-4, ga, [(5e-4, ga[0]), (2e-3, ga_at_lora_rate)]),
        },
    }


def test_a_gain_within_the_seed_spread_is_ahead_when_every_seed_gains():
    lora = [4.0, 4.2, 4.4, 4.1, 4.3]  # std 0.16: the spread rule would call 0.05 a tie
    ga = [v - 0.05 + 0.001 * s for s, v in enumerate(lora)]
    lines, facts = which_method.task_report("T", _task(lora, ga, ga_at_lora_rate=4.5))
    assert facts["at_best"]["lora-ga"] == {"20": "ahead", "40": "ahead"}
    c = facts["at_best_paired"]["lora-ga"]["40"]
    assert c["rule"] == "paired" and c["n"] == 5 and c["high"] < 0
    assert c["mean"] == pytest.approx(-0.048)
    row = next(line for line in lines if line.startswith("| lora-ga | 0.0005 |"))
    assert row.count("(+)") == 2  # both budgets marked ahead in the table of means
    assert any("ahead (-0.048 [" in line and "n=5" in line for line in lines)
    # at LoRA's rate LoRA-GA has seed 0 only: one pair, so the spread rule decides (marked †)
    at_lora = facts["at_lora_rate_paired"]["lora-ga"]
    assert at_lora["n"] == 1 and at_lora["rule"] == "spread"
    assert facts["at_lora_rate"]["lora-ga"] == "behind"  # 4.5 vs 4.2 ± 0.16
    assert any(
        line.startswith("| lora-ga | 4.500 | 4.500 | behind† | +0.500 n=1 |") for line in lines
    )


def test_a_gain_that_swings_across_seeds_is_a_tie():
    lora = [4.0, 4.2, 4.4]
    ga = [3.7, 4.3, 4.3]  # mean gain 0.1 but one seed loses
    _, facts = which_method.task_report("T", _task(lora, ga, ga_at_lora_rate=4.2))
    c = facts["at_best_paired"]["lora-ga"]["40"]
    assert facts["at_best"]["lora-ga"]["40"] == "tie" and c["low"] < 0 < c["high"]
    assert facts["at_lora_rate"]["lora-ga"] == "tie"  # 4.2 vs 4.2 ± 0.2, by the spread rule


def test_goals_read_the_paired_verdicts():
    lora = [4.0, 4.2, 4.4, 4.1, 4.3]
    ga = [v - 0.05 + 0.001 * s for s, v in enumerate(lora)]
    _, facts = which_method.task_report("SmolLM2 / Hamlet", _task(lora, ga, 4.5))
    lines = which_method.goals({"SmolLM2 / Hamlet": facts}, all_complete=True)
    row = next(line for line in lines if line.startswith("| SmolLM2 / Hamlet | lora-ga |"))
    assert row.endswith("| yes |") and row.count("ahead (") == 3
    assert any("Goal 2: not met" in line for line in lines)  # one task, two needed
