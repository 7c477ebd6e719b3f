"""The offset of a LoRA-GA init, in one place: where it is kept, how it is written, and the
signature of the base it was taken from (docs/algorithms.md, sections 2 and 5).

A LoRA-GA init keeps the model's function by subtracting s B0 A0, with A0 (r, n), B0 (m, r)
kept exactly as buffers ``lora_A[name].gradlora_weight0`` / ``lora_B[name].gradlora_weight0``
(``peft_view.WEIGHT0``; ``adapter.io`` folds them into a portable adapter and splits them
back). They are persistent: ``model.state_dict()`` holds them, so a raw ``load_state_dict``
into a model without them fails with unexpected keys under strict=True rather than silently
dropping the offset. Two places to keep it (``offset=``):

- "weight": the base weight is rewritten, W' = W - s B0 A0 (``offset_weight``).
- "adapter": W stays byte-identical and the LoRA layer subtracts the counter-term itself,
  y = W x + s B A dropout(x) - s B0 A0 x, exactly what the weight offset computes, for one
  extra rank-r product per forward (a forward hook while the adapter is active, not disabled
  and not merged; peft's merge takes s (B A - B0 A0)). With the adapter disabled the layer
  computes W x; for an offset written into the weight the same hook adds s B0 A0 x back then,
  so ``disable_adapter()`` is the original model in both modes.

``write_factors`` is the one place that changes a model's weights, all layers or none: every
step that can refuse or fail for a reason other than an interrupt or running out of memory
(shapes, signatures, casts, copies of A and B) runs before the first write. A float32 (or
float64) W is rewritten by one ``addmm_`` (no (m, n) temporary), a bf16 / fp16 W through
``offset_weight`` (fp32 math, rounded once). If an exception still arrives midway
(KeyboardInterrupt, out of memory), every layer is put back before it propagates: the layer
being written byte for byte from a copy of that one layer, the layers written before it by the
inverse operation W' + s B0 A0 (within one rounding of their dtype per entry); A, B, the
buffers and hooks exactly. The exception then carries a note that says so.

``weight_signature`` (the signature of W before the offset, kept for the portable adapter's
base check): for an (m, n) weight, [‖W‖_F, u_1ᵀ W z_1, ..., u_kᵀ W z_k] in fp64 with standard
Gaussian u_i (m,), z_i (n,) seeded by the layer's name. E[(u_iᵀ (W - W') z_i)²] = ‖W - W'‖_F²,
so the probes estimate how far two weights are apart (``adapter.io.relative_difference``). An
FSDP2-sharded W is never gathered: each rank sums its rows' terms and one small all-reduce
adds them (a collective).
"""

from __future__ import annotations

import math
import types
import zlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import GradLoraError
from ..parallel.sharding import (
    is_sharded,
    local,
    local_part,
    local_rows,
    require_row_layout,
    sum_over_shards,
)
from ..peft_view import BASE_SIGNATURE, WEIGHT0, LoraTarget
from ..precision import math_dtype

OFFSET_MODES = ("auto", "weight", "adapter")
MODE = "gradlora_offset"  # attribute on lora_A[adapter]: "weight" or "adapter"
_HANDLE = "_gradlora_counter_term_hook"
PROBES = 8  # signature probes k: the estimate's relative spread is about 1/sqrt(2k) = 25%
CHUNK = 1 << 18  # entries of W converted to fp64 at once (2 MiB: a small transient on any layer)


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


def offset_weight(W: Tensor, A0: Tensor, B0: Tensor, scaling: float) -> Tensor:
    """W' = W - s * B0 @ A0, computed in fp32 (or W's precision if higher), cast back to W's dtype.

    W (m, n), A0 (r, n), B0 (m, r). Pass the A0, B0 exactly as stored in the adapter (after
    casting to its dtype) so that W' + s B0 A0 reproduces W up to W's rounding.
    """
    dtype = math_dtype(W)
    delta = B0.to(dtype) @ A0.to(dtype)
    return (W.to(dtype) - scaling * delta).to(W.dtype)


def weight_signature(W: Tensor, name: str, probes: int = PROBES) -> list[float]:
    """[‖W‖_F, u_1ᵀ W z_1, ..., u_kᵀ W z_k] of the (m, n) weight W (module doc), in fp64. W may
    be a DTensor whose stored rows are sharded (FSDP2; W itself or its transpose): then every
    rank of its mesh calls this, and all get the same numbers."""
    m, n = W.shape
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    U = torch.randn(probes, m, generator=gen, dtype=torch.float64)
    Z = torch.randn(n, probes, generator=gen, dtype=torch.float64)
    if not is_sharded(W):
        return _terms(W, U, Z, None).tolist()
    stored, left, right = W, U, Z  # u^T W z with W's rows sharded, or z^T W^T u with its columns
    if not all(getattr(p, "dim", 0) == 0 for p in W.placements):
        stored, left, right = W.T, Z.T, U.T
    require_row_layout(stored)
    rows = local_rows(stored).cpu()
    total = sum_over_shards(_terms(local(stored), left, right, rows), stored).cpu()
    return [math.sqrt(total[0].item()), *total[1:].tolist()]


