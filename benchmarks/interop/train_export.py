"""Interoperability benchmark, part 1 of 3 (the main environment): fine-tune, export, record.

For each run of RUNS, SmolLM2-135M (the bundled offline model, fp32) is fine-tuned on the
built-in arithmetic task for ``--steps`` steps (LoRA-GA, LoRA-One with its preconditioned
AdamW, LoRA-Pro; r = 8 and 12, with and without rsLoRA, one run with a rank_pattern), then
written three ways into OUT/<run>/:

- ``export-vllm``: ``gradlora.export_adapter`` (scale 1, ranks padded: what vLLM reads right);
- ``portable``: ``gradlora.save_adapter`` (plain peft's format: what export changes);
- ``merged``: ``gradlora.export_merged`` in float32, with the tokenizer.

It records in OUT/manifest.json the base model's folder, the prompt token ids (the first 16
test problems), peft's greedy generations (32 tokens, EOS not stopping) of the base model and of
every trained model, and each adapter's rank with vLLM's ``max_lora_rank`` for it. Part 2
(``serve_vllm.py``, the vLLM environment) generates with vLLM; part 3 (``compare.py``) compares.

Usage: python benchmarks/interop/train_export.py --out runs/interop [--steps 30] [--only a,b]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

import gradlora
from gradlora.atomic import write_json
from gradlora.cli.tasks import load_task

PROMPTS, NEW_TOKENS = 16, 32
BATCH, MAX_LENGTH, ALPHA, INIT_BATCHES = 8, 128, 16.0, 4
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM accepts
# name: init (None: peft's), optimizer (gradlora.create_optimizer), learning rate, LoraConfig
RUNS = {
    "lora-ga-r8": ("lora-ga", "adamw", 2e-4, dict(r=8)),
    "lora-ga-r12-rslora": ("lora-ga", "adamw", 2e-4, dict(r=12, use_rslora=True)),
    "lora-ga-r8-rank-pattern": (
        "lora-ga",
        "adamw",
        2e-4,
        dict(r=8, rank_pattern={"down_proj": 4, "q_proj": 12}),
    ),
    "lora-one-r8-rslora": ("lora-one", "preconditioned", 2e-3, dict(r=8, use_rslora=True)),
    "lora-one-r12": ("lora-one", "preconditioned", 2e-3, dict(r=12)),
    "lora-pro-r8": (None, "lora-pro", 2e-3, dict(r=8)),
    "lora-pro-r12-rslora": (None, "lora-pro", 2e-3, dict(r=12, use_rslora=True)),
}


def max_lora_rank(rank: int) -> int:
    """The smallest value vLLM accepts for ``max_lora_rank`` that holds ``rank``."""
    return next(v for v in MAX_LORA_RANKS if v >= rank)


def adapter_rank(folder: Path) -> int:
    """The largest rank of any module in the adapter file (its lora_A rows)."""
    weights = load_file(str(folder / "adapter_model.safetensors"))
    return max(w.shape[0] for k, w in weights.items() if "lora_A" in k)


@torch.no_grad()
def greedy(model, prompts: list[list[int]], n: int = NEW_TOKENS) -> list[list[int]]:
    """``n`` greedy tokens after each prompt (one at a time, with the KV cache; EOS does not
    stop it, as vLLM with ignore_eos=True)."""
    model.eval()
    out = []
    for ids in prompts:
        step = model(input_ids=torch.tensor([ids]), use_cache=True)
        tokens = []
        for _ in range(n):
            token = int(step.logits[0, -1].argmax())
            tokens.append(token)
            step = model(
                input_ids=torch.tensor([[token]]),
                past_key_values=step.past_key_values,
                use_cache=True,
            )
        out.append(tokens)
    return out


def train_one(task, name: str, steps: int, out: Path, prompts) -> dict:
    """Fine-tune one run, write its three folders; its manifest entry."""
    init, optimizer, lr, lora = RUNS[name]
    start = time.perf_counter()
    base = task.load_base(seed=0)
    torch.manual_seed(1)
    config = LoraConfig(
        lora_alpha=ALPHA,
        lora_dropout=0.0,
        target_modules=task.targets,
        task_type="CAUSAL_LM",
        **lora,
    )
    model = get_peft_model(base, config)
    batches = task.batches("train", BATCH, MAX_LENGTH, steps, seed=0)
    if init is not None:
        gradlora.initialize(model, batches, method=init, num_batches=INIT_BATCHES, progress=False)
    opt = gradlora.create_optimizer(model, optimizer, lr=lr)
    model.train()
    losses = []
    for batch in batches:
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    folder = out / name
    gradlora.export_adapter(model, folder / "export-vllm", overwrite=True)
    gradlora.save_adapter(model, folder / "portable")
    gradlora.export_merged(
        model, folder / "merged", dtype=torch.float32, tokenizer=task.tokenizer, overwrite=True
    )
    ranks = {v: adapter_rank(folder / v) for v in ("export-vllm", "portable")}
    entry = {
        "init": init,
        "optimizer": optimizer,
        "lr": lr,
        "lora": lora,
        "steps": steps,
        "losses": losses,
        "export": str(folder / "export-vllm"),
        "portable": str(folder / "portable"),
        "merged": str(folder / "merged"),
        "rank": ranks,
        "max_lora_rank": {v: max_lora_rank(r) for v, r in ranks.items()},
        "peft_tokens": greedy(model, prompts),
        "seconds": time.perf_counter() - start,
    }
    print(f"{name}: loss {losses[0]:.3f} -> {losses[-1]:.3f}, {entry['seconds']:.0f} s")
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/interop")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--only", default=None, help="comma-separated run names")
    args = parser.parse_args(argv)
    names = list(RUNS) if args.only is None else args.only.split(",")
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown runs {unknown}; choose from {', '.join(RUNS)}")
    out = Path(args.out)
    task = load_task("smollm2", "arithmetic", max_length=MAX_LENGTH)
    texts = task.splits["test"].texts[:PROMPTS]
    prompts = [task.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {"runs": {}}
    manifest |= {
        "base": task.model_path,
        "prompts": prompts,
        "prompt_texts": texts,
        "new_tokens": NEW_TOKENS,
        "base_tokens": greedy(task.load_base(seed=0), prompts),
    }
    for name in names:
        manifest["runs"][name] = train_one(task, name, args.steps, out, prompts)
        write_json(manifest_path, manifest)  # after every run: an interruption keeps the rest
    print(f"wrote {manifest_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
