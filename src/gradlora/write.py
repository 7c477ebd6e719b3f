"""The one place that changes a model's weights: the all-or-nothing write of init factors.

Every step that can refuse or fail for a reason other than an interrupt or running out of memory
(shapes, signatures, casts, copies of A and B) runs before the first write. The base weight is
then rewritten in place, one layer at a time, with no copy of the other layers: a float32 (or
float64) W by one ``addmm_`` (W -= s B0 A0 with no (m, n) temporary), a bf16 / fp16 W through
``inits.offset_weight`` (fp32 math, rounded once) and a per-layer temporary. If an exception
still arrives midway (KeyboardInterrupt, out of memory), every layer is put back before it
propagates: the layer being written byte for byte from a copy of that one layer, the layers
written before it by the inverse operation W' + s B0 A0, which gives back W to within one
rounding of its dtype per entry (not always byte for byte); A, B, the buffers and hooks exactly.
The exception then carries a note that says so.

A LoRA-GA-style init offsets the frozen base weight, W' = W - s B0 A0, and keeps the exact A0,
B0 on the adapter as buffers ``lora_A[name].gradlora_weight0`` and ``lora_B[name].gradlora_weight0``
(``targets.WEIGHT0``); ``adapter_io`` folds them into a portable adapter and splits them back
out. They are persistent: ``model.state_dict()`` holds them, so a raw ``torch.save`` /
``load_state_dict`` round trip into a model initialized alike restores them, and one into a
model without them (a fresh PeftModel) fails with unexpected keys under strict=True rather than
silently dropping the counter-term of ``offset="adapter"``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from . import counter_term, inits
from .errors import GradLoraError
from .precision import math_dtype
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
    """Write init factors into the model, all layers or none (module doc).

    For each target, (A0 (r, n), B0 (m, r)) = factors[target.name] is cast to the adapter's dtype;
    with ``set_adapter_weights`` A and B are set to it; with ``offset_base`` A0, B0 are kept as
    buffers with the signature of W (``signature.py``, for the portable adapter) and the model's
    function is kept: ``mode="weight"`` makes the base weight W - s B0 A0 in place (fp32 math;
    for a float32 W one fused ``addmm_``, within one rounding of ``inits.offset_weight``, for
    bf16 / fp16 exactly ``inits.offset_weight``); ``mode="adapter"`` leaves it byte-identical and
    makes the LoRA layer subtract s B0 A0 x itself (``counter_term``).
    Every factor's shape is checked and every signature and cast made before anything is
    written. If anything fails midway (out of memory, interrupt), every layer is put back: A, B,
    buffers and hooks exactly, a base weight already rewritten to within one rounding of its
    dtype (the module doc), and the exception gets a note saying so.
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
            counter_term.install(t, mode)
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
        new_w = inits.offset_weight(t.weight_mn(), self.A0, self.B0, scaling)
        W.copy_(new_w.T if t.transposed else new_w)

    def restore_adapter(self) -> None:
        """A, B, buffers and hook exactly as before the write."""
        t = self.t
        local(t.A).copy_(self.old_a)
        local(t.B).copy_(self.old_b)
        if self.signature is not None:
            counter_term.remove(t)
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
