"""``export_merged``: the fine-tuned model as a plain transformers checkpoint, with no peft.

Each LoRA layer with A (r, n), B (m, r), scale s becomes one (m, n) weight relative to the
ORIGINAL base weight W (docs/algorithms.md, section 5):

  W_merged = W + s (B A - B0 A0)     (the B0 A0 term only after a LoRA-GA init)

After ``offset="weight"`` the live base is W' = W - s B0 A0, so W' + s B A is the same; after
``offset="adapter"`` it is W and the counter-term is subtracted here. A bitsandbytes 4-bit or
8-bit base is dequantized (W = the dequantized W_q its layers compute with), its layers become
``nn.Linear``; modules_to_save (a head) are written as trained. Every weight is stored in
``dtype``; the sum is computed in float32 (or wider) and rounded once.

The model is built as a copy that shares every unchanged tensor with the live model
(``reference.shared_copy``): the new memory is the merged weights and, where ``dtype`` differs
from the live one, the cast copies. It is written with ``save_pretrained`` into a temporary
folder, dropped, and the folder is read back with the model's own class (plain transformers)
and checked before it is moved into place: every adapted weight entry against peft's own merge
(W + peft's ``get_delta_weight``, within half a unit in the last place of ``dtype`` plus float32
rounding), and the logits on a probe batch against the live model's (``reference.RTOL`` of
the coarser of ``dtype`` and the live model's compute dtype: 1e-5 in float32, 5e-2 in bf16).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import Tensor, nn

from ..atomic import replace_dir
from ..errors import GradLoraError
from ..peft_view import LoraTarget, SkippedLayer, active_adapter, dequantize_bnb, lora_layers
from .offset import offset_mode
from .reference import (
    RTOL,
    check_destination,
    check_dtype,
    coarsest,
    compute_dtype,
    logits_of,
    model_to_export,
    probe_batch,
    relative_error,
    shared_copy,
    strip_peft,
)

FP32_SLACK = 16  # float32 roundings allowed between two ways of computing W + delta


def _is_bnb(module: nn.Module) -> bool:
    return type(module).__module__.startswith("bitsandbytes") and isinstance(module, nn.Linear)


def merged_weight(t: LoraTarget) -> Tensor:
    """W + s (B A - B0 A0) as (m, n) in float32 or wider (module doc)."""
    dtype = torch.promote_types(t.A.dtype, torch.float32)
    W = t.weight_mn().detach().to(dtype)
    delta = t.scaling * (t.B.detach().to(dtype) @ t.A.detach().to(dtype))
    if offset_mode(t) == "adapter":  # W is the original; the weight offset is already in W'
        A0, B0 = t.init_factors()
        delta -= t.scaling * (B0.detach().to(dtype) @ A0.detach().to(dtype))
    return W + delta


def _linear(module: nn.Module, weight: Tensor) -> nn.Linear:
    """An nn.Linear in place of a bitsandbytes layer: ``weight`` (m, n), the layer's bias."""
    bias = module.bias
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    new.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().to(weight.dtype), requires_grad=False)
    return new


def _set_weight(model: nn.Module, name: str, stored: Tensor, dtype: torch.dtype) -> None:
    """Give the layer ``name`` of the copy the weight ``stored`` (in its storage layout) in
    ``dtype``: a new Parameter (the shared one is never written), or a new nn.Linear for a
    bitsandbytes layer."""
    module = model.get_submodule(name)
    stored = stored.to(dtype).contiguous()
    if _is_bnb(module):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, _linear(module, stored))
    else:
        module._parameters["weight"] = nn.Parameter(stored, requires_grad=False)


