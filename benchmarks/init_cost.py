"""Cost of the gradient init on the real MiniLM: time and peak memory, each case in a fresh process.

Cases (N batches of B examples, max length 64, Rotten Tomatoes, MiniLM with LoRA r=8 on
query/key/value/intermediate.dense/output.dense):
  lora_passes     N plain forward+backward passes of the LoRA model (the floor)
  full_passes     N forward+backward passes with every weight trainable (grads held)
  gradlora_ga     gradlora.initialize(method="lora-ga"): capture, then SVD
  gradlora_one    gradlora.initialize(method="lora-one")
  peft_loraga     peft 0.21's preprocess_loraga + get_peft_model(init_lora_weights="lora_ga")

Memory is the process's RSS high-water mark (reset before the case starts) minus the RSS
when it started, on CPU; CUDA's max_memory_allocated on a GPU.

    python benchmarks/init_cost.py [--batches 8] [--batch-size 32] [--repeats 3] [--device cpu]
writes benchmarks/results/init_cost.json and prints a Markdown table.
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

CASES = ["lora_passes", "full_passes", "gradlora_ga", "gradlora_one", "peft_loraga"]
RESULTS = Path(__file__).parent / "results"


def run_case(case: str, batches_n: int, batch_size: int, device: str) -> dict:
    import torch
    from peft import get_peft_model

    import gradlora
    from gradlora.bundled import (
        load_minilm_classifier,
        load_rotten_tomatoes,
        make_batches,
        minilm_lora_config,
    )
    from gradlora.capture import move_to
    from gradlora.meter import measure

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    dev = torch.device(device)
    model, tok = load_minilm_classifier()
    model.to(dev)
    train, _ = load_rotten_tomatoes()
    batches = [move_to(b, dev) for b in make_batches(tok, train, batch_size, 64, batches_n)]
    out = {"case": case}

    if case == "peft_loraga":
        from peft import LoraGAConfig
        from peft.tuners.lora.loraga import preprocess_loraga

        config = minilm_lora_config(init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())

        def train_step():
            for b in batches:
                model(**b).loss.backward()

        with measure(dev) as cost:
            preprocess_loraga(model, config, train_step)
            t_mid = time.perf_counter()
            get_peft_model(model, config)
        out.update(seconds=cost.seconds, svd_seconds=time.perf_counter() - t_mid)
    else:
        model = get_peft_model(model, minilm_lora_config())
        if case in ("lora_passes", "full_passes"):
            if case == "full_passes":
                for p in model.parameters():
                    p.requires_grad_(True)
            model.train()
            with measure(dev) as cost:
                for b in batches:
                    model(**b).loss.backward()
            out.update(seconds=cost.seconds)
        else:
            method = "lora-ga" if case == "gradlora_ga" else "lora-one"
            with measure(dev) as cost:
                rep = gradlora.initialize(
                    model, batches, method=method, num_batches=batches_n, progress=False
                )
            out.update(
                seconds=cost.seconds,
                capture_seconds=rep.capture.seconds,
                svd_seconds=rep.svd.seconds,
                capture_increase_bytes=rep.capture.increase_bytes,
            )
    out.update(peak_bytes=cost.peak_bytes, increase_bytes=cost.increase_bytes, metric=cost.metric)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS / "init_cost.json"))
    args = parser.parse_args()
    if args.case:  # child process: one measurement, one JSON line
        print(json.dumps(run_case(args.case, args.batches, args.batch_size, args.device)))
        return

    rows = {case: [] for case in CASES}
    for rep in range(args.repeats):
        for case in CASES:
            cmd = [
                sys.executable,
                __file__,
                "--case",
                case,
                "--batches",
                str(args.batches),
                "--batch-size",
                str(args.batch_size),
                "--device",
                args.device,
            ]
            line = (
                subprocess.run(cmd, check=True, capture_output=True, text=True)
                .stdout.strip()
                .splitlines()[-1]
            )
            rows[case].append(json.loads(line))
            print(
                f"repeat {rep + 1}/{args.repeats} {case}: {rows[case][-1]['seconds']:.2f} s",
                file=sys.stderr,
            )

    def med(case, key):
        vals = [r[key] for r in rows[case] if key in r]
        return statistics.median(vals) if vals else None

    summary = {
        case: {
            k: med(case, k)
            for k in ("seconds", "capture_seconds", "svd_seconds", "increase_bytes", "peak_bytes")
        }
        for case in CASES
    }
    floor = summary["lora_passes"]
    lines = [
        f"MiniLM (6 layers), {args.batches} batches x {args.batch_size}, max length 64, {args.device}, "
        f"median of {args.repeats} fresh processes",
        "",
        "| case | total s | capture s | SVD s | x floor time | memory increase MiB | x floor memory |",
        "|---|---|---|---|---|---|---|",
    ]
    for case, s in summary.items():
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        lines.append(
            f"| {case} | {fmt(s['seconds'])} | {fmt(s['capture_seconds'])} | {fmt(s['svd_seconds'])} | "
            f"{s['seconds'] / floor['seconds']:.2f} | {s['increase_bytes'] / 2**20:.0f} | "
            f"{s['increase_bytes'] / max(floor['increase_bytes'], 1):.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    payload = {"args": vars(args), "summary": summary, "runs": rows, "table": table}
    Path(args.out).write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
