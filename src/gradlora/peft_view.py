"""The peft model as gradlora sees it: through the wrappers training frameworks put around it
(DDP, DataParallel, torch.compile; FSDP1 refused), to the (A, B, base weight) of every LoRA
layer of the active adapter, and the policy of which layers gradlora supports.

Shapes follow peft: the base weight W is (m, n) = (out, in) (stored (n, m) by transformers'
Conv1D or with fan_in_fan_out), ``lora_A.weight`` A is (r, n), ``lora_B.weight`` B is (m, r),
and the layer adds s B A x with s = alpha / r (alpha / sqrt(r) with rsLoRA).

LoRA on other layers (lora.Embedding, lora.Conv2d, ...) is refused unless ``skip_unsupported=
True``: ``supported_layers`` then returns them apart as ``SkippedLayer``s (no init, plain AdamW)
with one WARNING. DoRA, lora_bias, merged adapters and non-bitsandbytes quantized weights are
errors on every layer.
"""

from __future__ import annotations

import copy
import logging
import sys
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel
from peft.tuners.lora import LoraLayer
from peft.tuners.lora import layer as lora
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.utils.integrations import dequantize_bnb_weight
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from .errors import GradLoraError
from .parallel.sharding import partitioning
from .parallel.zero import read_whole, whole_shape

WEIGHT0 = "gradlora_weight0"  # buffer name of the init factors A0 / B0 on lora_A / lora_B
BASE_SIGNATURE = "gradlora_base_signature"  # on lora_A: weight_signature of W before the offset
PEFT_PREFIX = "base_model.model."
# peft LoRA layers gradlora can leave alone with skip_unsupported=True: their LoRA weights are
# ordinary trainable parameters (plain AdamW) and their base weights are never touched
SKIPPABLE = (lora.Embedding, lora.Conv1d, lora.Conv2d, lora.Conv3d)

log = logging.getLogger("gradlora")


@dataclass(frozen=True, eq=False)
class LoraTarget:
    """One LoRA-adapted linear layer of the active adapter, read once by ``LoraTarget.of``."""

    name: str  # module name in the base model, e.g. "bert.encoder.layer.0.attention.self.query"
    module_name: str  # module name in the wrapped model, as in model.named_modules()
    layer: LoraLinear
    adapter: str
    weight: nn.Parameter  # the frozen base weight as stored: (m, n), or (n, m) for Conv1D
    A: nn.Parameter  # lora_A weight, (r, n)
    B: nn.Parameter  # lora_B weight, (m, r)
    rank: int  # r
    scaling: float  # s = alpha / r (alpha / sqrt(r) with rsLoRA)
    shape: tuple[int, int]  # (m, n) = (out_features, in_features) of the effective weight
    transposed: bool  # W stored (n, m): transformers' Conv1D or fan_in_fan_out
    quantized: bool  # the base layer is bitsandbytes' 4-bit or 8-bit linear (a packed weight)
    # FSDP2 (``fully_shard``): the weights are DTensors; the base weight is then never read
    # whole nor rewritten, and A, B are written shard by shard
    sharded: bool
    # DeepSpeed ZeRO-3: each rank holds a slice of every weight (parallel/zero.py)
    zero3: bool = False

    @classmethod
    def of(
        cls, name: str, module_name: str, layer: LoraLinear, adapter: str, partition: str | None
    ) -> LoraTarget:
        base = layer.get_base_layer()
        A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        return cls(
            name,
            module_name,
            layer,
            adapter,
            weight=base.weight,
            A=A,
            B=B,
            rank=int(layer.r[adapter]),
            scaling=float(layer.scaling[adapter]),
            shape=(whole_shape(B)[0], whole_shape(A)[1]),
            transposed=isinstance(base, Conv1D) or bool(layer.fan_in_fan_out),
            quantized=_is_bnb(base),
            sharded=partition == "fsdp2",
            zero3=partition == "zero3",
        )

    @property
    def partitioned(self) -> bool:  # this rank holds a part of the weights only
        return self.sharded or self.zero3

    def weight_mn(self) -> Tensor:
        """The base weight as (m, n): a view of a float weight, a gathered copy (ZeRO-3: a
        collective), or the dequantized W_q (a new tensor) a quantized layer computes with."""
        if self.quantized:
            return dequantize_bnb(self.layer.get_base_layer())
        weight = read_whole(self.weight) if self.zero3 else self.weight
        return weight.T if self.transposed else weight

    def original_signature(self) -> list[float] | None:
        """``weight_signature`` of the base weight before the init offset it, or None."""
        sig = getattr(self.layer.lora_A[self.adapter], BASE_SIGNATURE, None)
        return None if sig is None else sig.tolist()

    def init_factors(self) -> tuple[Tensor, Tensor] | None:
        """(A0, B0) stored at init, or None if this layer's base weight was never offset."""
        a0 = getattr(self.layer.lora_A[self.adapter], WEIGHT0, None)
        b0 = getattr(self.layer.lora_B[self.adapter], WEIGHT0, None)
        return None if a0 is None or b0 is None else (a0, b0)


