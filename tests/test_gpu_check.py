"""benchmarks/gpu_check.sh end to end in its CPU mode (--device cpu --tiny): one subprocess, the
JSON and Markdown it writes hold every field, with finite positive times (issue 27)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INIT_CASES = ["lora_passes", "lora_step", "lora_ga_exact", "lora_ga_sketch"]
OPTIMIZERS = ["adamw", "preconditioned", "lora_pro", "lora_pro_full"]
# a pytest junit report as gpu_check.sh leaves it in OUTDIR: the JSON must carry its counts
JUNIT = (
    '<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="{e}" '
    'failures="{f}" skipped="{s}" tests="{t}" time="{time}"></testsuite></testsuites>'
)


def positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def test_cpu_tiny_mode_writes_every_field(tmp_path):
    out = tmp_path / "check"
    out.mkdir()
    counts = dict(t=7, f=1, e=0, s=3, time=2.5)
    (out / "cuda_tests.xml").write_text(JUNIT.format(**counts))
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)  # the script puts src/ first itself
    env.pop("GPU_CHECK_TESTS_RC", None)
    cmd = ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out), "--device", "cpu"]
    run = subprocess.run(
        [*cmd, "--tiny", "--batches", "3", "--steps", "2"],
        cwd=tmp_path,  # the script finds the repository from its own path
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "cuda tests: exit status" not in run.stdout  # --device cpu: the benchmark only
    result = json.loads((out / "gpu_check.json").read_text())

    assert result["tiny"] is True and result["schema"] == 1
    assert result["environment"]["device"] == "cpu" and result["environment"]["torch"]
    shapes = result["shapes"]
    assert shapes["num_batches"] == 3 and result["optimizer_steps_timed"] == 2
    assert len(shapes["targets"]) == 7
    per_layer = 2 * shapes["hidden"] ** 2 + 3 * shapes["hidden"] * shapes["intermediate"]
    kv = shapes["hidden"] // shapes["heads"] * shapes["kv_heads"]
    assert shapes["adapted_params"] == shapes["layers"] * (per_layer + 2 * shapes["hidden"] * kv)
    assert result["cuda_tests"] == {
        "exit_status": None,  # gpu_check.sh ran no tests (--device cpu): the report's alone
        "tests": counts["t"],
        "failures": counts["f"],
        "errors": counts["e"],
        "skipped": counts["s"],
        "time_s": counts["time"],
    }
    # on the CPU every memory field is null, and labelled so
    assert result["memory_metric"] is None and "null" in result["memory_note"]

    init = result["init"]
    assert list(init) == INIT_CASES
    for case, row in init.items():
        assert positive(row["seconds"]), case
        assert row["peak_bytes"] is None and row["increase_bytes"] is None
    for case in ("lora_ga_exact", "lora_ga_sketch"):
        row = init[case]
        assert row["gradient"] == case.rsplit("_", 1)[1]
        assert positive(row["capture_seconds"]) and positive(row["svd_seconds"])
        assert row["capture_seconds"] + row["svd_seconds"] <= row["seconds"]
        for base in ("lora_passes", "lora_step"):
            want = row["seconds"] / init[base]["seconds"]
            assert math.isclose(row[f"x_{base}_time"], want, rel_tol=1e-9)
            assert row[f"x_{base}_peak"] is None

    opts = result["optimizers"]
    assert list(opts) == OPTIMIZERS
    for name, row in opts.items():
        assert positive(row["step_ms"]) and positive(row["optimizer_ms"]), name
        assert row["optimizer_ms"] < row["step_ms"], name
        assert positive(row["state_bytes"]) and row["peak_bytes"] is None
        want = row["step_ms"] / opts["adamw"]["step_ms"]
        assert math.isclose(row["x_adamw_step"], want, rel_tol=1e-9)
        assert positive(row["x_adamw_optimizer"])
    full = result["lora_pro_full_memory"]
    # full mode keeps two fp32 (m, n) moments per adapted weight (README)
    assert full["state_bytes"] >= 2 * 4 * shapes["adapted_params"]
    assert full["extra_state_bytes"] == full["state_bytes"] - opts["lora_pro"]["state_bytes"]
    assert positive(result["seconds_total"]) and positive(result["warm_up"]["seconds"])

    table = (out / "gpu_check.md").read_text()
    assert all(f"| {name} |" in table for name in INIT_CASES + OPTIMIZERS)
    assert "tests 7, failures 1, errors 0, skipped 3" in table and "not measured" in table
    assert (out / "gpu_check.log").read_text().strip()
