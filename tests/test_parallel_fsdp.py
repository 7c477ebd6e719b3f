"""FSDP2 (``fully_shard``, DTensor parameters): init and optimizers on 2 gloo ranks against one
process over the same data; FSDP1 refused; the split of the SVDs across ranks; the sharding
helpers on plain tensors."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_peft
from test_parallel_collectives import torchrun

import gradlora
from gradlora.parallel import sharding
from gradlora.parallel.collectives import assign_owners
from gradlora.peft_view import peft_model_of, supported_layers, unwrap

TOL = 1e-3


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run _fsdp_worker.py on 2 ranks once (it asserts too); {rank: results}."""
    return torchrun("_fsdp_worker.py", tmp_path_factory.mktemp("fsdp"), timeout=180)


@pytest.mark.parametrize("case", ["ga", "one_sketch"])
def test_fsdp2_init_equals_one_process_over_the_union(ranks, case):
    """Each rank captured 2 of the 4 batches on a fully_shard-ed Llama: whole A, B, s B A, the
    effective weights and the logits equal one unsharded process over all 4 (relative 1e-3)."""
    for r in (0, 1):
        res = ranks[r]
        assert res[f"{case}/num_batches"] == 4 and res[f"{case}/layers"] == 14
        for key in ("A", "B", "sBA", "W_eff", "logits"):
            assert res[f"{case}/{key}"] < TOL, (r, key, res[f"{case}/{key}"])
        assert res[f"{case}/ranks_identical"] and res[f"{case}/singular_values_agree"]
    assert ranks[0]["ga/offset"] == "adapter"  # offset="auto" on sharded bases


@pytest.mark.parametrize("name", ["preconditioned", "lora-pro", "lora-pro-full"])
def test_fsdp2_optimizer_steps_equal_one_process_on_the_whole_batch(ranks, name):
    """Two steps on half-batches per rank equal one process on the whole batches; each rank
    keeps half of the moments (LoRA-Pro full: its rows of the (m, n) moments)."""
    for r in (0, 1):
        res = ranks[r]
        assert res[f"{name}/logits"] < TOL, res[f"{name}/logits"]
        assert res[f"{name}/moved"] > 0.1  # the steps changed the logits: not vacuous
        assert res[f"{name}/ranks_identical"]
        assert res[f"{name}/moment_share"] == 0.5


