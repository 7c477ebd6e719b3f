"""Why LoRA-One's preconditioner costs on the causal LMs (issue 26): the spectra of the r x r Gram
matrices BᵀB and AAᵀ it inverts, at LoRA-One's init, against the damping λ.

The preconditioned AdamW feeds Adam (BᵀB + λI)⁻¹ g_A and g_B (AAᵀ + λI)⁻¹. Adam divides each
entry by its own running scale, so a constant factor cancels. What survives is how unequal the
r eigen-directions are weighted. The direction of eigenvalue μ gets 1/(μ + λ), relative to the
largest eigenvalue's 1/(μ_max + λ). The spread κ = (μ_max + λ) / (μ_min + λ) is therefore the
factor by which the preconditioner re-weights directions before Adam; κ ≈ 1 is plain AdamW.

Task and init: `gradlora bench`'s Hamlet and arithmetic tasks (SmolLM2-135M, rank 8, the
lora-one recipe, seed 0, the first 8 training batches). For each layer, the eigenvalues of BᵀB
and AAᵀ at the init are reported, and κ at λ = 1e-6 (the default), 1e-4, 1e-2 and 1 (the sweep's
values), as quantiles over the layers.

    python benchmarks/gram_spectra.py
writes benchmarks/results/gram_spectra.{json,md}.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from gradlora.cli.recipes import build
from gradlora.cli.tasks import load_task
from gradlora.peft_view import supported_layers

RESULTS = Path(__file__).parent / "results"
LAMBDAS = (1e-6, 1e-4, 1e-2, 1.0)
TASKS = {  # name: (data, max_length, batch size, val / test sizes), as in lr_sweeps.sh
    "SmolLM2 / Hamlet": ("hamlet", 32, 8, 96, 96),
    "SmolLM2 / arithmetic": ("arithmetic", 96, 8, 96, 128),
}


def quantiles(values: list[float]) -> list[float]:
    """[min, median, max]."""
    t = torch.tensor(values, dtype=torch.float64)
    return [t.min().item(), t.median().item(), t.max().item()]


def spectra(data: str, max_length: int, batch: int, val: int, test: int) -> dict:
    torch.manual_seed(0)
    task = load_task("smollm2", data, max_length=max_length, val_size=val, test_size=test)
    batches = task.batches("train", batch, max_length, 8, seed=0)
    model = build("lora-one", task, lr=2e-3, seed=0, train_batches=batches).model
    grams = {"BtB": [], "AAt": []}
    for t in supported_layers(model)[0]:
        A, B = t.A.detach().double(), t.B.detach().double()
        grams["BtB"].append(torch.linalg.eigvalsh(B.T @ B).clamp_min(0))
        grams["AAt"].append(torch.linalg.eigvalsh(A @ A.T).clamp_min(0))
    out = {"layers": len(grams["BtB"])}
    for name, eigs in grams.items():
        out[name] = {
            "largest": quantiles([e.max().item() for e in eigs]),
            "smallest": quantiles([e.min().item() for e in eigs]),
            "kappa": {
                f"{lam:g}": quantiles([((e.max() + lam) / (e.min() + lam)).item() for e in eigs])
                for lam in LAMBDAS
            },
        }
    return out


def main() -> None:
    torch.set_num_threads(1)
    results = {name: spectra(*spec) for name, spec in TASKS.items()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gram_spectra.json").write_text(json.dumps(results, indent=1))
    lines = [
        "# Gram spectra at LoRA-One's init (benchmarks/gram_spectra.py)",
        "",
        "Eigenvalues of BᵀB and AAᵀ per layer at the lora-one recipe's init (rank 8, seed 0), and "
        "κ = (μ_max + λ) / (μ_min + λ), the factor by which the preconditioner re-weights the "
        "r directions before Adam (1: plain AdamW). Each cell: min / median / max over layers.",
        "",
    ]
    for name, res in results.items():
        lines += [f"### {name} ({res['layers']} layers)", ""]
        lines += [
            "| Gram | largest μ | smallest μ | "
            + " | ".join(f"κ at λ={lam:g}" for lam in LAMBDAS)
            + " |"
        ]
        lines += ["|---" * (3 + len(LAMBDAS)) + "|"]
        for gram in ("BtB", "AAt"):
            r = res[gram]
            cells = [
                " / ".join(f"{v:.2g}" for v in r["largest"]),
                " / ".join(f"{v:.2g}" for v in r["smallest"]),
                *(" / ".join(f"{v:.3g}" for v in r["kappa"][f"{lam:g}"]) for lam in LAMBDAS),
            ]
            lines.append(f"| {gram} | " + " | ".join(cells) + " |")
        lines.append("")
    (RESULTS / "gram_spectra.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
