"""Paired comparisons over seeds (issue 26), for the reports of benchmarks/which_method.py and
benchmarks/damping.py.

Two configurations run with the same seed see the same data order, the same dropout draws and
the same split; their per-seed difference removes that shared noise. A comparison here is the
per-seed difference ``a - b`` over the seeds both have, its mean and a Student t-interval
(n - 1 degrees of freedom). The verdict is "ahead" or "behind" only where the interval
excludes 0, else "tie", and "-" with fewer than 2 pairs. Standard library only: damping.py's
``--best`` is called from benchmarks/lr_sweeps.sh with whatever ``python`` is on the PATH.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable

LEVEL = 0.95  # of every interval in the reports


def t_two_sided_cdf(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with ``df`` (a positive integer) degrees of freedom, by the
    finite sums of Abramowitz & Stegun 26.7.3 (odd df) and 26.7.4 (even df): exact up to
    rounding, no special functions needed."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be a positive integer, got {df}")
    if t <= 0:
        return 0.0
    theta = math.atan(t / math.sqrt(df))
    cos2 = math.cos(theta) ** 2
    if df % 2 == 1:  # 2/pi (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...))
        term, total = 1.0, 0.0
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= cos2 * (2 * k) / (2 * k + 1)
        return 2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * total)
    term, total = 1.0, 0.0  # sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
    for k in range(df // 2):
        total += term
        term *= cos2 * (2 * k + 1) / (2 * k + 2)
    return math.sin(theta) * total


def t_quantile(level: float, df: int) -> float:
    """The t with P(|T| <= t) = ``level`` for ``df`` degrees of freedom: the half-width, in
    standard errors, of the two-sided ``level`` interval (t_{0.975, df} for 95%). Bisection on
    :func:`t_two_sided_cdf`, to 1e-12 relative."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    low, high = 0.0, 1.0
    while t_two_sided_cdf(high, df) < level:
        low, high = high, high * 2
    while high - low > 1e-12 * high:
        mid = (low + high) / 2
        if t_two_sided_cdf(mid, df) < level:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def t_interval(values: Iterable[float], level: float = LEVEL) -> dict:
    """Mean of ``values`` and its two-sided Student t-interval at ``level``: mean ± t_{df} s/√n
    with s the sample standard deviation and df = n - 1. ``low``/``high`` are None with fewer
    than 2 values (no spread to estimate)."""
    values = list(values)
    n = len(values)
    mean = statistics.fmean(values) if values else None
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": n}
    half = t_quantile(level, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def verdict(interval: dict, higher: bool) -> str:
    """ "ahead" where the interval of the difference a - b lies wholly on a's better side of 0
    (above it when ``higher`` is better, below it for a loss), "behind" where wholly on the
    other side, "tie" where it holds 0, "-" with fewer than 2 pairs."""
    if interval["n"] < 2:
        return "-"
    if interval["low"] > 0:
        return "ahead" if higher else "behind"
    if interval["high"] < 0:
        return "behind" if higher else "ahead"
    return "tie"


def score(run: dict, step: int | str, steps: int, metric: str) -> float | None:
    """The test ``metric`` of one stored run after ``step`` steps: its final test where ``step``
    is the run's length ``steps``, else the budget measured part way; None where the run
    diverged or the metric was not measured then."""
    if run.get("diverged_at") is not None:
        return None
    if int(step) == steps:
        test = run["test"] or {}
    else:
        test = run.get("budgets", {}).get(str(step), {}).get("test", {})
    return test.get(metric)


def by_seed(
    runs: Iterable[dict], method: str, lr: float, step: int | str, steps: int, metric: str
) -> dict[int, float]:
    """Seed -> test ``metric`` at ``step`` of the runs of ``method`` at rate ``lr`` (relative
    tolerance 1e-12); diverged runs and missing scores are left out."""
    out = {}
    for r in runs:
        if r["method"] == method and abs(r["lr"] - lr) <= 1e-12 * lr:
            value = score(r, step, steps, metric)
            if value is not None:
                out[r["seed"]] = value
    return out


def pair(a: dict[int, float], b: dict[int, float]) -> dict[int, float]:
    """Seed -> a - b over the seeds both have (in seed order)."""
    return {s: a[s] - b[s] for s in sorted(set(a) & set(b))}


def compare(a: dict[int, float], b: dict[int, float], higher: bool, level: float = LEVEL) -> dict:
    """The paired comparison of a against b (seed -> score each): the differences a - b by seed,
    their mean and t-interval (``mean``, ``low``, ``high``, ``n`` pairs) and the verdict."""
    diffs = pair(a, b)
    interval = t_interval(diffs.values(), level)
    return interval | {"seeds": list(diffs), "verdict": verdict(interval, higher)}


def fmt(c: dict | None, digits: int = 3) -> str:
    """A comparison as text: "+0.012 [+0.004, +0.020] n=3" (mean difference, 95% interval,
    pairs), "+0.012 n=1" without an interval, "-" without pairs."""
    if not c or c["n"] == 0:
        return "-"
    mean = f"{c['mean']:+.{digits}f}"
    if c["low"] is None:
        return f"{mean} n={c['n']}"
    return f"{mean} [{c['low']:+.{digits}f}, {c['high']:+.{digits}f}] n={c['n']}"
