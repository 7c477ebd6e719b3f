"""Sketch mode (docs/algorithms.md, section 1): the top singular triplets of each target's G, never forming G.

Pass 1 runs the N batches once and accumulates, per layer, the range sketch Y = G Omega (m, s)
and, for a single pass, the co-range sketch Z = Psi G (l, n); Omega (n, s) and Psi (l, m) are
fixed seeded Gaussian matrices, s = k + oversample, l = 2s + 1 (both capped by the layer's
size), k the method's SVD rank. Further passes run the same cached batches again (same dropout
draws: every pass starts from the caller's RNG state) and alternate exact products with
orthonormal bases, i.e. randomized subspace (power) iteration on G:

  passes=1: (Y, Z)                       -> sketch_svd (Tropp et al. 2017)
  passes=2: Q = orth(G Omega); Q^T G      -> SVD of Q (Q^T G)
  passes=3: ... P = orth(G^T Q); G P      -> SVD of (G P) P^T
  and so on, each extra pass one more half power iteration.

Memory per layer: O((m + n) s) floats instead of m n; the products are fed from module hooks
(``SketchAccumulator``), so no weight requires grad and no weight gradient is computed.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from ..peft_view import LoraTarget
from .capture import ActivationHooks, LossFn, capture
from .formulas import SeededGaussian, factored_svd, materialize, orthonormal_basis, sketch_svd


class SketchAccumulator(ActivationHooks):
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


@dataclass
class LayerSketch:
    """What the last pass left for one layer; ``svd()`` reconstructs the top-k triplets."""

    k: int
    # "single" (a=Y, b=Z, psi), "range" (a=Q, b=Q^T G), "corange" (a=G P, b=P),
    # "triplets" (a=U, b=V, singular values S: ``svd()`` already taken)
    kind: str
    a: Tensor
    b: Tensor
    psi: Tensor | SeededGaussian | None = None
    S: Tensor | None = None

    def svd(self) -> tuple[Tensor, Tensor, Tensor]:
        """U (m, k), S (k,), V (n, k) of the sketched G, fp32."""
        if self.kind == "triplets":
            return self.a, self.S, self.b
        if self.kind == "single":
            return sketch_svd(self.a, self.b, materialize(self.psi), self.k)
        if self.kind == "range":
            return factored_svd(self.a, self.b.T, self.k)
        return factored_svd(self.a, self.b, self.k)

    def compact(self) -> LayerSketch:
        """The same sketch with its SVD taken now: (m + n) k floats instead of the sketches
        (same numbers as a later ``svd()``)."""
        U, S, V = self.svd()
        return LayerSketch(self.k, "triplets", U, V, S=S)


# Default sketch width s = SKETCH_WIDTH_FACTOR * k: gradient spectra decay slowly, so a thin
# sketch misses energy; the widths measured against the exact SVD are in
# benchmarks/results/init_cost.md (benchmarks/init_cost.py; docs/initialize.md).
SKETCH_WIDTH_FACTOR = 8


def sketch_sizes(k: int, shape: tuple[int, int], oversample: int | None) -> tuple[int, int]:
    """(s, l): range sketch width s = k + oversample (default oversample = (SKETCH_WIDTH_FACTOR
    - 1) k, so s = 8k) and co-range width l = 2s + 1, capped at min(m, n) and m for a layer of
    shape (m, n)."""
    m, n = shape
    extra = (SKETCH_WIDTH_FACTOR - 1) * k if oversample is None else oversample
    s = min(k + extra, m, n)
    return s, min(2 * s + 1, m)


def sketch_bytes(shape: tuple[int, int], size: tuple[int, int], passes: int) -> int:
    """Bytes of one layer's sketch buffers (fp32) during a pass: G Omega (m, s) and Psi G (l, n)
    for a single pass; with more passes about a basis and a product, 2 (m + n) s floats."""
    (m, n), (s, l) = shape, size
    return 4 * (m * s + l * n) if passes == 1 else 8 * (m + n) * s


def sketch_groups(
    targets: list[LoraTarget], sizes: Mapping[str, tuple[int, int]], passes: int, memory: int | None
) -> list[list[LoraTarget]]:
    """The targets split, in model order, into groups whose sketch buffers (``sketch_bytes``)
    take at most ``memory`` bytes together (a layer over it alone gets a group of its own);
    one group for ``memory=None``. Depends only on shapes, so every rank splits alike."""
    if memory is None:
        return [list(targets)]
    groups: list[list[LoraTarget]] = [[]]
    held = 0
    for t in targets:
        need = sketch_bytes(t.shape, sizes[t.name], passes)
        if groups[-1] and held + need > memory:
            groups.append([])
            held = 0
        groups[-1].append(t)
        held += need
    return groups


def step_activation_bytes(targets: list[LoraTarget], batch: Any) -> int | None:
    """What a training step on ``batch`` keeps for the targets' backward, at the least: 4 bytes
    x tokens x sum over targets of (m + n) (each layer's input and output gradient per token).
    Tokens: ``batch["input_ids"]``'s element count, or an integer tensor's; None if unknown.
    ``sketch_memory="auto"`` caps the sketch buffers at this, so the sketch holds no more than
    the training step it prepares."""
    ids = batch.get("input_ids") if isinstance(batch, Mapping) else batch
    if not isinstance(ids, Tensor) or ids.is_floating_point() or ids.is_complex():
        return None
    return 4 * ids.numel() * sum(m + n for m, n in (t.shape for t in targets))


def sketch_svds(
    model: nn.Module,
    targets: list[LoraTarget],
    batches: Iterable[Any],
    ranks: Mapping[str, int],
    *,
    num_batches: int = 8,
    loss_fn: LossFn | None = None,
    progress: bool = True,
    passes: int = 1,
    oversample: int | None = None,
    seed: int = 0,
    reduce: Callable[[list[Tensor]], None] | None = None,
    memory: int | None = None,
) -> tuple[dict[str, LayerSketch], int]:
    """Sketch the mean gradient G of every target in ``passes`` passes over the same batches.

    ``ranks[name]`` is the number k of triplets wanted for that layer. Returns
    ({base-model layer name: LayerSketch}, number of batches used); call ``.svd()`` on each.
    Test matrices come from private generators seeded by ``seed`` and the layer's position, so
    the same seed gives bit-identical results. ``memory`` (bytes, None: no limit) caps the
    sketch buffers one pass holds: the layers are split in model order into groups within it
    (``sketch_groups``), each group sketched by its own passes over the same batches (cached),
    and each group but the last reduced to its top-k triplets (``LayerSketch.compact``) before
    the next starts; the results are the same, the time about one capture per group (a group
    of upper layers backpropagates only through them). Raises GradLoraError like ``capture``
    (empty data, unreached layer, non-finite or zero gradient); the model is restored in every
    case.
    """
    sizes = {t.name: sketch_sizes(ranks[t.name], t.shape, oversample) for t in targets}
    groups = sketch_groups(targets, sizes, passes, memory)
    if (passes > 1 or len(groups) > 1) and not isinstance(batches, Mapping | Tensor):
        batches = list(itertools.islice(batches, num_batches))  # replayed by the later passes
    omegas, psis = {}, {}
    for i, t in enumerate(targets):
        s, l = sizes[t.name]
        device = t.weight.device
        # recipes, not tensors: made afresh for each product (saves (n s + l m) floats per layer)
        omegas[t.name] = SeededGaussian(t.shape[1], s, seed * 1_000_003 + 2 * i, device)
        if passes == 1:
            psis[t.name] = SeededGaussian(l, t.shape[0], seed * 1_000_003 + 2 * i + 1, device)

    def run(group: list[LoraTarget], make: Callable[[LoraTarget], SketchAccumulator], count):
        return capture(
            model,
            group,
            batches,
            num_batches=count,
            loss_fn=loss_fn,
            progress=progress,
            make_accumulator=make,
            reduce=reduce,
        )

    out: dict[str, LayerSketch] = {}
    for j, group in enumerate(groups):
        sketches, used = _sketch_group(
            partial(run, group), group, ranks, omegas, psis, passes, num_batches, batches
        )
        if j < len(groups) - 1:  # keep (m + n) k floats, not the sketches, while the rest runs
            sketches = {name: sketch.compact() for name, sketch in sketches.items()}
        out.update(sketches)
    return out, used


def _sketch_group(run, targets, ranks, omegas, psis, passes, num_batches, batches):
    """``sketch_svds`` for one group of targets: its passes, through ``run(make, count)``."""
    accs, used = run(
        lambda t: SketchAccumulator(t, right=omegas[t.name], left=psis.get(t.name)), num_batches
    )
    first = {name: acc.result(used) for name, acc in accs.items()}
    del accs
    if passes == 1:
        return {
            t.name: LayerSketch(ranks[t.name], "single", *first[t.name], psis[t.name])
            for t in targets
        }, used

    count = len(batches)
    basis = {name: orthonormal_basis(Y) for name, (Y, _) in first.items()}  # Q (m, s)
    del first
    for p in range(2, passes + 1):
        left_side = p % 2 == 0  # even passes: Q^T G (s, n); odd passes: G P (m, s)
        accs, _ = run(partial(_projection, basis=basis, left_side=left_side), count)
        products = {name: acc.result(used)[1 if left_side else 0] for name, acc in accs.items()}
        del accs
        if p == passes:
            kind = "range" if left_side else "corange"
            if left_side:
                return {
                    t.name: LayerSketch(ranks[t.name], kind, basis[t.name], products[t.name])
                    for t in targets
                }, used
            return {
                t.name: LayerSketch(ranks[t.name], kind, products[t.name], basis[t.name])
                for t in targets
            }, used
        basis = {name: orthonormal_basis(M.T if left_side else M) for name, M in products.items()}
    raise AssertionError("unreachable")


def _projection(t: LoraTarget, basis: Mapping[str, Tensor], left_side: bool) -> SketchAccumulator:
    if left_side:
        return SketchAccumulator(t, left=basis[t.name].T)
    return SketchAccumulator(t, right=basis[t.name])
