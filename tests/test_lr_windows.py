"""benchmarks/lr_windows.py: the learning-rate window of a seed-0 sweep, its tolerance and its
place against LoRA's, on synthetic curves."""

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import lr_windows  # noqa: E402

GRID = [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2]


def _curve(best: float, losses_by_distance: list[float]) -> list[tuple[float, float]]:
    """A symmetric bowl on GRID: the loss at k rungs from ``best`` is losses_by_distance[k]."""
    i = GRID.index(best)
    return [(lr, losses_by_distance[abs(j - i)]) for j, lr in enumerate(GRID)]


def test_the_window_is_the_run_of_rates_within_the_tolerance_of_the_best():
    w = lr_windows.window(_curve(1e-3, [1.00, 1.03, 1.08, 1.5]), tol=0.05)
    assert (w["low"], w["high"], w["best_lr"], w["best"]) == (5e-4, 2e-3, 1e-3, 1.00)
    assert w["width"] == pytest.approx(2.0)  # 5e-4 .. 2e-3: a factor of 4
    assert not w["at_edge"] and w["outside"] == []
    wider = lr_windows.window(_curve(1e-3, [1.00, 1.03, 1.08, 1.5]), tol=0.10)
    assert (wider["low"], wider["high"]) == (2e-4, 5e-3)
    assert wider["width"] == pytest.approx(math.log2(25))


def test_a_single_rate_window_has_width_zero():
    w = lr_windows.window(_curve(1e-3, [1.0, 1.2, 1.4, 1.6]), tol=0.05)
    assert w["low"] == w["high"] == 1e-3 and w["width"] == 0.0


def test_a_window_that_reaches_the_grid_end_is_marked_and_diverged_runs_end_it():
    pts = [(1e-4, 1.00), (2e-4, 1.01), (5e-4, 1.02), (1e-3, None), (2e-3, 1.01)]
    w = lr_windows.window(pts, tol=0.05)
    assert (w["low"], w["high"]) == (1e-4, 5e-4) and w["at_edge"]
    # 2e-3 is within the tolerance but cut off by the diverged run: listed apart
    assert w["outside"] == [2e-3]
    assert lr_windows.window([(1e-3, None), (2e-3, None)], tol=1.0) is None


def test_the_points_may_come_in_any_order():
    pts = _curve(2e-3, [0.5, 0.51, 0.9, 0.9, 0.9])
    assert lr_windows.window(pts[::-1], 0.02) == lr_windows.window(pts, 0.02)


def test_tolerance_from_the_untrained_gap_or_from_loras_best():
    assert lr_windows.tolerance(0.115, 2.331) == pytest.approx(0.02 * 2.216)
    assert lr_windows.tolerance(3.830, None) == pytest.approx(0.0766)


def test_relative_position_against_loras_window():
    lora = {"low": 1e-3, "high": 4e-3}  # centre 2e-3
    lower = lr_windows.relative({"low": 1e-4, "high": 4e-4}, lora)
    assert lower["centre_ratio"] == pytest.approx(0.1) and not lower["overlap"]
    touching = lr_windows.relative({"low": 4e-3, "high": 1e-2}, lora)
    assert touching["overlap"] and touching["centre_ratio"] > 1


def _results(tmp: Path, curves: dict[str, list[tuple[float, float]]]) -> dict:
    points = {m: [{"lr": x, "val_loss": v} for x, v in c] for m, c in curves.items()}
    cfg = {"model": "smollm2", "data": "toy", "max_length": 32, "val_size": 96, "test_size": 96}
    return {"config": cfg, "methods": {m: {"lr_points": p} for m, p in points.items()}}


