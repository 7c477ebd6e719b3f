import math

import pytest
import torch
from conftest import (
    assert_same_snapshot,
    make_batches,
    model_snapshot,
    reference_gradients,
    tiny_base,
    tiny_peft,
)

import gradlora
from gradlora.peft_view import supported_layers


def outputs(model, batches):
    model.eval()
    with torch.no_grad():
        return [model(**{k: v for k, v in b.items() if k != "labels"}).logits for b in batches]


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_ga_keeps_outputs(arch, rslora):
    model, _ = tiny_peft(arch, use_rslora=rslora)
    batches = make_batches(arch)
    before = outputs(model, batches)
    report = gradlora.initialize(model, batches, num_batches=3, progress=False)
    after = outputs(model, batches)
    for a, b in zip(before, after, strict=True):
        assert (a - b).abs().max() < 1e-5 * a.abs().max()
    # the init did change A, B and W: the test above is not vacuous
    t = supported_layers(model)[0][0]
    assert t.B.abs().max() > 0 and t.init_factors() is not None
    assert set(report.layers) == {t.name for t in supported_layers(model)[0]}


@pytest.mark.parametrize("direction", ["ArB2r", "A2rBr", "ArBr"])
@pytest.mark.parametrize("rslora", [False, True])
def test_first_sgd_step_equals_best_rank_2r_full_step(direction, rslora):
    """One SGD step of size eta on A, B moves s B A by -eta s^2 c^2 [G]_2r + O(eta^2),
    with G from plain autograd on an unwrapped copy of the original model."""
    arch, r, gamma, eta = "gpt2", 2, 16.0, 1e-3
    model, original = tiny_peft(arch, r=r, use_rslora=rslora)
    batches = make_batches(arch, n=2)
    gradlora.initialize(
        model, batches, num_batches=2, progress=False, direction=direction, gamma=gamma
    )
    targets = supported_layers(model)[0]
    G = reference_gradients(original, batches, [t.name for t in targets])

    model.train()
    loss = sum(model(**b).loss for b in batches) / len(batches)
    loss.backward()
    checked = 0
    for t in targets:
        s = t.scaling
        assert s == pytest.approx(2 * r / (math.sqrt(r) if rslora else r))
        U, S, Vh = torch.linalg.svd(G[t.name].double(), full_matrices=False)
        G2r = (U[:, : 2 * r] * S[: 2 * r]) @ Vh[: 2 * r]
        c2 = math.sqrt(t.shape[0]) / gamma
        A0, B0, gA, gB = (x.detach().double() for x in (t.A, t.B, t.A.grad, t.B.grad))
        rels = []
        for eta in (1e-3, 1e-4):
            step = s * ((B0 - eta * gB) @ (A0 - eta * gA) - B0 @ A0)
            expected = -eta * s**2 * c2 * G2r
            rels.append(((step - expected).norm() / expected.norm()).item())
        assert rels[0] < 1e-3, (t.name, rels)
        assert rels[1] < 0.2 * rels[0]  # the remainder is O(eta^2): it shrinks with eta
        # and it is not the full gradient step: the rank truncation is visible
        full = -eta * s**2 * c2 * G[t.name].double()
        assert (step - full).norm() > 100 * (step - expected).norm()
        checked += 1
    assert checked == 8


def test_lora_one_function_is_one_normalized_gradient_step(arch):
    """W + s B0 A0 = W - (s / (gamma sigma_1)) [G]_r, checked through each layer's outputs."""
    r, gamma = 3, 128.0
    model, original = tiny_peft(arch, r=r)
    batches = make_batches(arch)
    rep = gradlora.initialize(model, batches, method="lora-one", num_batches=3, progress=False)
    targets = supported_layers(model)[0]
    G = reference_gradients(original, batches, [t.name for t in targets])
    model.eval()
    for t in targets:
        assert t.init_factors() is None  # no offset: nothing to undo when saving
        layer_in = torch.randn(5, 7, t.shape[1])
        U, S, Vh = torch.linalg.svd(G[t.name].double(), full_matrices=False)
        Gr = ((U[:, :r] * S[:r]) @ Vh[:r]).float()
        W = t.weight_mn().detach()
        W_expected = W - t.scaling / (gamma * S[0].item()) * Gr
        bias = t.layer.get_base_layer().bias
        with torch.no_grad():
            got = t.layer(layer_in)
        want = layer_in @ W_expected.T + (0 if bias is None else bias)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert rep.layers[t.name].singular_values[0] == pytest.approx(S[0].item(), rel=1e-4)


