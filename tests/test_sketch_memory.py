"""Sketch mode under ``sketch_memory``: the layers sketched in groups, each in its own passes,
give the same triplets (and the same init) as all layers in one pass."""

import pytest
import torch
from conftest import make_batches, tiny_peft

import gradlora
from gradlora.sketch import sketch_bytes, sketch_groups, sketch_sizes, sketch_svds
from gradlora.targets import find_targets


def test_sketch_groups_respect_the_memory():
    model, _ = tiny_peft("llama")
    targets = find_targets(model)
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
    targets = find_targets(model)
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
