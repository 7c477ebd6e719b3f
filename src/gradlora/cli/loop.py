"""A small training loop (plain torch) with a tqdm bar, evaluation, schedules and smoothing."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..init.capture import move_to


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # training loss of every step taken
    diverged_at: int | None = None  # step whose loss was NaN/inf (training stopped there)
    seconds: float = 0.0  # wall time of the loop


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, total_steps: int, warmup_steps: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then "constant", "linear" (to 0) or "cosine" (to 0) over total_steps."""
    if schedule not in ("constant", "linear", "cosine"):
        raise ValueError(f"unknown schedule {schedule!r}; use constant, linear or cosine")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        if schedule == "linear":
            return max(1.0 - progress, 0.0)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def train(
    model: nn.Module,
    batches: Sequence[dict[str, Any]],
    optimizer: torch.optim.Optimizer,
    scheduler: Any = None,
    progress: bool = True,
    desc: str = "train",
    start_step: int = 0,
    losses: Sequence[float] = (),
    on_step: Callable[[int, TrainResult], None] | None = None,
    loss_value: Callable[[torch.Tensor], float] | None = None,
) -> TrainResult:
    """One optimizer step per batch on ``model(**batch).loss``; stops at a non-finite loss.

    To resume, pass ``start_step`` (steps already taken: batches[:start_step] are skipped) and
    the ``losses`` of those steps, with model, optimizer, scheduler and RNG restored.
    ``on_step(steps_done, result)`` runs after every step (checkpoints). ``loss_value(loss)``
    turns the step's loss into the number recorded (default ``loss.item()``; data-parallel: the
    mean over the ranks, so every rank records and stops on the same value).
    """
    result = TrainResult(losses=list(losses))
    device = _device(model)
    model.train()
    start = time.perf_counter()
    bar = tqdm(
        batches[start_step:],
        desc=desc,
        unit="step",
        disable=not progress,
        initial=start_step,
        total=len(batches),
    )
    for step, batch in enumerate(bar, start=start_step):
        optimizer.zero_grad(set_to_none=True)
        loss = model(**move_to(batch, device)).loss
        value = loss.item() if loss_value is None else loss_value(loss)
        if not math.isfinite(value):
            result.diverged_at = step
            break
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        result.losses.append(value)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{value:.4f}")
        if on_step is not None:
            on_step(step + 1, result)
    optimizer.zero_grad(set_to_none=True)
    result.seconds = time.perf_counter() - start
    return result


def _greedy_hits(logits: torch.Tensor, labels: torch.Tensor) -> list[bool]:
    """Per row of causal-LM ``logits`` (B, T, V) and answer-only ``labels`` (B, T): whether
    every labelled position's argmax, given the reference prefix, is its label."""
    labels = labels[:, 1:]
    hit = (logits[:, :-1].argmax(-1) == labels) | (labels == -100)
    return hit.all(dim=1).tolist()


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Sequence[dict[str, Any]], matches: list[bool] | None = None
) -> dict[str, float]:
    """Mean loss and, for classifiers (1-D labels), accuracy over ``batches``. For causal-LM
    batches with answer-only labels, a list passed as ``matches`` is extended, per example,
    with ``greedy_matches``'s verdict, read from the same forward."""
    device = _device(model)
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    try:
        for batch in batches:
            batch = move_to(batch, device)
            out = model(**batch)
            n = batch["labels"].shape[0]
            total_loss += out.loss.item() * n
            if batch["labels"].ndim == 1:
                correct += (out.logits.argmax(-1) == batch["labels"]).sum().item()
            elif matches is not None:
                matches += _greedy_hits(out.logits, batch["labels"])
            count += n
    finally:
        model.train(was_training)
    metrics = {"loss": total_loss / count}
    if batches[0]["labels"].ndim == 1:
        metrics["accuracy"] = correct / count
    return metrics


def greedy_matches(model: nn.Module, batches: Sequence[dict[str, Any]]) -> list[bool]:
    """Per example of causal-LM ``batches`` (answer-only labels): whether greedy decoding from
    its prompt writes exactly its labelled answer and EOS. One teacher-forced forward: greedy
    decoding follows the reference as long as each next token's argmax, given the reference
    prefix, is the reference token, so it writes the reference iff every labelled position's
    argmax is its label (up to floating-point ties between the two computations)."""
    out: list[bool] = []
    evaluate(model, batches, matches=out)
    return out


@torch.no_grad()
def exact_match(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    answers: Sequence[str],
    final: Callable[[str], int | None],
    batch_size: int = 32,
    max_new_tokens: int = 40,
    known: Sequence[bool] | None = None,
) -> float:
    """Share of ``prompts`` whose greedy continuation (up to ``max_new_tokens`` or EOS) has the
    final answer of the reference answer: ``final(text)`` extracts it (None counts as wrong).
    ``known[i]`` True (``greedy_matches``: greedy decoding writes the reference itself) counts
    example i right without generating it."""
    done = [bool(k) for k in known] if known is not None else [False] * len(prompts)
    rest = [i for i, k in enumerate(done) if not k]
    prompts, answers = [prompts[i] for i in rest], [answers[i] for i in rest]
    correct = len(done) - len(rest)
    device = _device(model)
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # generation continues every row from its last token
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(
                list(prompts[start : start + batch_size]),
                return_tensors="pt",
                padding=True,
                add_special_tokens=False,
            )
            enc = move_to(dict(enc), device)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :])
            for text, answer in zip(texts, answers[start : start + batch_size], strict=True):
                got = final(text.split(tokenizer.eos_token, 1)[0])
                correct += got is not None and got == final(answer)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return correct / len(done)


def smooth(values: Sequence[float], window: int = 20) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def first_step_at_or_below(curve: Sequence[float], target: float) -> int | None:
    """1-based step at which ``curve`` first reaches ``target`` or below; None if never."""
    return next((i + 1 for i, v in enumerate(curve) if v <= target), None)
