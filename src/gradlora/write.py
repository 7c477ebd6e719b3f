"""The one place that changes a model's weights: the all-or-nothing write of init factors.

A LoRA-GA-style init offsets the frozen base weight, W' = W - s B0 A0, and keeps the exact A0,
B0 on the adapter as non-persistent buffers ``lora_A[name].gradlora_weight0`` and
``lora_B[name].gradlora_weight0`` (``targets.WEIGHT0``); ``adapter_io`` folds them into a
portable adapter and splits them back out.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from . import counter_term, inits
from .errors import GradLoraError
from .sharding import local, local_part
from .signature import weight_signature
from .targets import BASE_SIGNATURE, WEIGHT0, LoraTarget

OFFSET_MODES = ("auto", "weight", "adapter")


def resolve_offset(mode: str, targets: list[LoraTarget]) -> str:
    """``offset`` -> "weight" or "adapter": "auto" is "adapter" when any target's base is
    quantized (it cannot be rewritten without re-quantizing) or sharded (FSDP2: each rank holds
    a slice of W), and "weight" otherwise."""
    if mode not in OFFSET_MODES:
        raise GradLoraError(f"unknown offset={mode!r}; choose one of {', '.join(OFFSET_MODES)}")
    quantized = [t.name for t in targets if t.quantized]
    sharded = [t.name for t in targets if t.sharded]
    if mode == "auto":
        return "adapter" if quantized or sharded else "weight"
    if mode == "weight" and quantized:
        raise GradLoraError(
            f"offset='weight' would rewrite the quantized base weight of {quantized[0]!r}, and "
            "re-quantizing W - s B0 A0 changes the model; use offset='adapter' (or 'auto')"
        )
    if mode == "weight" and sharded:
        raise GradLoraError(
            f"offset='weight' would rewrite the FSDP-sharded base weight of {sharded[0]!r}; "
            "use offset='adapter' (or 'auto'), which leaves every base weight untouched and "
            "computes the same outputs and steps"
        )
    return mode


def write_factors(
    targets: list[LoraTarget],
    factors: Mapping[str, tuple[Tensor, Tensor]],
    *,
    offset_base: bool,
    mode: str = "weight",
    set_adapter_weights: bool = True,
) -> None:
    """Write init factors into the model, all layers or none.

    For each target, (A0 (r, n), B0 (m, r)) = factors[target.name] is cast to the adapter's dtype;
    with ``set_adapter_weights`` A and B are set to it; with ``offset_base`` A0, B0 are kept as
    buffers with the signature of W (``signature.py``, for the portable adapter) and the model's
    function is kept: ``mode="weight"`` makes the base weight W - s B0 A0 (fp32 math, see
    inits.offset_weight); ``mode="adapter"`` leaves it byte-identical and makes the LoRA layer
    subtract s B0 A0 x itself (``counter_term``).
    Every factor's shape is checked before anything is written. If anything fails midway (out
    of memory, interrupt) every layer is put back as it was.
    """
    if offset_base:
        mode = resolve_offset(mode, targets)
    missing = [t.name for t in targets if t.name not in factors]
    if missing:
        raise GradLoraError(f"no init factors for layer(s) {missing}")
    for t in targets:
        A0, B0 = factors[t.name]
        if tuple(A0.shape) != tuple(t.A.shape) or tuple(B0.shape) != tuple(t.B.shape):
            raise GradLoraError(
                f"init factors for {t.name!r} have shapes {tuple(A0.shape)}, {tuple(B0.shape)}; "
                f"the adapter needs {tuple(t.A.shape)}, {tuple(t.B.shape)}"
            )
    signatures = {}  # of sharded bases, shard-wise (signature.py), before anything is written
    if offset_base:
        with torch.no_grad():
            for t in (t for t in targets if t.sharded):
                # a collective: every rank writes the same targets in order
                signatures[t.name] = weight_signature(t.weight_mn(), t.name)
    undo: list[tuple[LoraTarget, Tensor, Tensor, Tensor | None]] = []
    try:
        with torch.no_grad():
            for t in targets:
                # A, B may be DTensors (FSDP2): each rank writes its own shard of A0, B0
                A, B = local(t.A), local(t.B)
                A0 = factors[t.name][0].to(device=A.device, dtype=A.dtype)
                B0 = factors[t.name][1].to(device=B.device, dtype=B.dtype)
                rewrite = offset_base and mode == "weight"
                old_w = t.weight.detach().clone() if rewrite else None
                undo.append((t, A.clone(), B.clone(), old_w))
                if offset_base:
                    sig = signatures.get(t.name) or weight_signature(t.weight_mn(), t.name)
                    sig = torch.tensor(sig, dtype=torch.float64)
                    t.layer.lora_A[t.adapter].register_buffer(BASE_SIGNATURE, sig, persistent=False)
                    t.layer.lora_A[t.adapter].register_buffer(WEIGHT0, A0.clone(), persistent=False)
                    t.layer.lora_B[t.adapter].register_buffer(WEIGHT0, B0.clone(), persistent=False)
                if rewrite:
                    new_w = inits.offset_weight(t.weight_mn(), A0, B0, t.scaling)
                    t.weight.copy_(new_w.T if t.transposed else new_w)
                if offset_base:
                    counter_term.install(t, mode)
                if set_adapter_weights:
                    A.copy_(local_part(A0, t.A))
                    B.copy_(local_part(B0, t.B))
    except BaseException:
        with torch.no_grad():
            for t, old_a, old_b, old_w in reversed(undo):
                local(t.A).copy_(old_a)
                local(t.B).copy_(old_b)
                if old_w is not None:
                    t.weight.copy_(old_w)
                if offset_base:
                    counter_term.remove(t)
                    for module in (t.layer.lora_A[t.adapter], t.layer.lora_B[t.adapter]):
                        module._buffers.pop(WEIGHT0, None)
                        module._buffers.pop(BASE_SIGNATURE, None)
        raise
