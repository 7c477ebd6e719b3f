"""Interoperability benchmark, part 3 of 3 (the main environment): compare and report.

Reads OUT/manifest.json (peft's greedy tokens, part 1) and OUT/vllm.json (vLLM's, part 2).
For every run and variant ("export", "portable", "merged", and the base model) and each of the
16 prompts: the same 32 tokens, or the first differing position p and the logit gap there,
l[peft's token] - l[vLLM's token] of the trained model (plain peft on the exported adapter,
which export_adapter checked against it) after the common prefix: a gap near 0 is a numerical
near-tie, a large one a different function. Writes RESULTS/results.json and RESULTS/results.md.

Usage: python benchmarks/interop/compare.py runs/interop --results benchmarks/results/interop
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from gradlora.atomic import write_json, write_text

VARIANTS = ("export", "portable", "merged")


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)


@torch.no_grad()
def gap(model, prompt: list[int], ref: list[int], other: list[int], p: int) -> float:
    """l[ref[p]] - l[other[p]] of ``model`` after prompt + ref[:p] (float32)."""
    ids = torch.tensor([prompt + ref[:p]])
    logits = model(input_ids=ids).logits[0, -1].float()
    return (logits[ref[p]] - logits[other[p]]).item()


def compare(model, prompts, ref_tokens, got) -> dict:
    """One variant: identical prompts, first differing positions, gaps; or vLLM's error."""
    if isinstance(got, dict):
        return {"error": got.get("error", "missing")}
    rows = []
    for prompt, ref, other in zip(prompts, ref_tokens, got, strict=True):
        p = first_difference(ref, other)
        rows.append(
            None if p is None else {"position": p, "gap": gap(model, prompt, ref, other, p)}
        )
    differing = [r for r in rows if r is not None]
    return {
        "identical": len(rows) - len(differing),
        "prompts": len(rows),
        "first_positions": [r["position"] for r in differing],
        "largest_gap": max((r["gap"] for r in differing), default=None),
        "per_prompt": rows,
    }


def report(results: dict) -> str:
    lines = [
        "# vLLM against peft: greedy generations (float32)",
        "",
        "Written by `benchmarks/interop/compare.py` (`make interop`); see docs/serving.md.",
        "",
        "| run | variant | identical / prompts | first differing positions | largest logit gap |",
        "|---|---|---|---|---|",
    ]
    rows = [("(base model)", "no LoRA", results["base"])]
    for name, variants in results["runs"].items():
        rows += [(name, v, variants[v]) for v in VARIANTS if v in variants]
    for name, variant, r in rows:
        if "error" in r:
            lines.append(f"| {name} | {variant} | vLLM error: {r['error'][:120]} | | |")
            continue
        largest = "" if r["largest_gap"] is None else f"{r['largest_gap']:.3g}"
        positions = ", ".join(map(str, r["first_positions"]))
        lines.append(
            f"| {name} | {variant} | {r['identical']} / {r['prompts']} | {positions} | {largest} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="runs/interop")
    parser.add_argument("--results", default="benchmarks/results/interop")
    args = parser.parse_args(argv)
    out = Path(args.out)
    manifest = json.loads((out / "manifest.json").read_text())
    served = json.loads((out / "vllm.json").read_text())
    prompts = manifest["prompts"]
    base = AutoModelForCausalLM.from_pretrained(manifest["base"], dtype=torch.float32).eval()
    results = {"base": compare(base, prompts, manifest["base_tokens"], served["base"]), "runs": {}}
    for name, run in manifest["runs"].items():
        fresh = AutoModelForCausalLM.from_pretrained(manifest["base"], dtype=torch.float32)
        trained = PeftModel.from_pretrained(fresh, run["export"]).eval()
        results["runs"][name] = {
            v: compare(trained, prompts, run["peft_tokens"], served["runs"][name].get(v, {}))
            for v in VARIANTS
        } | {"lora": run["lora"], "init": run["init"], "optimizer": run["optimizer"]}
    where = Path(args.results)
    write_json(where / "results.json", results)
    write_text(where / "results.md", report(results))
    print(report(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
