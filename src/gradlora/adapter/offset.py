"""The offset of a LoRA-GA init: where it is kept, how it is written, the base signature
(docs/algorithms.md, sections 2 and 5).

A LoRA-GA init keeps the model's function by subtracting s B0 A0; A0 (r, n), B0 (m, r) are
kept exactly as persistent buffers ``peft_view.WEIGHT0`` on lora_A / lora_B (a raw
``load_state_dict`` into a model without them fails under strict=True instead of silently
dropping the offset). ``offset="weight"`` rewrites W' = W - s B0 A0 (``offset_weight``);
``offset="adapter"`` keeps W byte-identical and the layer subtracts s B0 A0 x itself
(``CounterTerm``: exact at init in any dtype, one extra rank-r product per forward). With the
adapter disabled a hook adds s B0 A0 x back to a weight offset, so ``disable_adapter()`` is
the original model in both modes.

``write_factors`` is the one place that changes a model's weights, all layers or none: all that
can refuse runs before the first write (float32 W: one ``addmm_``; bf16 / fp16: ``offset_weight``).
An interrupt or out-of-memory midway puts every layer back (the one in flight from its copy, the
others by W' + s B0 A0, within one rounding) and notes it on the exception.

``weight_signature`` of an (m, n) W: [‖W‖_F, u_1ᵀ W z_1, ..., u_kᵀ W z_k] in fp64, Gaussian
u_i, z_i seeded by the layer's name; E[(u_iᵀ (W - W') z_i)²] = ‖W - W'‖_F², so two signatures
estimate how far two weights are apart (``adapter.format.relative_difference``). An FSDP2 W is
never gathered: each rank sums its rows' terms and one small all-reduce adds them.
"""

from __future__ import annotations

import math
import types
import zlib
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import LoraVariant
from torch import Tensor, nn

from ..errors import GradLoraError
from ..parallel.sharding import (
    assign_whole_,
    full,
    is_sharded,
    local,
    local_rows,
    require_row_layout,
    sum_over_shards,
)
from ..parallel.zero import register_external, whole_shape
from ..peft_view import BASE_SIGNATURE, WEIGHT0, LoraTarget
from ..precision import math_dtype

OFFSET_MODES = ("auto", "weight", "adapter")
MODE = "gradlora_offset"  # attribute on lora_A[adapter]: "weight" or "adapter"
_HANDLE = "_gradlora_counter_term_hook"
PROBES = 8  # signature probes k: the estimate's relative spread is about 1/sqrt(2k) = 25%
CHUNK = 1 << 18  # entries of W converted to fp64 at once (2 MiB: a small transient on any layer)


def resolve_offset(mode: str, targets: list[LoraTarget]) -> str:
    """``offset`` -> "weight" or "adapter". "auto" is "adapter" when any target's base is
    quantized (it cannot be rewritten without re-quantizing), sharded (FSDP2, ZeRO-3: each rank
    holds a slice of W), in bf16 / fp16 (the adapter mode keeps the outputs exactly at init, the weight
    mode only to the dtype's rounding), or shared with another adapter of the PeftModel (whose
    outputs a rewritten W would change); "weight" otherwise (no extra product per forward)."""
    if mode not in OFFSET_MODES:
        raise GradLoraError(f"unknown offset={mode!r}; choose one of {', '.join(OFFSET_MODES)}")
    quantized = [t.name for t in targets if t.quantized]
    sharded = [t.name for t in targets if t.partitioned]
    shared = [t for t in targets if set(t.layer.lora_A) - {t.adapter}]
    if mode == "auto":
        low = any(t.weight.dtype in (torch.bfloat16, torch.float16) for t in targets)
        return "adapter" if quantized or sharded or shared or low else "weight"
    if mode == "weight" and quantized:
        raise GradLoraError(
            f"offset='weight' would rewrite the quantized base weight of {quantized[0]!r}, and "
            "re-quantizing W - s B0 A0 changes the model; use offset='adapter' (or 'auto')"
        )
    if mode == "weight" and sharded:
        raise GradLoraError(
            f"offset='weight' would rewrite the base weight of {sharded[0]!r}, which FSDP2 / "
            "ZeRO-3 split across ranks (each holds a slice); "
            "use offset='adapter' (or 'auto'), which leaves every base weight untouched and "
            "computes the same outputs and steps"
        )
    if mode == "weight" and shared:
        others = sorted(set(shared[0].layer.lora_A) - {shared[0].adapter})
        raise GradLoraError(
            f"offset='weight' would rewrite the base weight of {shared[0].name!r}, which the "
            f"other adapter(s) {others} use too: their outputs would change. Use "
            "offset='adapter' (or 'auto'), which offsets inside this adapter only"
        )
    return mode


