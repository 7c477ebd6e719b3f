"""``initialize``: every pre-write check, then gradient capture -> SVD -> all-or-nothing write,
with a report of what it cost (docs/algorithms.md, sections 1-3)."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from peft import PeftModel
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import distributed as dist_
from .capture import LossFn, capture
from .errors import GradLoraError
from .inits import check_rank, init_from_gradient, init_from_svd, make_method
from .meter import PhaseCost, measure
from .portable_save import install_portable_save
from .precision import math_dtype
from .sketch import check_sketch_options, choose_gradient, sketch_svds, step_activation_bytes
from .targets import LoraTarget, check_gradient_flows, find_layers, unwrap
from .write import resolve_offset, write_factors


@dataclass
class LayerReport:
    shape: tuple[int, int]  # (out, in) of the effective weight
    rank: int  # the adapter's r for this layer
    singular_values: list[float]  # top singular values of G (2r for LoRA-GA, r for LoRA-One)


@dataclass
class InitReport:
    method: str  # "lora-ga" or "lora-one"
    options: dict[str, Any]  # the method's options, defaults filled in
    num_batches: int  # batches the gradient was averaged over, all ranks together
    ranks: int = 1  # processes whose batches were averaged (data-parallel init)
    gradient: str = "exact"  # how G was held: "exact" (fp32 accumulators) or "sketch"
    offset: str | None = None  # LoRA-GA: "weight" (W rewritten) or "adapter" (counter-term)
    gradient_options: dict[str, Any] = field(default_factory=dict)  # sketch passes, oversample
    layers: dict[str, LayerReport] = field(default_factory=dict)  # by base-model module name
    skipped: list[str] = field(default_factory=list)  # unsupported layers left at peft's init
    capture: PhaseCost = field(default_factory=PhaseCost)  # forward/backward passes
    svd: PhaseCost = field(default_factory=PhaseCost)  # SVDs and factor computation

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        mib = 2**20
        sigma1 = max((lr.singular_values[0] for lr in self.layers.values()), default=0.0)
        per_rank = (
            f"({self.num_batches // self.ranks} on each of {self.ranks} ranks) "
            if self.ranks > 1
            else ""
        )
        skipped = f" ({len(self.skipped)} unsupported skipped)" if self.skipped else ""
        return (
            f"{self.method} init of {len(self.layers)} layers{skipped} from {self.num_batches} batches "
            f"{per_rank}({self.gradient} gradient): "
            f"capture {self.capture.seconds:.2f} s (peak {self.capture.peak_bytes / mib:.0f} MiB, "
            f"+{self.capture.increase_bytes / mib:.0f}), SVD {self.svd.seconds:.2f} s "
            f"(peak {self.svd.peak_bytes / mib:.0f} MiB) [{self.capture.metric}]; "
            f"largest sigma_1 {sigma1:.3g}"
        )


def initialize(
    model: nn.Module,
    batches: Iterable[Any],
    method: str = "lora-ga",
    num_batches: int = 8,
    loss_fn: LossFn | None = None,
    progress: bool = True,
    gradient: str = "auto",
    offset: str = "auto",
    sketch_passes: int = 1,
    sketch_oversample: int | None = None,
    sketch_memory: int | str | None = "auto",
    distributed: bool | None = None,
    process_group: Any = None,
    skip_unsupported: bool = False,
    collective_timeout: float | None = None,
    **options: Any,
) -> InitReport:
    """Initialize the active LoRA adapter of ``model`` in place from the gradient on ``batches``.

    method="lora-ga" (options: direction="ArB2r"|"A2rBr"|"ArBr", scale="stable"|"unit"|"matched",
    gamma=16, svd="auto"|"exact"|"randomized", svd_niter=8, seed=0): A0, B0 from the top-2r
    singular vectors of G, and the offset s B0 A0 subtracted so the model's outputs are unchanged:
    ``offset="weight"`` rewrites the base weight W' = W - s B0 A0; ``offset="adapter"`` leaves
    every base weight byte-identical and makes the LoRA layer subtract s B0 A0 x itself (one
    extra rank-r product per forward; the same outputs, gradients and steps); ``offset="auto"``
    (default) is "adapter" on quantized (bitsandbytes 4-bit / 8-bit) or FSDP2-sharded bases,
    "weight" otherwise.
    method="lora-one" (options: gamma=128, svd, svd_niter, seed): s B0 A0 = -(s / (gamma
    sigma_1)) [G]_r, no offset. Batches are dicts for ``model(**batch)`` returning ``.loss``, or
    anything ``loss_fn(model, batch)`` turns into a scalar loss.

    gradient="exact" holds G in an fp32 (m, n) accumulator per layer (4 bytes per adapted
    weight) and takes its SVD; on a quantized layer it is filled from module hooks as
    sum over tokens of deltaᵀ x, the gradient at the dequantized weights the layer computes with.
    gradient="sketch" never forms G: module hooks accumulate thin
    randomized sketches of it from each layer's input and output gradient, no weight requires
    grad, and ``sketch_passes`` passes over the same batches give the top triplets (1: single-pass
    sketch, about one plain pass; 2: range finder plus exact projection; more: power
    iterations, each one more pass); sketch width s = k + ``sketch_oversample`` (default 7k, so
    s = 8k; k = 2r for LoRA-GA, r for LoRA-One), memory about 3 (m + n) s floats per layer.
    ``sketch_memory`` (bytes; None: no limit) caps what those buffers take in one pass: the
    layers are then sketched in groups (model order), one group per pass over the same batches
    (kept in memory), each group reduced to its top triplets before the next: the same result,
    the capture time about once per group (less for groups of upper layers). "auto" (default)
    caps them at what a training step on the first batch keeps for these layers' backward
    (``sketch.step_activation_bytes``: 4 bytes x tokens x sum of (m + n); the smallest over the
    ranks), so the init fits wherever training on these batches fits; one group whenever the
    batch has more tokens than the sketch is wide (about 8k), no cap if the batch has no
    token ids.
    gradient="auto" (the default) is "exact" while the fp32 accumulators take at most 1 GiB
    (about 268M adapted weights) and "sketch" above: measured on MiniLM, exact is exact and no
    slower at that size, while the single-pass sketch at s = 8k captures a median 0.99 (min
    0.85) of the top-2r gradient energy; on large models the accumulators would outgrow the
    model, and the sketch does not. The choice depends only on the layer shapes.

    gradlora initializes LoRA on nn.Linear and transformers' Conv1D layers. LoRA on any other
    layer (peft's lora.Embedding, lora.Conv2d) is an error naming the layers, unless
    ``skip_unsupported=True``: then those layers stay exactly at peft's init (their LoRA branch
    stays on during capture), the rest is initialized, one WARNING on the "gradlora" logger
    names them, and ``InitReport.skipped`` lists them. DoRA, lora_bias, merged adapters and
    quantized weights other than bitsandbytes 4-bit / 8-bit are errors either way.

    Every check runs before anything is written, and the write is all-or-nothing: on any error
    the model is exactly as it was. Returns an InitReport (singular values per layer, time and
    peak memory of capture and SVD).

    Data-parallel (torchrun, accelerate): with ``distributed=None`` (default) and
    torch.distributed initialized with several ranks, this is a collective: call it on every
    rank with that rank's batches; G is averaged over all ranks' batches and every rank ends
    with bit-identical A, B and W (see gradlora.distributed). ``distributed=False`` makes it a
    per-process init; ``process_group`` restricts the reduction to a group. A model wrapped in
    DistributedDataParallel is initialized through its ``.module``. Before the first collective
    every rank checks that all ranks of the group entered the init: it waits at most
    ``collective_timeout`` seconds (default: $GRADLORA_COLLECTIVE_TIMEOUT, else 60), then raises
    a GradLoraError naming the ranks that did not, with the model untouched. Each layer's SVD
    runs on one rank and its factors are broadcast, so that phase takes about 1/world the time.

    FSDP2 (``torch.distributed.fsdp.fully_shard`` on the PeftModel's layers and root, DTensor
    parameters): call it the same way on every rank, on the sharded model. G is built from the
    layers' inputs and output gradients (sum of deltaᵀ x, or the sketch), which FSDP2 does not
    shard; each rank writes its own shards of A and B; ``offset="auto"`` is "adapter" (a sharded
    base weight is never rewritten; "weight" is refused). FSDP1 (FullyShardedDataParallel) is
    refused: shard with FSDP2, or initialize before wrapping.
    """
    sync = dist_.resolve(distributed, process_group)
    try:
        if torch.is_inference_mode_enabled():
            raise GradLoraError(
                "initialize was called under torch.inference_mode(), where no gradient can be "
                "computed; call it outside the inference_mode block"
            )
        timeout = dist_.collective_timeout(collective_timeout)
        spec = make_method(method, **options)
        model = unwrap(model)
        targets, skipped = find_layers(model, skip_unsupported)
        if not sync and dist_.world_size() > 1 and any(t.sharded for t in targets):
            raise GradLoraError(
                f"the model is sharded with FSDP2 across {dist_.world_size()} ranks, so its init "
                "is a collective (every rank holds a slice of each factor): call initialize on "
                "every rank with distributed=None (the default) or True, not distributed=False"
            )
        mode = _check_before_write(
            spec, targets, gradient, sketch_passes, sketch_oversample, sketch_memory
        )
        offset_mode = resolve_offset(offset, targets) if spec.offsets_base else None
    except Exception:
        if sync:  # the other ranks stop at their join check instead of waiting for this one
            with contextlib.suppress(RuntimeError):  # a store error would hide the real one
                dist_.check_joined(process_group, failed=True)
        raise
    if sync:  # before any collective: a rank that never comes is an error, not a hang
        dist_.check_joined(process_group, timeout)
    device = targets[0].weight.device
    by_name = {t.name: t for t in targets}

    with measure(device) as capture_cost:
        reduce = dist_.make_reduce(process_group) if sync else None
        if mode == "sketch" and sketch_memory == "auto":
            sketch_memory, batches = _auto_sketch_memory(targets, batches, sync, process_group)
        if mode == "sketch":
            accs, used = sketch_svds(
                model,
                targets,
                batches,
                {t.name: spec.svd_rank(t.rank) for t in targets},
                num_batches=num_batches,
                loss_fn=loss_fn,
                progress=progress,
                passes=sketch_passes,
                oversample=sketch_oversample,
                seed=spec.seed,
                reduce=reduce,
                memory=sketch_memory,
            )
        else:
            accs, used = capture(
                model,
                targets,
                batches,
                num_batches=num_batches,
                loss_fn=loss_fn,
                progress=progress,
                reduce=reduce,
            )

    # with several ranks each layer's SVD runs on one of them and its factors are broadcast
    names = list(accs)
    ranks = dist_.world_size(process_group) if sync else 1
    me = dist_.group_rank(process_group) if sync else 0
    costs = [_svd_cost(by_name[n]) for n in names]
    owners = dict(zip(names, dist_.assign_owners(costs, ranks), strict=True))
    layout = {n: _factor_layout(by_name[n], spec) for n in names}
    results = {}
    with measure(device) as svd_cost:
        for name in names:
            if owners[name] != me:
                del accs[name]  # another rank decomposes it
        for name in tqdm(
            list(accs), desc=f"gradlora: {spec.name} SVD", unit="layer", disable=not progress
        ):
            t = by_name[name]
            if mode == "sketch":
                U, S, V = accs.pop(name).svd()
                A0, B0 = init_from_svd(U, S, V, t.rank, spec)
                S = S[: spec.svd_rank(t.rank)]
            else:
                G = accs.pop(name).result(used)  # frees each (m, n) buffer as soon as it is used
                A0, B0, S = init_from_gradient(G, t.rank, spec)
                del G
            results[name] = (A0, B0, S)
        if sync:
            results = dist_.share_factors(results, layout, owners, device, process_group)
    factors, layers = {}, {}
    for name in names:
        A0, B0, S = results.pop(name)
        t = by_name[name]
        factors[name] = (A0, B0)
        layers[name] = LayerReport(shape=t.shape, rank=t.rank, singular_values=S.tolist())

    write_factors(targets, factors, offset_base=spec.offsets_base, mode=offset_mode or "weight")
    if spec.offsets_base and isinstance(model, PeftModel):
        install_portable_save(model)  # peft's own save_pretrained (and the Trainer's) stays right
    if sync:
        dist_.synchronize_targets(targets, process_group)
    return InitReport(
        method=spec.name,
        options=asdict(spec),
        num_batches=used,
        ranks=dist_.world_size(process_group) if sync else 1,
        gradient=mode,
        offset=offset_mode,
        gradient_options=(
            {"passes": sketch_passes, "oversample": sketch_oversample, "memory": sketch_memory}
            if mode == "sketch"
            else {}
        ),
        layers=layers,
        skipped=[s.name for s in skipped],
        capture=capture_cost,
        svd=svd_cost,
    )


def _svd_cost(t: LoraTarget) -> float:
    """The relative cost of a layer's SVD, m n min(m, n) (exact; a randomized one scales alike)."""
    m, n = t.shape
    return float(m * n * min(m, n))


