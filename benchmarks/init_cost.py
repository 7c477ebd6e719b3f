"""Cost of the gradient init: time and peak memory, each case in a fresh process; sketch quality.

Models (LoRA r=8, alpha=16, no dropout):
  minilm  the real all-MiniLM-L6-v2 classifier, Rotten Tomatoes batches of B, max length 64,
          targets query/key/value/intermediate.dense/output.dense
  llama   a synthetic wide Llama from LlamaConfig (hidden 1024, intermediate 2816, 16 heads,
          --llama-layers layers, vocab 2048, random weights), random token batches of B x
          --llama-seq, causal LM loss, all 7 projections targeted
  smollm2-nf4  the real SmolLM2-135M loaded in 4-bit nf4 with bitsandbytes (QLoRA, fp32
          compute on CPU), Hamlet chunks of --llama-seq tokens in batches of --llama-batch, all
          7 projections targeted; LoRA-GA carries its offset in the adapter (offset="auto")

Cases (N = --batches batches):
  lora_passes     N plain forward+backward passes of the LoRA model (the floor)
  lora_step       one plain LoRA training step on the first batch (forward, backward, AdamW)
  gradlora_exact  gradlora.initialize(method="lora-ga", gradient="exact")
  gradlora_sketch gradlora.initialize(method="lora-ga", gradient="sketch") at its defaults
  (sketch_memory="auto": the sketch buffers capped at a training step's activations)
  peft_loraga     peft 0.21's preprocess_loraga + get_peft_model(init_lora_weights="lora_ga")
  (full_passes, gradlora_one, gradlora_sketch_adapter (the sketch init with offset="adapter",
  which never rewrites a base weight), gradlora_sketch_memory (the sketch init with
  sketch_memory = --sketch-memory-mib MiB: layers sketched in groups): with --cases)

Memory: ``peak`` is the process's RSS high-water mark during the case (reset at its start) on
CPU, CUDA's max_memory_allocated on a GPU; ``increase`` is peak minus what was in use when
the case started (the model and batches are loaded before).

Quality (--quality, MiniLM only, one process): G exact per layer from the N batches, then for
each number of sketch passes the fraction of G's top-2r spectral energy that the sketch's
subspaces capture, E = ||U^T G V||_F^2 / sum_{i<=2r} sigma_i(G)^2 (``spectral.captured_energy``,
``both``; 1 = the exact top-2r subspaces), min and median over layers; also the one-sided
||U^T G||_F^2 / sum sigma_i^2.

    python benchmarks/init_cost.py [--models minilm llama] [--batches 8] [--repeats 3] [--quick]
writes benchmarks/results/init_cost.json and init_cost.md (Markdown tables).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from _wide_llama import TARGETS, random_batches, wide_llama  # noqa: E402

CASES = ["lora_passes", "lora_step", "gradlora_exact", "gradlora_sketch", "peft_loraga"]
EXTRA_CASES = ["full_passes", "gradlora_one", "gradlora_sketch_adapter", "gradlora_sketch_memory"]
RESULTS = Path(__file__).parent / "results"


def build(model_name: str, args, device):
    """(base model, LoraConfig factory, batches) on ``device``; same weights and data every call."""
    from peft import LoraConfig

    from gradlora.init.capture import move_to

    if model_name == "minilm":
        from gradlora.cli.data import (
            load_minilm_classifier,
            load_rotten_tomatoes,
            make_batches,
            minilm_lora_config,
        )

        model, tok = load_minilm_classifier()
        train, _ = load_rotten_tomatoes()
        batches = make_batches(tok, train, args.batch_size, 64, args.batches)
        config = minilm_lora_config
    elif model_name == "smollm2-nf4":
        from gradlora.cli.data import load_pretrained, make_batches, smollm2_path
        from gradlora.cli.tasks import load_task

        task = load_task("smollm2", "hamlet", max_length=args.llama_seq)
        model = load_pretrained(smollm2_path(), False, quantize="nf4", device=device)
        batches = make_batches(
            task.tokenizer, task.splits["train"], args.llama_batch, args.llama_seq, args.batches
        )

        def config(**overrides):
            kw = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
            return LoraConfig(task_type="CAUSAL_LM", **(kw | overrides))

        return model, config, [move_to(b, device) for b in batches]
    else:
        model = wide_llama(args.llama_layers, max_positions=max(512, args.llama_seq))
        batches = random_batches(args.batches, args.llama_batch, args.llama_seq)

        def config(**overrides):
            kw = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
            return LoraConfig(task_type="CAUSAL_LM", **(kw | overrides))

    return model.to(device), config, [move_to(b, device) for b in batches]


def run_case(model_name: str, case: str, args) -> dict:
    import torch
    from peft import get_peft_model

    import gradlora
    from gradlora.meter import measure

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    dev = torch.device(args.device)
    model, make_config, batches = build(model_name, args, dev)
    out = {"model": model_name, "case": case}

    if case == "peft_loraga":
        from peft import LoraGAConfig
        from peft.tuners.lora.loraga import preprocess_loraga

        config = make_config(init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())

        def train_step():
            for b in batches:
                model(**b).loss.backward()

        with measure(dev) as cost:
            preprocess_loraga(model, config, train_step)
            get_peft_model(model, config)
    else:
        torch.manual_seed(1)
        model = get_peft_model(model, make_config())
        model.train()
        if case in ("lora_passes", "full_passes"):
            if case == "full_passes":
                for p in model.parameters():
                    p.requires_grad_(True)
            with measure(dev) as cost:
                for b in batches:
                    model(**b).loss.backward()
        elif case == "lora_step":
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            with measure(dev) as cost:
                model(**batches[0]).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        else:
            method = "lora-one" if case == "gradlora_one" else "lora-ga"
            gradient = "sketch" if case.startswith("gradlora_sketch") else "exact"
            offset = "adapter" if case.endswith("_adapter") else "auto"
            memory = args.sketch_memory_mib * 2**20 if case.endswith("_memory") else "auto"
            with measure(dev) as cost:
                rep = gradlora.initialize(
                    model,
                    batches,
                    method=method,
                    num_batches=len(batches),
                    progress=False,
                    gradient=gradient,
                    offset=offset,
                    sketch_memory=memory,
                )
            out.update(
                capture_seconds=rep.capture.seconds,
                svd_seconds=rep.svd.seconds,
                gradient=rep.gradient,
                gradient_options=rep.gradient_options,
            )
    out.update(
        seconds=cost.seconds,
        peak_bytes=cost.peak_bytes,
        increase_bytes=cost.increase_bytes,
        metric=cost.metric,
    )
    return out


def run_quality(args, passes_list=(1, 2, 3)) -> dict:
    """Captured top-2r energy of the sketch on real MiniLM gradients (see the module docstring)."""
    import torch
    from peft import get_peft_model

    import gradlora
    from gradlora.init.formulas import captured_energy
    from gradlora.init.sketch import sketch_svds
    from gradlora.peft_view import supported_layers

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    dev = torch.device(args.device)
    base, make_config, batches = build("minilm", args, dev)
    torch.manual_seed(1)
    model = get_peft_model(base, make_config())
    G = gradlora.estimate_gradients(model, batches, num_batches=len(batches), progress=False)
    targets = supported_layers(model)[0]
    ranks = {t.name: 2 * t.rank for t in targets}
    out = {}
    for passes in passes_list:
        sketches, _ = sketch_svds(
            model, targets, batches, ranks, num_batches=len(batches), progress=False, passes=passes
        )
        left, both = [], []
        for t in targets:
            U, _, V = sketches[t.name].svd()
            e_left, e_both = captured_energy(G[t.name], U, V)
            left.append(e_left)
            both.append(e_both)
        out[str(passes)] = {
            "min": min(both),
            "median": statistics.median(both),
            "left_min": min(left),
            "left_median": statistics.median(left),
            "layers": len(both),
        }
        print(f"quality passes={passes}: {out[str(passes)]}", file=sys.stderr)
    return out


def _child(model: str, case: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", model, case] + args.forward
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{model}/{case} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _table(model: str, summary: dict, args) -> list[str]:
    mib = 2**20
    floor, step = summary.get("lora_passes"), summary.get("lora_step")
    lines = [
        f"**{model}**: {args.batches} batches, {args.device}, median of {args.repeats} fresh "
        f"process(es){' (--quick: preliminary)' if args.quick else ''}",
        "",
        "| case | total s | capture s | SVD s | x floor time | peak MiB | x LoRA-step peak "
        "| increase MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def fmt(v, spec=".2f"):
        return "-" if v is None else format(v, spec)

    for case, s in summary.items():
        time_ratio = s["seconds"] / floor["seconds"] if floor else None
        mem_ratio = s["peak_bytes"] / step["peak_bytes"] if step else None
        lines.append(
            f"| {case} | {fmt(s['seconds'])} | {fmt(s.get('capture_seconds'))} | "
            f"{fmt(s.get('svd_seconds'))} | {fmt(time_ratio)} | {s['peak_bytes'] / mib:.0f} | "
            f"{fmt(mem_ratio)} | {s['increase_bytes'] / mib:.0f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["minilm", "llama"])
    parser.add_argument("--cases", nargs="+", default=CASES, choices=CASES + EXTRA_CASES)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32, help="MiniLM batch size")
    parser.add_argument("--llama-layers", type=int, default=8)
    parser.add_argument("--llama-batch", type=int, default=4)
    parser.add_argument("--llama-seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sketch-memory-mib", type=int, default=32)
    parser.add_argument("--no-quality", dest="quality", action="store_false")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one repeat, MiniLM batch 8, a 2-layer Llama at batch 1 x 128: checks the script, "
        "rough numbers only",
    )
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--quality-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS / "init_cost.json"))
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.batch_size = 1, 8
        args.llama_layers, args.llama_batch, args.llama_seq = 2, 1, 128
    if args.child:  # child process: one measurement, one JSON line
        print(json.dumps(run_case(*args.child, args)))
        return
    if args.quality_only:
        print(json.dumps(run_quality(args)))
        return
    args.forward = [
        f"--{k.replace('_', '-')}={getattr(args, k)}"
        for k in (
            "batches",
            "batch_size",
            "llama_layers",
            "llama_batch",
            "llama_seq",
            "device",
            "sketch_memory_mib",
        )
    ]

    runs = {m: {c: [] for c in args.cases} for m in args.models}
    for rep in range(args.repeats):
        for model in args.models:
            for case in args.cases:
                row = _child(model, case, args)
                runs[model][case].append(row)
                print(
                    f"repeat {rep + 1}/{args.repeats} {model} {case}: {row['seconds']:.2f} s, "
                    f"peak {row['peak_bytes'] / 2**20:.0f} MiB",
                    file=sys.stderr,
                )

    def med(rows, key):
        vals = [r[key] for r in rows if key in r]
        return statistics.median(vals) if vals else None

    keys = ("seconds", "capture_seconds", "svd_seconds", "increase_bytes", "peak_bytes")
    summary = {
        m: {c: {k: med(rows, k) for k in keys} for c, rows in cases.items()}
        for m, cases in runs.items()
    }
    lines = []
    for model in args.models:
        lines += _table(model, summary[model], args) + [""]
    quality = None
    if args.quality and "minilm" in args.models:
        cmd = [sys.executable, __file__, "--quality-only"] + args.forward
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        quality = json.loads(done.stdout.strip().splitlines()[-1])
        lines += [
            "**sketch quality** (MiniLM, real gradients): captured top-2r energy "
            "||U^T G V||^2 / sum_{i<=2r} sigma_i^2 (one-sided ||U^T G||^2 in brackets)",
            "",
            "| sketch passes | min | median |",
            "|---|---|---|",
        ]
        for passes, q in quality.items():
            lines.append(
                f"| {passes} | {q['min']:.4f} ({q['left_min']:.4f}) | "
                f"{q['median']:.4f} ({q['left_median']:.4f}) |"
            )
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "args": {k: v for k, v in vars(args).items() if k not in ("child", "forward")},
        "summary": summary,
        "quality": quality,
        "runs": runs,
        "table": table,
    }
    out.write_text(json.dumps(payload, indent=1))
    out.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