def offset_weight(W: Tensor, A0: Tensor, B0: Tensor, scaling: float) -> Tensor:
    """W' = W - s B0 A0 (W (m, n), A0 (r, n), B0 (m, r) as stored in the adapter), in fp32 or
    W's precision if higher, cast back to W's dtype: W' + s B0 A0 is W up to W's rounding."""
    dtype = math_dtype(W)
    delta = B0.to(dtype) @ A0.to(dtype)
    return (W.to(dtype) - scaling * delta).to(W.dtype)


def weight_signature(W: Tensor, name: str, probes: int = PROBES) -> list[float]:
    """[‖W‖_F, u_1ᵀ W z_1, ..., u_kᵀ W z_k] of the (m, n) W (module doc) in fp64; for a DTensor
    W (FSDP2, rows of W or Wᵀ sharded) a collective that gives every rank the same numbers."""
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
    """[‖W‖_F, u_iᵀ W z_i] over the rows ``rows`` (None: all) W holds (a shard: ‖W‖_F²)."""
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
    stored = target.init_factors() is not None
    return getattr(target.layer.lora_A[target.adapter], MODE, "weight") if stored else None


def _offsets(layer: nn.Module, mode: str, active_only: bool) -> list[str]:
    """The adapters of ``layer`` (active ones only, or all) whose offset is kept in ``mode``."""
    names = layer.active_adapters if active_only else list(layer.lora_A)
    names = [names] if isinstance(names, str) else names
    modules = [(a, layer.lora_A[a]) for a in names if a in layer.lora_A]
    return [a for a, m in modules if getattr(m, MODE, None) == mode and hasattr(m, WEIGHT0)]


def refuse_foreign_weight_offset(targets: list[LoraTarget], what: str) -> None:
    """Refuse ``what`` on an adapter whose base W another adapter's weight offset rewrote."""
    bad = [t for t in targets if set(_offsets(t.layer, "weight", False)) - {t.adapter}]
    if bad:
        raise GradLoraError(
            f"{what}: another adapter's weight offset rewrote the base weight of {bad[0].name!r}, "
            f"so adapter {bad[0].adapter!r} would be relative to W' and wrong on the original "
            "model; initialize the other adapter with offset='adapter', or use a fresh PeftModel"
        )


def _add_term(layer: nn.Module, adapter: str, x: Tensor, output: Tensor) -> Tensor:
    """output + s B0 A0 x (a new tensor: the output may be saved for backward)."""
    A0 = getattr(layer.lora_A[adapter], WEIGHT0)
    B0 = getattr(layer.lora_B[adapter], WEIGHT0)
    xA = x.reshape(-1, x.shape[-1]).to(A0.dtype) @ A0.T  # (tokens, r)
    term = (layer.scaling[adapter] * (xA @ B0.T)).to(output.dtype)
    return output + term.view(output.shape)


def _restore_when_disabled(layer: nn.Module, args: tuple, output: Any) -> Any:
    """Forward hook: with the adapters disabled, add s B0 A0 x back for the offsets written into
    the weight, so that ``disable_adapter()`` (a DPO reference model, say) is the original
    model in both modes (an offset kept in the adapter leaves W as it was)."""
    if isinstance(output, Tensor) and args and layer.disable_adapters:
        for adapter in _offsets(layer, "weight", active_only=False):
            output = _add_term(layer, adapter, args[0], output)
    return output


def _delta_weight(layer: nn.Module, adapter: str) -> Tensor:
    """peft's s B A (transposed for fan_in_fan_out) minus s B0 A0 for an offset in the adapter."""
    delta = type(layer).get_delta_weight(layer, adapter)
    if adapter not in _offsets(layer, "adapter", active_only=False):
        return delta
    A0 = getattr(layer.lora_A[adapter], WEIGHT0)
    B0 = getattr(layer.lora_B[adapter], WEIGHT0)
    counter = layer.scaling[adapter] * (B0.to(delta.dtype) @ A0.to(delta.dtype))
    return delta - (counter.T if layer.fan_in_fan_out else counter)


