"""One rank of the 2-process FSDP2 test (run by torchrun from test_parallel_fsdp.py).

Usage: python -m torch.distributed.run --standalone --nproc_per_node 2 _fsdp_worker.py OUT
A tiny Llama PeftModel with each decoder layer and the root ``fully_shard``-ed (gloo, CPU):
``initialize`` with each rank's own batches, then two optimizer steps on half-batches per rank.
Every rank also builds the unsharded model from the same seed and runs the same init over the
union of the batches and the same steps on the whole batches in one process (the reference).
Each rank writes OUT/rank{r}.pt with relative errors and checks, asserts them, and exits
non-zero on failure.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from conftest import make_batches, tiny_peft
from torch.distributed.fsdp import fully_shard

import gradlora
from gradlora.parallel.sharding import local
from gradlora.peft_view import supported_layers

R, LR, TOL = 4, 1e-2, 1e-3
INIT_CASES = {  # name: initialize options
    "ga": dict(method="lora-ga"),
    "one_sketch": dict(method="lora-one", gradient="sketch"),
}
OPTIMIZERS = {  # name: optimizer factory
    "preconditioned": lambda m: gradlora.create_preconditioned_optimizer(m, lr=LR),
    "lora-pro": lambda m: gradlora.create_lora_pro_optimizer(m, lr=LR),
    "lora-pro-full": lambda m: gradlora.create_lora_pro_optimizer(m, lr=LR, mode="full"),
}


def sharded_model():
    model, _ = tiny_peft("llama", r=R)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def whole(model) -> dict[str, dict[str, torch.Tensor]]:
    """Per layer: whole A, B, s B A and the effective weight W_eff the layer computes with."""
    out = {}
    for t in supported_layers(model)[0]:
        A, B = t.A.full_tensor() if t.sharded else t.A, t.B.full_tensor() if t.sharded else t.B
        W = t.weight.full_tensor() if t.sharded else t.weight
        delta = t.scaling * B @ A
        A0B0 = t.init_factors()
        offset = t.scaling * A0B0[1] @ A0B0[0] if t.sharded and A0B0 is not None else 0
        out[t.name] = {"A": A, "B": B, "sBA": delta, "W_eff": W + delta - offset}
    return {k: {n: x.detach().clone() for n, x in v.items()} for k, v in out.items()}


def logits(model, batch) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model.train()
    return out


def same_on_all_ranks(x: torch.Tensor) -> bool:
    gathered = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, x.contiguous())
    return all(torch.equal(g, gathered[0]) for g in gathered)


def check_init(result: dict, batches, mine) -> None:
    for case, opts in INIT_CASES.items():
        model = sharded_model()
        report = gradlora.initialize(model, mine, num_batches=len(mine), progress=False, **opts)
        result[f"{case}/num_batches"] = report.num_batches
        result[f"{case}/offset"] = report.offset
        ref, _ = tiny_peft("llama", r=R)
        gradlora.initialize(
            ref, batches, num_batches=len(batches), progress=False, distributed=False, **opts
        )
        got, want = whole(model), whole(ref)
        result[f"{case}/layers"] = len(got)
        for key in ("A", "B", "sBA", "W_eff"):
            result[f"{case}/{key}"] = max(rel(got[n][key], want[n][key]) for n in want)
        flat = torch.cat([got[n][k].reshape(-1) for n in sorted(got) for k in ("A", "B")])
        result[f"{case}/ranks_identical"] = same_on_all_ranks(flat)
        before = logits(ref, batches[0])
        result[f"{case}/logits"] = rel(logits(model, batches[0]), before)
        sBA = torch.stack([got[n]["sBA"].norm() for n in got])
        result[f"{case}/singular_values_agree"] = same_on_all_ranks(
            torch.tensor([s for lr in report.layers.values() for s in lr.singular_values])
        ) and bool((sBA > 0).all())


def check_steps(result: dict, batches, mine, rank: int) -> None:
    probe = batches[-1]
    for name, make_opt in OPTIMIZERS.items():
        model = sharded_model()
        gradlora.initialize(model, mine, num_batches=len(mine), progress=False)
        ref, _ = tiny_peft("llama", r=R)
        gradlora.initialize(
            ref, batches, num_batches=len(batches), progress=False, distributed=False
        )
        start = logits(ref, probe)
        opt, ref_opt = make_opt(model), make_opt(ref)
        model.train()
        ref.train()
        for step in range(2):
            batch = batches[step]
            half = {k: v[2 * rank : 2 * rank + 2] for k, v in batch.items()}
            opt.zero_grad()
            model(**half).loss.backward()
            opt.step()
            ref_opt.zero_grad()
            ref(**batch).loss.backward()
            ref_opt.step()
        got, want = logits(model, probe), logits(ref, probe)
        result[f"{name}/logits"] = rel(got, want)
        result[f"{name}/moved"] = rel(want, start)  # the steps changed the model (not vacuous)
        result[f"{name}/ranks_identical"] = same_on_all_ranks(got)
        # each rank keeps its shard of the moments: half of the one process's (even shards)
        result[f"{name}/moment_share"] = moment_numel(opt) / moment_numel(ref_opt)


def moment_numel(opt) -> int:
    return sum(local(s["exp_avg"]).numel() for s in opt.state.values() if "exp_avg" in s)


def check_refusals(result: dict, mine) -> None:
    model = sharded_model()
    try:
        gradlora.initialize(model, mine, num_batches=1, progress=False, offset="weight")
        result["weight_offset_error"] = None
    except gradlora.GradLoraError as e:
        result["weight_offset_error"] = str(e)
    try:
        gradlora.initialize(model, mine, num_batches=1, progress=False, distributed=False)
        result["per_process_error"] = None
    except gradlora.GradLoraError as e:
        result["per_process_error"] = str(e)
    result["untouched_after_refusal"] = all(
        t.init_factors() is None for t in supported_layers(model)[0]
    )


def run_rank(
    out: Path,
    checks: Callable[[dict, list, list, int], None],
    join: Callable[[], None] = lambda: dist.init_process_group("gloo"),
) -> None:
    """Join the 2-rank gloo group (``join``), run ``checks(result, batches, mine, rank)`` on the
    4 shared batches and this rank's 2, save ``result`` to OUT/rank{r}.pt for the test, and exit
    1 if a check raised (its traceback printed)."""
    join()
    rank = dist.get_rank()
    assert dist.get_world_size() == 2
    torch.set_num_threads(1)
    batches = make_batches("llama", n=4, batch=4)
    mine = batches[2 * rank : 2 * rank + 2]
    result: dict = {}
    failed = False
    try:
        checks(result, batches, mine, rank)
    except Exception:
        traceback.print_exc()
        failed = True
    torch.save(result, out / f"rank{rank}.pt")
    dist.destroy_process_group()
    sys.exit(1 if failed else 0)


def checks(result: dict, batches: list, mine: list, rank: int) -> None:
    check_init(result, batches, mine)
    check_steps(result, batches, mine, rank)
    check_refusals(result, mine)
    for case in INIT_CASES:
        assert result[f"{case}/num_batches"] == 4, result
        assert result[f"{case}/offset"] in (None, "adapter"), result
        assert result[f"{case}/ranks_identical"] and result[f"{case}/singular_values_agree"]
        for key in ("A", "B", "sBA", "W_eff", "logits"):
            assert result[f"{case}/{key}"] < TOL, (case, key, result[f"{case}/{key}"])
    for name in OPTIMIZERS:
        assert result[f"{name}/logits"] < TOL, (name, result[f"{name}/logits"])
        assert result[f"{name}/moved"] > 100 * TOL, (name, result[f"{name}/moved"])
        assert result[f"{name}/ranks_identical"], name
        assert result[f"{name}/moment_share"] == 0.5, (name, result[f"{name}/moment_share"])
    assert "offset='adapter'" in (result["weight_offset_error"] or ""), result
    assert "not distributed=False" in (result["per_process_error"] or ""), result
    assert result["untouched_after_refusal"]


if __name__ == "__main__":
    run_rank(Path(sys.argv[1]), checks)
