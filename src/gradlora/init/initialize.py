"""``initialize``: every check before anything is written, then gradient capture -> SVD ->
all-or-nothing write, with a report of what it cost (docs/algorithms.md, sections 1-3; the
options, gradient modes and their memory in docs/initialize.md).
"""

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

from ..adapter.offset import refuse_foreign_weight_offset, resolve_offset, write_factors
from ..adapter.portable_save import install_portable_save
from ..errors import GradLoraError
from ..meter import PhaseCost, measure
from ..parallel import collectives
from ..parallel.sharding import full
from ..peft_view import (
    LoraTarget,
    check_gradient_flows,
    offset_layers,
    supported_layers,
    unwrap,
)
from ..precision import math_dtype
from ..rates import INIT_ATTRIBUTE
from .capture import LossFn, capture, choose_gradient
from .formulas import LoraGA, LoraOne, check_rank, init_from_gradient, init_from_svd, make_method
from .sketch import sketch_svds, step_activation_bytes

# peft's inits that leave the base weights as they were. Any other value (PiSSA, OLoRA, CorDA,
# LoftQ, peft's LoRA-GA, and any init peft adds later, until it is checked) rewrites them, or may.
BASE_PRESERVING_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")
# an adapter whose ||B A||_F is at most this fraction of ||B||_F ||A||_F adds nothing (peft's
# inits: B = 0, or orthogonal / MiCA factors whose product is 0 up to rounding); a trained one
# is far above it
UNTOUCHED_PRODUCT = 1e-4


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
    overwrite_adapter: bool = False,
    **options: Any,
) -> InitReport:
    """Initialize the active LoRA adapter of ``model`` in place from the gradient on ``batches``.

    G (m, n) = mean over the first ``num_batches`` batches of dL/dW at each targeted base weight
    W, with the LoRA branches bypassed. method="lora-ga" (options direction, scale, gamma=16,
    svd, svd_niter, seed): A0 (r, n), B0 (m, r) from the top-2r singular vectors of G, and the
    offset s B0 A0 subtracted so outputs are unchanged (``offset``: "weight" rewrites W' = W -
    s B0 A0; "adapter" keeps W byte-identical and subtracts s B0 A0 x in the layer; "auto" is
    "adapter" on quantized or FSDP2-sharded bases). method="lora-one" (options gamma=128, svd,
    svd_niter, seed): s B0 A0 = -(s / (gamma sigma_1)) [G]_r, no offset.

    Batches are dicts for ``model(**batch)`` returning ``.loss``, or anything
    ``loss_fn(model, batch)`` turns into a scalar loss. ``gradient`` ("auto", "exact",
    "sketch") and the ``sketch_*`` options choose how G is held; ``skip_unsupported`` leaves
    LoRA on nn.Embedding / convolutions at peft's init. An adapter that already changes the
    model (trained or loaded) is refused unless ``overwrite_adapter=True`` discards its weights;
    one whose peft init rewrote the base (PiSSA, OLoRA, ...) always. Every check runs before anything is
    written and the write is all-or-nothing: on any error the model is exactly as it was.
    Under torch.distributed with several ranks (DDP, FSDP2) it is a collective: call it on
    every rank with that rank's batches (``distributed``, ``process_group``,
    ``collective_timeout``). docs/initialize.md and docs/distributed.md give every option.
    Returns an InitReport (singular values per layer, time and peak memory of each phase).
    """
    sketch = {"passes": sketch_passes, "oversample": sketch_oversample, "memory": sketch_memory}
    dist = (distributed, process_group, collective_timeout)
    layers = (skip_unsupported, overwrite_adapter)
    run = _prepare(model, method, options, gradient, offset, layers, dist, sketch)
    spec, targets, group = run.spec, run.targets, process_group
    by_name = {t.name: t for t in targets}
    device = targets[0].weight.device
    common = dict(num_batches=num_batches, loss_fn=loss_fn, progress=progress)
    with measure(device) as capture_cost:
        reduce = collectives.make_reduce(group) if run.sync else None
        if run.gradient == "sketch":
            if sketch["memory"] == "auto":
                sketch["memory"], batches = _auto_sketch_memory(targets, batches, run.sync, group)
            ranks = {t.name: spec.svd_rank(t.rank) for t in targets}
            accs, used = sketch_svds(
                run.model, targets, batches, ranks, **common, passes=sketch_passes,
                oversample=sketch_oversample, seed=spec.seed, reduce=reduce, memory=sketch["memory"],
            )  # fmt: skip
        else:
            accs, used = capture(run.model, targets, batches, **common, reduce=reduce)

    # with several ranks each layer's SVD runs on one of them and its factors are broadcast
    names, me, owners = list(accs), 0, dict.fromkeys(accs, 0)
    if run.sync:
        me, costs = collectives.group_rank(group), [_svd_cost(by_name[n]) for n in accs]
        world = collectives.world_size(group)
        owners = dict(zip(names, collectives.assign_owners(costs, world), strict=True))
    results = {}
    with measure(device) as svd_cost:
        mine = [n for n in names if owners[n] == me]
        for name in tqdm(
            mine, desc=f"gradlora: {spec.name} SVD", unit="layer", disable=not progress
        ):
            t, acc = by_name[name], accs.pop(name)
            if run.gradient == "sketch":
                U, S, V = acc.svd()
                results[name] = (*init_from_svd(U, S, V, t.rank, spec), S[: spec.svd_rank(t.rank)])
            else:  # result() frees each (m, n) buffer as soon as it is used
                results[name] = init_from_gradient(acc.result(used), t.rank, spec)
            del acc
        accs.clear()
        if run.sync:
            layout = {n: _factor_layout(by_name[n], spec) for n in names}
            results = collectives.share_factors(results, layout, owners, device, group)

    factors = {name: results[name][:2] for name in names}
    write_factors(targets, factors, offset_base=spec.offsets_base, mode=run.offset or "weight")
    if spec.offsets_base and isinstance(run.model, PeftModel):
        install_portable_save(run.model)  # peft's own save_pretrained (the Trainer's) stays right
    setattr(run.model, INIT_ATTRIBUTE, (spec.name, asdict(spec)))  # for the rate guard (rates.py)
    if run.sync:
        collectives.synchronize_targets(targets, group)
    return InitReport(
        method=spec.name,
        options=asdict(spec),
        num_batches=used,
        ranks=collectives.world_size(group) if run.sync else 1,
        gradient=run.gradient,
        offset=run.offset,
        gradient_options=sketch if run.gradient == "sketch" else {},
        layers={
            n: LayerReport(by_name[n].shape, by_name[n].rank, results[n][2].tolist()) for n in names
        },
        skipped=[s.name for s in run.skipped],
        capture=capture_cost,
        svd=svd_cost,
    )


