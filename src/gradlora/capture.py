"""Gradient estimation at the pre-trained weights (docs/algorithms.md, section 1): the engine.

G = mean over N batches of dL_b/dW for every LoRA-targeted base weight W (m, n), in fp32.
``capture`` runs forward/backward passes with at most the target weights requiring grad and
the LoRA branches bypassed, and hands each layer's signal to a per-layer accumulator
(``gradlora.accumulators``): the one seam where estimators and a cross-rank reduction plug in.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .accumulators import Accumulator, exact_accumulator
from .errors import GradLoraError
from .flags import ModuleFlags
from .targets import LoraTarget, check_gradient_flows, find_targets

LossFn = Callable[[nn.Module, Any], Tensor]


def move_to(batch: Any, device: torch.device) -> Any:
    """Move the tensors of a batch (dict, list, tuple or tensor) to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: move_to(v, device) for k, v in batch.items()})
    if isinstance(batch, list | tuple):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def batch_loss(model: nn.Module, batch: Any, loss_fn: LossFn | None, index: int) -> Tensor:
    """The scalar loss of one batch: ``loss_fn(model, batch)``, or from ``model(**batch)``: its
    ``.loss``, its ``["loss"]``, or the output itself if it is a tensor."""
    if loss_fn is not None:
        loss = loss_fn(model, batch)
    elif isinstance(batch, Mapping):
        loose = [k for k, v in batch.items() if v is not None and not isinstance(v, Tensor)]
        if loose:
            raise GradLoraError(
                f"batch {index} is not collated: {loose[0]!r} is a {type(batch[loose[0]]).__name__}, "
                "not a tensor (a datasets.Dataset or a list of examples yields such rows); pass "
                "collated batches, e.g. torch.utils.data.DataLoader(dataset, batch_size=8, "
                "collate_fn=transformers.DataCollatorWithPadding(tokenizer)), or a loss_fn"
            )
        out = model(**batch)
        # ModelOutput, a plain dict with "loss", or the loss tensor itself
        loss = out if isinstance(out, Tensor) else getattr(out, "loss", None)
        if loss is None and isinstance(out, Mapping):
            loss = out.get("loss")
        if loss is None:
            raise GradLoraError(
                f"batch {index}: the model returned no .loss; include labels in the batch "
                "or pass loss_fn=lambda model, batch: ..."
            )
    else:
        raise GradLoraError(
            f"batch {index} is a {type(batch).__name__}, not a dict for model(**batch); "
            "pass loss_fn=lambda model, batch: <scalar loss> to use other batch types"
        )
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise GradLoraError(
            f"batch {index}: the loss must be a scalar tensor, got {type(loss).__name__}"
        )
    if not torch.isfinite(loss.detach()).item():
        raise GradLoraError(
            f"batch {index}: the loss is {loss.item()}; check the data (empty or all-masked labels) "
            "and the model's dtype (fp16 overflows: use bf16 or fp32)"
        )
    return loss


def _input_device(model: nn.Module) -> torch.device:
    device = getattr(model, "device", None)
    return device if isinstance(device, torch.device) else next(model.parameters()).device


@contextmanager
def adapters_disabled(targets: list[LoraTarget]):
    """Bypass the LoRA branch of each target layer (heads in modules_to_save stay active).

    Restores each layer's disabled flag on exit; callers restore requires_grad flags themselves.
    """
    previous = [t.layer.disable_adapters for t in targets]
    for t in targets:
        t.layer._disable_adapters = True
    try:
        yield
    finally:
        for t, was in zip(targets, previous, strict=True):
            t.layer._disable_adapters = was


@contextmanager
def capture_mode(model: nn.Module, targets: list[LoraTarget], grad_weights: list[nn.Parameter]):
    """Train mode, LoRA branches bypassed, grad only on ``grad_weights``; all restored on exit.

    Restores every parameter's requires_grad, each module's train/eval flag, each layer's
    adapter-disabled flag, the target weights' ``.grad``, and the global RNG states (dropout
    during capture does not shift the caller's random stream).
    """
    params = list(model.parameters())
    flags = ModuleFlags(model)
    grads = [(t.weight, t.weight.grad) for t in targets]
    cuda = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    with ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=cuda))
        stack.enter_context(adapters_disabled(targets))
        try:
            for p in params:
                p.requires_grad_(False)
            for w in grad_weights:
                w.requires_grad_(True)
                w.grad = None
            model.train()
            with torch.enable_grad():
                yield
        finally:
            flags.restore()
            for weight, grad in grads:
                weight.grad = grad