def _factor_layout(t: LoraTarget, spec) -> tuple:
    """((shape, dtype) of A0, B0 and the reported singular values) of one layer, as every rank
    receives them: the factors in at least the adapter's precision (they are cast to it)."""
    m, n = t.shape
    dtype = math_dtype(t.A)
    return (((t.rank, n), dtype), ((m, t.rank), dtype), ((spec.svd_rank(t.rank),), torch.float64))


def _check_before_write(
    spec,
    targets: list[LoraTarget],
    gradient: str,
    passes: int,
    oversample: int | None,
    memory: int | None = None,
) -> str:
    """Every check that can refuse an init, run before any batch is touched; returns the
    resolved gradient mode ("exact" or "sketch")."""
    if targets and not any(t.A.requires_grad or t.B.requires_grad for t in targets):
        raise GradLoraError(
            f"no LoRA weight of adapter {targets[0].adapter!r} is trainable (requires_grad=False "
            "everywhere, e.g. PeftModel.from_pretrained without is_trainable=True, or "
            "LoraConfig(inference_mode=True)); load it with is_trainable=True or call "
            "requires_grad_(True) on the lora_A / lora_B weights before initializing"
        )
    check_gradient_flows(targets)  # bitsandbytes layers: a device and a layout it can train on
    for t in targets:
        check_rank(spec, t.rank, t.shape, t.name)
    done = [t.name for t in targets if t.init_factors() is not None]
    if done:
        raise GradLoraError(
            f"the model was already initialized by gradlora (base weights offset, e.g. {done[0]!r}); "
            "a second init would measure the gradient at the offset weights. Start again from a "
            "fresh PeftModel of the original base model"
        )
    check_sketch_options(passes, oversample, memory)
    return choose_gradient(gradient, targets)


def _auto_sketch_memory(targets, batches, sync: bool, group: Any):
    """(``sketch_memory="auto"``'s byte cap or None, the batches with the peeked one back)."""
    if isinstance(batches, Mapping | Tensor):
        first = batches
    else:
        it = iter(batches)
        first = next(it, None)
        batches = batches if first is None else itertools.chain([first], it)
    cap = None if first is None else step_activation_bytes(targets, first)
    if sync:  # every rank must group the layers alike: the smallest cap, -1 for "none"
        cap = dist_.all_reduce_min(-1 if cap is None else cap, targets[0].weight.device, group)
        cap = None if cap < 0 else cap
    return cap, batches