def _terms(W: Tensor, U: Tensor, Z: Tensor, rows: Tensor | None) -> Tensor:
    """[‖W‖_F, u_iᵀ W z_i] of the rows ``rows`` (None: all) of the whole weight, whose rows
    ``W`` holds: the norm as a sum of squares for a shard, its square root for a whole W."""
    probes = U.shape[0]
    Z = Z.to(W.device)
    WZ = torch.empty(W.shape[0], probes, dtype=torch.float64)  # (rows, k): one column per probe
    squares = torch.zeros((), dtype=torch.float64)
    step = max(1, CHUNK // max(1, W.shape[1]))  # an fp64 copy of at most CHUNK entries at a time
    for start in range(0, W.shape[0], step):
        block = W[start : start + step].detach().to(torch.float64)
        WZ[start : start + step] = (block @ Z).cpu()
        squares += block.square().sum().cpu()
    U = U if rows is None else U[:, rows]
    projections = (U * WZ.T).sum(dim=1)
    if rows is None:
        return torch.cat([squares.sqrt().reshape(1), projections])
    return torch.cat([squares.reshape(1), projections]).to(W.device)


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


def install_counter_term(target: LoraTarget, mode: str) -> None:
    """Record where ``target``'s offset is kept ("weight" or "adapter") and install the layer's
    hook (the factors must be stored already)."""
    setattr(target.layer.lora_A[target.adapter], MODE, mode)
    layer = target.layer
    if getattr(layer, _HANDLE, None) is None:
        setattr(layer, _HANDLE, layer.register_forward_hook(_apply_offsets))
        layer.get_delta_weight = types.MethodType(_delta_weight, layer)


def remove_counter_term(target: LoraTarget) -> None:
    """Undo ``install_counter_term`` (the write rolled back); the stored factors are removed by the caller."""
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


def write_factors(
    targets: list[LoraTarget],
    factors: Mapping[str, tuple[Tensor, Tensor]],
    *,
    offset_base: bool,
    mode: str = "weight",
    set_adapter_weights: bool = True,
) -> None:
    """Write init factors into the model, all layers or none (module doc).

    For each target, (A0 (r, n), B0 (m, r)) = factors[target.name] is cast to the adapter's dtype;
    with ``set_adapter_weights`` A and B are set to it; with ``offset_base`` A0, B0 are kept as
    buffers with the signature of W (``weight_signature``, for the portable adapter) and the model's
    function is kept in ``mode``, as ``resolve_offset`` chose it: ``mode="weight"`` makes the base weight W - s B0 A0 in place (fp32 math;
    for a float32 W one fused ``addmm_``, within one rounding of ``offset_weight``, for
    bf16 / fp16 exactly ``offset_weight``); ``mode="adapter"`` leaves it byte-identical and
    makes the LoRA layer subtract s B0 A0 x itself (the counter-term).
    Every factor's shape is checked and every signature and cast made before anything is
    written. If anything fails midway (out of memory, interrupt), every layer is put back: A, B,
    buffers and hooks exactly, a base weight already rewritten to within one rounding of its
    dtype (the module doc), and the exception gets a note saying so.
    """
    if mode not in ("weight", "adapter"):  # the callers resolve "auto" (resolve_offset)
        raise GradLoraError(f"write_factors takes offset mode 'weight' or 'adapter', not {mode!r}")
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
    rewrite = offset_base and mode == "weight"
    with torch.no_grad():  # every fallible step before the first write
        plans = [_Plan.make(t, *factors[t.name], offset_base, rewrite) for t in targets]
    written: list[_Plan] = []  # layers completely written
    current: tuple[_Plan, Tensor | None] | None = None  # the layer being written, its W copy
    try:
        with torch.no_grad():
            for plan in plans:
                copy = plan.t.weight.detach().clone() if rewrite else None
                current = (plan, copy)
                del copy
                plan.write(mode, set_adapter_weights)
                written.append(plan)
                current = None
    except BaseException as e:
        with torch.no_grad():
            inexact = _undo(written, current)
        if inexact:
            e.add_note(
                f"gradlora: interrupted while writing the init; every layer was put back, the "
                f"base weights of the {inexact} layer(s) already rewritten by adding s B0 A0 back "
                "(equal to the original to within one rounding of their dtype)"
            )
        raise


class _Plan:
    """One layer's write, prepared: everything that can fail is made in ``make``."""

    t: LoraTarget
    A0: Tensor  # in the adapter's dtype and device: what A, B and the buffers get
    B0: Tensor
    part_a: Tensor  # this rank's part of A0, B0 (for set_adapter_weights)
    part_b: Tensor
    old_a: Tensor  # this rank's A, B before the write
    old_b: Tensor
    signature: Tensor | None  # of W before the offset
    rewrite: bool  # whether the base weight is offset (mode "weight")
    weight_factors: tuple[Tensor, Tensor] | None  # A0, B0 in W's math dtype, for an in-place W

    @classmethod
    def make(cls, t: LoraTarget, A0: Tensor, B0: Tensor, offset_base: bool, rewrite: bool):
        """Casts, copies and the signature (a collective for a sharded W: every rank makes the
        plans of the same targets in order)."""
        p = cls()
        p.t = t
        A, B = local(t.A), local(t.B)  # A, B may be DTensors (FSDP2): each rank writes its shard
        p.A0 = A0.to(device=A.device, dtype=A.dtype)
        p.B0 = B0.to(device=B.device, dtype=B.dtype)
        p.part_a, p.part_b = local_part(p.A0, t.A), local_part(p.B0, t.B)
        p.old_a, p.old_b = A.clone(), B.clone()
        p.signature = None
        if offset_base:
            sig = weight_signature(t.weight_mn(), t.name)
            p.signature = torch.tensor(sig, dtype=torch.float64)
        p.rewrite, p.weight_factors = rewrite, None
        if rewrite and math_dtype(t.weight) == t.weight.dtype:
            dtype = t.weight.dtype
            p.weight_factors = (p.A0.to(dtype), p.B0.to(dtype))
        return p

    def write(self, mode: str, set_adapter_weights: bool) -> None:
        """Buffers, counter-term hook, A and B, then the base weight."""
        t = self.t
        if self.signature is not None:
            lora_a, lora_b = t.layer.lora_A[t.adapter], t.layer.lora_B[t.adapter]
            lora_a.register_buffer(BASE_SIGNATURE, self.signature, persistent=False)
            # persistent: a raw model.state_dict() carries them, so loading it into a model
            # without them fails with unexpected keys (strict=True) instead of losing the offset
            lora_a.register_buffer(WEIGHT0, self.A0.clone(), persistent=True)
            lora_b.register_buffer(WEIGHT0, self.B0.clone(), persistent=True)
            install_counter_term(t, mode)
        if set_adapter_weights:
            local(t.A).copy_(self.part_a)
            local(t.B).copy_(self.part_b)
        if self.rewrite:
            self._offset(t.scaling)

    def _offset(self, scaling: float) -> None:
        """W <- W - scaling B0 A0 in place (add it back with -scaling)."""
        t, W = self.t, self.t.weight
        if self.weight_factors is not None:  # float32 / float64: one addmm_, no (m, n) temporary
            A0, B0 = self.weight_factors
            if t.transposed:  # stored (n, m)
                W.addmm_(A0.T, B0.T, alpha=-scaling)
            else:
                W.addmm_(B0, A0, alpha=-scaling)
            return
        new_w = offset_weight(t.weight_mn(), self.A0, self.B0, scaling)
        W.copy_(new_w.T if t.transposed else new_w)

    def restore_adapter(self) -> None:
        """A, B, buffers and hook exactly as before the write."""
        t = self.t
        local(t.A).copy_(self.old_a)
        local(t.B).copy_(self.old_b)
        if self.signature is not None:
            remove_counter_term(t)
            for module in (t.layer.lora_A[t.adapter], t.layer.lora_B[t.adapter]):
                module._buffers.pop(WEIGHT0, None)
                module._buffers.pop(BASE_SIGNATURE, None)


def _undo(written: list[_Plan], current: tuple[_Plan, Tensor | None] | None) -> int:
    """Put every layer back (module doc); returns how many base weights were restored by the
    inverse operation rather than byte for byte."""
    inexact = 0
    if current is not None:
        plan, copy = current
        if written and written[-1] is plan:  # finished, but not yet marked as such
            written.pop()
        if copy is not None:
            plan.t.weight.copy_(copy)
        plan.restore_adapter()
    for plan in reversed(written):
        if plan.rewrite:
            plan._offset(-plan.t.scaling)
            inexact += 1
        plan.restore_adapter()
    return inexact
