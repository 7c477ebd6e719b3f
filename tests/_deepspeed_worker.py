"""One rank of the 2-process DeepSpeed test (run by torchrun from test_parallel_deepspeed.py).

Usage: python -m torch.distributed.run --standalone --nproc_per_node 2 _deepspeed_worker.py OUT
A tiny Llama PeftModel (r = 3 and an intermediate size of 27, so some LoRA factors have an odd
number of entries and ZeRO-3 pads the last rank's slice) under ``deepspeed.initialize`` with
gloo on CPU and torch AdamW as the client optimizer. Every rank also builds the same model
unsharded and runs the same init over the union of the batches, or the same steps with
gradlora's own optimizer on the whole batches, in one process (the reference). Each rank
writes OUT/rank{r}.pt with relative errors and checks; the test asserts them.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from _fsdp_worker import logits, rel, run_rank
from conftest import VOCAB
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import gradlora
from gradlora.parallel.zero import read_whole
from gradlora.peft_view import supported_layers

R, LR, WD = 3, 1e-2, 0.01
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def base_model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=27, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def peft_model(nonzero_b: bool = False) -> PeftModel:
    model = get_peft_model(base_model(), LoraConfig(r=R, lora_alpha=6, target_modules=TARGETS))
    if nonzero_b:  # a start where B^T B is not 0, for the pair transforms
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for t in supported_layers(model)[0]:
                t.B.copy_(0.1 * torch.randn(t.B.shape, generator=g))
    return model


def config(stage: int, clip: float = 0.0, **extra) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": clip,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10**9,
        **extra,
    }


def engine_of(model, stage: int, clip: float = 0.0, optimizer=None):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer or torch.optim.AdamW(params, lr=LR, weight_decay=WD)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config(stage, clip))
    return engine


def whole(model) -> dict[str, dict[str, torch.Tensor]]:
    """Per layer: whole A, B, s B A and the base weight (ZeRO-3: gathered)."""
    out = {}
    for t in supported_layers(model)[0]:
        A, B, W = (read_whole(x).clone() for x in (t.A, t.B, t.weight))
        out[t.name] = {"A": A, "B": B, "sBA": t.scaling * B @ A, "W": W}
    return out


def check_init(result: dict, batches, mine) -> None:
    """ZeRO-3 inits (after deepspeed.initialize; and one before it) against one process."""
    cases = {
        "ga": dict(method="lora-ga"),
        "ga_sketch": dict(method="lora-ga", gradient="sketch", sketch_passes=2),
        "one": dict(method="lora-one"),
    }
    for case, opts in cases.items():
        ref = peft_model()
        before = logits(ref, batches[0])
        original = whole(ref)
        gradlora.initialize(ref, batches, num_batches=4, progress=False, distributed=False, **opts)
        want = whole(ref)
        model = peft_model()
        if case == "one":  # the user's own script may initialize before deepspeed.initialize
            report = gradlora.initialize(model, mine, num_batches=2, progress=False, **opts)
            engine = engine_of(model, 3)
        else:
            engine = engine_of(model, 3)
            report = gradlora.initialize(engine, mine, num_batches=2, progress=False, **opts)
        got = whole(engine.module)
        result[f"{case}/num_batches"] = report.num_batches
        result[f"{case}/offset"] = report.offset
        result[f"{case}/sBA"] = max(rel(got[n]["sBA"], want[n]["sBA"]) for n in want)
        result[f"{case}/nonzero"] = min(want[n]["sBA"].norm().item() for n in want)
        result[f"{case}/W"] = max((got[n]["W"] - original[n]["W"]).abs().max().item() for n in want)
        after = logits(engine.module, batches[0])
        result[f"{case}/unchanged"] = rel(after, before)  # LoRA-GA: outputs kept at init
        result[f"{case}/logits"] = rel(after, logits(ref, batches[0]))


def check_save(result: dict, batches, mine, out: Path) -> None:
    """save_adapter under ZeRO-3 (a collective, one writer) after an init and a step loads with
    plain peft on the original base and gives the sharded model's logits."""
    model = peft_model()
    engine = engine_of(model, 3)
    gradlora.initialize(engine, mine, num_batches=2, progress=False)
    half = {k: v[:2] for k, v in batches[dist.get_rank()].items()}
    engine.backward(engine(**half).loss)
    engine.step()
    sharded = logits(engine.module, batches[0])
    path = gradlora.save_adapter(engine.module, out / "adapter")
    result["save/returned"] = str(path)
    loaded = PeftModel.from_pretrained(base_model(), str(path))
    result["save/plain_peft"] = rel(logits(loaded, batches[0]), sharded)


def check_steps(result: dict, batches, rank: int) -> None:
    """Two steps of each pair transform in front of DeepSpeed's AdamW (ZeRO-2, ZeRO-3, with and
    without clipping) against gradlora's own optimizer on the whole batches in one process."""
    makers = {
        "lora-pro": lambda m: gradlora.create_lora_pro_optimizer(m, lr=LR, weight_decay=WD),
        "preconditioned": lambda m: gradlora.create_preconditioned_optimizer(
            m, lr=LR, weight_decay=WD
        ),
    }
    for name, make in makers.items():
        for stage in (1, 2, 3):
            for clip in (0.0, 0.05):
                key = f"{name}/zero{stage}" + ("/clip" if clip else "")
                ref = peft_model(nonzero_b=True)
                ref_opt = make(ref)
                engine = engine_of(peft_model(nonzero_b=True), stage, clip)
                gradlora.attach_pair_transform(engine, name)
                norms = []
                for step in range(2):
                    batch = batches[step]
                    half = {k: v[2 * rank : 2 * rank + 2] for k, v in batch.items()}
                    engine.backward(engine(**half).loss)
                    engine.step()
                    ref_opt.zero_grad()
                    ref(**batch).loss.backward()
                    if clip:
                        norms.append(torch.nn.utils.clip_grad_norm_(ref.parameters(), clip).item())
                    ref_opt.step()
                got, want = whole(engine.module), whole(ref)
                start = whole(peft_model(nonzero_b=True))
                result[key] = max(rel(got[n][k], want[n][k]) for n in want for k in "AB")
                result[key + "/moved"] = min(rel(want[n]["A"], start[n]["A"]) for n in want)
                if clip:
                    result[key + "/clipped"] = min(norms) > clip  # the clip really acted


