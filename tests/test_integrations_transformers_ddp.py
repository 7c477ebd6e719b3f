"""GradLoraCallback in a 2-process Trainer run (DDP, gloo, CPU, torchrun): the plain Trainer and
TRL's SFTTrainer building the PeftModel from a peft_config (_trainer_ddp_worker.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_integrations_transformers import expected_init, plain_peft_logits
from test_parallel_collectives import torchrun


def launch(case: str, tmp_path_factory) -> tuple[str, Path, dict[int, dict]]:
    """(case, OUT, {rank: results}) of _trainer_ddp_worker.py on 2 ranks."""
    out = tmp_path_factory.mktemp(case)
    return case, out, torchrun("_trainer_ddp_worker.py", out, timeout=240, GRADLORA_TEST_CASE=case)


@pytest.fixture(scope="module")
def trainer_ranks(tmp_path_factory):
    return launch("trainer", tmp_path_factory)


@pytest.fixture(scope="module")
def sft_ranks(tmp_path_factory):
    pytest.importorskip("trl", reason="trl is not installed (pip install trl==1.16.0)")
    return launch("sft", tmp_path_factory)


@pytest.fixture(params=["trainer", "sft"])
def ranks(request):
    """The Trainer run and the SFTTrainer run (each launched once per module)."""
    return request.getfixturevalue(f"{request.param}_ranks")


def test_every_rank_initializes_on_its_own_batches_as_one_process_over_their_union(ranks):
    case, _, r = ranks
    assert r[0]["world"] == 2 and r[0]["wrapper"] == "DistributedDataParallel"
    assert r[0]["ranks"] == r[1]["ranks"] == 2 and r[0]["num_batches"] == r[1]["num_batches"] == 4
    mine = {k: [b["input_ids"] for b in r[k]["batches"]] for k in (0, 1)}
    for k in (0, 1):  # the init's 2 batches are the ones this rank then trains on first
        assert len(mine[k]) >= 4 and all(
            torch.equal(a, b) for a, b in zip(mine[k][:2], mine[k][2:4], strict=True)
        )
    union = [b["input_ids"] for b in r[0]["batches"][:2] + r[1]["batches"][:2]]
    assert len({tuple(x.flatten().tolist()) for x in union}) == 4  # each rank its own shard
    # bit-identical on both ranks, and the 1-process init over the 4 batches
    init = r[0]["init"]
    for name, tensors in init.items():
        assert all(torch.isfinite(x).all() for x in tensors)
        assert all(torch.equal(x, y) for x, y in zip(tensors, r[1]["init"][name], strict=True))
    want = expected_init("llama", "lora-ga", r[0]["batches"][:2] + r[1]["batches"][:2], r=2)
    assert init.keys() == want.keys()
    for name in want:  # fp32 sums in another order and thread count: ~3e-6 apart (|A| ~ 0.3)
        for x, y in zip(init[name], want[name], strict=True):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)


def test_ranks_train_identically_and_the_summary_is_logged_once(ranks):
    _, _, r = ranks
    for key, x in r[0]["trained"].items():
        assert torch.equal(x, r[1]["trained"][key]), key
    assert any(not torch.equal(r[0]["trained"][f"{n}.B"], b[1]) for n, b in r[0]["init"].items())
    assert len(r[0]["summaries"]) == 1 and r[1]["summaries"] == []
    assert "lora-ga init of 14 layers from 4 batches (2 on each of 2 ranks)" in r[0]["summaries"][0]


def test_checkpoints_and_save_model_are_written_once_and_load_with_plain_peft(ranks, tmp_path):
    _, out, r = ranks
    assert r[0]["saves"] == ["checkpoint-2", "checkpoint-4", "final", "direct0"]
    assert r[1]["saves"] == [] and not (out / "direct1").exists()  # is_main_process=False
    folders = [out / "a" / "checkpoint-2", out / "a" / "final"]
    for folder in folders:
        assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4
        assert json.loads((folder / "gradlora.json").read_text())["converted"]
    ckpt, final = plain_peft_logits(tmp_path, [("llama", f) for f in folders])
    torch.testing.assert_close(ckpt, r[0]["saved_logits"][2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(final, r[0]["final_logits"], rtol=1e-4, atol=1e-5)
    assert torch.equal(r[0]["final_logits"], r[1]["final_logits"])
    assert not torch.allclose(ckpt, final)  # the checkpoint is the step-2 model


def test_resume_from_checkpoint_continues_exactly_on_every_rank(ranks):
    _, _, r = ranks
    for k in (0, 1):
        assert r[k]["resumed_at"] == 2 and r[k]["resumed_report"] is None  # no second init
        assert r[k]["resumed"].keys() == r[k]["trained"].keys()
        for key, x in r[k]["resumed"].items():
            if key.endswith(".W"):  # the offset applied again from the saved factors, exactly
                assert torch.equal(x, r[k]["trained"][key]), key
            else:
                torch.testing.assert_close(x, r[k]["trained"][key], rtol=1e-5, atol=1e-7)


def test_iterable_dataset_each_rank_initializes_on_the_batches_dispatched_to_it(trainer_ranks):
    _, _, r = trainer_ranks
    for k in (0, 1):
        it = r[k]["iterable"]
        assert it["loader"] == "DataLoaderDispatcher" and it["num_batches"] == 4
        assert it["in_dataloader_after_init"] is False  # the early stop left no trace
        init, train = it["seen"][:2], it["seen"][2:4]
        assert all(torch.equal(a, b) for a, b in zip(init, train, strict=True))
    assert not torch.equal(r[0]["iterable"]["seen"][0], r[1]["iterable"]["seen"][0])
