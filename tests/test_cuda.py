"""The paths that differ on a GPU, against CPU float64 references (issue 27; docs/gpu.md).

Every test runs on "cpu" and "cuda" (skipped with a reason without a GPU), so the comparisons
and tolerances are exercised in the normal suite; ``pytest -m cuda tests/test_cuda.py`` runs
them all. Init tolerances: G within G_TOL[dtype] of fp64. The init's factors are singular
vectors of G, which dG turns by about ||dG||_2 / gap (Wedin), gap the smallest distance between
the singular values the init separates (sigma_1..sigma_2r+1 for LoRA-GA, sigma_r and sigma_r+1
for LoRA-One; a global scale of G changes neither), so each layer's s B A must be within
4 ||dG||_2 / gap of the fp64 one, dG measured; layers whose bound exceeds FIRST_ORDER are not
compared (singular vectors may trade places), at least half must be. bf16 moves G by ~1%,
which only wide gaps resolve: its cases use r = 1 (gaps among the top three values).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import lora_config, make_batches, tiny_base, wide_llama_config
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

import gradlora

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("one_thread")]

NO_CUDA = "no CUDA device (torch.cuda.is_available() is False)"
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA))
DEVICES = ["cpu", CUDA]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
RANK = {torch.float32: 2, torch.bfloat16: 1}
G_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # relative error of G, per layer
SKETCH_NOISE = 1e-5  # the sketch's fp32 reconstruction, relative to sigma_1, added to ||dG||_2
FIRST_ORDER = 0.5  # largest bound at which a layer is compared
WEIGHT0 = "gradlora_weight0"  # README: A0, B0 are kept as buffers lora_A/B.<adapter>.<WEIGHT0>
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def full_fp32_matmuls():
    """fp32 cases compare fp32 arithmetic: TF32 (which a user may switch on) is off."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def build(dtype: torch.dtype, device: str, r: int = 2):
    """conftest's tiny Llama with its base in ``dtype`` (adapters fp32, as peft makes them)."""
    base = tiny_base("llama")
    if dtype != torch.float32:
        base = base.to(dtype)
    torch.manual_seed(1)
    return get_peft_model(base, lora_config("llama", r=r)).to(device)


def reference(dtype: torch.dtype, r: int = 2):
    """``build(dtype, "cpu", r)`` in float64: the same (dtype-rounded) weights, fp64 arithmetic."""
    return build(dtype, "cpu", r).double()


def to(batches, device):
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


def lora_layers(model) -> dict[str, LoraLayer]:
    """The LoRA layers by module name in the base model (the keys of ``InitReport.layers``)."""
    base = model.get_base_model()
    return {n: m for n, m in base.named_modules() if isinstance(m, LoraLayer)}


def products(model, init: bool = False) -> dict[str, torch.Tensor]:
    """s B A (m, n) per layer, float64 on the CPU; ``init``: s B0 A0 from the stored factors."""
    out = {}
    for name, layer in lora_layers(model).items():
        A, B = (
            getattr(x["default"], WEIGHT0) if init else x["default"].weight
            for x in (layer.lora_A, layer.lora_B)
        )
        out[name] = layer.scaling["default"] * B.detach().double().cpu() @ A.detach().double().cpu()
    return out


def base_weights(model) -> dict[str, torch.Tensor]:
    return {n: m.get_base_layer().weight.detach().clone() for n, m in lora_layers(model).items()}