def check_offload(result: dict, batches, mine, rank: int) -> None:
    """ZeRO-3 with parameters and optimizer state offloaded to the CPU: a LoRA-GA init, then two
    steps of the LoRA-Pro transform, against one process (torch AdamW as DeepSpeed's optimizer:
    zero_force_ds_cpu_optimizer off, so no DeepSpeedCPUAdam op has to be compiled)."""
    cfg = config(3)
    offload = {"offload_param": {"device": "cpu"}, "offload_optimizer": {"device": "cpu"}}
    cfg["zero_optimization"].update(offload)
    cfg["zero_force_ds_cpu_optimizer"] = False
    model = peft_model()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WD)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)
    ref = peft_model()
    gradlora.initialize(ref, batches, num_batches=4, progress=False, distributed=False)
    gradlora.initialize(engine, mine, num_batches=2, progress=False)
    got, want = whole(engine.module), whole(ref)
    result["offload/init"] = max(rel(got[n]["sBA"], want[n]["sBA"]) for n in want)
    ref_opt = gradlora.create_lora_pro_optimizer(ref, lr=LR, weight_decay=WD)
    gradlora.attach_pair_transform(engine, "lora-pro")
    for step in range(2):
        half = {k: v[2 * rank : 2 * rank + 2] for k, v in batches[step].items()}
        engine.backward(engine(**half).loss)
        engine.step()
        ref_opt.zero_grad()
        ref(**batches[step]).loss.backward()
        ref_opt.step()
    got, want = whole(engine.module), whole(ref)
    result["offload/steps"] = max(rel(got[n][k], want[n][k]) for n in want for k in "AB")


def check_bf16(result: dict, batches, mine, rank: int, out: Path) -> None:
    """ZeRO-3 with DeepSpeed's bf16 (bf16 weights, fp32 master copies): the LoRA-GA init leaves
    the logits bit for bit as they were, two LoRA-Pro transform steps move them, and the saved
    adapter loads with plain peft on the bf16 original base to the sharded model's logits."""
    cfg = config(3)
    cfg["bf16"] = {"enabled": True}
    model = peft_model()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)
    result["bf16/dtype"] = str(next(engine.module.parameters()).dtype)
    before = logits(engine.module, batches[0])
    gradlora.initialize(engine, mine, num_batches=2, progress=False)
    result["bf16/unchanged"] = (logits(engine.module, batches[0]) - before).abs().max().item()
    gradlora.attach_pair_transform(engine, "lora-pro")
    for step in range(2):
        half = {k: v[2 * rank : 2 * rank + 2] for k, v in batches[step].items()}
        engine.backward(engine(**half).loss)
        engine.step()
    trained = logits(engine.module, batches[0]).float()
    result["bf16/moved"] = rel(trained, before.float())
    path = gradlora.save_adapter(engine.module, out / "bf16")
    dist.barrier()
    loaded = PeftModel.from_pretrained(base_model().to(torch.bfloat16), str(path))
    result["bf16/plain_peft"] = rel(logits(loaded, batches[0]).float(), trained)


def check_refusals(result: dict, batches, rank: int) -> None:
    model = peft_model(nonzero_b=True)
    start = copy.deepcopy({k: v.clone() for k, v in model.state_dict().items()})
    try:
        opt = gradlora.create_lora_pro_optimizer(model, lr=LR)
        engine = engine_of(model, 2, optimizer=opt)
        half = {k: v[2 * rank : 2 * rank + 2] for k, v in batches[0].items()}
        engine.backward(engine(**half).loss)
        engine.step()
        result["client_error"] = None
    except gradlora.GradLoraError as e:
        result["client_error"] = str(e)
    result["client_untouched"] = all(
        torch.equal(v, start[k]) for k, v in model.state_dict().items() if v.numel()
    )
    engine = engine_of(peft_model(), 3)
    try:
        gradlora.attach_pair_transform(engine, "lora-pro", mode="full")
        result["full_error"] = None
    except gradlora.GradLoraError as e:
        result["full_error"] = str(e)
    try:
        gradlora.initialize(engine, batches[:1], num_batches=1, progress=False, offset="weight")
        result["weight_error"] = None
    except gradlora.GradLoraError as e:
        result["weight_error"] = str(e)
    result["weight_untouched"] = all(
        t.init_factors() is None for t in supported_layers(engine.module)[0]
    )


def checks(out: Path):
    """Every check of this worker, for ``_fsdp_worker.run_rank``."""

    def run(result: dict, batches: list, mine: list, rank: int) -> None:
        check_init(result, batches, mine)
        check_save(result, batches, mine, out)
        check_steps(result, batches, rank)
        check_refusals(result, batches, rank)
        check_offload(result, batches, mine, rank)
        check_bf16(result, batches, mine, rank, out)

    return run


if __name__ == "__main__":
    out = Path(sys.argv[1])
    run_rank(out, checks(out), join=lambda: deepspeed.init_distributed(dist_backend="gloo"))
