"""GPU check (issue 27): cost of the gradient inits and of the optimizers at an 8B model's layer
shapes, against plain LoRA. Run through benchmarks/gpu_check.sh, which runs the cuda tests first.

Model: a random-weight Llama with Llama-3-8B's layer shapes (hidden 4096, intermediate 14336,
32 heads, 8 KV heads) but 4 layers and a 32000 vocabulary, in bf16; LoRA r=16, alpha=32 on
q, k, v, o, gate, up, down (fp32 adapters, as peft makes them on a bf16 base); N = 8 random
batches of 4 x 2048 tokens, causal LM loss. ``--tiny``: hidden 64, intermediate 128, 4 heads,
2 KV heads, 2 layers, vocab 128, r=4, batches of 2 x 32 (seconds on a CPU).

Init cases (each on a fresh model with the same weights):
  lora_passes     N plain LoRA forward+backward passes (the floor the init is compared with)
  lora_step       one LoRA training step (forward, backward, torch AdamW), median of 3 after 2
  lora_ga_exact   gradlora.initialize(method="lora-ga", gradient="exact", num_batches=N)
  lora_ga_sketch  the same with gradient="sketch"
Optimizer cases (fresh model, B ~ N(0, 1e-3^2) so no pair starts at B = 0): torch AdamW,
gradlora's preconditioned AdamW, LoRA-Pro efficient and full; ``--steps`` timed steps after 3
warm-ups, median ms of the whole step and of optimizer.step() alone, both also as x AdamW's.

Times: wall clock between torch.cuda.synchronize() calls (on the CPU: plain wall clock), after
a warm-up of every kernel involved (one pass, one step and one tiny init, untimed). Memory:
``peak_bytes`` is torch.cuda.max_memory_allocated over the case (reset at its start, the model
already loaded; for the inits the max of gradlora's own capture and SVD peaks, which it measures
the same way, and of what follows them), ``increase_bytes`` that minus what was allocated when
the case began. On the CPU no allocator peak exists: every memory field is null and
``memory_metric`` says so.

    python benchmarks/gpu_check.py OUTDIR [--device cuda|cpu] [--tiny] [--steps 10]
writes OUTDIR/gpu_check.json and OUTDIR/gpu_check.md.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")

import torch  # noqa: E402
from _gpu_check_report import add_ratios, cuda_tests, markdown  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import gradlora  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FULL = dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8, layers=4, vocab=32000,
            batch=4, seq=2048, rank=16)  # fmt: skip
TINY = dict(hidden=64, intermediate=128, heads=4, kv_heads=2, layers=2, vocab=128,
            batch=2, seq=32, rank=4)  # fmt: skip
OPTIMIZERS = {
    "adamw": ("adamw", {}),
    "preconditioned": ("preconditioned", {}),
    "lora_pro": ("lora-pro", {"mode": "efficient"}),
    "lora_pro_full": ("lora-pro", {"mode": "full"}),
}
INIT_CASES = ["lora_passes", "lora_step", "lora_ga_exact", "lora_ga_sketch"]
TESTS_RC = "GPU_CHECK_TESTS_RC"  # pytest's exit status, set by gpu_check.sh after the cuda tests


class Bench:
    """Shapes, device and dtype of one run; builds the models and times / measures cases."""

    def __init__(self, shapes: dict, device: str, dtype: torch.dtype, num_batches: int):
        self.shapes, self.device, self.dtype = shapes, torch.device(device), dtype
        self.cuda = self.device.type == "cuda"
        gen = torch.Generator().manual_seed(1)
        size = (shapes["batch"], shapes["seq"])
        self.batches = []
        for _ in range(num_batches):
            ids = torch.randint(0, shapes["vocab"], size, generator=gen).to(self.device)
            self.batches.append({"input_ids": ids, "labels": ids})

    def model(self, b_std: float = 0.0):
        """A fresh LoRA model: random Llama of ``shapes`` (same seed each call) drawn on the
        device, cast to ``dtype``; LoRA r, alpha 2r on TARGETS (fp32 adapters: peft's default on
        a bf16 base); B ~ N(0, b_std^2) if b_std, else peft's B = 0."""
        s = self.shapes
        cfg = LlamaConfig(
            vocab_size=s["vocab"],
            hidden_size=s["hidden"],
            intermediate_size=s["intermediate"],
            num_hidden_layers=s["layers"],
            num_attention_heads=s["heads"],
            num_key_value_heads=s["kv_heads"],
            max_position_embeddings=max(2048, s["seq"]),
        )
        torch.manual_seed(0)
        with self.device:  # drawn on the device (seconds for 1B weights), then cast
            base = LlamaForCausalLM(cfg).to(self.dtype)
        config = LoraConfig(
            r=s["rank"], lora_alpha=2 * s["rank"], lora_dropout=0.0, target_modules=TARGETS
        )
        model = get_peft_model(base, config).train()
        if b_std:
            gen = torch.Generator(device=self.device).manual_seed(2)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.copy_(b_std * torch.randn(p.shape, generator=gen, device=self.device))
        return model

    def adapted_params(self) -> int:
        """Weights under a LoRA adapter: layers (2 h^2 + 2 h kv + 3 h i), kv = h / heads kv_heads
        (q, o: h x h; k, v: kv x h; gate, up: i x h; down: h x i)."""
        s = self.shapes
        h, i, kv = s["hidden"], s["intermediate"], s["hidden"] // s["heads"] * s["kv_heads"]
        return s["layers"] * (2 * h * h + 2 * h * kv + 3 * h * i)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def now(self) -> float:
        """Wall clock after the device has finished what was queued (seconds)."""
        self.sync()
        return time.perf_counter()

    def reset_peak(self) -> int:
        """Start a memory measurement: returns the bytes allocated now (0 on the CPU)."""
        if not self.cuda:
            return 0
        self.sync()
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    def peak(self, start: int, *more: int) -> dict:
        """{peak_bytes, increase_bytes} since ``reset_peak`` (with other peaks ``more``), or
        nulls on the CPU."""
        if not self.cuda:
            return {"peak_bytes": None, "increase_bytes": None}
        self.sync()
        peak = max(torch.cuda.max_memory_allocated(self.device), *more)
        return {"peak_bytes": peak, "increase_bytes": max(peak - start, 0)}

    def free(self) -> None:
        """Give a finished case's memory back (models hold reference cycles) before the next
        case's measurement; on the CPU nothing is measured (and collecting takes seconds)."""
        if self.cuda:
            gc.collect()
            torch.cuda.empty_cache()