def logits(model, batches, train: bool = False) -> torch.Tensor:
    """Logits on ``batches`` without grad, float64 on the CPU. ``train``: in train mode (no
    dropout here), which bitsandbytes' 4-bit CPU layers need to keep passing gradients."""
    model.train(train)
    with torch.no_grad():
        out = [model(**{k: v for k, v in b.items() if k != "labels"}).logits for b in batches]
    return torch.cat(out).double().cpu()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (Frobenius norms)."""
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm()).item()


def compare_gradients(model, ref, batches, dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """G of ``model`` (on its device, in its dtype) against G of the fp64 ``ref``, per layer:
    each within G_TOL[dtype] relative. Returns {name: (G64, G - G64)}, float64 on the CPU."""
    n = len(batches)
    got = gradlora.estimate_gradients(model, batches, num_batches=n, progress=False)
    want = gradlora.estimate_gradients(ref, to(batches, "cpu"), num_batches=n, progress=False)
    assert got.keys() == want.keys() == lora_layers(model).keys()
    errors = {name: rel(got[name], want[name]) for name in want}
    worst = max(errors, key=errors.get)
    assert errors[worst] < G_TOL[dtype], (worst, errors[worst])
    return {k: (want[k].double(), got[k].double().cpu() - want[k].double()) for k in want}


def separated(method: str, r: int) -> tuple[list[int], int]:
    """(gaps, k): the init needs sigma_i > sigma_i+1 for i in gaps (0-based), and the signs of
    the first k singular vector pairs (LoRA-GA pairs u_r+i with v_i; [G]_r has no sign)."""
    return (list(range(2 * r)), 2 * r) if method == "lora-ga" else ([r - 1], 0)


def bound(G64: torch.Tensor, dG: torch.Tensor, method: str, r: int, noise: float = 0.0):
    """(b, signed): b = 4 (||dG||_2 + noise sigma_1) / min gap, the first-order relative change
    of the init's products of singular vectors of G64 (m, n) (module docstring); signed: whether
    the sign convention (largest entry of each u_i positive) is stable under dG, i.e. for each
    of the k vectors its two largest |entries| are further apart than b (which bounds ||du_i||)."""
    gaps, k = separated(method, r)
    U, S, _ = torch.linalg.svd(G64, full_matrices=False)
    gap = min((S[i] - S[i + 1]).item() for i in gaps)
    spread = torch.linalg.matrix_norm(dG, ord=2).item() + noise * S[0].item()
    b = 4 * spread / max(gap, 1e-300)
    top2 = U[:, :k].abs().topk(2, dim=0).values
    return b, bool((top2[0] - top2[1] > b).all())


def assert_spectral_close(got, want, grads, method, r, noise=0.0, what="s B A") -> int:
    """Each layer of ``got`` within its ``bound`` of ``want`` (up to sign where the sign is not
    stable); layers with a bound above FIRST_ORDER are not compared, and at least half of them
    must be. Returns how many were."""
    compared = 0
    for name in want:
        b, signed = bound(*grads[name], method, r, noise)
        if b > FIRST_ORDER:
            continue
        compared += 1
        err = rel(got[name], want[name])
        if not signed:
            err = min(err, rel(got[name], -want[name]))
        assert err <= b, (what, name, err, b)
    assert 2 * compared >= len(want), (what, f"only {compared} of {len(want)} layers resolved")
    return compared


@pytest.mark.parametrize("gradient", ["exact", "sketch"])
@pytest.mark.parametrize("method", ["lora-ga", "lora-one"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("device", DEVICES)
def test_init_matches_float64(device, dtype, method, gradient):
    """G, s B A and, for LoRA-GA, s B0 A0 and the weight offset W' - W = -s B0 A0 of an init on
    ``device`` in ``dtype`` equal those of the same init in fp64 on the CPU; outputs kept."""
    r, batches = RANK[dtype], to(make_batches("llama", n=2), device)
    model, ref = build(dtype, device, r), reference(dtype, r)
    grads = compare_gradients(model, ref, batches, dtype)
    w_before, out_before = base_weights(model), logits(model, batches)
    kw = dict(method=method, gradient=gradient, num_batches=2, progress=False)
    if method == "lora-ga":
        kw["offset"] = "weight"  # the weight offset's rounding is what this compares
    report = gradlora.initialize(model, batches, **kw)
    ref_report = gradlora.initialize(ref, to(batches, "cpu"), **kw)
    assert report.gradient == gradient and set(report.layers) == set(grads)
    noise = SKETCH_NOISE if gradient == "sketch" else 0.0
    for name, (_, dG) in grads.items():  # Weyl: |sigma_i(G + dG) - sigma_i(G)| <= ||dG||_2
        got, want = (torch.tensor(r.layers[name].singular_values) for r in (report, ref_report))
        slack = torch.linalg.matrix_norm(dG, ord=2) + (noise + 1e-6) * want[0]
        assert ((got - want).abs() <= 2 * slack).all(), (name, got, want)
    w_after = base_weights(model)
    assert all(w.device.type == device and w.dtype == dtype for w in w_after.values())

    assert_spectral_close(products(model), products(ref), grads, method, r, noise)
    if method == "lora-ga":
        offset = products(model, init=True)  # s B0 A0 as stored; B A starts there
        for n, p in products(model).items():
            torch.testing.assert_close(p, offset[n], rtol=1e-6, atol=0)
        assert_spectral_close(offset, products(ref, True), grads, method, r, noise, "s B0 A0")
        eps32 = torch.finfo(torch.float32).eps
        for n, w in w_after.items():  # W' = W - s B0 A0 in fp32, rounded once to W's dtype
            w, w0 = w.double().cpu(), w_before[n].double().cpu()
            scale = w0.abs() + offset[n].abs().max()
            slack = torch.finfo(dtype).eps * w.abs() + 8 * eps32 * scale
            assert ((w - w0 + offset[n]).abs() <= slack).all(), n
    else:
        assert all(torch.equal(w_after[n], w_before[n]) for n in w_after)
    tol = 1e-5 if dtype == torch.float32 else 5e-2  # of the largest logit
    out, want = logits(model, batches), logits(ref, to(batches, "cpu"))
    assert (out - want).abs().max() <= tol * want.abs().max()
    if method == "lora-ga":  # the offset keeps the function; LoRA-One's init moves it
        assert (out - out_before).abs().max() <= tol * out_before.abs().max()


@pytest.mark.parametrize("device", DEVICES)
def test_offset_adapter_keeps_the_base_and_steps_like_offset_weight(device):
    """offset="adapter" on ``device``: every base weight byte-identical, outputs kept, s B A and
    s B0 A0 those of the fp64 offset="weight" init, disable_adapter() the original model, and
    one SGD step gives the same model as with offset="weight" on the same device."""
    batches = to(make_batches("llama", n=2), device)
    models = {mode: build(torch.float32, device) for mode in ("adapter", "weight")}
    ref = reference(torch.float32)
    grads = compare_gradients(models["adapter"], ref, batches, torch.float32)
    w_before, out_before = base_weights(models["adapter"]), logits(models["adapter"], batches)
    kw = dict(num_batches=2, progress=False)
    gradlora.initialize(ref, to(batches, "cpu"), offset="weight", **kw)
    for mode, model in models.items():
        assert gradlora.initialize(model, batches, offset=mode, **kw).offset == mode
    model = models["adapter"]
    assert all(torch.equal(w, w_before[n]) for n, w in base_weights(model).items())
    torch.testing.assert_close(logits(model, batches), out_before, rtol=1e-5, atol=1e-6)
    assert_spectral_close(products(model), products(ref), grads, "lora-ga", 2)
    assert_spectral_close(products(model, True), products(ref, True), grads, "lora-ga", 2, 0, "B0")
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, batches), out_before, rtol=1e-6, atol=1e-7)

    stepped = {}
    for mode, m in models.items():
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
        m.train()
        sum(m(**b).loss for b in batches).backward()
        opt.step()
        stepped[mode] = logits(m, batches)
    assert rel(stepped["adapter"], out_before) > 1e-4  # the step moved the model
    torch.testing.assert_close(stepped["adapter"], stepped["weight"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("offset", ["weight", "adapter"])
@pytest.mark.parametrize("device", DEVICES)
def test_portable_save_loads_with_plain_peft_on_the_original_base(device, offset, tmp_path):
    """A LoRA-GA model trained on ``device``, saved by gradlora.save_adapter, loads with plain
    peft onto the original base (on ``device`` and on the CPU) and gives the same logits; the
    saved adapter has rank 2r; gradlora.load_adapter resumes it."""
    batches = to(make_batches("llama", n=2), device)
    model = build(torch.float32, device)
    gradlora.initialize(model, batches, offset=offset, num_batches=2, progress=False)
    opt = gradlora.create_optimizer(model, "adamw", lr=1e-2)
    model.train()
    for b in batches:
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad()
    trained = logits(model, batches)
    path = gradlora.save_adapter(model, tmp_path / "adapter")
    assert PeftConfig.from_pretrained(str(path)).r == 2 * RANK[torch.float32]
    for where in dict.fromkeys([device, "cpu"]):
        plain = PeftModel.from_pretrained(tiny_base("llama").to(where), str(path))
        got = logits(plain, to(batches, where))
        torch.testing.assert_close(got, trained, rtol=1e-5, atol=1e-5)
    original = logits(tiny_base("llama").to(device), batches)
    assert rel(trained, original) > 1e-4  # training moved it: the comparison is not vacuous
    resumed = gradlora.load_adapter(tiny_base("llama").to(device), path, offset=offset)
    torch.testing.assert_close(logits(resumed, batches), trained, rtol=1e-5, atol=1e-5)


OPTIMIZERS = {"adamw": ("adamw", {}), "preconditioned": ("preconditioned", {}),
              "lora-pro": ("lora-pro", {"mode": "efficient"}),
              "lora-pro-full": ("lora-pro", {"mode": "full"})}  # fmt: skip
UPDATE_TOL = {torch.float32: 2e-3, torch.bfloat16: 0.1}  # per parameter / all together (bf16)
LOSS_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3}


def train(model, name, batches, steps=4) -> tuple[dict[str, torch.Tensor], list[float], object]:
    """``steps`` steps of optimizer ``name``: (update of each trainable parameter, float64 on
    the CPU; the losses; the optimizer)."""
    kind, kw = OPTIMIZERS[name]
    opt = gradlora.create_optimizer(model, kind, lr=1e-2, **kw)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses = []
    model.train()
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = model(**batches[i % len(batches)]).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    moved = {n: p.detach().double().cpu() for n, p in model.named_parameters() if n in start}
    return {n: moved[n] - start[n].double().cpu() for n in start}, losses, opt


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("device", DEVICES)
def test_optimizer_steps_match_float64(device, dtype, name):
    """Four steps of each optimizer on ``device`` (base in ``dtype``, fp32 adapters, B nonzero)
    move every LoRA parameter as the same run in fp64 on the CPU does; fp32: each within
    UPDATE_TOL, bf16 (whose Adam steps flip on small gradients): all of them together."""
    model = build(dtype, "cpu")
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a nonzero B, so that A gets a gradient from the first step
        for layer in lora_layers(model).values():
            B = layer.lora_B["default"].weight
            B.copy_(0.02 * torch.randn(B.shape, generator=gen))
    ref = copy.deepcopy(model).double()
    batches = make_batches("llama", n=2)
    got, losses, opt = train(model.to(device), name, to(batches, device))
    want, ref_losses, _ = train(ref, name, batches)
    assert all(w.norm() > 0 for w in want.values())
    if dtype == torch.float32:
        worst = max(got, key=lambda n: rel(got[n], want[n]))
        assert rel(got[worst], want[worst]) < UPDATE_TOL[dtype], worst
    else:
        assert (
            rel(
                torch.cat([g.flatten() for g in got.values()]),
                torch.cat([w.flatten() for w in want.values()]),
            )
            < UPDATE_TOL[dtype]
        )
    for a, b in zip(losses, ref_losses, strict=True):
        assert abs(a - b) <= LOSS_TOL[dtype] * abs(b)
    states = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    moments = [t for t in states if t.dim() > 0]
    assert moments and all(t.device.type == device and t.dtype == torch.float32 for t in moments)


def bitsandbytes_on(device: str):
    """bitsandbytes' functional module, or a skip with the reason it cannot run on ``device``."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    try:
        import bitsandbytes.functional as F

        packed, state = F.quantize_4bit(torch.ones(64, 64, device=device), quant_type="nf4")
        F.dequantize_4bit(packed, state)
    except Exception as err:  # e.g. a CPU-only build of bitsandbytes on a GPU machine
        pytest.skip(f"bitsandbytes {bnb.__version__} cannot quantize on {device}: {err!r}")
    return F


