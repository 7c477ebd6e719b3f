"""Exact vs randomized SVD on real MiniLM gradients: time and how much of G's top-k energy each keeps.

G is captured by gradlora.estimate_gradients on 8 Rotten Tomatoes batches of 32 (LoRA r=8 on
query/key/value/intermediate.dense/output.dense), k = 2r = 16 (what LoRA-GA needs).
Energy ratio = ||U_rand^T G V_rand||_diag^2 / sum of the top-k sigma^2 (1 = as good as exact).

    python benchmarks/svd_accuracy.py    # writes benchmarks/results/svd_accuracy.json
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import gradlora  # noqa: E402
from gradlora.cli.data import load_minilm_lora, load_rotten_tomatoes, make_batches  # noqa: E402
from gradlora.spectral import exact_svd, randomized_svd  # noqa: E402


def main(k: int = 16) -> None:
    model, tok = load_minilm_lora()
    train, _ = load_rotten_tomatoes()
    batches = make_batches(tok, train, 32, 64, 8)
    G = gradlora.estimate_gradients(model, batches, progress=False)
    rows, t_exact, t_rand = [], 0.0, 0.0
    for name, g in G.items():
        start = time.perf_counter()
        _, S, _ = exact_svd(g, k)
        t_exact += time.perf_counter() - start
        start = time.perf_counter()
        U, _, V = randomized_svd(g, k, niter=4)
        t_rand += time.perf_counter() - start
        ratio = ((U.T @ g @ V).diagonal() ** 2).sum() / (S**2).sum()
        rows.append(
            {
                "layer": name,
                "shape": list(g.shape),
                "energy_ratio": ratio.item(),
                "sigma2_over_sigma1": (S[1] / S[0]).item(),
            }
        )
    worst = min(r["energy_ratio"] for r in rows)
    summary = {
        "layers": len(rows),
        "k": k,
        "exact_seconds": t_exact,
        "randomized_seconds": t_rand,
        "worst_energy_ratio": worst,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(summary, indent=1))
    out = Path(__file__).parent / "results" / "svd_accuracy.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "layers": rows}, indent=1))


if __name__ == "__main__":
    main()
