import pytest
import torch
from conftest import (
    assert_same_snapshot,
    make_batches,
    model_snapshot,
    reference_gradients,
    tiny_peft,
)

import gradlora
from gradlora.init.capture import ExactAccumulator, capture
from gradlora.peft_view import supported_layers


def test_gradient_equals_plain_autograd(arch):
    model, original = tiny_peft(arch)
    batches = make_batches(arch, n=3)
    G = gradlora.estimate_gradients(model, batches, num_batches=3, progress=False)
    ref = reference_gradients(original, batches, list(G))
    assert len(G) == len(supported_layers(model)[0]) > 0
    for name, g in G.items():
        assert g.dtype == torch.float32
        assert g.shape == ref[name].shape, name  # (out, in), also for GPT-2's Conv1D
        torch.testing.assert_close(g, ref[name], rtol=1e-5, atol=1e-7, msg=name)


def test_gradient_with_loss_fn_and_tuple_batches():
    model, original = tiny_peft("gpt2")
    batches = [(b["input_ids"], b["labels"]) for b in make_batches("gpt2", n=2)]

    def loss_fn(m, batch):
        ids, labels = batch
        logits = m(input_ids=ids).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()) * 0.5

    G = gradlora.estimate_gradients(model, batches, loss_fn=loss_fn, progress=False)
    ref = reference_gradients(original, batches, list(G), loss_fn=loss_fn)
    for name, g in G.items():
        torch.testing.assert_close(g, ref[name], rtol=1e-5, atol=1e-7, msg=name)


def test_num_batches_limits_and_nonzero_adapter_is_bypassed():
    model, original = tiny_peft("llama")
    for t in supported_layers(model)[0]:  # a non-zero B would change the function if not bypassed
        torch.nn.init.normal_(t.B)
    batches = make_batches("llama", n=5)
    G = gradlora.estimate_gradients(model, iter(batches), num_batches=2, progress=False)
    ref = reference_gradients(original, batches[:2], list(G))
    for name, g in G.items():
        torch.testing.assert_close(g, ref[name], rtol=1e-5, atol=1e-7)


def test_state_restored_and_rng_untouched(arch):
    model, _ = tiny_peft(arch)
    model.eval()
    model.base_model.model.get_submodule(supported_layers(model)[0][0].name).train()  # mixed modes
    head = [p for n, p in model.named_parameters() if p.requires_grad][0]
    head.grad = torch.ones_like(head)
    before = model_snapshot(model)
    rng = torch.get_rng_state()
    gradlora.estimate_gradients(model, make_batches(arch), progress=False)
    assert torch.equal(rng, torch.get_rng_state())
    assert_same_snapshot(before, model_snapshot(model))


def test_one_weight_gradient_live_at_a_time():
    model, _ = tiny_peft("llama")
    targets = supported_layers(model)[0]
    weights = [t.weight for t in targets]
    live_max = []

    class Watching(ExactAccumulator):
        def attach(self):
            handles = super().attach()

            def watch(param):
                live_max.append(sum(w.grad is not None for w in weights))

            # registered after the accumulator's own hook: sees the state once it has run
            handles.append(self.target.weight.register_post_accumulate_grad_hook(watch))
            return handles

    accs, used = capture(
        model, targets, make_batches("llama"), progress=False, make_accumulator=Watching
    )
    assert used == 3 and all(a.hits == 3 for a in accs.values())
    assert max(live_max) == 0  # freed immediately after each accumulation
    assert len(live_max) == 3 * len(targets)


def test_bf16_model_gives_fp32_gradient():
    model, original = tiny_peft("llama")
    model.to(torch.bfloat16)
    batches = make_batches("llama", n=2)
    G = gradlora.estimate_gradients(model, batches, progress=False)
    ref = reference_gradients(original, batches, list(G))
    for name, g in G.items():
        assert g.dtype == torch.float32
        rel = (g - ref[name]).norm() / ref[name].norm()
        assert rel < 0.1, (name, rel)


