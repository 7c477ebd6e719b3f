"""The report of benchmarks/gpu_check.py: ratio columns, the cuda tests' counts and the
Markdown tables, from the result dict it writes as gpu_check.json (see that module's docstring
for what each field measures)."""

from __future__ import annotations

from pathlib import Path
from xml.etree import ElementTree


def ratio(a, b):
    """a / b, or None when either is missing (a case that failed, or memory on the CPU)."""
    return None if a is None or b is None or b == 0 else a / b


def add_ratios(result: dict) -> None:
    """x-columns: each init against N passes and one step; each optimizer against AdamW.
    Cases not (yet) measured or failed are empty dicts: their ratios are None."""
    init, opts = result["init"], result["optimizers"]
    for case in ("lora_ga_exact", "lora_ga_sketch"):
        row = init.get(case)
        for base in ("lora_passes", "lora_step") if row else ():
            ref = init.get(base, {})
            row[f"x_{base}_time"] = ratio(row.get("seconds"), ref.get("seconds"))
            row[f"x_{base}_peak"] = ratio(row.get("peak_bytes"), ref.get("peak_bytes"))
    adamw = opts.get("adamw", {})
    for row in opts.values():
        for key, col in (
            ("step_ms", "step"),
            ("optimizer_ms", "optimizer"),
            ("peak_bytes", "peak"),
        ):
            row[f"x_adamw_{col}"] = ratio(row.get(key), adamw.get(key))
    full, eff = opts.get("lora_pro_full", {}), opts.get("lora_pro", {})
    result["lora_pro_full_memory"] = {
        "state_bytes": full.get("state_bytes"),
        "extra_state_bytes": None
        if full.get("state_bytes") is None or eff.get("state_bytes") is None
        else full["state_bytes"] - eff["state_bytes"],
        "peak_bytes": full.get("peak_bytes"),
        "x_adamw_peak": full.get("x_adamw_peak"),
        "x_lora_pro_peak": ratio(full.get("peak_bytes"), eff.get("peak_bytes")),
    }


def cuda_tests(outdir: Path, exit_status: int | None = None) -> dict | None:
    """The cuda tests' outcome: pytest's exit status (gpu_check.sh passes it) and the counts
    of OUTDIR/cuda_tests.xml, its junit report (absent if pytest was cut short); None if
    neither exists (the tests were not run)."""
    path = outdir / "cuda_tests.xml"
    if exit_status is None and not path.exists():
        return None
    out: dict = {"exit_status": exit_status}
    if path.exists():
        root = ElementTree.parse(path).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        for key in ("tests", "failures", "errors", "skipped"):
            out[key] = int(suite.get(key, 0))
        out["time_s"] = float(suite.get("time", 0))
    return out


def fmt(x, spec: str = ".2f", scale: float = 1.0) -> str:
    """x / scale formatted, or "n/a" for None (not measured, or the case failed)."""
    return "n/a" if x is None else f"{x / scale:{spec}}"


def label(name: str, row: dict) -> str:
    """A table row's first cell: the case's name, and its error if it failed."""
    return f"{name} (failed: {row['error'].replace('|', '/')})" if "error" in row else name


def markdown(result: dict) -> str:
    """The setup, the cuda tests' counts, and the init and optimizer tables (times in s / ms,
    memory in MiB, x-columns as ratios; module docstring)."""
    env, s, mib, tests = result["environment"], result["shapes"], 2**20, result["cuda_tests"]
    tiny = ", tiny" if result["tiny"] else ""
    counts = "not run" if tests is None else ", ".join(f"{k} {v}" for k, v in tests.items())
    lines = [
        f"# gpu_check: {env['device_name']} ({env['device']}{tiny})",
        "",
        f"torch {env['torch']} (CUDA {env['cuda']}), transformers {env['transformers']}, "
        f"peft {env['peft']}, bitsandbytes {env['bitsandbytes']}, gradlora {env['gradlora']}. "
        f"Random Llama: hidden {s['hidden']}, intermediate {s['intermediate']}, {s['heads']} "
        f"heads / {s['kv_heads']} KV, {s['layers']} layers, vocab {s['vocab']}, {s['dtype']}; "
        f"LoRA r={s['rank']} on {', '.join(s['targets'])} ({s['adapted_params'] / 1e6:.1f}M "
        f"adapted weights); N = {s['num_batches']} batches of {s['batch']} x {s['seq']} tokens. "
        f"Memory: {result['memory_metric'] or 'not measured'} ({result['memory_note']}).",
        "",
        f"cuda tests: {counts}",
        "",
        "| init case | s | capture s | SVD s | x N passes time | x step time | peak MiB | "
        "x step peak | x N passes peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case, r in result["init"].items():
        cols = [fmt(r.get("seconds"), ".3f"), fmt(r.get("capture_seconds"), ".3f")]
        cols += [fmt(r.get("svd_seconds"), ".3f"), fmt(r.get("x_lora_passes_time"))]
        cols += [fmt(r.get("x_lora_step_time")), fmt(r.get("peak_bytes"), ".0f", mib)]
        cols += [fmt(r.get("x_lora_step_peak")), fmt(r.get("x_lora_passes_peak"))]
        lines.append(f"| {label(case, r)} | {' | '.join(cols)} |")
    lines += [
        "",
        "| optimizer | step ms | x AdamW step | optimizer.step ms | x AdamW optimizer | "
        "state MiB | peak MiB | x AdamW peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in result["optimizers"].items():
        cols = [fmt(r.get("step_ms")), fmt(r.get("x_adamw_step")), fmt(r.get("optimizer_ms"))]
        cols += [fmt(r.get("x_adamw_optimizer")), fmt(r.get("state_bytes"), ".1f", mib)]
        cols += [fmt(r.get("peak_bytes"), ".0f", mib), fmt(r.get("x_adamw_peak"))]
        lines.append(f"| {label(name, r)} | {' | '.join(cols)} |")
    full = result["lora_pro_full_memory"]
    lines += [
        "",
        f"LoRA-Pro full: optimizer state {fmt(full['state_bytes'], '.1f', mib)} MiB "
        f"({fmt(full['extra_state_bytes'], '.1f', mib)} MiB more than efficient), peak "
        f"{fmt(full['peak_bytes'], '.0f', mib)} MiB, x AdamW peak {fmt(full['x_adamw_peak'])}, "
        f"x LoRA-Pro efficient peak {fmt(full['x_lora_pro_peak'])}.",
    ]
    return "\n".join(lines) + "\n"