def timed_step(bench: Bench, model, opt, batch) -> tuple[float, float]:
    """Milliseconds of (the whole step, optimizer.step() alone) for one training step."""
    start = bench.now()
    opt.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    mid = bench.now()
    opt.step()
    end = bench.now()
    return (end - start) * 1e3, (end - mid) * 1e3


def make_optimizer(model, name: str):
    kind, kw = OPTIMIZERS[name]
    return gradlora.create_optimizer(model, kind, lr=1e-5, **kw)


def state_bytes(opt) -> int:
    return sum(
        t.numel() * t.element_size()
        for s in opt.state.values()
        for t in s.values()
        if isinstance(t, torch.Tensor)
    )


def warm_up(bench: Bench) -> dict:
    """Load every kernel the cases use: a pass, an AdamW step, tiny LoRA-GA inits; its seconds."""
    t0 = bench.now()
    model = bench.model()
    opt = make_optimizer(model, "adamw")
    timed_step(bench, model, opt, bench.batches[0])
    del model, opt
    bench.free()
    tiny = Bench({**TINY}, str(bench.device), bench.dtype, 2)
    for gradient in ("exact", "sketch"):
        gradlora.initialize(
            tiny.model(), tiny.batches, gradient=gradient, num_batches=2, progress=False
        )
    return {"seconds": bench.now() - t0}


def init_case(bench: Bench, case: str) -> dict:
    """One init case on a fresh model: seconds and memory (module docstring)."""
    model = bench.model()
    start = bench.reset_peak()
    out: dict = {"case": case}
    if case == "lora_passes":
        adapted = sum(
            m.get_base_layer().weight.numel() for m in model.modules() if isinstance(m, LoraLayer)
        )
        assert adapted == bench.adapted_params(), (adapted, bench.adapted_params())
        t0 = bench.now()
        for batch in bench.batches:
            model(**batch).loss.backward()
        out["seconds"] = bench.now() - t0
    elif case == "lora_step":
        opt = make_optimizer(model, "adamw")
        for batch in bench.batches[:2]:  # warm-ups: AdamW's state exists before the timing
            timed_step(bench, model, opt, batch)
        start = bench.reset_peak()
        n = len(bench.batches)
        ms = [timed_step(bench, model, opt, bench.batches[(2 + i) % n])[0] for i in range(3)]
        out["seconds"] = statistics.median(ms) / 1e3
    else:
        gradient = case.rsplit("_", 1)[1]
        t0 = bench.now()
        report = gradlora.initialize(
            model, bench.batches, method="lora-ga", gradient=gradient,
            num_batches=len(bench.batches), progress=False,
        )  # fmt: skip
        out["seconds"] = bench.now() - t0
        out["capture_seconds"], out["svd_seconds"] = report.capture.seconds, report.svd.seconds
        out["gradient"] = report.gradient
        if bench.cuda:  # the meter reset the peak at each phase: take its peaks too
            out.update(bench.peak(start, report.capture.peak_bytes, report.svd.peak_bytes))
    out.update({} if "peak_bytes" in out else bench.peak(start))
    del model
    bench.free()
    return out