@dataclass(frozen=True)
class SkippedLayer:
    """A LoRA layer of the active adapter that gradlora does not support (peft's lora.Embedding
    or a convolution), left out with ``skip_unsupported=True``: no init, plain AdamW."""

    name: str  # module name in the base model
    module_name: str  # module name in the wrapped model
    layer: LoraLayer
    adapter: str

    @property
    def kind(self) -> str:
        """E.g. "an nn.Embedding layer (peft lora.Embedding)"."""
        return _describe(self.layer)

    def lora_parameters(self) -> list[nn.Parameter]:
        """This layer's LoRA parameters of the adapter (lora_A / lora_B or lora_embedding_*)."""
        params = []
        for attr in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
            container = getattr(self.layer, attr, {})  # ModuleDict or ParameterDict (no .get)
            if self.adapter not in container:
                continue
            item = container[self.adapter]
            if isinstance(item, nn.Module):
                params.extend(item.parameters())
            elif isinstance(item, nn.Parameter):
                params.append(item)
        return params


_WRAPPERS = (nn.parallel.DistributedDataParallel, nn.DataParallel)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel / DeepSpeed's engine (``.module``)
    and torch.compile (``._orig_mod``) wrappers, however deeply nested.

    Working through DDP's forward would run its gradient all-reduce on parameters gradlora does
    not train; gradlora works on the inner module and reduces itself. FSDP2 (``fully_shard``)
    keeps the model's own class (as a subclass) with DTensor parameters, so it needs no
    unwrapping; FSDP1 (``FullyShardedDataParallel``) flattens the weights and is refused.
    """
    while True:
        if isinstance(model, _WRAPPERS) or type(model).__name__ == "DeepSpeedEngine":
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # torch.compile's OptimizedModule
        else:
            break
    check_not_fsdp1(model)
    return model


def check_not_fsdp1(model: nn.Module) -> None:
    """Refuse a model wrapped in FSDP1 (``FullyShardedDataParallel``, at the top or inside),
    naming FSDP2 as the way to shard it."""
    for name, module in model.named_modules():
        if type(module).__name__ == "FullyShardedDataParallel":
            where = "the model is" if not name else f"module {name!r} is"
            raise GradLoraError(
                f"{where} wrapped in FSDP1 (FullyShardedDataParallel), whose flat-parameter "
                "sharding hides the LoRA weights; shard the model with FSDP2 instead "
                "(torch.distributed.fsdp.fully_shard on each decoder layer and the root, or "
                "accelerate's fsdp_version: 2), which gradlora supports, or call gradlora "
                "before wrapping in FSDP1"
            )


def peft_model_of(model: nn.Module | None, user: str = "gradlora") -> PeftModel:
    """The PeftModel inside ``model``: through ``unwrap``'s wrappers and any other wrapper that
    keeps it as ``.module`` (accelerate); a GradLoraError naming ``user`` if there is none."""
    current = model
    while not isinstance(current, PeftModel):
        inner = unwrap(current) if isinstance(current, nn.Module) else None
        if inner is current:
            inner = getattr(current, "module", None)
        if not isinstance(inner, nn.Module):
            raise GradLoraError(
                f"{user} needs the model to be a peft.PeftModel with a LoRA adapter, got "
                f"{type(model).__name__}; wrap it first with peft.get_peft_model(model, "
                "LoraConfig(...)) (or pass peft_config to TRL's SFTTrainer)"
            )
        current = inner
    return current


def active_adapter(model: nn.Module) -> str:
    """The single active adapter's name; an error if several are active at once."""
    if isinstance(model, PeftModel):
        names = model.active_adapters
    else:
        names = sorted(
            {a for m in model.modules() if isinstance(m, LoraLayer) for a in m.active_adapters}
        )
    names = [names] if isinstance(names, str) else list(names)
    if len(names) != 1:
        raise GradLoraError(
            f"gradlora works on one adapter at a time, but {len(names)} are active ({names}); "
            "call model.set_adapter(name) to activate just one"
        )
    return names[0]


