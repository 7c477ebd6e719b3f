"""DeepSpeed ZeRO-2/3 on 2 gloo CPU ranks (tests/_deepspeed_worker.py): the gradient inits, the
pair transforms in front of DeepSpeed's AdamW, the collective save, the refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_parallel_collectives import torchrun

pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")

# DeepSpeed compiles a small shared-memory op on its first launch: kept in the repository
EXTENSIONS = str(Path(__file__).resolve().parents[1] / ".torch_extensions")
TOL = 1e-5


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run _deepspeed_worker.py on 2 ranks once; {rank: results}."""
    out = tmp_path_factory.mktemp("deepspeed")
    return torchrun("_deepspeed_worker.py", out, timeout=420, TORCH_EXTENSIONS_DIR=EXTENSIONS)


@pytest.mark.parametrize("case", ["ga", "ga_sketch", "one"])
def test_zero3_init_equals_one_process_over_the_union(ranks, case):
    """Each rank captured 2 of the 4 batches on a ZeRO-3 partitioned Llama (some factors of an
    odd size, so the last rank's slice is padded): s B A per layer equals one unpartitioned
    process over all 4 (relative 1e-5), the base weights are untouched, and the logits equal
    the reference's (LoRA-GA: unchanged by the init). 'one' initialized before
    deepspeed.initialize, the others after it, through the engine."""
    for r in (0, 1):
        res = ranks[r]
        assert res[f"{case}/num_batches"] == 4
        assert res[f"{case}/sBA"] < TOL, (r, res[f"{case}/sBA"])
        assert res[f"{case}/nonzero"] > 1e-3  # the init wrote something: not vacuous
        assert res[f"{case}/W"] == 0.0
        assert res[f"{case}/logits"] < TOL
    if case.startswith("ga"):
        assert ranks[0][f"{case}/offset"] == "adapter"  # offset="auto" on partitioned bases
        assert ranks[0][f"{case}/unchanged"] < TOL
    else:
        assert ranks[0][f"{case}/unchanged"] > 1e-2  # LoRA-One moves the outputs at init


@pytest.mark.parametrize("name", ["lora-pro", "preconditioned"])
@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("clip", [False, True])
def test_pair_transform_under_zero_equals_gradlora_optimizer(ranks, name, stage, clip):
    """Two steps on half-batches per rank, the transform in front of DeepSpeed's (torch AdamW)
    step, equal gradlora's own optimizer on the whole batches (relative 1e-5 on A and B); with
    gradient_clipping the raw gradients are clipped as in a plain loop (the clip acted)."""
    key = f"{name}/zero{stage}" + ("/clip" if clip else "")
    for r in (0, 1):
        assert ranks[r][key] < TOL, (r, ranks[r][key])
        assert ranks[r][key + "/moved"] > 0.05
        if clip:
            assert ranks[r][key + "/clipped"]


def test_zero3_save_adapter_loads_with_plain_peft(ranks):
    """save_adapter on every rank (a collective, rank 0 writes) after a LoRA-GA init and a
    step: plain PeftModel.from_pretrained on the original base gives the sharded logits."""
    for r in (0, 1):
        assert ranks[r]["save/returned"].endswith("adapter")
        assert ranks[r]["save/plain_peft"] < TOL


def test_zero3_with_cpu_offload_of_parameters_and_optimizer(ranks):
    """offload_param and offload_optimizer to the CPU: the LoRA-GA init and two LoRA-Pro
    transform steps equal one process (relative 1e-5)."""
    for r in (0, 1):
        assert ranks[r]["offload/init"] < TOL and ranks[r]["offload/steps"] < TOL


def test_zero3_bf16_init_keeps_outputs_and_saves_a_loadable_adapter(ranks):
    """DeepSpeed bf16 under ZeRO-3: outputs unchanged bit for bit by the LoRA-GA init, the
    transform steps move them, and plain peft on the bf16 original base reproduces the sharded
    logits to bf16 rounding (relative 1e-2)."""
    for r in (0, 1):
        res = ranks[r]
        assert res["bf16/dtype"] == "torch.bfloat16"
        assert res["bf16/unchanged"] == 0.0
        assert res["bf16/moved"] > 0.05 and res["bf16/plain_peft"] < 1e-2


