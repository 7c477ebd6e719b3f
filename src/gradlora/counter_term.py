"""LoRA-GA's offset carried by the adapter instead of the base weight (``offset="adapter"``).

The weight offset W' = W - s B0 A0 rewrites the base weight; on a quantized base that would
mean re-quantizing, which changes the model. Here W stays byte-identical and the LoRA layer
itself subtracts the frozen counter-term:

    y = W x + s B A dropout(x) - s B0 A0 x,

which is exactly what the weight offset computes (W' x + s B A dropout(x)), so outputs at
init, the gradients of A and B and every step are the same; it costs one extra rank-r product
per layer and forward. A0 (r, n), B0 (m, r) are the buffers ``targets.WEIGHT0`` that both
offset modes keep. The counter-term is applied by a forward hook on the peft LoRA layer while
its adapter is active, not disabled and not merged; when peft merges the adapter into the base
(``merge_adapter``, ``merge_and_unload``) the delta it merges is s (B A - B0 A0), so a merged
or unloaded model is right too. With the adapter disabled the layer computes W x, the original
model; for an offset written into the weight the same hook adds s B0 A0 x back while the
adapter is disabled, so ``disable_adapter()`` is the original model in both modes.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import Tensor, nn

from .targets import WEIGHT0, LoraTarget

MODE = "gradlora_offset"  # attribute on lora_A[adapter]: "weight" or "adapter"
_HANDLE = "_gradlora_counter_term_hook"


def offset_mode(target: LoraTarget) -> str | None:
    """ "weight", "adapter", or None when the layer's base was never offset."""
    if target.init_factors() is None:
        return None
    return getattr(target.layer.lora_A[target.adapter], MODE, "weight")


def _offsets(layer: nn.Module, mode: str, active_only: bool) -> list[str]:
    """The adapters of ``layer`` (active ones only, or all) whose offset is kept in ``mode``."""
    names = layer.active_adapters if active_only else list(layer.lora_A)
    names = [names] if isinstance(names, str) else names
    return [
        a
        for a in names
        if a in layer.lora_A
        and getattr(layer.lora_A[a], MODE, None) == mode
        and getattr(layer.lora_A[a], WEIGHT0, None) is not None
    ]


def _add_term(layer: nn.Module, adapter: str, x: Tensor, output: Tensor, sign: float) -> Tensor:
    """output + sign s B0 A0 x, with the rank-r product fused into one ``addmm`` where the
    dtypes agree (a new tensor: the output may be saved for backward)."""
    A0 = getattr(layer.lora_A[adapter], WEIGHT0)
    B0 = getattr(layer.lora_B[adapter], WEIGHT0)
    alpha = sign * layer.scaling[adapter]
    xA = x.reshape(-1, x.shape[-1]).to(A0.dtype) @ A0.T  # (tokens, r)
    if output.dtype == B0.dtype:
        out = torch.addmm(output.reshape(-1, output.shape[-1]), xA, B0.T, alpha=alpha)
        return out.view(output.shape)
    return output + (alpha * (xA @ B0.T)).to(output.dtype).view(output.shape)


def _apply_offsets(layer: nn.Module, args: tuple, output: Any) -> Any:
    """Forward hook. Adapter enabled: subtract s B0 A0 x for offsets kept in the adapter.
    Adapter disabled: add s B0 A0 x back for offsets written into the weight, so that
    ``disable_adapter()`` (a DPO reference model, say) is the original model in both modes."""
    if not isinstance(output, Tensor) or not args:
        return output
    x = args[0]
    if layer.disable_adapters:
        for adapter in _offsets(layer, "weight", active_only=False):
            output = _add_term(layer, adapter, x, output, 1.0)
    elif not layer.merged:
        for adapter in _offsets(layer, "adapter", active_only=True):
            output = _add_term(layer, adapter, x, output, -1.0)
    return output


def _delta_weight(layer: nn.Module, adapter: str) -> Tensor:
    """peft's get_delta_weight, s B A (transposed for fan_in_fan_out), minus the counter-term of
    an offset kept in the adapter (an offset in the weight is merged already)."""
    delta = type(layer).get_delta_weight(layer, adapter)
    if adapter not in _offsets(layer, "adapter", active_only=False):
        return delta
    A0 = getattr(layer.lora_A[adapter], WEIGHT0)
    B0 = getattr(layer.lora_B[adapter], WEIGHT0)
    counter = layer.scaling[adapter] * (B0.to(delta.dtype) @ A0.to(delta.dtype))
    return delta - (counter.T if layer.fan_in_fan_out else counter)


def install(target: LoraTarget, mode: str) -> None:
    """Record where ``target``'s offset is kept ("weight" or "adapter") and install the layer's
    hook (the factors must be stored already)."""
    setattr(target.layer.lora_A[target.adapter], MODE, mode)
    layer = target.layer
    if getattr(layer, _HANDLE, None) is None:
        setattr(layer, _HANDLE, layer.register_forward_hook(_apply_offsets))
        layer.get_delta_weight = types.MethodType(_delta_weight, layer)


def remove(target: LoraTarget) -> None:
    """Undo ``install`` (the write rolled back); the stored factors are removed by the caller."""
    module = target.layer.lora_A[target.adapter]
    if hasattr(module, MODE):
        delattr(module, MODE)
    layer = target.layer
    if not any(_offsets(layer, m, active_only=False) for m in ("weight", "adapter")):
        handle = getattr(layer, _HANDLE, None)
        if handle is not None:
            handle.remove()
            delattr(layer, _HANDLE)
        layer.__dict__.pop("get_delta_weight", None)