def lora_layers(
    model: nn.Module, adapter: str | None = None
) -> tuple[list[LoraTarget], list[SkippedLayer]]:
    """(supported targets, skippable unsupported layers) of ``adapter`` (None: the active
    one), quietly.

    Every hard error is raised here for every layer (not LoRA, no LoRA layers, several active
    adapters, an unskippable kind, non-bitsandbytes quantized weights, DoRA, lora_bias, merged
    adapters). Callers that act on the choice use ``supported_layers``. Takes a PeftModel or
    any module peft injected LoRA layers into, also inside the wrappers ``unwrap`` sees through.
    """
    model = unwrap(model)
    config = (
        model.peft_config.get(adapter or model.active_adapter)
        if isinstance(model, PeftModel)
        else None
    )
    if config is not None and not isinstance(config, LoraConfig):
        raise GradLoraError(
            f"the adapter is a {type(config).__name__}, not LoRA; gradlora needs a LoraConfig adapter"
        )
    lora_modules = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    if not lora_modules:
        raise GradLoraError(
            "the model has no LoRA adapters: wrap it first with "
            "peft.get_peft_model(model, LoraConfig(target_modules=[...]))"
        )
    if adapter is None:
        adapter = active_adapter(model)
    targets, skipped = [], []
    for module_name, layer in lora_modules:
        if adapter not in layer.lora_A and adapter not in getattr(layer, "lora_embedding_A", {}):
            continue  # the active adapter does not target this layer
        partition = partitioning(layer.parameters())
        supported = _check_layer(module_name, layer, adapter)
        name = module_name.removeprefix(PEFT_PREFIX)
        if supported:
            targets.append(LoraTarget.of(name, module_name, layer, adapter, partition))
        else:
            skipped.append(SkippedLayer(name, module_name, layer, adapter))
    if not targets and not skipped:
        raise GradLoraError(f"no LoRA layer belongs to the active adapter {adapter!r}")
    return targets, skipped


def supported_layers(
    model: nn.Module, skip_unsupported: bool = False
) -> tuple[list[LoraTarget], list[SkippedLayer]]:
    """``lora_layers``, acting on ``skip_unsupported``: without it, any LoRA layer on an
    nn.Embedding or a convolution is an error that names the layers and both fixes; with it,
    they are returned apart and one WARNING on the "gradlora" logger lists them."""
    targets, skipped = lora_layers(model)
    if skipped and not skip_unsupported:
        layers = "; ".join(f"{s.name!r}, {s.kind}" for s in skipped)
        one = len(skipped) == 1
        it = "it" if one else "them"
        raise GradLoraError(
            f"the active adapter {skipped[0].adapter!r} has LoRA on "
            f"{'a layer' if one else f'{len(skipped)} layers'} gradlora does not support: "
            f"{layers}. gradlora supports LoRA on nn.Linear and transformers' Conv1D layers; "
            f"either remove {it} from LoraConfig.target_modules, or pass "
            f"skip_unsupported=True to leave {it} at peft's init and train {it} with plain AdamW"
        )
    if not targets:
        raise GradLoraError(
            f"every LoRA layer of the active adapter {skipped[0].adapter!r} is of a kind gradlora "
            f"does not support ({', '.join(repr(s.name) for s in skipped)}), so there is nothing "
            "to initialize or precondition: target nn.Linear / Conv1D layers too, or use plain "
            "peft and torch.optim.AdamW"
        )
    if skipped:
        log.warning(
            "gradlora: skip_unsupported=True: leaving %d LoRA layer(s) at peft's init, trained "
            "with plain AdamW: %s",
            len(skipped),
            "; ".join(f"{s.name!r}, {s.kind}" for s in skipped),
        )
    return targets, skipped


def check_gradient_flows(targets: list[LoraTarget]) -> None:
    """Refuse bitsandbytes 4-bit layers in the CPU inference layout (set by a no-grad eval
    forward on AVX512-BF16 CPUs), whose matmul passes no gradient back to its input."""
    for t in targets:
        if t.quantized:
            check_bnb_device(t.weight.device, f"the bitsandbytes layer {t.name!r}")
        state = getattr(t.weight, "quant_state", None)
        if t.quantized and getattr(state, "packing_format_for_cpu", False):
            raise GradLoraError(
                f"bitsandbytes has switched the 4-bit weight of {t.name!r} to its CPU inference "
                "layout (it does on a forward in eval mode without grad), through which no "
                "gradient flows; run gradlora before evaluating the model (or evaluate in train "
                "mode), or load the model again"
            )


