"""Time of one optimizer step (no forward/backward) on MiniLM's LoRA parameters, r=8, 36 pairs.

python benchmarks/optimizer_step.py    # prints ms/step for torch AdamW and PreconditionedAdamW
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import gradlora  # noqa: E402
from gradlora.bundled import load_minilm_lora  # noqa: E402


def time_steps(opt: torch.optim.Optimizer, steps: int = 50) -> float:
    for _ in range(5):
        opt.step()
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    model, _ = load_minilm_lora()
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(0)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    print(f"torch.optim.AdamW: {time_steps(torch.optim.AdamW(params, lr=1e-5)):.2f} ms/step")
    opt = gradlora.create_preconditioned_optimizer(model, lr=1e-5)
    print(f"gradlora PreconditionedAdamW: {time_steps(opt):.2f} ms/step")


if __name__ == "__main__":
    main()