def optimizer_case(bench: Bench, name: str, steps: int) -> dict:
    """Median ms of the whole step and of optimizer.step(), state bytes and peak memory."""
    model = bench.model(b_std=1e-3)
    start = bench.reset_peak()
    opt = make_optimizer(model, name)
    batches = bench.batches
    for i in range(3):  # warm-ups (the optimizer's state is created here)
        timed_step(bench, model, opt, batches[i % len(batches)])
    times = [timed_step(bench, model, opt, batches[(3 + i) % len(batches)]) for i in range(steps)]
    out = {
        "optimizer": name,
        "step_ms": statistics.median(t[0] for t in times),
        "optimizer_ms": statistics.median(t[1] for t in times),
        "state_bytes": state_bytes(opt),
        **bench.peak(start),
    }
    del model, opt
    bench.free()
    return out


def environment(bench: Bench) -> dict:
    import peft
    import transformers

    try:  # the installed distribution, without importing it (slow, and noisy on a CPU)
        bnb = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        bnb = None
    name = torch.cuda.get_device_name(bench.device) if bench.cuda else platform.processor()
    return {
        "device": bench.device.type,
        "device_name": name or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "gradlora": gradlora.__version__,
        "bitsandbytes": bnb,
        "threads": torch.get_num_threads(),
    }


def run_case(bench: Bench, fn, *args) -> dict:
    """``fn(bench, *args)``, or {"error": ...} if it raised (e.g. out of memory): one failed
    case leaves the others' results."""
    try:
        return fn(bench, *args)
    except Exception as err:  # recorded, and the exit status says so
        bench.free()
        return {"error": f"{type(err).__name__}: {str(err)[:300]}"}


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, run every case, write OUTDIR/gpu_check.{json,md} after each case
    (a run cut short keeps what it measured); 1 if a case failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (seconds on a CPU)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--batches", type=int, default=8, help="N: batches of the init")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (10; tiny: 3)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False (use --device cpu)")
    steps = args.steps or (3 if args.tiny else 10)
    shapes = dict(TINY if args.tiny else FULL)
    bench = Bench(shapes, args.device, getattr(torch, args.dtype), args.batches)
    started = time.perf_counter()
    tests_rc = int(os.environ[TESTS_RC]) if os.environ.get(TESTS_RC) else None
    result = {
        "schema": 1,
        "tiny": args.tiny,
        "environment": environment(bench),
        "shapes": {**shapes, "dtype": args.dtype, "targets": TARGETS},
        "memory_metric": "cuda_max_allocated" if bench.cuda else None,
        "memory_note": "torch.cuda.max_memory_allocated, reset at each case's start"
        if bench.cuda
        else "CPU: no allocator peak; memory fields are null",
        "timing": "wall clock after warm-ups"
        + (", between torch.cuda.synchronize() calls" if bench.cuda else ""),
        "optimizer_steps_timed": steps,
        "cuda_tests": cuda_tests(args.outdir, tests_rc),
        "init": {},
        "optimizers": {},
    }
    result["shapes"].update(num_batches=args.batches, adapted_params=bench.adapted_params())
    args.outdir.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        add_ratios(result)
        result["seconds_total"] = time.perf_counter() - started
        (args.outdir / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.outdir / "gpu_check.md").write_text(markdown(result))

    result["warm_up"] = run_case(bench, warm_up)
    save()
    for case in INIT_CASES:
        result["init"][case] = row = run_case(bench, init_case, case)
        print(f"{case}: {row.get('seconds', row.get('error'))} s", flush=True)
        save()
    for name in OPTIMIZERS:
        result["optimizers"][name] = row = run_case(bench, optimizer_case, name, steps)
        print(f"{name}: {row.get('step_ms', row.get('error'))} ms/step", flush=True)
        save()
    print(markdown(result))
    rows = [result["warm_up"], *result["init"].values(), *result["optimizers"].values()]
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
