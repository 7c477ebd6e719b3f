"""gradlora train --export vllm / merged: OUT/export-vllm (a plain adapter) and OUT/merged (a
bf16 transformers checkpoint with the tokenizer), and the refusals before anything trains."""

import json

import pytest
import torch
from conftest import tiny_llama_folder
from peft import PeftModel
from test_cli_main import FAST, write_csv
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from gradlora.cli.main import main

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]


@pytest.fixture
def tiny_folder(tmp_path):
    """A 1-layer random Llama with MiniLM's tokenizer, saved as a local model folder."""
    return tiny_llama_folder(tmp_path / "tiny")


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_train_exports_a_plain_adapter_and_a_merged_model(tmp_path, tiny_folder, capsys):
    data = tmp_path / "notes.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"note {i}: the cat sat"}) for i in range(20)))
    out = tmp_path / "out"
    args = ["train", "--model", str(tiny_folder), "--data", str(data), "--method", "lora-ga"]
    args += ["--steps", "3", "--rank", "2", "--lr", "1e-2", "--out", str(out), "--no-progress"]
    assert main([*args, "--export", "vllm", "--export", "merged"]) == 0
    assert f"exported {out / 'export-vllm'}" in capsys.readouterr().out
    record = json.loads((out / "train.json").read_text())
    assert record["exported"] == [str(out / "export-vllm"), str(out / "merged")]
    config = json.loads((out / "export-vllm" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 4, False)
    ids = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(0))
    base = LlamaForCausalLM.from_pretrained(tiny_folder)
    want = logits(PeftModel.from_pretrained(base, out / "adapter"), ids)  # save_adapter's
    exported = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(tiny_folder), out / "export-vllm"
    )
    assert rel(logits(exported, ids), want) < 1e-5
    assert rel(logits(LlamaForCausalLM.from_pretrained(tiny_folder), ids), want) > 1e-3
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert merged.dtype == torch.bfloat16
    assert rel(logits(merged, ids), want) < 2e-2
    assert AutoTokenizer.from_pretrained(out / "merged").vocab_size == base.config.vocab_size


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "full", "--export", "merged"], "already a plain transformers checkpoint"),
        (["--method", "pissa", "--export", "vllm"], "rewrote the base weights"),
        (["--export", "vllm"], "use --export merged"),  # a classification head
    ],
)
def test_exports_that_cannot_work_are_refused_before_training(tmp_path, capsys, extra, message):
    data = write_csv(tmp_path / "reviews.csv")
    args = ["train", "--data", str(data), "--out", str(tmp_path / "o"), *FAST, *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o" / "adapter").exists()