class CounterTerm(LoraVariant):
    """peft's LoRA-variant hooks for an offset kept in the adapter: the layer adds s (B A d -
    B0 A0 x), d = dropout(x), as s [(B - B0) A d + B0 ((A - A0) d + A0 (d - x))] (the last term
    only under dropout): exactly 0 at init in any dtype, and the product the portable adapter's
    [B - B0, B0] [A; A - A0] computes; merging adds s (B A - B0 A0)."""

    @staticmethod
    def forward(module, active_adapter: str, x: Tensor, result: Tensor, **kwargs) -> Tensor:
        lora_A, lora_B = module.lora_A[active_adapter], module.lora_B[active_adapter]
        A0, B0 = getattr(lora_A, WEIGHT0), getattr(lora_B, WEIGHT0)
        x = x.to(lora_A.weight.dtype)
        dropout = module.lora_dropout[active_adapter]
        d = dropout(x)
        v = F.linear(d, lora_A.weight - A0)
        if dropout.training and not isinstance(dropout, nn.Identity):
            v = v + F.linear(d - x, A0)
        delta = F.linear(lora_A(d), lora_B.weight - B0) + F.linear(v, B0)
        return result + delta * module.scaling[active_adapter]

    @staticmethod
    def merge_safe(module, active_adapter: str, orig_weight: Tensor) -> Tensor:
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module, active_adapter: str, orig_weight: Tensor) -> None:
        orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module, active_adapter: str, orig_weight: Tensor) -> Tensor:
        return orig_weight.data - module.get_delta_weight(active_adapter).to(orig_weight.dtype)


def install_counter_term(target: LoraTarget, mode: str) -> None:
    """Record where ``target``'s offset is kept, make the layer merge s (B A - B0 A0), install
    the counter-term ("adapter") and the disabled-adapter hook; the factors are stored already."""
    setattr(target.layer.lora_A[target.adapter], MODE, mode)
    layer = target.layer
    if mode == "adapter":
        layer.lora_variant[target.adapter] = CounterTerm()
        # it reads A and B outside their modules' forward: ZeRO-3 must gather them with the layer
        register_external(layer, [target.A, target.B])
    if getattr(layer, _HANDLE, None) is None:
        setattr(layer, _HANDLE, layer.register_forward_hook(_restore_when_disabled))
        layer.get_delta_weight = types.MethodType(_delta_weight, layer)


def remove_counter_term(target: LoraTarget) -> None:
    """Undo ``install_counter_term`` (the write rolled back); the caller removes the factors."""
    module = target.layer.lora_A[target.adapter]
    if hasattr(module, MODE):
        delattr(module, MODE)
    layer = target.layer
    if isinstance(layer.lora_variant.get(target.adapter), CounterTerm):
        del layer.lora_variant[target.adapter]
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

    For each target, (A0 (r, n), B0 (m, r)) = factors[target.name] in the adapter's dtype; with
    ``set_adapter_weights`` A and B are set to it; with ``offset_base`` A0, B0 are kept as
    buffers with the signature of W, and the function is kept in ``mode`` ("weight" or
    "adapter", as ``resolve_offset`` chose it). Shapes, signatures and casts are all made
    before the first write; a failure midway puts every layer back (module doc).
    """
    if mode not in ("weight", "adapter"):  # the callers resolve "auto" (resolve_offset)
        raise GradLoraError(f"write_factors takes offset mode 'weight' or 'adapter', not {mode!r}")
    missing = [t.name for t in targets if t.name not in factors]
    if missing:
        raise GradLoraError(f"no init factors for layer(s) {missing}")
    for t in targets:
        A0, B0 = factors[t.name]
        shape_a, shape_b = tuple(whole_shape(t.A)), tuple(whole_shape(t.B))
        if tuple(A0.shape) != shape_a or tuple(B0.shape) != shape_b:
            raise GradLoraError(
                f"init factors for {t.name!r} have shapes {tuple(A0.shape)}, {tuple(B0.shape)}; "
                f"the adapter needs {shape_a}, {shape_b}"
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
    old_a: Tensor  # whole A, B before the write
    old_b: Tensor
    signature: Tensor | None  # of W before the offset
    rewrite: bool  # whether the base weight is offset (mode "weight")
    weight_factors: tuple[Tensor, Tensor] | None  # A0, B0 in W's math dtype, for an in-place W

    @classmethod
    def make(cls, t: LoraTarget, A0: Tensor, B0: Tensor, offset_base: bool, rewrite: bool):
        """Casts, copies and the signature (for a sharded W a collective, in target order)."""
        p = cls()
        p.t = t
        p.A0, p.B0 = (x.to(local(y).device, y.dtype) for x, y in ((A0, t.A), (B0, t.B)))
        p.old_a, p.old_b = full(t.A).clone(), full(t.B).clone()  # FSDP2, ZeRO-3: gathers
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
            self._set(self.A0, self.B0)
        if self.rewrite:
            self._offset(t.scaling)

    def _set(self, a: Tensor, b: Tensor) -> None:
        """A, B <- the whole a, b, on this rank's part (ZeRO: the master copy too)."""
        assign_whole_(self.t.A, a)
        assign_whole_(self.t.B, b)

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
        self._set(self.old_a, self.old_b)
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