def test_report_contents():
    model, original = tiny_peft("bert", r=2)
    batches = make_batches("bert")
    rep = gradlora.initialize(model, batches, num_batches=3, progress=False)
    G = reference_gradients(original, batches, list(rep.layers))
    assert rep.method == "lora-ga" and rep.num_batches == 3 and rep.options["gamma"] == 16
    for name, layer in rep.layers.items():
        S = torch.linalg.svdvals(G[name].double())[:4]
        assert len(layer.singular_values) == 4
        torch.testing.assert_close(
            torch.tensor(layer.singular_values, dtype=torch.float64), S, rtol=1e-4, atol=1e-8
        )
    assert rep.capture.seconds > 0 and rep.svd.seconds > 0
    assert rep.capture.peak_bytes > 0 and rep.capture.metric in ("rss_peak", "rss_peak_since_start")
    assert "lora-ga init of" in rep.summary()
    assert rep.to_dict()["layers"][name]["rank"] == 2


def test_bf16_model_init_keeps_outputs():
    model, _ = tiny_peft("llama")
    model.to(torch.bfloat16)
    batches = make_batches("llama")
    before = outputs(model, batches)
    gradlora.initialize(model, batches, num_batches=3, progress=False)
    after = outputs(model, batches)
    for a, b in zip(before, after, strict=True):
        assert (a.float() - b.float()).abs().max() < 0.05 * a.float().abs().max()
    t = supported_layers(model)[0][0]
    assert t.weight.dtype == torch.bfloat16 and t.init_factors()[0].dtype == t.A.dtype


def _assert_fails_untouched(model, match, batches, **kw):
    before = model_snapshot(model)
    with pytest.raises(gradlora.GradLoraError, match=match):
        gradlora.initialize(model, batches, progress=False, **kw)
    assert_same_snapshot(before, model_snapshot(model))


def test_bad_input_errors_leave_model_untouched():
    batches = make_batches("llama")
    plain = tiny_base("llama")
    _assert_fails_untouched(plain, "no LoRA adapters.*get_peft_model", batches)
    model, _ = tiny_peft("llama", r=10)  # k_proj is 16 x 32: 2r = 20 > 16
    _assert_fails_untouched(model, r"needs 20 singular vectors .*k_proj", batches)
    model, _ = tiny_peft("llama")
    _assert_fails_untouched(model, "empty", [])
    _assert_fails_untouched(
        model, "loss is nan", batches, loss_fn=lambda m, b: m(**b).loss * float("nan")
    )
    _assert_fails_untouched(
        model,
        "no gradient reached",
        batches,
        loss_fn=lambda m, b: m(**b, output_hidden_states=True).hidden_states[1].sum(),
    )
    _assert_fails_untouched(model, "unknown method 'pissa'", batches, method="pissa")
    _assert_fails_untouched(model, r"unknown option\(s\) rank", batches, rank=4)


def test_unsupported_target_module_type():
    from peft import LoraConfig, get_peft_model

    base = tiny_base("llama")
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"]))
    _assert_fails_untouched(
        model, "Embedding .*nn.Linear and transformers' Conv1D", make_batches("llama")
    )


def test_second_init_is_refused():
    model, _ = tiny_peft("gpt2")
    batches = make_batches("gpt2")
    gradlora.initialize(model, batches, num_batches=3, progress=False)
    _assert_fails_untouched(model, "already initialized", batches)


def test_only_active_adapter_is_initialized():
    model, _ = tiny_peft("llama")
    from conftest import lora_config

    model.add_adapter("other", lora_config("llama", r=2))
    other_before = {k: v.clone() for k, v in model.state_dict().items() if ".other." in k}
    gradlora.initialize(model, make_batches("llama"), num_batches=3, progress=False)
    for k, v in model.state_dict().items():
        if ".other." in k:
            assert torch.equal(v, other_before[k]), k
    assert all(t.adapter == "default" for t in supported_layers(model)[0])


class TwoLayerNet(torch.nn.Module):
    """Not a transformers model: a plain module someone else wrote, wrapped by peft."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(12, 24)
        self.act = torch.nn.GELU()
        self.fc2 = torch.nn.Linear(24, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def test_plain_torch_module_with_loss_fn(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    net = TwoLayerNet()
    original = TwoLayerNet()
    original.load_state_dict(net.state_dict())
    model = get_peft_model(net, LoraConfig(r=1, lora_alpha=2, target_modules=["fc1", "fc2"]))
    data = [(torch.randn(16, 12), torch.randint(0, 3, (16,))) for _ in range(4)]

    def loss_fn(m, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(m(x), y)

    x = torch.randn(5, 12)
    with torch.no_grad():
        before = model(x)
    report = gradlora.initialize(model, data, num_batches=4, loss_fn=loss_fn, progress=False)
    assert set(report.layers) == {"fc1", "fc2"}
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
    G = reference_gradients(original, data, ["fc1", "fc2"], loss_fn=loss_fn)
    for name in ("fc1", "fc2"):
        S = torch.linalg.svdvals(G[name])[:2]
        torch.testing.assert_close(
            torch.tensor(report.layers[name].singular_values), S, rtol=1e-4, atol=1e-7
        )
    gradlora.save_adapter(model, tmp_path)
    loaded = PeftModel.from_pretrained(original, str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), before, rtol=1e-5, atol=1e-6)
