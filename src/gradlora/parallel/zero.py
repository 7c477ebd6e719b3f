"""DeepSpeed ZeRO's parameters as gradlora needs them: whole values read and written on every
rank, and whole gradients between backward and the optimizer step.

ZeRO-3 partitions each parameter: ``p.data`` is empty, ``p.ds_shape`` its shape, ``p.ds_tensor``
this rank's slice of the flattened parameter (padded to ``ds_tensor.numel() x ranks``), and,
once ``deepspeed.initialize`` built its optimizer, an fp32 master slice lives in that optimizer
(``p._z3_optimizer``). ZeRO-1/2 keep every parameter whole on every rank but partition the fp32
master copy and the gradients (``p._hp_mapping``). A write must reach both the weight and the
master copy, or the next step undoes it. Every function here that touches another rank's data
is a collective: call it on every rank, in the same order. deepspeed is imported lazily (it is
an optional dependency); a parameter DeepSpeed never saw passes through unchanged.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor


def is_zero3(p: Tensor) -> bool:
    """Whether DeepSpeed ZeRO-3 partitioned ``p`` (it holds this rank's slice only)."""
    return hasattr(p, "ds_id")


def is_zero(p: Tensor) -> bool:
    """Whether a DeepSpeed ZeRO engine holds ``p``'s values or gradients in partitions: ZeRO-3
    partitioned it, or a ZeRO-1/2 optimizer maps it to an fp32 partition (``_hp_mapping``)."""
    return is_zero3(p) or hasattr(p, "_hp_mapping")


def has_master_copy(p: Tensor) -> bool:
    """Whether a DeepSpeed ZeRO optimizer keeps an fp32 master copy of ``p`` (ZeRO-1/2/3 after
    ``deepspeed.initialize``, for a trainable ``p``)."""
    return getattr(p, "_z3_optimizer", None) is not None or hasattr(p, "_hp_mapping")


def whole_shape(p: Tensor) -> torch.Size:
    """``p``'s shape: ``ds_shape`` for a ZeRO-3 parameter (whose ``.shape`` is (0,))."""
    return p.ds_shape if is_zero3(p) else p.shape


@contextlib.contextmanager
def gathered(params: Iterable[Tensor]) -> Iterator[None]:
    """Inside, every ZeRO-3 parameter of ``params`` holds its whole value, to read (a
    collective: every rank enters with the same parameters); other parameters as they are."""
    params = [p for p in params if is_zero3(p)]
    if not params:
        yield
        return
    import deepspeed  # optional (the deepspeed extra), and only a ZeRO-3 parameter gets here

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def read_whole(p: Tensor) -> Tensor:
    """A detached copy of ``p``'s whole value (ZeRO-3: gathered, a collective); ``p`` itself,
    detached, otherwise."""
    if not is_zero3(p):
        return p.detach()
    with gathered([p]):
        return p.detach().clone()


def _slice(whole: Tensor, p: Tensor) -> Tensor:
    """This rank's part of ``whole`` (``p``'s shape) as ZeRO-3 lays ``p`` out: the flattened
    value, zero-padded to ranks x slice, cut at this rank's offset."""
    size = p.ds_tensor.numel()
    rank = dist.get_rank(group=p.ds_process_group)
    flat = whole.reshape(-1)
    start = rank * size
    part = flat[start : start + size]
    if part.numel() < size:  # the last rank's slice runs into the padding
        part = torch.cat([part, flat.new_zeros(size - part.numel())])
    return part


def write_whole_(p: Tensor, value: Tensor) -> None:
    """Set ``p`` to ``value`` (its whole shape) on this rank, master copy included; no
    communication (every rank passes the same ``value``)."""
    with torch.no_grad():
        if is_zero3(p):
            part = _slice(value, p)
            p.ds_tensor.copy_(part.to(p.ds_tensor.dtype))
            optimizer = getattr(p, "_z3_optimizer", None)
            if optimizer is not None and p.requires_grad:
                optimizer.set_local_hp_param(part.float(), p)
            return
        p.copy_(value.to(p.dtype))
        if hasattr(p, "_hp_mapping"):
            p.set_full_hp_param(value.float())


def master_value(p: Tensor) -> Tensor:
    """The whole fp32 master copy a ZeRO optimizer keeps of ``p`` (a collective)."""
    from deepspeed.utils import safe_get_full_fp32_param  # optional: only DeepSpeed's params

    return safe_get_full_fp32_param(p).reshape(whole_shape(p))


def whole_grad(p: Tensor) -> Tensor | None:
    """The whole gradient of a ZeRO parameter (``is_zero``) between backward and the ZeRO
    optimizer's step, in the precision DeepSpeed accumulates it in (a collective)."""
    from deepspeed.utils import safe_get_full_grad  # optional: only DeepSpeed's params

    return safe_get_full_grad(p)


def set_whole_grad_(p: Tensor, value: Tensor) -> None:
    """Replace a ZeRO parameter's gradient with ``value`` (whole shape), this rank's part only;
    no communication (every rank passes the same ``value``)."""
    from deepspeed.utils import safe_set_full_grad, safe_set_local_grad  # optional, as above

    if is_zero3(p) and p.grad is None:
        safe_set_local_grad(p, _slice(value, p).float())
    else:
        safe_set_full_grad(p, value)


def register_external(module: torch.nn.Module, params: Iterable[Tensor]) -> None:
    """Have ZeRO-3 gather ``params`` whenever ``module`` runs (forward and backward), for a
    forward that reads them outside their own modules. Also done for whole parameters once
    deepspeed is imported: ``deepspeed.initialize`` may partition them later."""
    params = list(params)
    if not any(is_zero3(p) for p in params) and "deepspeed" not in sys.modules:
        return
    # optional: deepspeed is imported already (ZeRO-3 parameters, or the user's script)
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter

    for p in params:
        register_external_parameter(module, p)
    # ZeRO-3 prefetches by a trace of the first forward: the layer now fetches more parameters
    # than the trace says (a RuntimeError at the next forward), so it is recorded again
    for optimizer in _optimizers(params):
        coordinator = optimizer.parameter_offload.get_param_coordinator()
        if coordinator is not None and not coordinator.is_invalid_trace():
            coordinator._invalidate_trace()


def release_leftovers(params: Iterable[Tensor]) -> None:
    """After a backward run outside ``engine.backward``: release the ZeRO-3 parameters whose
    post-backward hook never fired (modules fed inputs that need no gradient), as DeepSpeed's
    own backward epilogue does; else a later gather finds them still in use."""
    for optimizer in _optimizers(params):
        optimizer.parameter_offload.release_backward_leftovers()


def _optimizers(params: Iterable[Tensor]) -> list:
    """The distinct ZeRO-3 optimizers owning ``params``."""
    found = {id(o): o for p in params if (o := getattr(p, "_z3_optimizer", None)) is not None}
    return list(found.values())