def merged_copy(
    peft_model: PeftModel, targets: list[LoraTarget], skipped: list[SkippedLayer], dtype
) -> nn.Module:
    """The merged model (module doc) as a copy of the base model sharing unchanged tensors."""
    adapter = active_adapter(peft_model)
    with torch.no_grad():
        model = shared_copy(peft_model.get_base_model())
        strip_peft(model, adapter, heads="trained")
        for t in targets:
            W = merged_weight(t)
            _set_weight(model, t.name, W.T if t.transposed else W, dtype)
        for s in skipped:  # nn.Embedding, convolutions: peft's delta, never offset
            base = s.layer.get_base_layer().weight.detach()
            math = torch.promote_types(base.dtype, torch.float32)
            delta = s.layer.get_delta_weight(adapter).to(math)
            _set_weight(model, s.name, base.to(math) + delta, dtype)
        for name, module in list(model.named_modules()):  # the bitsandbytes layers left
            if _is_bnb(module):
                _set_weight(model, name, dequantize_bnb(module), dtype)
        cast: dict[int, nn.Parameter] = {}
        for module in model.modules():
            for key, p in list(module._parameters.items()):
                if p is not None and p.is_floating_point() and p.dtype != dtype:
                    if id(p) not in cast:  # tied weights stay tied
                        cast[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
                    module._parameters[key] = cast[id(p)]
    model.config.dtype = dtype
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None
    for attr in ("is_loaded_in_4bit", "is_loaded_in_8bit", "quantization_method"):
        model.__dict__.pop(attr, None)
    return model


def export_merged(
    model: nn.Module,
    path: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    *,
    probe: Mapping[str, Tensor] | Tensor | None = None,
    tokenizer: Any = None,
    overwrite: bool = False,
    rtol: float | None = None,
) -> Path:
    """Write ``model`` (a PeftModel) with its active LoRA adapter merged (module doc) as a plain
    transformers checkpoint in ``dtype`` to ``path``; it loads with the base model's own class
    (or AutoModelForCausalLM for a causal LM) and no peft. ``tokenizer``: saved beside it (a
    server needs it). ``probe``: the check's batch (dict for ``model(**probe)``, or input ids;
    default 2 x 16 seeded random tokens). ``overwrite``: replace an existing non-empty folder.
    ``rtol``: the logits check's relative tolerance (module doc). The live model is not
    modified. Returns the folder."""
    what = "export_merged"
    peft_model = model_to_export(model, what)
    check_dtype(dtype, what)
    targets, skipped = lora_layers(peft_model)
    config = peft_model.peft_config[active_adapter(peft_model)]
    for field in ("trainable_token_indices", "layer_replication", "alora_invocation_tokens"):
        if getattr(config, field, None):
            raise GradLoraError(
                f"the adapter sets {field}, which export_merged does not merge; merge it with "
                "peft's merge_and_unload() on a copy and save that"
            )
    path = check_destination(path, overwrite)
    base = peft_model.get_base_model()
    batch = probe_batch(base, probe)
    live = logits_of(peft_model, batch, "live model")
    tol = rtol if rtol is not None else RTOL[coarsest(compute_dtype(peft_model), dtype)]
    cls = type(base)

    def write(tmp: Path) -> None:
        merged = merged_copy(peft_model, targets, skipped, dtype)
        merged.save_pretrained(str(tmp))
        del merged
        gc.collect()
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        reloaded = cls.from_pretrained(str(tmp), dtype=dtype)
        check_merged_weights(reloaded, peft_model, targets, skipped, dtype)
        got = logits_of(reloaded, {k: v.cpu() for k, v in batch.items()}, "merged model")
        err = relative_error(got, live)
        if not err <= tol:
            raise GradLoraError(
                f"the merged model, read back with plain transformers, gives logits {err:.2e} "
                f"(relative) away from the trained model's (at most {tol:.0e} in {dtype}); the "
                "export was not written. Report this as a gradlora bug, with the model and "
                "LoraConfig"
            )

    return replace_dir(path, write)


def check_merged_weights(
    reloaded: nn.Module,
    peft_model: PeftModel,
    targets: list[LoraTarget],
    skipped: list[SkippedLayer],
    dtype: torch.dtype,
) -> None:
    """Every adapted weight of ``reloaded`` is peft's merge of the live layer, base weight +
    ``get_delta_weight`` (gradlora's counter-term included), rounded to ``dtype``: entry by entry
    within half an ulp of ``dtype`` plus FP32_SLACK float32 roundings."""
    adapter = active_adapter(peft_model)
    eps, eps32 = torch.finfo(dtype).eps, torch.finfo(torch.float32).eps
    with torch.no_grad():
        for layer in [*targets, *skipped]:
            if isinstance(layer, LoraTarget):
                base = layer.weight_mn().T if layer.transposed else layer.weight_mn()
            else:
                base = layer.layer.get_base_layer().weight
            math = torch.promote_types(base.dtype, torch.float32)
            base = base.detach().to("cpu", math)
            delta = layer.layer.get_delta_weight(adapter).detach().to("cpu", math)
            want = base + delta
            got = reloaded.get_submodule(layer.name).weight.detach().to(math)
            bound = 0.5 * eps * want.abs() + FP32_SLACK * eps32 * (base.abs() + delta.abs())
            bound += torch.finfo(dtype).tiny
            bad = (got - want).abs() > bound if got.shape == want.shape else None
            if bad is None or bad.any():
                where = "a different shape" if bad is None else f"{int(bad.sum())} entries off"
                raise GradLoraError(
                    f"the merged weight of {layer.name!r}, read back, is not the trained layer's "
                    f"merge rounded to {dtype} ({where}); the export was not written. Report "
                    "this as a gradlora bug"
                )
