"""Follow one ``gradlora.initialize`` call from the entry to the written A and B, module by
module (issue 22's measure of how far a reader must jump to follow the code).

A tiny random Llama (1 block, LoRA r=2 on q_proj and v_proj, fp32, one process) is initialized
with LoRA-GA from 2 batches under ``sys.setprofile``. The script reads the code as a reader
would: each library function once, in the order the call first runs it, leaving out the shared
helpers (errors, precision, meter, flags, atomic, _version); each function stands for its
module, and consecutive functions of one module are one visit. It prints:
  modules: the distinct library modules the call runs code in;
  returns: how often that reading comes back to a module it had already left (for example
           initialize -> a layer finder in another module -> a check back in initialize's
           module counts one);
  path:    the visits, each with the functions read there.
Usage: python benchmarks/trace_initialize.py [--json]
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import gradlora  # noqa: E402

PACKAGE = Path(gradlora.__file__).resolve().parent
HELPERS = {"errors", "precision", "meter", "flags", "atomic", "_version", "__init__"}


def module_of(filename: str) -> str | None:
    """ "init/initialize" for .../gradlora/init/initialize.py; None outside the library, for
    the application (cli) and for the shared helpers."""
    path = Path(filename).resolve()
    if PACKAGE not in path.parents:
        return None
    name = path.relative_to(PACKAGE).with_suffix("").as_posix()
    if name.startswith("cli/") or name in HELPERS:
        return None
    return name


def trace() -> list[list]:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = get_peft_model(
        LlamaForCausalLM(cfg), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    )
    ids = torch.randint(0, 64, (2, 2, 8))
    batches = [{"input_ids": x, "labels": x} for x in ids]
    seen: set = set()
    path: list[list] = []  # [module, [functions read there]]

    def profile(frame, event, _arg):
        code = frame.f_code
        if event != "call" or code in seen:
            return
        seen.add(code)
        module = module_of(code.co_filename)
        if module is None or code.co_name.startswith("<"):  # comprehensions, lambdas
            return
        if path and path[-1][0] == module:
            path[-1][1].append(code.co_qualname)
        else:
            path.append([module, [code.co_qualname]])

    sys.setprofile(profile)
    try:
        gradlora.initialize(model, batches, method="lora-ga", num_batches=2, progress=False)
    finally:
        sys.setprofile(None)
    return path


def main() -> None:
    path = trace()
    modules = sorted({m for m, _ in path})
    result = {"modules": len(modules), "returns": len(path) - len(modules), "path": path}
    if "--json" in sys.argv:
        print(json.dumps(result))
        return
    print(f"modules: {len(modules)} ({', '.join(modules)})")
    print(f"returns: {result['returns']}")
    print("path:")
    for module, functions in path:
        print(f"  {module}: {', '.join(functions)}")


if __name__ == "__main__":
    main()
