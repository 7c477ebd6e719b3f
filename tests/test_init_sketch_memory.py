"""Sketch mode under ``sketch_memory``: the layers sketched in groups, each in its own passes,
give the same triplets (and the same init) as all layers in one pass."""

import pytest
import torch
from conftest import make_batches, tiny_peft

import gradlora
from gradlora.init.sketch import sketch_bytes, sketch_groups, sketch_sizes, sketch_svds
from gradlora.peft_view import supported_layers


def test_sketch_groups_respect_the_memory():
    model, _ = tiny_peft("llama")
    targets = supported_layers(model)[0]
    sizes = {t.name: sketch_sizes(8, t.shape, None) for t in targets}
    need = [sketch_bytes(t.shape, sizes[t.name], 1) for t in targets]
    assert sketch_groups(targets, sizes, 1, None) == [targets]
    budget = sum(need) // 3
    groups = sketch_groups(targets, sizes, 1, budget)
    assert [t for g in groups for t in g] == targets  # model order, every layer once
    assert len(groups) >= 3
    for g in groups:
        held = sum(sketch_bytes(t.shape, sizes[t.name], 1) for t in g)
        assert held <= budget or len(g) == 1
    assert len(sketch_groups(targets, sizes, 1, 1)) == len(targets)


@pytest.mark.parametrize("passes", [1, 2])
def test_sketch_memory_gives_the_same_sketches(passes):
    """One layer per pass (sketch_memory=1) against all layers in one pass: the same triplets
    bit for bit, from batches given as a one-shot iterator."""
    model, _ = tiny_peft("llama")
    targets = supported_layers(model)[0]
    batches = make_batches("llama")
    ranks = {t.name: 2 * t.rank for t in targets}
    whole, used = sketch_svds(
        model, targets, batches, ranks, num_batches=3, progress=False, passes=passes
    )
    split, used_split = sketch_svds(
        model, targets, iter(batches), ranks, num_batches=3, progress=False, passes=passes, memory=1
    )
    assert used == used_split == 3
    assert {s.kind for s in split.values()} == {"triplets", whole[targets[0].name].kind}
    for t in targets:
        for a, b in zip(whole[t.name].svd(), split[t.name].svd(), strict=True):
            assert torch.equal(a, b), t.name


def test_sketch_memory_init_is_the_same_init():
    runs = []
    for memory in (None, 4096):
        model, _ = tiny_peft("gpt2")
        rep = gradlora.initialize(
            model,
            make_batches("gpt2"),
            num_batches=2,
            progress=False,
            gradient="sketch",
            sketch_memory=memory,
        )
        assert rep.gradient_options["memory"] == memory
        runs.append(model.state_dict())
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_auto_caps_the_sketch_at_a_training_steps_activations():
    """sketch_memory="auto": the cap is 4 bytes x tokens x sum of (m + n) over the targets,
    from the first batch (a one-shot iterator is not shortened by the peek); the same init."""
    from gradlora.init.sketch import step_activation_bytes

    model, _ = tiny_peft("llama")
    targets = supported_layers(model)[0]
    batches = make_batches("llama", n=3, batch=2, seq=5)
    tokens = batches[0]["input_ids"].numel()
    expected = 4 * tokens * sum(m + n for m, n in (t.shape for t in targets))
    assert step_activation_bytes(targets, batches[0]) == expected
    assert step_activation_bytes(targets, {"x": torch.zeros(2, 3)}) is None
    assert step_activation_bytes(targets, torch.randn(2, 8)) is None  # float features: unknown
    sizes = {t.name: sketch_sizes(2 * t.rank, t.shape, None) for t in targets}
    assert len(sketch_groups(targets, sizes, 1, expected)) > 1  # 10 tokens < the sketch width
    states = []
    for memory in ("auto", None):
        model, _ = tiny_peft("llama")
        rep = gradlora.initialize(
            model,
            iter(batches),
            num_batches=3,
            progress=False,
            gradient="sketch",
            sketch_memory=memory,
        )
        assert rep.num_batches == 3
        assert rep.gradient_options["memory"] == (expected if memory == "auto" else None)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    fresh, _ = tiny_peft("llama")
    with pytest.raises(gradlora.GradLoraError, match="sketch_memory must be 'auto'"):
        gradlora.initialize(fresh, batches, gradient="sketch", sketch_memory="half")