def test_errors_leave_model_untouched():
    model, _ = tiny_peft("bert")
    before = model_snapshot(model)
    with pytest.raises(gradlora.GradLoraError, match="empty"):
        gradlora.estimate_gradients(model, [], progress=False)
    bad = make_batches("bert", n=2)
    bad[1]["labels"] = bad[1]["labels"] * 0 + 5  # out of range for 2 labels -> error in loss
    nan_batch = make_batches("bert", n=1)
    with pytest.raises(gradlora.GradLoraError, match="loss is nan"):
        gradlora.estimate_gradients(
            model, nan_batch, loss_fn=lambda m, b: m(**b).loss * float("nan"), progress=False
        )
    with pytest.raises(gradlora.GradLoraError, match="not a dict"):
        gradlora.estimate_gradients(model, [torch.zeros(2, 3)], progress=False)
    no_labels = [{k: v for k, v in b.items() if k != "labels"} for b in make_batches("bert", n=1)]
    with pytest.raises(gradlora.GradLoraError, match="no .loss"):
        gradlora.estimate_gradients(model, no_labels, progress=False)
    with pytest.raises(gradlora.GradLoraError, match="num_batches"):
        gradlora.estimate_gradients(model, make_batches("bert"), num_batches=0, progress=False)
    assert_same_snapshot(before, model_snapshot(model))


def test_layer_without_gradient_is_named():
    model, _ = tiny_peft("llama")
    batches = make_batches("llama", n=1)

    def loss_fn(m, batch):  # uses only layer 0's output: layer 1 gets no gradient
        out = m(**batch, output_hidden_states=True)
        return out.hidden_states[1].pow(2).mean()

    before = model_snapshot(model)
    with pytest.raises(
        gradlora.GradLoraError, match=r"no gradient reached layer\(s\) \['model.layers.1"
    ):
        gradlora.estimate_gradients(model, batches, loss_fn=loss_fn, progress=False)
    assert_same_snapshot(before, model_snapshot(model))


def test_runs_out_of_batches_warns():
    model, _ = tiny_peft("llama")
    with pytest.warns(UserWarning, match="ran out after 2"):
        gradlora.estimate_gradients(
            model, make_batches("llama", n=2), num_batches=4, progress=False
        )


def test_reduce_seam_sums_state_and_counts():
    """A cross-rank sum of two identical ranks must give the same mean gradient, twice the batches."""
    model, _ = tiny_peft("gpt2")
    targets = supported_layers(model)[0]
    batches = make_batches("gpt2", n=2)
    single, used1 = capture(model, targets, batches, progress=False)
    seen = []

    def two_identical_ranks(tensors):
        seen.append(len(tensors))
        for t in tensors:
            t.mul_(2)

    doubled, used2 = capture(model, targets, batches, progress=False, reduce=two_identical_ranks)
    assert seen == [len(targets) + 1] and used2 == 2 * used1 == 4
    assert all(a.hits == 4 for a in doubled.values())
    for name in single:
        torch.testing.assert_close(doubled[name].result(used2), single[name].result(used1))


class DictOutputNet(torch.nn.Module):
    """Someone else's model: returns a plain dict, or the loss tensor itself."""

    def __init__(self, as_tensor: bool):
        super().__init__()
        self.as_tensor = as_tensor
        self.proj = torch.nn.Linear(6, 4)

    def forward(self, x, y):
        loss = torch.nn.functional.cross_entropy(self.proj(x), y)
        return loss if self.as_tensor else {"loss": loss, "logits": None}


@pytest.mark.parametrize("as_tensor", [False, True])
def test_models_returning_dict_or_tensor_loss(as_tensor):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = DictOutputNet(as_tensor)
    model = get_peft_model(net, LoraConfig(r=1, target_modules=["proj"]))
    batches = [{"x": torch.randn(8, 6), "y": torch.randint(0, 4, (8,))} for _ in range(2)]
    G = gradlora.estimate_gradients(model, batches, num_batches=2, progress=False)
    W = net.proj.base_layer.weight.detach().clone().requires_grad_()
    bias = net.proj.base_layer.bias.detach()
    losses = [torch.nn.functional.cross_entropy(b["x"] @ W.T + bias, b["y"]) for b in batches]
    ref = sum(torch.autograd.grad(loss, W)[0] for loss in losses) / 2
    torch.testing.assert_close(G["proj"], ref)


def test_single_batch_instead_of_iterable_is_explained():
    model, _ = tiny_peft("llama")
    with pytest.raises(gradlora.GradLoraError, match=r"single dict; pass an iterable of batches"):
        gradlora.estimate_gradients(model, make_batches("llama", n=1)[0], progress=False)