@dataclass
class _Run:
    """What the checks before the write settled: the method, the model and layers, the modes."""

    spec: LoraGA | LoraOne
    model: nn.Module  # inside its DDP / compile wrappers
    targets: list[LoraTarget]
    skipped: list  # SkippedLayer: left at peft's init
    gradient: str  # "exact" or "sketch"
    offset: str | None  # "weight" or "adapter" for LoRA-GA, None for LoRA-One
    sync: bool  # a collective over the ranks of the process group


def _prepare(model, method, options, gradient, offset, layers, dist, sketch) -> _Run:
    """Every check that can refuse an init, before any batch is touched. In a collective init
    a refusal is told to the other ranks, which stop at their join check; then every rank waits
    (at most the collective timeout) for all to join."""
    distributed, group, timeout = dist
    skip_unsupported, overwrite_adapter = layers
    check_sketch_options(*sketch.values())
    sync = collectives.resolve(distributed, group)
    try:
        timeout = collectives.collective_timeout(timeout)
        world = collectives.world_size()
        if torch.is_inference_mode_enabled():
            raise GradLoraError(
                "initialize was called under torch.inference_mode(), where no gradient can be "
                "computed; call it outside the inference_mode block"
            )
        model = unwrap(model)
        targets, skipped = supported_layers(model, skip_unsupported)
        if not sync and world > 1 and any(t.partitioned for t in targets):
            how = "FSDP2" if any(t.sharded for t in targets) else "DeepSpeed ZeRO-3"
            raise GradLoraError(
                f"the model is sharded with {how} across {world} ranks, so its init is a "
                "collective (every rank holds a slice of each factor): call initialize on every "
                "rank with distributed=None (the default) or True, not distributed=False"
            )
        if not any(t.A.requires_grad or t.B.requires_grad for t in targets):
            raise GradLoraError(
                f"no LoRA weight of adapter {targets[0].adapter!r} is trainable "
                "(requires_grad=False everywhere, e.g. PeftModel.from_pretrained without "
                "is_trainable=True, or LoraConfig(inference_mode=True)); load it with "
                "is_trainable=True or call requires_grad_(True) on the lora_A / lora_B weights "
                "before initializing"
            )
        check_gradient_flows(targets)  # bitsandbytes layers: a device and a layout to train on
        done = offset_layers(targets)
        if not done:  # an offset model gets the clearer "already initialized" error below
            check_fresh_adapter(model, targets, overwrite_adapter)
        spec = make_method(method, **options)
        for t in targets:
            check_rank(spec, t.rank, t.shape, t.name)
        if done:
            raise GradLoraError(
                f"the model was already initialized by gradlora (base weights offset, e.g. "
                f"{done[0]!r}); a second init would measure the gradient at the offset weights. "
                "Start again from a fresh PeftModel of the original base model"
            )
        refuse_foreign_weight_offset(targets, "initialize")
        offset_mode = resolve_offset(offset, targets) if spec.offsets_base else None
        mode = choose_gradient(gradient, targets)
    except Exception:
        if sync:  # the other ranks stop at their join check instead of waiting for this one
            with contextlib.suppress(RuntimeError):  # a store error would hide the real one
                collectives.check_joined(group, failed=True)
        raise
    if sync:  # before any collective: a rank that never comes is an error, not a hang
        collectives.check_joined(group, timeout)
    return _Run(spec, model, targets, skipped, mode, offset_mode, sync)


