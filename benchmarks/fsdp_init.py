"""Cost of ``gradlora.initialize`` on an FSDP2 model (``fully_shard``, gloo on CPU), 1 vs 2 ranks.

Model: the synthetic wide Llama of init_cost.py (hidden 1024, intermediate 2816, 16 heads,
4 layers, vocab 2048, random weights), LoRA r=8, alpha=16 on all 7 projections (28 layers),
each decoder layer and the root ``fully_shard``-ed. Data: 8 random token batches of 2 x 64,
the same global data for every world size (each rank takes 8 / world of them).

Cases, each in fresh processes under ``torch.distributed.run`` with 1 thread per rank:
  init_auto   initialize(method="lora-ga"), defaults: exact gradient, svd="auto" (randomized
              at these shapes), offset="auto" (adapter, the base is sharded)
  init_exact  the same with svd="exact" (the SVD phase is heavier, so its split shows)
  init_sketch the same with gradient="sketch" (no (m, n) accumulators)
  step        one FSDP2 LoRA training step (forward, backward, torch AdamW) on one batch per
              rank: the memory reference
Per rank: SVD-phase and capture seconds (``InitReport``, wall), total initialize seconds, the
CPU seconds this rank spent in the decompositions of the layers it owns and how many it owned
(``init.initialize.init_from_gradient`` / ``init_from_svd`` and ``LayerSketch.svd`` wrapped
with a timer: with one thread per rank this is the rank's SVD work, whatever else shares the
machine), and the
process's RSS high-water mark during the case (reset at its start; ``increase`` = peak minus
RSS at the start, the model being built before).

    BENCH_THREADS=1 python benchmarks/fsdp_init.py
writes benchmarks/results/fsdp_init.json and fsdp_init.md. The machine's load average is
recorded with the numbers: on a shared machine the timings are indicative only.
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

from _wide_llama import TARGETS, random_batches, wide_llama  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CASES = ("init_auto", "init_exact", "init_sketch", "step")
BATCHES, BATCH, SEQ = 8, 2, 64


def build():
    """The FSDP2-sharded wide Llama PeftModel and this rank's batches."""
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from torch.distributed.fsdp import fully_shard

    base = wide_llama(4)
    config = LoraConfig(
        task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS
    )
    model = get_peft_model(base, config)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    batches = random_batches(BATCHES, BATCH, SEQ)
    rank, world = dist.get_rank(), dist.get_world_size()
    share = BATCHES // world
    return model, batches[rank * share : (rank + 1) * share]


def timed(fn, work: dict, count: bool = True):
    """``fn`` adding its CPU seconds (and, with ``count``, its calls) to ``work``."""
    import time

    def wrapper(*args, **kwargs):
        start = time.process_time()
        try:
            return fn(*args, **kwargs)
        finally:
            work["cpu_s"] += time.process_time() - start
            work["layers"] += count

    return wrapper


def worker(case: str, out: Path) -> None:
    import time

    import torch
    import torch.distributed as dist

    import gradlora
    from gradlora.init import initialize as initialization
    from gradlora.init.sketch import LayerSketch
    from gradlora.meter import measure

    dist.init_process_group("gloo")
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    model, mine = build()
    dev = torch.device("cpu")
    result = {"case": case, "rank": dist.get_rank(), "world": dist.get_world_size()}
    dist.barrier()
    if case == "step":
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        model.train()
        with measure(dev) as cost:
            model(**mine[0]).loss.backward()
            opt.step()
            opt.zero_grad()
    else:
        svd = "exact" if case == "init_exact" else "auto"
        gradient = "sketch" if case == "init_sketch" else "auto"
        work = {"cpu_s": 0.0, "layers": 0}
        for name in ("init_from_gradient", "init_from_svd"):
            setattr(initialization, name, timed(getattr(initialization, name), work))
        LayerSketch.svd = timed(LayerSketch.svd, work, count=False)  # the sketch's own SVD
        start = time.perf_counter()
        with measure(dev) as cost:
            report = gradlora.initialize(
                model,
                mine,
                method="lora-ga",
                num_batches=len(mine),
                progress=False,
                svd=svd,
                gradient=gradient,
            )
        result |= {
            "init_s": time.perf_counter() - start,
            "capture_s": report.capture.seconds,
            "svd_s": report.svd.seconds,
            "svd_cpu_s": work["cpu_s"],
            "svd_layers": work["layers"],
            "num_batches": report.num_batches,
            "offset": report.offset,
            "gradient": report.gradient,
        }
    result |= {
        "seconds": cost.seconds,
        "peak_mib": cost.peak_bytes / 2**20,
        "increase_mib": cost.increase_bytes / 2**20,
        "metric": cost.metric,
    }
    (out / f"{case}.rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def launch(case: str, world: int, out: Path) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[1] / "src"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += ["--nproc_per_node", str(world), __file__, "--worker", case, "--out", str(out)]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return [json.loads((out / f"{case}.rank{r}.json").read_text()) for r in range(world)]


def table(rows: list[dict]) -> str:
    lines = [
        "| world | case | rank | init s | capture s | SVD s | SVD CPU s (layers) | peak MiB "
        "| increase MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [f"{r[k]:.2f}" if k in r else "-" for k in ("init_s", "capture_s", "svd_s")]
        work = f"{r['svd_cpu_s']:.2f} ({r['svd_layers']})" if "svd_cpu_s" in r else "-"
        lines.append(
            f"| {r['world']} | {r['case']} | {r['rank']} | {' | '.join(cells)} | {work} | "
            f"{r['peak_mib']:.0f} | {r['increase_mib']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.out)
        return
    rows = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.worlds:
            for case in CASES:
                out = Path(tmp) / f"w{world}"
                out.mkdir(exist_ok=True)
                rows += launch(case, world, out)
                print(table(rows[-world:]).splitlines()[-1], flush=True)
    meta = {
        "threads_per_rank": int(os.environ.get("BENCH_THREADS", "1")),
        "cpus": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "model": "wide random Llama, hidden 1024, intermediate 2816, 4 layers, LoRA r=8 x 28",
        "data": f"{BATCHES} batches of {BATCH} x {SEQ}, split across ranks",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "fsdp_init.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    text = (
        "**FSDP2 init cost** (`BENCH_THREADS=1 python benchmarks/fsdp_init.py`): "
        f"{meta['model']}; {meta['data']}; gloo on CPU, {meta['threads_per_rank']} thread per "
        f"rank, {meta['cpus']} CPUs, load average {load_before[0]:.1f} before and "
        f"{meta['loadavg_after'][0]:.1f} after (a shared machine: timings are indicative).\n\n"
        + table(rows)
        + "\n"
    )
    (RESULTS / "fsdp_init.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
