"""What LoRA-GA's offset="adapter" costs per step against offset="weight".

offset="weight" rewrites W' = W - s B0 A0; offset="adapter" keeps W and subtracts s B0 A0 x in
the LoRA layer, one extra rank-r product per layer and forward. Model: the synthetic wide
Llama of init_cost.py (hidden 1024, intermediate 2816, --layers layers, vocab 2048), LoRA r=8
on all 7 projections, random token batches of --batch x --seq. After a LoRA-GA init (exact
gradient, 2 batches) in each mode, the script times forward-only (no grad) and
forward+backward passes, alternating the two models, median of --reps.

    python benchmarks/offset_cost.py [--layers 4] [--batch 2] [--seq 64] [--reps 20]
writes benchmarks/results/offset_cost.json and offset_cost.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from _wide_llama import TARGETS, random_batches, wide_llama  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402

import gradlora  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def build(args, mode: str, batches):
    model = get_peft_model(
        wide_llama(args.layers, seed=1),
        LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS),
    )
    gradlora.initialize(model, batches[:2], num_batches=2, offset=mode, progress=False)
    return model.train()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default=str(RESULTS / "offset_cost.json"))
    args = parser.parse_args()
    batches = random_batches(2, args.batch, args.seq, seed=2)
    models = {mode: build(args, mode, batches) for mode in ("weight", "adapter")}
    batch = batches[0]

    def forward(model):
        with torch.no_grad():
            model(**batch)

    def step(model):
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)

    times: dict[str, dict[str, list[float]]] = {m: {"forward": [], "fwd+bwd": []} for m in models}
    for _ in range(3):  # warm-up
        for model in models.values():
            forward(model)
            step(model)
    for _ in range(args.reps):
        for mode, model in models.items():
            times[mode]["forward"].append(timed(lambda m=model: forward(m)))
            times[mode]["fwd+bwd"].append(timed(lambda m=model: step(m)))
    med = {m: {k: statistics.median(v) * 1e3 for k, v in t.items()} for m, t in times.items()}
    result = {
        "config": vars(args),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "median_ms": med,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    lines = [
        f"Wide Llama, {args.layers} layers, batch {args.batch} x {args.seq}, LoRA r=8 on 7 "
        f"projections, CPU, {torch.get_num_threads()} threads, median of {args.reps}:",
        "",
        "| pass | offset=weight ms | offset=adapter ms | adapter / weight |",
        "|---|---|---|---|",
    ]
    for kind in ("forward", "fwd+bwd"):
        w, a = med["weight"][kind], med["adapter"][kind]
        lines.append(f"| {kind} | {w:.1f} | {a:.1f} | {a / w:.3f} |")
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
