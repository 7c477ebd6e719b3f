"""The default rates of ``gradlora methods`` come from the learning-rate sweeps of issue 15:
benchmarks/which_method.py writes each method's best rate per task kind; once a kind's sweeps
are complete, the recipes must hold exactly those rates."""

import json
from pathlib import Path

import pytest

from gradlora.cli.recipes import RECIPES, _ladder

SWEEPS = Path(__file__).parent.parent / "benchmarks" / "results" / "which_method.json"


def test_every_default_rate_is_in_its_own_grid():
    for recipe in RECIPES.values():
        for kind in recipe.lr:
            assert recipe.default_lr(kind) in recipe.lr_grid(kind), (recipe.name, kind)


@pytest.mark.skipif(not SWEEPS.exists(), reason="benchmarks/which_method.py has not been run")
def test_default_rates_are_the_swept_ones():
    rates = json.loads(SWEEPS.read_text())["default_rates"]
    assert set(rates) == {"classification", "causal-lm"}
    for kind, found in rates.items():
        if not found["complete"]:
            continue
        assert found["rates"], kind
        for method, lr in found["rates"].items():
            assert RECIPES[method].default_lr(kind) == pytest.approx(lr, rel=1e-9), (method, kind)


def test_a_recipe_grid_is_its_rate_and_the_two_neighbouring_rungs():
    assert _ladder(1e-3) == (5e-4, 1e-3, 2e-3)
    assert _ladder(2e-4) == (1e-4, 2e-4, 5e-4)
    assert _ladder(5e-3) == (2e-3, 5e-3, 1e-2)
    with pytest.raises(ValueError, match="not on the 1-2-5 ladder"):
        _ladder(3e-5)
