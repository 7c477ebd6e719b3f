"""``arithmetic``: a built-in generative task of multi-step arithmetic word problems.

Problems in the style of GSM8K, small enough for a 135M model: two or three steps of +, -
and x on small whole numbers, from fixed templates filled by a seeded generator, so every
machine gets the same problems. A model is trained on ``prompt + answer`` with the loss on the
answer tokens only (``TextData.answers``). Answers are worked, as in GSM8K: the steps, then
the final number (" 5+7=12, 12-3=9. So 9"). A model is scored by greedy decoding: the exact
match of the number after "So" in what it writes with the true final number
(``loop.exact_match``).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from .data import TextData

NUM_PROBLEMS = 2400  # before de-duplication; 10% validation, 10% test by default
SEED = 1234
NAMES = ["Ana", "Ben", "Carla", "Dev", "Emma", "Farid", "Gita", "Hugo", "Ines", "Jon", "Kemal"]
THINGS = ["apples", "marbles", "stickers", "pencils", "cards", "coins", "books", "shells"]

Problem = tuple[str, list[str]]  # (question, its steps "a+b=c"; the last result is the answer)


def _buy_give(r: random.Random, name: str, thing: str) -> Problem:
    a, b = r.randint(5, 30), r.randint(2, 20)
    c = r.randint(1, a + b)
    q = (
        f"{name} has {a} {thing}. {name} gets {b} more {thing} and then gives {c} of them "
        f"away. How many {thing} does {name} have now?"
    )
    return q, [f"{a}+{b}={a + b}", f"{a + b}-{c}={a + b - c}"]


def _groups_minus(r: random.Random, name: str, thing: str) -> Problem:
    a, b = r.randint(2, 9), r.randint(2, 9)
    c = r.randint(1, a * b)
    q = (
        f"{name} has {a} bags with {b} {thing} in each bag. {name} loses {c} {thing}. "
        f"How many {thing} are left?"
    )
    return q, [f"{a}*{b}={a * b}", f"{a * b}-{c}={a * b - c}"]


def _three_steps(r: random.Random, name: str, thing: str) -> Problem:
    a, b = r.randint(10, 40), r.randint(2, 15)
    c = r.randint(1, a + b)
    d = r.randint(1, 15)
    q = (
        f"A box holds {a} {thing}. {name} puts in {b} {thing}, takes out {c}, and then puts "
        f"in {d} more. How many {thing} are in the box?"
    )
    return q, [f"{a}+{b}={a + b}", f"{a + b}-{c}={a + b - c}", f"{a + b - c}+{d}={a + b - c + d}"]


def _earn_spend(r: random.Random, name: str, thing: str) -> Problem:
    a, b = r.randint(2, 12), r.randint(2, 7)
    c = r.randint(1, a * b)
    q = (
        f"{name} earns {a} dollars every day for {b} days and then spends {c} dollars. "
        f"How many dollars does {name} have left?"
    )
    return q, [f"{a}*{b}={a * b}", f"{a * b}-{c}={a * b - c}"]


def _share(r: random.Random, name: str, thing: str) -> Problem:
    each, friends = r.randint(2, 9), r.randint(2, 6)
    extra = r.randint(0, friends - 1)
    total = each * friends + extra
    q = (
        f"{name} shares {total} {thing} equally among {friends} friends and keeps what is "
        f"left over. How many {thing} does each friend get?"
    )
    return q, [f"{total}-{extra}={total - extra}", f"{total - extra}/{friends}={each}"]


def _double_plus(r: random.Random, name: str, thing: str) -> Problem:
    a, b = r.randint(3, 25), r.randint(1, 20)
    q = (
        f"{name} has {a} {thing}. A friend has twice as many {thing} as {name} plus {b}. "
        f"How many {thing} does the friend have?"
    )
    return q, [f"2*{a}={2 * a}", f"{2 * a}+{b}={2 * a + b}"]


TEMPLATES: list[Callable[[random.Random, str, str], Problem]] = [
    _buy_give,
    _groups_minus,
    _three_steps,
    _earn_spend,
    _share,
    _double_plus,
]


def prompt_of(question: str) -> str:
    """The text a model is given: the question, then "Answer:" (the answer follows a space)."""
    return f"Question: {question}\nAnswer:"


def answer_of(steps: list[str]) -> str:
    """The worked answer: " 5+7=12, 12-3=9. So 9" (the steps, then the final number)."""
    return f" {', '.join(steps)}. So {steps[-1].rsplit('=', 1)[1]}"


FINAL = re.compile(r"So (-?\d+)")  # the final answer in a worked answer


def final_answer(text: str) -> int | None:
    """The number after "So " in ``text`` (a worked answer or a generation), None if none."""
    found = FINAL.search(text)
    return None if found is None else int(found.group(1))


def make_problems(n: int = NUM_PROBLEMS, seed: int = SEED) -> TextData:
    """``n`` problems (duplicates dropped) as prompts with their worked answers."""
    r = random.Random(seed)
    seen, prompts, answers = set(), [], []
    for _ in range(n):
        template = TEMPLATES[r.randrange(len(TEMPLATES))]
        question, steps = template(r, r.choice(NAMES), r.choice(THINGS))
        if question in seen:
            continue
        seen.add(question)
        prompts.append(prompt_of(question))
        answers.append(answer_of(steps))
    return TextData(prompts, None, answers)
