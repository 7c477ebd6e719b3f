"""Data-parallel init: 2 CPU ranks (gloo, torchrun) against 1 process over the same batches;
the join check when not every rank calls initialize."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_peft

import gradlora
from gradlora.parallel.collectives import collective_timeout, fingerprint, resolve
from gradlora.peft_view import unwrap as unwrap_model

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run _dist_worker.py on 2 ranks once; ({rank: results}) for the tests below."""
    return torchrun("_dist_worker.py", tmp_path_factory.mktemp("dist"), timeout=240)


def torchrun(worker: str, out: Path, timeout: float, **env: str) -> dict[int, dict]:
    """Run tests/``worker`` OUT on 2 gloo ranks under torchrun; {rank: OUT/rank{r}.pt}. A run
    past ``timeout`` seconds (a hang) is stopped, ranks included, and fails the test."""
    env = dict(os.environ, PYTHONPATH=str(SRC), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **env)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    log = out / "torchrun.log"  # a file, not a pipe: a stray rank cannot hold the test up
    with (
        log.open("w") as f,
        subprocess.Popen(
            [*cmd, str(TESTS / worker), str(out)], env=env, stdout=f, stderr=subprocess.STDOUT
        ) as proc,
    ):
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()  # torchrun passes SIGTERM on to the ranks, then SIGKILLs them
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            pytest.fail(f"{worker} on 2 ranks did not finish within {timeout} s (hung)")
    assert proc.returncode == 0, log.read_text()[-4000:]
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


@pytest.fixture(scope="module")
def joins(tmp_path_factory):
    """Run _dist_join_worker.py on 2 ranks with a 3 s join timeout; {rank: results}. Before the
    join check, rank 0's lone initialize waited in an all-reduce for gloo's 30 minutes."""
    out = tmp_path_factory.mktemp("join")
    return torchrun("_dist_join_worker.py", out, timeout=120, GRADLORA_COLLECTIVE_TIMEOUT="3")


def test_initialize_on_rank_0_only_names_rank_1_and_leaves_the_model(joins):
    absent = joins[0]["absent"]
    assert absent["error"] is not None and absent["untouched"]
    assert "ranks [1] did not call gradlora.initialize within 3 s" in absent["error"]
    assert "call it on every rank" in absent["error"] and "distributed=False" in absent["error"]
    assert 2.5 < absent["seconds"] < 30  # the 3 s wait, not gloo's 30 minutes


def test_rank_arriving_after_the_others_gave_up_raises_at_once(joins):
    late = joins[1]["late"]
    assert late["error"] is not None and late["untouched"]
    assert "rank 1 called gradlora.initialize after the other ranks" in late["error"]
    assert "had stopped waiting for it" in late["error"]
    assert late["seconds"] < 10  # it does not wait out its own 3 s, nor enter an all-reduce


def test_a_rank_failing_its_checks_stops_the_others_at_once(joins):
    """Rank 1 passes an unknown method: rank 0 does not wait out its 20 s collective_timeout."""
    raised = [joins[r]["raised"] for r in (0, 1)]
    assert all(x["untouched"] for x in raised)
    assert "unknown method 'lora-xx'" in raised[1]["error"]
    assert "ranks [1] raised an error in gradlora.initialize" in raised[0]["error"]
    assert raised[0]["seconds"] < 10


def test_subgroup_init_after_a_failed_join_still_works(joins):
    """Both ranks over a new_group (collective_timeout= argument): the usual collective init."""
    assert joins[0]["subgroup/ranks"] == joins[1]["subgroup/ranks"] == 2
    assert joins[0]["subgroup/num_batches"] == 4
    for a, b in zip(joins[0]["subgroup/A"], joins[1]["subgroup/A"], strict=True):
        assert torch.equal(a, b)


def test_join_check_costs_little(joins):
    """A few store messages per init, both ranks calling together (measured ~0.1-1 ms on CPU)."""
    assert max(joins[r]["overhead"] for r in (0, 1)) < 0.25


def test_collective_timeout_from_argument_or_environment(monkeypatch):
    monkeypatch.delenv("GRADLORA_COLLECTIVE_TIMEOUT", raising=False)
    assert collective_timeout() == 60.0 and collective_timeout(2) == 2.0
    monkeypatch.setenv("GRADLORA_COLLECTIVE_TIMEOUT", "7.5")
    assert collective_timeout() == 7.5 and collective_timeout(2) == 2.0  # the argument wins
    for bad in (0, -1, float("inf"), float("nan"), "5", True):
        with pytest.raises(gradlora.GradLoraError, match="collective_timeout must be a positive"):
            collective_timeout(bad)
    monkeypatch.setenv("GRADLORA_COLLECTIVE_TIMEOUT", "soon")
    with pytest.raises(gradlora.GradLoraError, match=r"\$GRADLORA_COLLECTIVE_TIMEOUT must be"):
        collective_timeout()