def test_task_windows_takes_the_untrained_score_only_at_the_sweeps_sizes(tmp_path):
    curves = {
        "lora": _curve(2e-3, [1.0, 1.1, 1.3, 1.5, 1.7, 1.9]),
        "lora-ga": _curve(5e-4, [1.05, 1.12, 1.3, 1.5, 1.7, 1.9]),
    }
    results = _results(tmp_path, curves)
    found = lr_windows.task_windows(results, None, tmp_path)
    assert found["untrained_val_loss"] is None and "no untrained score" in found["basis"]
    assert found["tolerance"] == pytest.approx(0.02)  # 2% of LoRA's best, 1.0
    assert found["windows"]["lora"]["width"] == 0.0
    base = {"args": {"max_length": 32, "val_size": 96, "test_size": 96}, "val": {"loss": 6.0}}
    (tmp_path / "base_score_smollm2_toy.json").write_text(json.dumps(base))
    found = lr_windows.task_windows(results, None, tmp_path)
    assert found["untrained_val_loss"] == 6.0 and found["tolerance"] == pytest.approx(0.1)
    assert (found["windows"]["lora"]["low"], found["windows"]["lora"]["high"]) == (1e-3, 5e-3)
    ga = found["windows"]["lora-ga"]
    assert (ga["low"], ga["high"]) == (2e-4, 1e-3) and ga["overlap"]
    assert ga["centre_ratio"] == pytest.approx(math.sqrt(2e-4 * 1e-3 / (1e-3 * 5e-3)))
    base["args"]["max_length"] = 96  # measured on another task size: not used
    (tmp_path / "base_score_smollm2_toy.json").write_text(json.dumps(base))
    assert lr_windows.task_windows(results, None, tmp_path)["untrained_val_loss"] is None


def test_the_plot_is_written(tmp_path):
    curves = {"lora": _curve(2e-3, [1.0, 1.1, 1.3, 1.5, 1.7, 1.9])}
    curves["lora-one-init"] = _curve(1e-3, [1.0, 1.01, 1.3, 1.5, 1.7, 1.9])
    results = _results(tmp_path, {"lora": curves["lora"]})
    diag = _results(tmp_path, {"lora-one-init": curves["lora-one-init"]})
    found = lr_windows.task_windows(results, diag, tmp_path)
    assert set(found["windows"]) == {"lora", "lora-one-init"}
    lr_windows.plot("toy", results, diag, found, tmp_path / "w.png")
    assert (tmp_path / "w.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_sensitivity_table_recomputes_every_window_at_each_share(tmp_path):
    """At 1%, 2% and 5% of the gap (untrained 6.0, LoRA's best 1.0: tolerances 0.05, 0.1,
    0.25) LoRA-GA's window grows from its best alone to overlapping LoRA's and then to the grid's
    edge, and the table says so."""
    curves = {
        "lora": _curve(2e-3, [1.0, 1.1, 1.3, 1.5, 1.7, 1.9]),
        "lora-ga": _curve(5e-4, [1.05, 1.12, 1.3, 1.5, 1.7, 1.9]),
    }
    results = _results(tmp_path, curves)
    base = {"args": {"max_length": 32, "val_size": 96, "test_size": 96}, "val": {"loss": 6.0}}
    (tmp_path / "base_score_smollm2_toy.json").write_text(json.dumps(base))
    found = lr_windows.task_windows(results, None, tmp_path)
    assert list(found["sensitivity"]) == ["0.01", "0.02", "0.05"]
    ga = {share: w["lora-ga"] for share, w in found["sensitivity"].items()}
    assert (ga["0.01"]["low"], ga["0.01"]["high"]) == (5e-4, 5e-4) and not ga["0.01"]["overlap"]
    assert ga["0.02"] == found["windows"]["lora-ga"]  # the main table's tolerance
    assert (ga["0.05"]["low"], ga["0.05"]["high"]) == (1e-4, 2e-3) and ga["0.05"]["at_edge"]
    lines = lr_windows.sensitivity_table(found)
    assert "| lora-ga | 0.00 | 2.32 ✓ | ≥ 4.32 ✓ |" in lines
