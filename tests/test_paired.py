"""benchmarks/paired.py: the t quantile, the paired t-interval and verdict, pairing runs by seed."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import paired  # noqa: E402


@pytest.mark.parametrize(
    "df, t975, t995",  # the printed tables of Student's t (two-sided 95% and 99%)
    [
        (1, 12.7062, 63.6567),
        (2, 4.3027, 9.9248),
        (3, 3.1824, 5.8409),
        (4, 2.7764, 4.6041),
        (9, 2.2622, 3.2498),
        (30, 2.0423, 2.7500),
    ],
)
def test_t_quantile_matches_the_tables(df, t975, t995):
    assert paired.t_quantile(0.95, df) == pytest.approx(t975, abs=1e-4)
    assert paired.t_quantile(0.99, df) == pytest.approx(t995, abs=1e-4)


def test_t_quantile_tends_to_the_normal_one():
    assert paired.t_quantile(0.95, 2000) == pytest.approx(1.95996, abs=2e-3)
    assert paired.t_quantile(0.95, 2000) > 1.95996  # t tails are heavier


@pytest.mark.parametrize("df", [1, 2, 5, 6])
def test_the_cdf_inverts_the_quantile(df):
    for level in (0.5, 0.9, 0.95):
        assert paired.t_two_sided_cdf(paired.t_quantile(level, df), df) == pytest.approx(level)


def test_t_interval_of_known_numbers():
    # differences 1, 2, 3: mean 2, s = 1, half-width t_{0.975, 2} / sqrt(3) = 4.3027 / 1.7321
    c = paired.t_interval([1.0, 2.0, 3.0])
    half = 4.302652729749464 / math.sqrt(3)
    assert c["n"] == 3 and c["mean"] == pytest.approx(2.0)
    assert c["low"] == pytest.approx(2 - half) and c["high"] == pytest.approx(2 + half)
    assert c["low"] == pytest.approx(-0.4841, abs=1e-4)  # this one holds 0


def test_t_interval_without_a_spread():
    assert paired.t_interval([0.5]) == {"mean": 0.5, "low": None, "high": None, "n": 1}
    assert paired.t_interval([])["n"] == 0


def test_a_consistent_gain_is_ahead_and_a_noisy_one_a_tie():
    lora = {0: 3.90, 1: 3.95, 2: 3.85, 3: 4.00, 4: 3.92}  # test loss: lower is better
    better = {s: v - 0.02 + 0.002 * (s % 2) for s, v in lora.items()}
    c = paired.compare(better, lora, higher=False)
    assert c["verdict"] == "ahead" and c["n"] == 5 and c["high"] < 0
    assert c["seeds"] == [0, 1, 2, 3, 4]
    worse = paired.compare(lora, better, higher=False)
    assert worse["verdict"] == "behind" and worse["low"] > 0
    # the same mean gain, but the per-seed differences swing across 0
    noisy = {s: v - 0.02 + (0.1 if s % 2 else -0.1) for s, v in lora.items()}
    c = paired.compare(noisy, lora, higher=False)
    assert c["verdict"] == "tie" and c["low"] < 0 < c["high"]


def test_the_verdict_follows_the_direction_of_the_score():
    up = {"mean": 0.05, "low": 0.01, "high": 0.09, "n": 3}
    assert paired.verdict(up, higher=True) == "ahead"  # accuracy: a higher is better
    assert paired.verdict(up, higher=False) == "behind"  # loss: a higher is worse
    assert paired.verdict(up | {"n": 1, "low": None, "high": None}, higher=True) == "-"


def test_pairing_keeps_only_the_shared_seeds():
    a = {0: 1.0, 1: 2.0, 3: 5.0}
    b = {0: 0.5, 1: 1.0, 2: 9.0}
    assert paired.pair(a, b) == {0: 0.5, 1: 1.0}
    c = paired.compare(a, b, higher=True)
    assert c["n"] == 2 and c["seeds"] == [0, 1]
    assert c["mean"] == pytest.approx(0.75)
    assert paired.compare({0: 1.0}, b, higher=True)["verdict"] == "-"


def _run(method, lr, seed, final, at10=None, diverged=None):
    return {
        "method": method,
        "lr": lr,
        "seed": seed,
        "diverged_at": diverged,
        "test": {} if diverged is not None else {"loss": final},
        "budgets": {} if at10 is None else {"10": {"val": {"loss": 0}, "test": {"loss": at10}}},
    }


def test_by_seed_reads_the_budget_or_the_end_and_skips_diverged_runs():
    runs = [
        _run("lora", 2e-3, 0, 3.9, at10=4.2),
        _run("lora", 2e-3, 1, 3.8, at10=4.1),
        _run("lora", 2e-3, 2, None, diverged=5),
        _run("lora", 5e-3, 3, 3.7, at10=4.0),  # another rate
        _run("full", 2e-3, 4, 3.6, at10=3.9),  # another method
    ]
    assert paired.by_seed(runs, "lora", 2e-3, 40, 40, "loss") == {0: 3.9, 1: 3.8}
    assert paired.by_seed(runs, "lora", 0.002 * (1 + 1e-14), "10", 40, "loss") == {0: 4.2, 1: 4.1}
    assert paired.by_seed(runs, "lora", 2e-3, 20, 40, "loss") == {}  # no such budget
    assert paired.by_seed(runs, "lora", 2e-3, 40, 40, "accuracy") == {}


def test_fmt():
    c = paired.compare({0: 1.0, 1: 2.0, 2: 3.0}, {0: 0.0, 1: 0.0, 2: 0.0}, higher=True)
    assert paired.fmt(c) == "+2.000 [-0.484, +4.484] n=3"
    assert paired.fmt(paired.compare({0: 1.0}, {0: 1.5}, True), 2) == "-0.50 n=1"
    assert paired.fmt(None) == "-" and paired.fmt(paired.compare({}, {}, True)) == "-"