def test_fsdp2_weight_offset_and_per_process_init_are_refused_with_the_fix(ranks):
    error = ranks[0]["weight_offset_error"]
    assert "FSDP2 / ZeRO-3 split across ranks" in error and "offset='adapter'" in error
    assert "is a collective" in ranks[1]["per_process_error"]  # distributed=False
    assert ranks[0]["untouched_after_refusal"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Run _fsdp_save_worker.py on 2 ranks once (it asserts too); {rank: results}."""
    return torchrun("_fsdp_save_worker.py", tmp_path_factory.mktemp("fsdp_save"), timeout=180)


def test_fsdp2_save_adapter_is_a_collective_with_one_writer(saved):
    """save_adapter from both ranks (each to its own folder) writes rank 0's only, and every
    rank returns its path; the installed save_pretrained writes where is_main_process is set."""
    for r in (0, 1):
        assert saved[r]["returned"].endswith(f"adapter{r}")
        assert saved[r]["written"] == ["adapter0", "pretrained1"]
    assert saved[0]["files"] == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "gradlora.json",
        "gradlora_factors.safetensors",
    ]


def test_fsdp2_saved_adapter_loads_with_plain_peft_on_the_original_base(saved):
    """After an FSDP2 LoRA-GA init and a step, the rank-2r adapter on the unsharded original
    base (plain peft, the installed save_pretrained's copy, gradlora.load_adapter) computes the
    sharded model's logits (relative 1e-4); the step moved them."""
    res = saved[0]
    assert res["sidecar"]["converted"] and res["sidecar"]["rank_factor"] == 2
    assert res["config_r"] == 8 and len(res["sidecar"]["base"]) == 14
    for key in ("logits", "pretrained_logits", "gradlora_load_logits"):
        assert res[key] < 1e-4, (key, res[key])
    assert res["moved"] > 1e-2


def test_fsdp2_base_signature_is_taken_shard_wise_without_gathering(saved):
    """A vanilla sharded model's sidecar signatures (per-shard sums, one all-reduce) equal the
    unsharded weights' to rounding."""
    res = saved[0]
    assert res["vanilla_converted"] is False
    assert res["signature_diff"] < 1e-12 and res["signature_norm"] < 1e-12


class FullyShardedDataParallel(torch.nn.Module):  # stands in for FSDP1 (same class name)
    def __init__(self, module):
        super().__init__()
        self._fsdp_wrapped_module = module


def test_fsdp1_is_refused_naming_fsdp2():
    model, _ = tiny_peft("llama")
    for wrapped, where in (
        (FullyShardedDataParallel(model), "the model is"),
        (model, "module"),
    ):
        if wrapped is model:  # FSDP1 around one decoder layer inside the model
            layers = model.base_model.model.model.layers
            layers[0] = FullyShardedDataParallel(layers[0])
        with pytest.raises(gradlora.GradLoraError, match="FSDP1") as err:
            unwrap(wrapped)
        assert where in str(err.value) and "fully_shard" in str(err.value)
        with pytest.raises(gradlora.GradLoraError, match="FSDP2"):
            gradlora.create_lora_pro_optimizer(wrapped, lr=1e-3)


def test_unwrap_leaves_an_unsharded_peft_model_alone():
    model, _ = tiny_peft("llama")
    assert unwrap(model) is model and peft_model_of(model) is model
    assert not any(t.sharded for t in supported_layers(model)[0])


def test_assign_owners_balances_and_is_deterministic():
    costs = [8.0, 1.0, 1.0, 4.0, 4.0, 2.0]
    owners = assign_owners(costs, 2)
    assert owners == assign_owners(costs, 2)
    load = [sum(c for c, o in zip(costs, owners, strict=True) if o == r) for r in (0, 1)]
    assert sorted(load) == [10.0, 10.0]
    assert assign_owners(costs, 1) == [0] * len(costs)
    assert set(assign_owners([1.0] * 3, 8)) == {0, 1, 2}  # more ranks than layers


def test_sharding_helpers_pass_plain_tensors_through():
    x = torch.randn(5, 3)
    assert not sharding.is_sharded(x) and sharding.is_whole(x)
    for fn in (sharding.full, sharding.local):
        assert fn(x) is x
    assert sharding.local_part(x, x) is x and sharding.local_rows(x) is None
    assert sharding.sum_over_shards(x, x) is x and sharding.gather_rows(x, x) is x
    sharding.require_row_layout(x)


@pytest.fixture(scope="module")
def trainer_fsdp(tmp_path_factory):
    """Run _trainer_fsdp_worker.py on 2 ranks once; {rank: results}."""
    return torchrun("_trainer_fsdp_worker.py", tmp_path_factory.mktemp("trainer_fsdp"), timeout=240)


def test_trainer_under_fsdp2_with_callback_and_transform(trainer_fsdp):
    """The Trainer really sharding with FSDP2 (DTensor LoRA weights; accelerate's CPU state
    marked as GPU-like, see the worker): GradLoraCallback's LoRA-GA init over both ranks'
    batches (offset kept in the adapter), the LoRA-Pro transform before each of the 3 steps, and
    save_model's portable adapter (written from the Trainer's gathered state dict by rank 0
    alone: no collective) loading with plain peft to the sharded model's logits."""
    for r in (0, 1):
        res = trainer_fsdp[r]
        assert res["sharded"] and res["ranks"] == 2 and res["num_batches"] == 4
        assert res["offset"] == "adapter" and res["applied"] == ["lora-pro"] * 3
        assert res["moved"] > 1e-3 and res["plain_peft"] < 1e-5
