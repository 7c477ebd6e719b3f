"""Per-layer accumulators of the gradient signal, fed by ``capture`` (docs/algorithms.md, 1).

For a linear layer y = x Wᵀ, dL/dW = Σ_t δ_tᵀ x_t over tokens t (δ = dL/dy). Three ways to
collect it, one protocol:

- ``ExactAccumulator``: the (m, n) sum of dL/dW from a post-accumulate-grad hook on the base
  weight, which frees ``.grad`` at once, so one weight gradient is live at a time. Needs a
  float base weight that can require grad.
- ``HookedExactAccumulator``: the same (m, n) sum, built as Σ δᵀ x from module hooks on the
  base layer's input and output gradient: no weight gradient and no float copy of W, so it
  works on quantized (bitsandbytes 4-bit / 8-bit) layers, whose G is the gradient at the
  weights the layer computes with (the dequantized W_q), and on FSDP2-sharded ones (the
  layer's input and output gradient are whole on every rank).
- ``SketchAccumulator``: never forms G; accumulates G M and L G for thin fixed M, L from the
  same module hooks (the sketch passes of ``gradlora.sketch``).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .errors import GradLoraError
from .precision import math_dtype
from .spectral import SeededGaussian, materialize
from .targets import LoraTarget


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


class _ActivationHooks:
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


class HookedExactAccumulator(_ActivationHooks):
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
    """The exact accumulator for ``target``: from the weight gradient for float weights (as
    measured: no slower), from module hooks for quantized ones and for FSDP2-sharded ones (whose
    weight gradient would be reduce-scattered into shards; activations are not sharded)."""
    if target.quantized or target.sharded:
        return HookedExactAccumulator(target)
    return ExactAccumulator(target)


class SketchAccumulator(_ActivationHooks):
    """Sums of G @ M (m, k) and L @ G (l, n) for fixed ``right`` M (n, k) and ``left`` L (l, m).

    For a linear layer y = x W^T, dL/dW = sum_t delta_t^T x_t over tokens t, so
    G M = sum_t delta_t^T (x_t M) and L G = sum_t (L delta_t^T) x_t: no weight gradient and no
    (m, n) buffer, per batch or in total. x (T, n) and delta (T, m) come from a forward hook on the
    base layer and a gradient hook on its output; products are taken and summed in fp32. Either
    side may be None (not accumulated). Memory: (m + n) k + l n floats per layer.
    """

    def __init__(
        self,
        target: LoraTarget,
        right: Tensor | SeededGaussian | None = None,
        left: Tensor | SeededGaussian | None = None,
    ):
        self.target = target
        self.hits = 0
        m, n = target.shape
        device = target.weight.device
        self.right, self.left = right, left
        self.GR = None if right is None else torch.zeros(m, right.shape[1], device=device)
        self.LG = None if left is None else torch.zeros(left.shape[0], n, device=device)

    def _add(self, x: Tensor, delta: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        d = delta.reshape(-1, delta.shape[-1]).float()
        if self.GR is not None:
            self.GR.addmm_(d.T, x @ materialize(self.right))
        if self.LG is not None:
            self.LG.addmm_(materialize(self.left) @ d.T, x)
        self.hits += 1

    def state(self) -> list[Tensor]:
        return [s for s in (self.GR, self.LG) if s is not None]

    def result(self, num_batches: int) -> tuple[Tensor | None, Tensor | None]:
        """(G M, L G) for the mean gradient G, i.e. the sums divided by ``num_batches``, in
        place (no second copy of the sketches): call it once."""
        return tuple(None if s is None else s.div_(num_batches) for s in (self.GR, self.LG))


def _drop_grad(tensor: Tensor) -> None:
    tensor.grad = None
