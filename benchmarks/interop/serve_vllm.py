"""Interoperability benchmark, part 2 of 3 (the vLLM environment, .venv-vllm): generate.

Reads OUT/manifest.json (part 1, ``train_export.py``) and writes OUT/vllm.json: vLLM's greedy
generations (temperature 0, ``new_tokens`` tokens, EOS ignored) of the prompt token ids for

- the base model without LoRA ("base");
- every run's exported adapter ("export") and ``save_adapter``'s portable one ("portable"),
  served as LoRA on the base, each with vLLM's ``max_lora_rank`` from the manifest (one engine
  per value);
- every run's merged model without LoRA ("merged").

Everything in float32 (in bf16 vLLM's greedy tokens differ from peft's even for the base),
``max_model_len=256``, ``enforce_eager=True``. An adapter vLLM refuses is recorded with its
error instead of tokens. Imports vLLM only (no gradlora, no torch code of ours). Run with
VLLM_CPU_KVCACHE_SPACE=1 and VLLM_ENABLE_V1_MULTIPROCESSING=0 (run.sh sets them).

Usage: .venv-vllm/bin/python benchmarks/interop/serve_vllm.py runs/interop
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path

from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest

VARIANTS = ("export", "portable")  # the adapters, served as LoRA


def engine(model: str, **kwargs) -> LLM:
    return LLM(
        model=model, dtype="float32", max_model_len=256, enforce_eager=True, seed=0, **kwargs
    )


def generate(llm: LLM, prompts: list[list[int]], new_tokens: int, lora=None):
    """Greedy token ids per prompt, or {"error": ...} when vLLM refuses."""
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    try:
        outs = llm.generate(
            [{"prompt_token_ids": p} for p in prompts], params, lora_request=lora, use_tqdm=False
        )
    except Exception as e:  # vLLM rejects an adapter: that is a result too
        return {"error": f"{type(e).__name__}: {e}"[:1000]}
    return [list(o.outputs[0].token_ids) for o in outs]


def main(out: Path) -> int:
    manifest = json.loads((out / "manifest.json").read_text())
    prompts, n = manifest["prompts"], manifest["new_tokens"]
    result: dict = {"runs": {name: {} for name in manifest["runs"]}}
    groups: dict[int, list[tuple[str, str]]] = {}
    for name, run in manifest["runs"].items():
        for variant in VARIANTS:
            key = "export-vllm" if variant == "export" else variant
            groups.setdefault(run["max_lora_rank"][key], []).append((name, variant))
    lora_id = 0
    for max_rank, items in sorted(groups.items()):
        start = time.perf_counter()
        llm = engine(manifest["base"], enable_lora=True, max_lora_rank=max_rank, max_loras=1)
        if "base" not in result:
            result["base"] = generate(llm, prompts, n)
        for name, variant in items:
            lora_id += 1
            path = manifest["runs"][name][variant]
            request = LoRARequest(f"{name}-{variant}", lora_id, path)
            result["runs"][name][variant] = generate(llm, prompts, n, request)
        print(
            f"max_lora_rank {max_rank}: {len(items)} adapters, {time.perf_counter() - start:.0f} s"
        )
        del llm
        gc.collect()
    for name, run in manifest["runs"].items():
        llm = engine(run["merged"])
        result["runs"][name]["merged"] = generate(llm, prompts, n)
        del llm
        gc.collect()
    tmp = out / ".vllm.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out / "vllm.json")
    print(f"wrote {out / 'vllm.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/interop")))