def capture(
    model: nn.Module,
    targets: list[LoraTarget],
    batches: Iterable[Any],
    *,
    num_batches: int = 8,
    loss_fn: LossFn | None = None,
    progress: bool = True,
    make_accumulator: Callable[[LoraTarget], Accumulator] = exact_accumulator,
    reduce: Callable[[list[Tensor]], None] | None = None,
) -> tuple[dict[str, Accumulator], int]:
    """Run up to ``num_batches`` forward/backward passes and feed each target's accumulator.

    Returns ({base-model layer name: accumulator}, number of batches used). ``reduce``, if
    given, sums a list of tensors across ranks in place (e.g. an all-reduce); it receives the
    accumulators' state and a float64 tensor of the batch and hit counts, so the returned
    count and the checks are global.
    Raises GradLoraError for empty data, a non-finite loss, a layer no gradient reached, and a
    non-finite or all-zero estimate; the model is restored before any error propagates.
    """
    if isinstance(batches, Mapping | Tensor):
        raise GradLoraError(
            f"batches is a single {type(batches).__name__}; pass an iterable of batches, "
            "e.g. [batch] or a DataLoader"
        )
    if not isinstance(num_batches, int) or num_batches < 1:
        raise GradLoraError(f"num_batches must be a positive integer, got {num_batches!r}")
    check_gradient_flows(targets)
    accs = {t.name: make_accumulator(t) for t in targets}
    device = _input_device(model)
    used = 0
    grad_weights = [t.weight for t in targets if accs[t.name].needs_weight_grad]
    with capture_mode(model, targets, grad_weights):
        handles = [h for acc in accs.values() for h in acc.attach()]
        try:
            bar = tqdm(
                itertools.islice(batches, num_batches),
                total=num_batches,
                desc="gradlora: gradient",
                unit="batch",
                disable=not progress,
            )
            for index, batch in enumerate(bar):
                try:
                    loss = batch_loss(model, move_to(batch, device), loss_fn, index)
                    if not loss.requires_grad:
                        raise GradLoraError(
                            f"batch {index}: the loss does not depend on any LoRA target layer, so "
                            "no gradient reached them; check loss_fn and target_modules"
                        )
                    loss.backward()
                except Exception as e:
                    if not isinstance(e, GradLoraError):
                        e.add_note(
                            f"gradlora: raised while computing the gradient of batch {index}"
                        )
                    raise
                _check_finite_after(accs, index)
                used += 1
        finally:
            for h in handles:
                h.remove()
    if reduce is not None:
        counts = torch.tensor(
            [used] + [a.hits for a in accs.values()], dtype=torch.float64, device=device
        )
        reduce([s for acc in accs.values() for s in acc.state()] + [counts])
        used = int(counts[0].item())
        for acc, hits in zip(accs.values(), counts[1:].tolist(), strict=True):
            acc.hits = int(hits)
    if used == 0:
        raise GradLoraError("batches is empty: pass an iterable that yields at least one batch")
    if used < num_batches:
        warnings.warn(f"batches ran out after {used} of num_batches={num_batches}", stacklevel=3)
    _check_accumulators(accs)
    return accs, used


def _check_finite_after(accs: Mapping[str, Accumulator], index: int) -> None:
    """Raise, naming batch ``index``, if its backward made an accumulator non-finite although
    its loss was finite (an overflow in backward). One fp64 sum per state tensor and one sync."""
    sums = [s.sum(dtype=torch.float64) for acc in accs.values() for s in acc.state()]
    if not sums or torch.isfinite(torch.stack(sums)).all().item():
        return
    bad = next(n for n, a in accs.items() if not all(torch.isfinite(s).all() for s in a.state()))
    raise GradLoraError(
        f"batch {index}: the loss is finite but the gradient of layer {bad!r} has NaN/inf "
        "entries (an overflow in backward); check that batch and use bf16 or fp32 rather than fp16"
    )


def _check_accumulators(accs: Mapping[str, Accumulator]) -> None:
    unreached = [name for name, acc in accs.items() if acc.hits == 0]
    if unreached:
        raise GradLoraError(
            f"no gradient reached layer(s) {unreached[:5]}{' ...' if len(unreached) > 5 else ''}: "
            "the loss does not depend on them (unused module, detached output, or gradient "
            "checkpointing without model.enable_input_require_grads()); remove them from "
            "target_modules or fix the loss"
        )
    for name, acc in accs.items():
        state = acc.state()
        if not all(torch.isfinite(s).all() for s in state):
            raise GradLoraError(
                f"the gradient of layer {name!r} has NaN/inf entries; check the data and use "
                "bf16 or fp32 rather than fp16"
            )
        if not any(s.any() for s in state):
            raise GradLoraError(
                f"the gradient of layer {name!r} is exactly zero, so it has no direction to "
                "initialize from; remove the layer from target_modules or check the loss"
            )


def estimate_gradients(
    model: nn.Module,
    batches: Iterable[Any],
    num_batches: int = 8,
    loss_fn: LossFn | None = None,
    progress: bool = True,
    skip_unsupported: bool = False,
) -> dict[str, Tensor]:
    """G (m, n) fp32 per LoRA target, keyed by the layer's module name in the base model.

    G = (1/N) sum_b dL_b/dW at the current base weights, with the LoRA branches bypassed and the
    model in train mode; N = min(num_batches, batches available). Conv1D weights are returned
    transposed to (out, in). The model is left exactly as it was. ``skip_unsupported=True``
    leaves out LoRA layers on nn.Embedding / nn.Conv2d instead of refusing the model.
    """
    accs, used = capture(
        model,
        find_targets(model, skip_unsupported),
        batches,
        num_batches=num_batches,
        loss_fn=loss_fn,
        progress=progress,
    )
    return {name: acc.result(used) for name, acc in accs.items()}
