"""Data-parallel init: 2 CPU ranks (gloo, torchrun) against 1 process over the same batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_peft

import gradlora
from gradlora.distributed import fingerprint, resolve
from gradlora.targets import unwrap as unwrap_model

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run _dist_worker.py on 2 ranks once; ({rank: results}) for the tests below."""
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, PYTHONPATH=str(SRC), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, str(TESTS / "_dist_worker.py"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {r: torch.load(out / f"rank{r}.pt") for r in (0, 1)}


CASES = ("ga_randomized", "one_exact")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("stage", ["init", "trained"])
def test_ranks_bit_identical(ranks, case, stage):
    """A, B, W (and A0, B0) agree bit for bit across ranks after init and after DDP steps."""
    a, b = ranks[0][f"{case}/{stage}"], ranks[1][f"{case}/{stage}"]
    assert a.keys() == b.keys() and len(a) >= 3 * 8
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("case", CASES)
def test_two_ranks_equal_one_process_over_union(ranks, case):
    """Rank 0 had batches 0..3, rank 1 batches 4..7: the init equals one process over all 8."""
    assert ranks[0][f"{case}/num_batches"] == ranks[1][f"{case}/num_batches"] == 8
    two, one = ranks[0][f"{case}/init"], ranks[0][f"{case}/single"]
    assert two.keys() == one.keys()
    for key in two:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6, msg=key)
    # and the training moved the adapter: the bit-identity after training is not vacuous
    trained = ranks[0][f"{case}/trained"]
    assert any(not torch.equal(trained[k], two[k]) for k in two if k.endswith(".A"))


def test_optimizer_finds_pairs_through_ddp(ranks):
    assert ranks[0]["ga_randomized/pairs"] == 2 * 8  # gpt2 tiny: 8 LoRA layers, A and B each


def test_one_ulp_difference_is_repaired_from_rank_0(ranks):
    assert (
        len(ranks[0]["repair/first"]) == 1 and ranks[0]["repair/first"] == ranks[1]["repair/first"]
    )
    assert ranks[0]["repair/second"] == ranks[1]["repair/second"] == []
    assert torch.equal(ranks[0]["repair/W"], ranks[1]["repair/W"])


def test_fingerprint_sees_one_bit():
    x = torch.randn(1000)
    y = x.clone()
    y[500] = torch.nextafter(y[500], torch.tensor(10.0))
    z = x.clone()
    z[[3, 4]] = z[[4, 3]]  # same multiset of values, different places
    assert not torch.equal(fingerprint(x), fingerprint(y))
    assert not torch.equal(fingerprint(x), fingerprint(z))
    assert torch.equal(fingerprint(x), fingerprint(x.clone()))
    assert fingerprint(x.bfloat16()).dtype == torch.int64
    assert torch.equal(fingerprint(y, chunk=7), fingerprint(y))  # chunking changes nothing


def test_single_process_needs_no_process_group():
    assert resolve(None) is False and resolve(False) is False
    with pytest.raises(gradlora.GradLoraError, match="torch.distributed is not initialized"):
        resolve(True)
    with pytest.raises(gradlora.GradLoraError, match="distributed must be None, True or False"):
        resolve("yes")
    model, _ = tiny_peft("llama")
    assert unwrap_model(torch.nn.DataParallel(model)) is model