@pytest.mark.parametrize("device", DEVICES)
def test_qlora_nf4_with_bf16_compute(device, tmp_path):
    """LoRA-GA (r = 1) on an nf4 base computing in bf16: G and s B A match the fp64 init on the
    dequantized weights W_q; the packed weights stay byte-identical (offset="adapter"), outputs
    are kept, LoRA-Pro steps it, and the saved adapter loads with plain peft on a fresh nf4 base."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    F = bitsandbytes_on(device)
    torch.manual_seed(0)  # bitsandbytes' 4-bit blocks need layers at least 64 wide
    cfg = wide_llama_config()
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    nf4 = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    where = {"": 0 if device == "cuda" else "cpu"}

    def quantized():
        return LlamaForCausalLM.from_pretrained(
            tmp_path / "base", quantization_config=nf4, device_map=where, dtype=torch.bfloat16
        )

    def lora(base):
        torch.manual_seed(1)
        config = LoraConfig(r=1, lora_alpha=2, lora_dropout=0.0, target_modules=PROJ)
        return get_peft_model(base, config)

    model = lora(quantized())
    packed = base_weights(model)
    float_base = LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16)
    with torch.no_grad():  # the fp64 reference computes with W_q
        for name, layer in lora_layers(model).items():
            w = layer.get_base_layer().weight
            float_base.get_submodule(name).weight.copy_(F.dequantize_4bit(w.data, w.quant_state))
    ref = lora(float_base).double()
    batches = to(make_batches("llama", n=2), device)
    grads = compare_gradients(model, ref, batches, torch.bfloat16)
    before = logits(model, batches, train=True)
    report = gradlora.initialize(model, batches, num_batches=2, progress=False)
    gradlora.initialize(ref, to(batches, "cpu"), offset="weight", num_batches=2, progress=False)
    assert report.offset == "adapter"
    assert all(torch.equal(w, packed[n]) for n, w in base_weights(model).items())
    assert_spectral_close(products(model), products(ref), grads, "lora-ga", 1)
    out = logits(model, batches, train=True)
    assert (out - before).abs().max() <= 5e-2 * before.abs().max()

    opt = gradlora.create_optimizer(model, "lora-pro", lr=1e-2)
    start = products(model)
    model.train()
    for b in batches:
        model(**b).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(w, packed[n]) for n, w in base_weights(model).items())
    assert all(rel(p, start[n]) > 0 and p.isfinite().all() for n, p in products(model).items())
    trained = logits(model, batches, train=True)
    path = gradlora.save_adapter(model, tmp_path / "adapter")
    plain = PeftModel.from_pretrained(quantized(), str(path))
    assert rel(logits(plain, batches, train=True), trained) < 3e-2  # bf16 compute
    assert rel(trained, before) > 0.3  # the steps moved the model well beyond that
