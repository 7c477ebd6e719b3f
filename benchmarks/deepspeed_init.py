"""Cost of the LoRA-GA sketch init under DeepSpeed ZeRO-3 on 2 CPU ranks (gloo), against one
ZeRO-3 training step and against the same init under FSDP2.

Model and data: fsdp_init.py's (the wide random Llama of _wide_llama.py, hidden 1024,
intermediate 2816, 4 layers, LoRA r=8 on all 7 projections; 8 batches of 2 x 64 split across
the ranks). Cases, each in fresh processes under ``torch.distributed.run``, 1 thread per rank:
  zero3_init_sketch  deepspeed.initialize (ZeRO-3, stage3_param_persistence_threshold 0, torch
                     AdamW), then gradlora.initialize(engine, method="lora-ga",
                     gradient="sketch") on this rank's 4 batches
  zero3_init_1_batch the same on 1 batch per rank (one forward and backward, like a step)
  zero3_step         the same engine: one training step (forward, engine.backward, engine.step)
                     on one batch, after one unmeasured step: the memory reference. The first
                     step records ZeRO-3's prefetch trace and releases every parameter after
                     use; later steps (and passes) keep parameters gathered within
                     stage3_max_reuse_distance, so the second step is the steady state
  zero3_4_steps      four such steps, one on each of the rank's 4 batches (as many forward and
                     backward passes as the init makes): how the peak grows over passes
  fsdp2_init_sketch  the same init on the fully_shard-ed model (fsdp_init.py's build)
Per rank: seconds and the process's RSS high-water mark during the phase (``gradlora.meter``:
peak, and increase over the RSS at its start). The target: the ZeRO-3 sketch init's peak at
most 1.10 x the ZeRO-3 step's, on each rank: compared pass for pass (init on 1 batch against 1
step, init on 4 batches against 4 steps) and, as the target is worded, the 4-batch init against
1 step.

    python benchmarks/deepspeed_init.py
writes benchmarks/results/deepspeed_init.json and deepspeed_init.md (the load average with
them: on a shared machine the timings are indicative).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = Path(__file__).parent / "results"
CASES = (
    "zero3_init_1_batch",
    "zero3_step",
    "zero3_init_sketch",
    "zero3_4_steps",
    "fsdp2_init_sketch",
)
TARGET = 1.10
ROOT = Path(__file__).resolve().parents[1]


def zero3_engine():
    import deepspeed
    import torch
    import torch.distributed as dist
    from _wide_llama import TARGETS, random_batches, wide_llama
    from fsdp_init import BATCH, BATCHES, SEQ
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS
    )
    model = get_peft_model(wide_llama(4), config)
    params = [p for p in model.parameters() if p.requires_grad]
    ds = {
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": 1,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
    }
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    batches = random_batches(BATCHES, BATCH, SEQ)
    rank, world = dist.get_rank(), dist.get_world_size()
    share = BATCHES // world
    return engine, batches[rank * share : (rank + 1) * share]


def worker(case: str, out: Path) -> None:
    import time

    import torch
    import torch.distributed as dist

    import gradlora
    from gradlora.meter import measure

    if case.startswith("zero3"):
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    torch.set_num_threads(1)
    if case.startswith("zero3"):
        model, mine = zero3_engine()
    else:
        from fsdp_init import build

        model, mine = build()
    result = {"case": case, "rank": dist.get_rank(), "world": dist.get_world_size()}
    if case in ("zero3_step", "zero3_4_steps"):  # the unmeasured first step (module doc)
        model.backward(model(**mine[1]).loss)
        model.step()
    dist.barrier()
    start = time.perf_counter()
    with measure(torch.device("cpu")) as cost:
        if case in ("zero3_step", "zero3_4_steps"):
            for batch in mine[: 1 if case == "zero3_step" else 4]:
                model.backward(model(**batch).loss)
                model.step()
        else:
            report = gradlora.initialize(
                model, mine[:1] if case == "zero3_init_1_batch" else mine, method="lora-ga",
                num_batches=len(mine), progress=False,
                gradient="sketch",
            )  # fmt: skip
            result |= {"capture_s": report.capture.seconds, "svd_s": report.svd.seconds}
            result |= {"capture_peak_mib": report.capture.peak_bytes / 2**20}
            result |= {"svd_peak_mib": report.svd.peak_bytes / 2**20}
    result |= {
        "seconds": time.perf_counter() - start,
        "peak_mib": cost.peak_bytes / 2**20,
        "increase_mib": cost.increase_bytes / 2**20,
        "metric": cost.metric,
    }
    (out / f"{case}.rank{dist.get_rank()}.json").write_text(json.dumps(result))


def launch(case: str, out: Path) -> list[dict]:
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=f"{ROOT / 'src'}:{Path(__file__).parent}",
        TORCH_EXTENSIONS_DIR=str(ROOT / ".torch_extensions"),
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [__file__, "--worker", case, "--out", str(out)]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return [json.loads((out / f"{case}.rank{r}.json").read_text()) for r in range(2)]


def table(rows: list[dict]) -> str:
    lines = [
        "| case | rank | seconds | capture s | SVD s | peak MiB | increase MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [f"{r[k]:.2f}" if k in r else "-" for k in ("seconds", "capture_s", "svd_s")]
        lines.append(
            f"| {r['case']} | {r['rank']} | {' | '.join(cells)} | {r['peak_mib']:.0f} "
            f"| {r['increase_mib']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.out)
        return
    rows, load_before = [], os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            rows += launch(case, Path(tmp))
            print(table(rows[-2:]).splitlines()[-1], flush=True)
    peak = {(r["case"], r["rank"]): r["peak_mib"] for r in rows}
    pairs = {
        "init 1 batch / 1 step": ("zero3_init_1_batch", "zero3_step"),
        "init 4 batches / 4 steps": ("zero3_init_sketch", "zero3_4_steps"),
        "init 4 batches / 1 step": ("zero3_init_sketch", "zero3_step"),
    }
    ratios = {k: [peak[(a, r)] / peak[(b, r)] for r in (0, 1)] for k, (a, b) in pairs.items()}
    meta = {
        "cpus": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "model": "wide random Llama, hidden 1024, intermediate 2816, 4 layers, LoRA r=8 x 28",
        "data": "8 batches of 2 x 64, 4 per rank",
        "peak_ratios": ratios,
        "target": TARGET,
        "met": {k: all(x <= TARGET for x in v) for k, v in ratios.items()},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "deepspeed_init.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    verdict = "; ".join(
        f"{k}: rank 0 {v[0]:.2f}, rank 1 {v[1]:.2f} ({'met' if meta['met'][k] else 'NOT met'})"
        for k, v in ratios.items()
    )
    text = (
        "**DeepSpeed ZeRO-3 sketch init cost** (`python benchmarks/deepspeed_init.py`): "
        f"{meta['model']}; {meta['data']}; 2 gloo ranks on CPU, 1 thread each, {meta['cpus']} "
        f"CPUs, load average {load_before[0]:.1f} before and {meta['loadavg_after'][0]:.1f} "
        f"after (a shared machine: timings are indicative). Peak ratios (target <= {TARGET}): "
        f"{verdict}.\n\n" + table(rows) + "\n"
    )
    (RESULTS / "deepspeed_init.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
