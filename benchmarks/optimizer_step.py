"""Cost of a whole training step (forward, backward, optimizer step) per optimizer, each case in a
fresh process, on two models:
  minilm  real MiniLM (6 layers, hidden 384), LoRA r=8 on 36 weights, batch 32 x 64 tokens
  wide    a random Llama with hidden 1024 (2 layers, 14 LoRA weights, r=16), batch 2 x 32 tokens:
          the forward/backward is cheap, so the optimizer's own cost shows
Optimizers: adamw (torch.optim.AdamW on the trainable parameters, plain LoRA), preconditioned
(gradlora.create_preconditioned_optimizer), lora_pro (create_lora_pro_optimizer, efficient) and
lora_pro_full (mode="full"). Reported: median ms per whole step and per optimizer.step() over
the timed steps, the optimizer state's bytes, and the process's RSS peak during training.

    python benchmarks/optimizer_step.py [--steps 10] [--models minilm,wide] [--threads 2]
writes benchmarks/results/optimizer_step.json and optimizer_step.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

OPTIMIZERS = ["adamw", "preconditioned", "lora_pro", "lora_pro_full"]
RESULTS = Path(__file__).parent / "results"


def build(model_name: str):
    import torch

    if model_name == "minilm":
        from gradlora.cli.data import load_minilm_lora, load_rotten_tomatoes, make_batches

        model, tok = load_minilm_lora()
        train, _ = load_rotten_tomatoes()
        return model, make_batches(tok, train, 32, 64, 4)
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=2,
        num_attention_heads=16,
        num_key_value_heads=16,
    )
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=16, target_modules=targets))
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(4):
        ids = torch.randint(0, 512, (2, 32), generator=gen)
        batches.append({"input_ids": ids, "labels": ids})
    return model, batches


def make_optimizer(name: str, model):
    import torch

    import gradlora

    if name == "adamw":
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    if name == "preconditioned":
        return gradlora.create_preconditioned_optimizer(model, lr=1e-4)
    mode = "full" if name == "lora_pro_full" else "efficient"
    return gradlora.create_lora_pro_optimizer(model, lr=1e-4, mode=mode)


def run_case(model_name: str, opt_name: str, steps: int) -> dict:
    import torch

    from gradlora.meter import measure

    model, batches = build(model_name)
    opt = make_optimizer(opt_name, model)
    model.train()
    step_ms, opt_ms = [], []
    with measure(torch.device("cpu")) as cost:
        for i in range(steps + 3):  # 3 warm-up steps, not timed
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            model(**batches[i % len(batches)]).loss.backward()
            mid = time.perf_counter()
            opt.step()
            end = time.perf_counter()
            if i >= 3:
                step_ms.append((end - start) * 1000)
                opt_ms.append((end - mid) * 1000)
    state_bytes = sum(
        t.numel() * t.element_size()
        for s in opt.state.values()
        for t in s.values()
        if isinstance(t, torch.Tensor)
    )
    lora_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return {
        "model": model_name,
        "optimizer": opt_name,
        "step_ms": statistics.median(step_ms),
        "optimizer_ms": statistics.median(opt_ms),
        "state_mib": state_bytes / 2**20,
        "trainable_mib": lora_bytes / 2**20,
        "rss_peak_mib": cost.peak_bytes / 2**20,
        "threads": torch.get_num_threads(),
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| model | optimizer | step ms | vs adamw | optimizer.step ms | share of step | "
        "optimizer state MiB | RSS peak MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = {r["model"]: r for r in rows if r["optimizer"] == "adamw"}
    for r in rows:
        b = base.get(r["model"])
        ratio = f"{r['step_ms'] / b['step_ms']:.2f}x" if b else ""
        lines.append(
            f"| {r['model']} | {r['optimizer']} | {r['step_ms']:.1f} | {ratio} | "
            f"{r['optimizer_ms']:.2f} | {r['optimizer_ms'] / r['step_ms']:.0%} | "
            f"{r['state_mib']:.1f} | {r['rss_peak_mib']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case")
    parser.add_argument("--models", default="minilm,wide")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # model:optimizer, run in this process
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.case:
        model_name, opt_name = args.case.split(":")
        print(json.dumps(run_case(model_name, opt_name, args.steps)))
        return
    rows = []
    for model_name in args.models.split(","):
        for opt_name in args.optimizers.split(","):
            cmd = [sys.executable, __file__, "--case", f"{model_name}:{opt_name}"]
            cmd += ["--steps", str(args.steps), "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(f"{model_name} {opt_name}: {rows[-1]['step_ms']:.1f} ms/step", flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "optimizer_step.json").write_text(json.dumps(rows, indent=2) + "\n")
    (RESULTS / "optimizer_step.md").write_text(table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
