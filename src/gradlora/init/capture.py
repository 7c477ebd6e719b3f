"""Gradient estimation at the pre-trained weights (docs/algorithms.md, section 1): the engine,
its exact accumulators, and the choice between them and the sketch.

G = mean over N batches of dL_b/dW for every LoRA-targeted base weight W (m, n), in fp32.
``capture`` runs forward/backward passes with at most the target weights requiring grad and
the LoRA branches bypassed, and hands each layer's signal to a per-layer ``Accumulator``: the
one seam where estimators and a cross-rank reduction plug in. For y = x Wᵀ, dL/dW = Σ_t δ_tᵀ
x_t over tokens t (δ = dL/dy). ``ExactAccumulator`` sums dL/dW from a post-accumulate-grad
hook on a float base weight (freeing ``.grad`` at once: one weight gradient live at a time);
``HookedExactAccumulator`` sums Σ δᵀ x from module hooks (no weight gradient) for quantized
layers (G at their dequantized weights) and FSDP2 / ZeRO-3 partitioned ones (x and δ are whole
on every rank). The third, ``sketch.SketchAccumulator``, never forms G.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from tqdm.auto import tqdm

from ..errors import GradLoraError
from ..flags import ModuleFlags
from ..parallel.zero import release_leftovers
from ..peft_view import LoraTarget, check_gradient_flows
from ..precision import math_dtype

LossFn = Callable[[nn.Module, Any], Tensor]


class Accumulator(Protocol):
    """Collects one target layer's gradient signal during capture."""

    target: LoraTarget
    hits: int  # backward passes that reached this layer
    needs_weight_grad: bool  # whether the engine must make the base weight require grad

    def attach(self) -> list[RemovableHandle]:
        """Install the hooks that feed this accumulator; the engine removes them."""
        ...

    def state(self) -> list[Tensor]:
        """The running sums: all-reduced (summed) across ranks before ``result``."""
        ...

    def result(self, num_batches: int) -> Any:
        """The estimate after ``num_batches`` batches (here: G, (m, n) fp32)."""
        ...


class ExactAccumulator:
    """Sum of dL/dW in fp32, (m, n) whatever W's storage; memory 4 bytes per weight entry."""

    needs_weight_grad = True

    def __init__(self, target: LoraTarget):
        self.target = target
        self.hits = 0
        m, n = target.shape
        dtype = math_dtype(target.weight)
        self.total = torch.zeros(m, n, dtype=dtype, device=target.weight.device)

    def attach(self) -> list[RemovableHandle]:
        transposed = self.target.transposed

        def add_and_free(param: nn.Parameter) -> None:
            self.total.add_(param.grad.T if transposed else param.grad)
            self.hits += 1
            param.grad = None

        return [self.target.weight.register_post_accumulate_grad_hook(add_and_free)]

    def state(self) -> list[Tensor]:
        return [self.total]

    def result(self, num_batches: int) -> Tensor:
        """G = total / N, divided in place (no second (m, n) buffer): call it once."""
        return self.total.div_(num_batches)


class ActivationHooks:
    """Feeds ``self._add(x, delta)`` from a forward hook on the target's base layer (its input
    x) and a gradient hook on that layer's output (delta = dL/dy), once per backward."""

    target: LoraTarget
    needs_weight_grad = False

    def _add(self, x: Tensor, delta: Tensor) -> None:
        raise NotImplementedError

    def _checked_add(self, x: Tensor, delta: Tensor | None) -> None:
        if delta is None:  # a layer above returned no input gradient
            raise GradLoraError(
                f"no gradient reached the output of layer {self.target.name!r} although the loss "
                "depends on it: a layer above it passes no gradient back (e.g. a bitsandbytes "
                "layer in its CPU inference layout); load the model again and run gradlora first"
            )
        self._add(x, delta)

    def attach(self) -> list[RemovableHandle]:
        def on_forward(module: nn.Module, args: tuple, y: Tensor) -> Tensor:
            if not args or not isinstance(args[0], Tensor):
                raise GradLoraError(
                    f"layer {self.target.name!r} was called without a tensor input; the "
                    "hooked gradient capture needs it as the first positional argument"
                )
            x = args[0]
            if not y.requires_grad:
                # nothing upstream requires grad (all weights are frozen): start the graph here,
                # and drop the leaf's accumulated .grad at once
                y = y.detach().requires_grad_()
                y.register_post_accumulate_grad_hook(_drop_grad)
            y.register_hook(lambda delta: self._checked_add(x, delta))
            return y

        return [self.target.layer.get_base_layer().register_forward_hook(on_forward)]


class HookedExactAccumulator(ActivationHooks):
    """Sum of dL/dW = Σ_t δ_tᵀ x_t in fp32, (m, n), from module hooks (module doc): for layers
    whose weight cannot take a gradient (quantized) or is sharded (FSDP2). Per batch one fp32
    (fp64 for an fp64 adapter) copy of x (T, n) and δ (T, m) and one ``addmm``; memory 4 bytes
    per weight entry for the sum."""

    def __init__(self, target: LoraTarget):
        self.target = target
        self.hits = 0
        m, n = target.shape
        self.total = torch.zeros(m, n, dtype=math_dtype(target.A), device=target.A.device)

    def _add(self, x: Tensor, delta: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.total.dtype)
        d = delta.reshape(-1, delta.shape[-1]).to(self.total.dtype)
        self.total.addmm_(d.T, x)
        self.hits += 1

    def state(self) -> list[Tensor]:
        return [self.total]

    def result(self, num_batches: int) -> Tensor:
        """G = total / N, divided in place (no second (m, n) buffer): call it once."""
        return self.total.div_(num_batches)


def exact_accumulator(target: LoraTarget) -> Accumulator:
    """The exact accumulator for ``target``: from the weight gradient for float weights, from
    module hooks for quantized and partitioned ones (module doc)."""
    if target.quantized or target.partitioned:
        return HookedExactAccumulator(target)
    return ExactAccumulator(target)


GRADIENT_MODES = ("auto", "exact", "sketch")
# gradient="auto" holds G exactly while its fp32 accumulators (4 bytes per adapted weight) total
# at most this much, and sketches it above: above it the accumulators outgrow the model itself
# (bf16 weights take 2 bytes each) while the sketch needs about 3 s (m + n) floats per layer
# (the measured trade-off: docs/initialize.md).
AUTO_EXACT_MAX_BYTES = 2**30


def choose_gradient(mode: str, targets: list[LoraTarget]) -> str:
    """Resolve ``initialize``'s ``gradient`` argument to "exact" or "sketch".

    "auto": "exact" if sum over targets of 4 m n bytes <= AUTO_EXACT_MAX_BYTES, else "sketch":
    the layer shapes alone decide, so every rank of a data-parallel run chooses alike.
    """
    if mode not in GRADIENT_MODES:
        raise GradLoraError(f"unknown gradient={mode!r}; choose one of {', '.join(GRADIENT_MODES)}")
    if mode != "auto":
        return mode
    exact_bytes = sum(4 * t.shape[0] * t.shape[1] for t in targets)
    return "exact" if exact_bytes <= AUTO_EXACT_MAX_BYTES else "sketch"


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
                    release_leftovers(t.A for t in targets if t.zero3)
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


def _drop_grad(tensor: Tensor) -> None:
    tensor.grad = None