def check_bnb_device(device: torch.device, what: str) -> None:
    """Refuse ``what`` on a device bitsandbytes (if imported) has no backend for."""
    supported = getattr(sys.modules.get("bitsandbytes"), "supported_torch_devices", None)
    if supported is not None and device.type not in supported:
        raise GradLoraError(
            f"{what} is on device {str(device)!r}, where bitsandbytes has no backend (it runs "
            f"on {', '.join(sorted(supported))}); move the model to one of those (e.g. load it "
            "with device_map='cuda' or 'cpu'), or load it without quantization"
        )


def offset_layers(targets: list[LoraTarget]) -> list[str]:
    """The names of the layers whose base a gradlora init has offset (they hold A0, B0)."""
    return [t.name for t in targets if t.init_factors() is not None]


def dequantize_bnb(module: nn.Module) -> Tensor:
    """The float (m, n) weight W_q a bitsandbytes layer computes with (a new tensor), also from
    the 4-bit CPU inference layout (bf16 block scales, transposed): a copy is unpacked."""
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if not getattr(state, "packing_format_for_cpu", False):
        return dequantize_bnb_weight(weight, getattr(module, "state", None))
    import bitsandbytes.functional as bnb_f  # late: the optional quant extra, loaded already

    inverse = getattr(bnb_f, "_convert_weight_packed_for_cpu_inverse", None)
    if inverse is None:
        raise GradLoraError(
            "bitsandbytes has switched a 4-bit weight to its CPU inference layout and this "
            "bitsandbytes version cannot switch it back; load the model again (and use gradlora "
            "before evaluating it, or evaluate in train mode)"
        )
    unpacked = copy.deepcopy(state)
    unpacked.original_nested = False  # the packing dequantized nested scales already
    codes, unpacked = inverse(weight.data, unpacked)  # the 4-bit codes, in the original layout
    # bitsandbytes' inverse leaves the scales (in_blocks, out) as packed; dequantize wants them
    # (out, in_blocks) flattened
    unpacked.absmax = state.absmax.T.reshape(-1).to(torch.float32)
    unpacked.nested = False
    return bnb_f.dequantize_4bit(codes, unpacked)


def _is_bnb(module: nn.Module) -> bool:
    """bitsandbytes' Linear4bit / Linear8bitLt (nn.Linear subclasses with a packed weight)."""
    return type(module).__module__.startswith("bitsandbytes") and isinstance(module, nn.Linear)


def _describe(layer: LoraLayer) -> str:
    """E.g. "an nn.Embedding layer (peft lora.Embedding)"."""
    base = type(layer.get_base_layer())
    prefix = "nn." if base.__module__.startswith("torch.nn") else ""
    article = "an" if prefix or base.__name__[0].lower() in "aeiou" else "a"  # "an nn.", "a Foo"
    return f"{article} {prefix}{base.__name__} layer (peft lora.{type(layer).__name__})"


def _check_layer(module_name: str, layer: LoraLayer, adapter: str) -> bool:
    """True for a supported layer, False for a skippable one; raises for anything else."""
    base = layer.get_base_layer()
    linear_lora = isinstance(layer, LoraLinear) or (
        _is_bnb(base) and type(layer).__module__ == "peft.tuners.lora.bnb"
    )
    supported = linear_lora and isinstance(base, nn.Linear | Conv1D)
    if not supported and not isinstance(layer, SKIPPABLE):
        raise GradLoraError(
            f"target module {module_name!r} is {_describe(layer)}; gradlora supports LoRA on "
            "nn.Linear and transformers' Conv1D layers (and can skip nn.Embedding and "
            "convolution layers with skip_unsupported=True): remove it from "
            "LoraConfig.target_modules"
        )
    if not base.weight.is_floating_point() and not _is_bnb(base):
        raise GradLoraError(
            f"target module {module_name!r} has a quantized {base.weight.dtype} weight in a "
            f"{type(base).__name__}; gradlora supports float weights and bitsandbytes 4-bit / "
            "8-bit layers: load the model unquantized, or with load_in_4bit / load_in_8bit"
        )
    if layer.use_dora.get(adapter, False):
        raise GradLoraError(
            f"{module_name!r} uses DoRA; gradlora supports plain LoRA: set use_dora=False"
        )
    if getattr(layer, "lora_bias", {}).get(adapter, False):
        raise GradLoraError(
            f"{module_name!r} has lora_bias=True; gradlora supports lora_bias=False only"
        )
    if layer.merged:
        raise GradLoraError(
            f"{module_name!r} has merged adapters; call model.unmerge_adapter() first"
        )
    return supported
