"""Exact vs randomized SVD on real MiniLM gradients: time and how much of G's top-k energy each keeps.

G is captured by gradlora.estimate_gradients on 8 Rotten Tomatoes batches of 32 (LoRA r=8 on
query/key/value/intermediate.dense/output.dense), k = 2r = 16 (what LoRA-GA needs).
Energy ratio = ||U_rand^T G V_rand||_diag^2 / sum of the top-k sigma^2 (1 = as good as exact),
for the randomized SVD at the reference code's settings (q = 2k, 4 power iterations) and at
gradlora's defaults (q = 2k + 64, 8).

    python benchmarks/svd_accuracy.py    # writes benchmarks/results/svd_accuracy.json

With --synthetic: a 1024 x 640 matrix with singular values i^-p (p = 0.5, 1; random singular
vectors), k = 8, 16, 32. For the randomized SVD at the reference code's settings (q = 2k, 4
power iterations) and at gradlora's defaults (q = 2k + 64, 8), the relative error of the top-k
reconstruction U_k S_k V_k^T against the exact SVD's (what LoRA-One's B0 A0 is made of), and
the time of each against the exact SVD (median of 3).

    python benchmarks/svd_accuracy.py --synthetic   # writes svd_accuracy_synthetic.json/.md
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
from gradlora.init.formulas import exact_svd, randomized_svd  # noqa: E402


def main(k: int = 16) -> None:
    model, tok = load_minilm_lora()
    train, _ = load_rotten_tomatoes()
    batches = make_batches(tok, train, 32, 64, 8)
    G = gradlora.estimate_gradients(model, batches, progress=False)
    settings = {"reference": dict(oversample=k, niter=4), "default": {}}  # q=2k, 4 it; 2k+64, 8
    rows, t_exact, t_rand = [], 0.0, dict.fromkeys(settings, 0.0)
    for name, g in G.items():
        start = time.perf_counter()
        _, S, _ = exact_svd(g, k)
        t_exact += time.perf_counter() - start
        row = {"layer": name, "shape": list(g.shape), "sigma2_over_sigma1": (S[1] / S[0]).item()}
        for setting, kw in settings.items():
            start = time.perf_counter()
            U, _, V = randomized_svd(g, k, **kw)
            t_rand[setting] += time.perf_counter() - start
            ratio = ((U.T @ g @ V).diagonal() ** 2).sum() / (S**2).sum()
            row[f"{setting}_energy_ratio"] = ratio.item()
        rows.append(row)
    summary = {
        "layers": len(rows),
        "k": k,
        "exact_seconds": t_exact,
        "randomized_seconds": t_rand,
        "worst_energy_ratio": {s: min(r[f"{s}_energy_ratio"] for r in rows) for s in settings},
        "settings": {"reference": "q = 2k, 4 power iterations", "default": "q = 2k + 64, 8"},
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(summary, indent=1))
    out = Path(__file__).parent / "results" / "svd_accuracy.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "layers": rows}, indent=1))


def _median_time(fn, reps: int = 3):
    times, out = [], None
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], out


def synthetic() -> None:
    g = torch.Generator().manual_seed(0)
    m, n = 1024, 640
    U, _ = torch.linalg.qr(torch.randn(m, n, generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    rows = []
    for decay in (0.5, 1.0):
        G = (U * torch.arange(1, n + 1).float() ** -decay) @ V.T
        for k in (8, 16, 32):
            t_exact, (Ue, Se, Ve) = _median_time(lambda G=G, k=k: exact_svd(G, k))
            ref = (Ue * Se) @ Ve.T
            row = {"decay": decay, "k": k, "exact_ms": t_exact * 1e3}
            for name, kw in (("reference", dict(oversample=k, niter=4)), ("default", {})):
                t, (Ur, Sr, Vr) = _median_time(lambda G=G, k=k, kw=kw: randomized_svd(G, k, **kw))
                row[f"{name}_error"] = (((Ur * Sr) @ Vr.T - ref).norm() / ref.norm()).item()
                row[f"{name}_ms"] = t * 1e3
            rows.append(row)
    lines = [
        f"1024 x 640, sigma_i = i^-p, {torch.get_num_threads()} threads, median of 3:",
        "",
        "| p | k | exact ms | q=2k, 4 it: error | ms | q=2k+64, 8 it (default): error | ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['decay']:g} | {r['k']} | {r['exact_ms']:.0f} | {r['reference_error']:.1e} | "
            f"{r['reference_ms']:.0f} | {r['default_error']:.1e} | {r['default_ms']:.0f} |"
        )
    text = "\n".join(lines) + "\n"
    out = Path(__file__).parent / "results" / "svd_accuracy_synthetic.json"
    out.write_text(json.dumps(rows, indent=1))
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    import sys

    synthetic() if "--synthetic" in sys.argv else main()