def test_pair_optimizer_as_client_and_full_mode_and_weight_offset_are_refused(ranks):
    res = ranks[0]
    assert (
        "client optimizer" in res["client_error"] and "attach_pair_transform" in res["client_error"]
    )
    assert res["client_untouched"]
    assert "mode='full'" in res["full_error"] and "efficient" in res["full_error"]
    assert "offset='adapter'" in res["weight_error"] and "ZeRO-3" in res["weight_error"]
    assert res["weight_untouched"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Run _trainer_deepspeed_worker.py on 2 ranks once; {rank: results}."""
    out = tmp_path_factory.mktemp("trainer_deepspeed")
    env = dict(TORCH_EXTENSIONS_DIR=EXTENSIONS)
    return torchrun("_trainer_deepspeed_worker.py", out, timeout=420, **env)


def test_trainer_zero3_callback_inits_transforms_saves_and_resumes(trained):
    """Trainer + GradLoraCallback("lora-ga", transform="lora-pro") under ZeRO-3: the init on
    both ranks, the LoRA-Pro transform before each of the 4 DeepSpeed steps, save_model's
    portable adapter loading with plain peft on the original base (the sharded model's logits),
    and a run resumed from checkpoint-2 ending where the uninterrupted one did."""
    for r in (0, 1):
        res = trained[r]
        assert res["zero3/ranks"] == 2 and res["zero3/offset"] == "adapter"
        assert res["zero3/applied"] == ["lora-pro"] * 4
        assert res["zero3/moved"] > 0.01
        assert res["zero3/plain_peft"] < TOL
        assert res["zero3/resumed_at"] == 2 and res["zero3/resume"] < TOL
    assert "gradlora_factors.safetensors" in trained[0]["zero3/files"]


def test_trainer_zero2_lora_ga_weight_offset_resumes(trained):
    """ZeRO-2 keeps the fp32 base weights whole: LoRA-GA rewrites them (offset "weight"). The
    saved adapter loads with plain peft on the original base, and a resume (DeepSpeed's
    checkpoint leaves out the frozen weights; the callback offsets them again from the
    checkpoint's factors) ends where the uninterrupted run did."""
    for r in (0, 1):
        res = trained[r]
        assert res["zero2/ranks"] == 2 and res["zero2/offset"] == "weight"
        assert res["zero2/moved"] > 0.01 and res["zero2/plain_peft"] < TOL
        assert res["zero2/resumed_at"] == 2 and res["zero2/resume"] < TOL


def test_sft_trainer_zero2_lora_one_with_preconditioner(trained):
    """TRL's SFTTrainer (it builds the PeftModel) under ZeRO-2: LoRA-One's init, its
    preconditioner before each DeepSpeed step, and a saved adapter plain peft loads."""
    for r in (0, 1):
        res = trained[r]
        assert res["sft/ranks"] == 2 and res["sft/applied"] == ["preconditioned"] * 4
        assert res["sft/moved"] > 0.01 and res["sft/plain_peft"] < TOL


def test_trainer_with_an_accelerate_deepspeed_config_file(trained):
    """ZeRO-3 from an accelerate DeepSpeed config file (ACCELERATE_DEEPSPEED_CONFIG_FILE, as
    ``accelerate launch --config_file`` sets it) rather than TrainingArguments(deepspeed=...):
    partitioned weights, the preconditioner before both steps, a loadable adapter."""
    for r in (0, 1):
        res = trained[r]
        assert res["accelerate/deepspeed"] == "DeepSpeedEngine" and res["accelerate/partitioned"]
        assert res["accelerate/applied"] == ["preconditioned"] * 2
        assert res["accelerate/plain_peft"] < TOL
