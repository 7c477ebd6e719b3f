"""The learning-rate guard (gradlora/rates.py): one WARNING at LoRA's rate for a LoRA-GA init
with gamma 16, silence at its own rate and for the inits whose windows overlap LoRA's; its
numbers are the committed benchmark windows."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from conftest import make_batches, tiny_peft
from test_integrations_transformers import args, rows
from transformers import Trainer

import gradlora
from gradlora.rates import LORA_GA_WINDOWS

WINDOWS = Path(__file__).resolve().parents[1] / "benchmarks/results/lr_windows.json"


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "above every rate" in r.getMessage()]


def initialized(method="lora-ga", **options):
    model, _ = tiny_peft("llama", r=2)
    gradlora.initialize(model, make_batches("llama", n=1), method=method, progress=False, **options)
    return model


def test_the_windows_are_the_committed_benchmark_numbers():
    measured = json.loads(WINDOWS.read_text())
    for task, (low, high, best, lora) in LORA_GA_WINDOWS.items():
        window = measured[task]["windows"]
        assert (window["lora-ga"]["low"], window["lora-ga"]["high"]) == (low, high)
        assert (window["lora-ga"]["best_lr"], window["lora"]["best_lr"]) == (best, lora)


def test_create_optimizer_warns_at_loras_rate_for_lora_ga_gamma_16(caplog):
    model = initialized()
    with caplog.at_level(logging.WARNING, logger="gradlora"):
        gradlora.create_optimizer(model, "adamw", lr=2e-3)  # LoRA's best rate on two tasks
    (message,) = warnings_of(caplog)
    assert "lr=0.002" in message and "0.10-0.25x" in message and "lr_windows" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gradlora"):
        gradlora.create_optimizer(model, "adamw", lr=5e-4)  # LoRA-GA's own best rate
    assert warnings_of(caplog) == []


@pytest.mark.parametrize("method,options", [("lora-one", {}), ("lora-ga", {"scale": "matched"})])
def test_silent_for_inits_whose_windows_overlap_loras(caplog, method, options):
    model = initialized(method, **options)
    with caplog.at_level(logging.WARNING, logger="gradlora"):
        gradlora.create_optimizer(model, "adamw", lr=2e-3)
    assert warnings_of(caplog) == []


@pytest.mark.parametrize("lr,fires", [(2e-3, True), (5e-4, False)])
def test_callback_warns_at_the_trainers_rate(tmp_path, caplog, lr, fires):
    model, _ = tiny_peft("llama", r=2)
    callback = gradlora.GradLoraCallback("lora-ga", num_batches=1, progress=False)
    trainer = Trainer(
        model=model,
        args=args(tmp_path, max_steps=1, learning_rate=lr),
        train_dataset=rows("llama", n=1),
        callbacks=[callback],
    )
    with caplog.at_level(logging.WARNING, logger="gradlora"):
        trainer.train()
    assert len(warnings_of(caplog)) == (1 if fires else 0)
