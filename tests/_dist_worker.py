"""One rank of the 2-process data-parallel test (run by torchrun from test_parallel_collectives.py).

Usage: python -m torch.distributed.run --standalone --nproc_per_node 2 _dist_worker.py OUT
Each rank writes OUT/rank{r}.pt with its tensors at each stage; rank 0 also writes the
1-process init over the union of the batches. The test compares the files.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from conftest import make_batches, tiny_peft
from torch.nn.parallel import DistributedDataParallel as DDP

import gradlora
from gradlora.parallel.collectives import synchronize_targets
from gradlora.peft_view import supported_layers

ARCH, R = "gpt2", 2
CASES = {  # name: initialize options
    "ga_randomized": dict(method="lora-ga", svd="randomized", seed=7),
    "one_exact": dict(method="lora-one", svd="exact"),
}


def tensors(model) -> dict[str, torch.Tensor]:
    out = {}
    for t in supported_layers(model)[0]:
        out[f"{t.name}.A"] = t.A.detach().clone()
        out[f"{t.name}.B"] = t.B.detach().clone()
        out[f"{t.name}.W"] = t.weight.detach().clone()
        for key, x in zip(("A0", "B0"), t.init_factors() or (), strict=False):
            out[f"{t.name}.{key}"] = x.clone()
    return out


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2
    torch.set_num_threads(1)
    batches = make_batches(ARCH, n=8)
    mine = batches[4 * rank : 4 * rank + 4]
    result: dict = {}
    for case, opts in CASES.items():
        model, _ = tiny_peft(ARCH, r=R)
        ddp = DDP(model)  # init through the DDP wrapper: gradlora looks through .module
        report = gradlora.initialize(ddp, mine, num_batches=4, progress=False, **opts)
        result[f"{case}/num_batches"] = report.num_batches
        result[f"{case}/init"] = tensors(model)
        opt = gradlora.create_preconditioned_optimizer(ddp, lr=1e-2)
        result[f"{case}/pairs"] = sum(len(g["params"]) for g in opt.param_groups if g["lora_pairs"])
        ddp.train()
        for step in range(3):
            opt.zero_grad()
            ddp(**mine[step]).loss.backward()
            opt.step()
        result[f"{case}/trained"] = tensors(model)
        if rank == 0:  # the reference: one process over all 8 batches
            single, _ = tiny_peft(ARCH, r=R)
            gradlora.initialize(
                single, batches, num_batches=8, progress=False, distributed=False, **opts
            )
            result[f"{case}/single"] = tensors(single)

    # repair: a one-ulp difference on rank 1 is detected and replaced by rank 0's weight
    model, _ = tiny_peft(ARCH, r=R)
    gradlora.initialize(model, mine, num_batches=4, progress=False)
    t = supported_layers(model)[0][3]
    if rank == 1:
        with torch.no_grad():
            t.weight.view(-1)[5] = torch.nextafter(t.weight.view(-1)[5], torch.tensor(1e9))
    result["repair/first"] = synchronize_targets(supported_layers(model)[0])
    result["repair/second"] = synchronize_targets(supported_layers(model)[0])
    result["repair/W"] = t.weight.detach().clone()
    torch.save(result, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
