"""One rank of the 2-process FSDP2 save test (run by torchrun from test_parallel_fsdp.py).

Usage: python -m torch.distributed.run --standalone --nproc_per_node 2 _fsdp_save_worker.py OUT
A tiny Llama PeftModel with each decoder layer and the root ``fully_shard``-ed (gloo, CPU):
LoRA-GA init on each rank's batches and one preconditioned step, then, from every rank,
``gradlora.save_adapter`` to OUT/adapter{rank} (only rank 0 may write: OUT/adapter1 must not
exist) and the installed ``save_pretrained`` with is_main_process on rank 1 only (only
OUT/pretrained1 may exist). Rank 0 loads OUT/adapter0 with plain peft onto a freshly built
unsharded original base and compares its logits with the sharded model's. A vanilla (not
initialized) sharded model's sidecar signatures are compared with the unsharded weights'.
Each rank writes OUT/rank{r}.pt and exits non-zero on a failed check.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import torch.distributed as dist
from _fsdp_worker import R, logits, rel, run_rank, sharded_model
from conftest import tiny_base, tiny_peft
from peft import PeftModel

import gradlora
from gradlora.adapter.format import relative_difference
from gradlora.adapter.offset import weight_signature
from gradlora.peft_view import supported_layers


def check_save(result: dict, batches, mine, rank: int, out: Path) -> None:
    model = sharded_model()
    gradlora.initialize(model, mine, num_batches=len(mine), progress=False, method="lora-ga")
    opt = gradlora.create_preconditioned_optimizer(model, lr=1e-2)
    model.train()
    half = {k: v[2 * rank : 2 * rank + 2] for k, v in batches[0].items()}
    model(**half).loss.backward()
    opt.step()
    opt.zero_grad()
    probe = batches[-1]
    sharded_logits = logits(model, probe)
    returned = gradlora.save_adapter(model, out / f"adapter{rank}")
    result["returned"] = str(returned)
    model.save_pretrained(str(out / f"pretrained{rank}"), is_main_process=rank == 1)
    dist.barrier()
    result["written"] = sorted(p.name for p in out.iterdir() if p.is_dir())
    if rank == 0:
        folder = out / "adapter0"
        result["files"] = sorted(p.name for p in folder.iterdir())
        result["sidecar"] = json.loads((folder / "gradlora.json").read_text())
        result["config_r"] = json.loads((folder / "adapter_config.json").read_text())["r"]
        plain = PeftModel.from_pretrained(tiny_base("llama"), str(folder))
        result["logits"] = rel(logits(plain, probe), sharded_logits)
        result["moved"] = rel(sharded_logits, logits(tiny_base("llama"), probe))
        # the installed save_pretrained wrote the same adapter (from rank 1)
        again = PeftModel.from_pretrained(tiny_base("llama"), str(out / "pretrained1"))
        result["pretrained_logits"] = rel(logits(again, probe), sharded_logits)
        # gradlora's loader splits it back and sees the original base
        loaded = gradlora.load_adapter(tiny_base("llama"), folder)
        result["gradlora_load_logits"] = rel(logits(loaded, probe), sharded_logits)


def check_signature(result: dict, out: Path) -> None:
    """A vanilla sharded model's sidecar: signatures taken shard-wise equal the whole weights'."""
    model = sharded_model()
    gradlora.save_adapter(model, out / "vanilla")
    if dist.get_rank() == 0:
        sidecar = json.loads((out / "vanilla" / "gradlora.json").read_text())
        ref = {t.name: t.weight_mn() for t in supported_layers(tiny_peft("llama", r=R)[0])[0]}
        result["vanilla_converted"] = sidecar["converted"]
        result["signature_diff"] = max(
            relative_difference(weight_signature(W, n), sidecar["base"][n]) for n, W in ref.items()
        )
        result["signature_norm"] = max(
            abs(weight_signature(W, n)[0] - sidecar["base"][n][0]) / sidecar["base"][n][0]
            for n, W in ref.items()
        )


def checks(out: Path, result: dict, batches: list, mine: list, rank: int) -> None:
    check_save(result, batches, mine, rank, out)
    check_signature(result, out)
    assert result["returned"] == str(out / f"adapter{rank}"), result
    assert result["written"] == ["adapter0", "pretrained1"], result
    if rank == 0:
        assert result["sidecar"]["converted"] and result["config_r"] == 2 * R, result
        for key in ("logits", "pretrained_logits", "gradlora_load_logits"):
            assert result[key] < 1e-4, (key, result[key])
        assert result["moved"] > 1e-2, result
        assert not result["vanilla_converted"], result
        assert result["signature_diff"] < 1e-12 and result["signature_norm"] < 1e-12, result


if __name__ == "__main__":
    out = Path(sys.argv[1])
    run_rank(out, functools.partial(checks, out))
