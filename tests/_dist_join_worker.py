"""One rank of the 2-process join-check test (run by torchrun from test_parallel_collectives.py).

Usage: GRADLORA_COLLECTIVE_TIMEOUT=3 python -m torch.distributed.run --standalone
--nproc_per_node 2 _dist_join_worker.py OUT. Each rank writes OUT/rank{r}.pt:

1. absent: rank 0 alone calls initialize (the $GRADLORA_COLLECTIVE_TIMEOUT wait), rank 1 waits
   on a store key (no backend collective) until rank 0 is done;
2. late: then rank 1 alone calls initialize, after rank 0 has given up on that call;
3. raised: both call initialize, rank 1 with an unknown method (a pre-write check fails);
4. subgroup: both ranks initialize over a new_group (collective_timeout= argument);
5. overhead: the seconds of one check_joined on the world group, both ranks calling.
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from conftest import assert_same_snapshot, make_batches, model_snapshot, tiny_peft

import gradlora
from gradlora.parallel.collectives import check_joined
from gradlora.peft_view import supported_layers

ARCH, R = "gpt2", 2


def attempt(model, batches, **kw) -> dict:
    """initialize expected to fail: the error, how long it took, whether the model changed."""
    before = model_snapshot(model)
    start = time.perf_counter()
    try:
        gradlora.initialize(model, batches, num_batches=2, progress=False, **kw)
        error = None
    except gradlora.GradLoraError as e:
        error = str(e)
    seconds = time.perf_counter() - start
    try:
        assert_same_snapshot(before, model_snapshot(model))
        untouched = True
    except AssertionError:
        untouched = False
    return {"error": error, "seconds": seconds, "untouched": untouched}


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    store = dist.group.WORLD.get_group_store()
    batches = make_batches(ARCH, n=4)
    mine = batches[2 * rank : 2 * rank + 2]
    result: dict = {}

    model, _ = tiny_peft(ARCH, r=R)
    if rank == 0:
        result["absent"] = attempt(model, mine)
        store.set("test/absent_done", "1")
    else:
        store.wait(["test/absent_done"], timedelta(seconds=120))
        result["late"] = attempt(model, mine)
        store.set("test/late_done", "1")
    store.wait(["test/late_done"], timedelta(seconds=120))

    model, _ = tiny_peft(ARCH, r=R)
    bad = {"method": "lora-xx"} if rank == 1 else {}
    result["raised"] = attempt(model, mine, collective_timeout=20, **bad)

    sub = dist.new_group([0, 1])
    model, _ = tiny_peft(ARCH, r=R)
    report = gradlora.initialize(
        model, mine, num_batches=2, progress=False, process_group=sub, collective_timeout=20
    )
    result["subgroup/ranks"] = report.ranks
    result["subgroup/num_batches"] = report.num_batches
    result["subgroup/A"] = [t.A.detach().clone() for t in supported_layers(model)[0]]

    dist.barrier()
    start, n = time.perf_counter(), 20
    for _ in range(n):
        check_joined(None, 10.0)
    result["overhead"] = (time.perf_counter() - start) / n
    torch.save(result, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
