"""benchmarks/which_method.py: the default rates it derives from the sweeps."""

import importlib.util
import math
from pathlib import Path

import pytest

PATH = Path(__file__).parent.parent / "benchmarks" / "which_method.py"
spec = importlib.util.spec_from_file_location("which_method", PATH)
which_method = importlib.util.module_from_spec(spec)
spec.loader.exec_module(which_method)


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