def check_fresh_adapter(model: nn.Module, targets: list[LoraTarget], overwrite: bool) -> None:
    """Refuse to initialize an adapter that is not peft's untouched init: one whose peft init
    rewrote the base weights (``init_lora_weights`` outside ``BASE_PRESERVING_INITS``: gradlora
    would measure the gradient at the residual and drop the principal part), and, unless
    ``overwrite``, one that already adds something (||B A||_F > UNTOUCHED_PRODUCT ||B|| ||A||:
    trained, or loaded from a checkpoint), whose weights the
    init would replace. FSDP2 factors are gathered (a collective)."""
    config = model.peft_config.get(targets[0].adapter) if isinstance(model, PeftModel) else None
    init = getattr(config, "init_lora_weights", True)
    if not any(init is v or init == v for v in BASE_PRESERVING_INITS):
        raise GradLoraError(
            f"the adapter {targets[0].adapter!r} was built with init_lora_weights={init!r}, "
            "which rewrites the base weights (a residual of the original): a gradient init on "
            "top would lose that part. Load the base model again and build the PeftModel with "
            "init_lora_weights=True (gradlora replaces A and B anyway)"
        )
    if overwrite:
        return
    for t in targets:
        A, B = full(t.A).detach().double(), full(t.B).detach().double()
        # ||B A||_F = ||R_B R_Aᵀ||_F from the QRs B = Q_B R_B, Aᵀ = Q_A R_A: r x r, no squaring
        R_B, R_A = torch.linalg.qr(B, mode="r")[1], torch.linalg.qr(A.T, mode="r")[1]
        product = (R_B @ R_A.T).norm()
        if product > UNTOUCHED_PRODUCT * B.norm() * A.norm():
            raise GradLoraError(
                f"the adapter {t.adapter!r} already changes the model (layer {t.name!r} has "
                "B A != 0: trained, or loaded from a checkpoint), and a gradient init would "
                "replace its weights. Initialize a fresh PeftModel, or pass "
                "overwrite_adapter=True to discard the adapter's weights"
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
        cap = collectives.all_reduce_min(
            -1 if cap is None else cap, targets[0].weight.device, group
        )
        cap = None if cap < 0 else cap
    return cap, batches


def check_sketch_options(passes: Any, oversample: Any, memory: Any = None) -> None:
    """Refuse bad ``sketch_passes`` / ``sketch_oversample`` / ``sketch_memory`` values."""
    if memory not in (None, "auto") and (
        not isinstance(memory, int) or isinstance(memory, bool) or memory < 1
    ):
        raise GradLoraError(
            f"sketch_memory must be 'auto', None (one pass sketches every layer) or a number of "
            f"bytes >= 1, got {memory!r}"
        )
    if not isinstance(passes, int) or isinstance(passes, bool) or passes < 1:
        raise GradLoraError(f"sketch_passes must be a positive integer, got {passes!r}")
    if oversample is not None and (
        not isinstance(oversample, int) or isinstance(oversample, bool) or oversample < 0
    ):
        raise GradLoraError(
            f"sketch_oversample must be None or an integer >= 0, got {oversample!r}"
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
        supported_layers(unwrap(model), skip_unsupported)[0],
        batches,
        num_batches=num_batches,
        loss_fn=loss_fn,
        progress=progress,
    )
    return {name: acc.result(used) for name, acc in accs.items()}
