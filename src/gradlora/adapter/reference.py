"""What an export is checked against: the probe batch, the live model's logits, and copies of
the base model that share every tensor with the live model (``export.py``, ``merged.py``).

``shared_copy`` deep-copies the module tree while mapping every parameter, buffer and tensor
attribute to itself, so the copy costs the module objects only; the exporters then replace
whole entries of the copy's ``_parameters`` (never writing into a shared tensor), so the live
model is never modified. ``strip_peft`` puts back, in the copy, each LoRA layer's base layer and
each ``modules_to_save`` wrapper's original (or trained) module. ``original_base`` is the base
model as it was before any offset: for a base weight offset in place (W' = W - s B0 A0) a
forward hook on the copied base layer adds s B0 A0 x back, so the layer computes
W' x + s B0 A0 x = W x with no (m, n) copy of W. Quantized (bitsandbytes) layers and the
counter-term of ``offset="adapter"`` need nothing: their base weights are the originals.

Forwards for a check run in eval mode with bitsandbytes layers left in train mode: on a CPU
with AVX512-BF16, bitsandbytes repacks a 4-bit weight into its inference layout on the first
eval-mode forward without grad, after which no gradient flows through it (peft_view's
``check_gradient_flows``); train mode changes nothing else of those layers' output.
"""

from __future__ import annotations

import copy
import itertools
import os
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from torch import Tensor, nn

from ..errors import GradLoraError
from ..flags import ModuleFlags
from ..peft_view import LoraTarget, lora_layers, unwrap
from .offset import offset_mode

PROBE_SHAPE = (2, 16)  # (batch, tokens) of the default probe
PROBE_SEED = 0
# relative Frobenius error of the logits allowed by a check, by the coarsest float dtype the
# compared models compute or store in; bf16 rounding alone moves SmolLM2-135M's logits by 2e-3
# (bf16 weights, fp32 compute) to 2e-2 (bf16 weights and compute), fp16 about 8x less
RTOL = {torch.float64: 1e-5, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what an export may write


def check_dtype(dtype: torch.dtype, what: str) -> None:
    if dtype not in DTYPES:
        raise GradLoraError(
            f"{what} dtype={dtype}: choose torch.float32, torch.bfloat16 or torch.float16"
        )


def coarsest(*dtypes: torch.dtype) -> torch.dtype:
    """The float dtype of the fewest mantissa bits among ``dtypes``."""
    return max(dtypes, key=lambda d: torch.finfo(d).eps)


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The coarsest float dtype among the model's non-LoRA parameters (a bitsandbytes base's
    packed weights are not float; its other weights are in its compute dtype), bf16 when
    bitsandbytes computes a 4-bit layer in its CPU inference layout (in bf16)."""
    dtypes = {
        p.dtype for n, p in model.named_parameters() if p.is_floating_point() and "lora_" not in n
    }
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if _is_bnb(module) and getattr(state, "packing_format_for_cpu", False):
            dtypes.add(torch.bfloat16)
    return coarsest(*dtypes) if dtypes else torch.float32


def _is_bnb(module: nn.Module) -> bool:
    return type(module).__module__.startswith("bitsandbytes")


def probe_batch(model: nn.Module, probe: Mapping[str, Tensor] | Tensor | None) -> dict:
    """The inputs of the check, on the device of the model's input embeddings: ``probe`` (a
    batch for ``model(**probe)``, labels dropped, or a (batch, tokens) tensor of input ids), or
    PROBE_SHAPE token ids drawn uniformly from the vocabulary with a fixed seed."""
    embeddings = model.get_input_embeddings()
    device = embeddings.weight.device if embeddings is not None else torch.device("cpu")
    if probe is None:
        if embeddings is None:
            raise GradLoraError(
                "the model has no input embeddings to draw a probe batch of token ids for; pass "
                "probe={...}, a batch for model(**probe)"
            )
        positions = getattr(model.config, "max_position_embeddings", None) or PROBE_SHAPE[1]
        shape = (PROBE_SHAPE[0], min(PROBE_SHAPE[1], positions))
        gen = torch.Generator().manual_seed(PROBE_SEED)
        ids = torch.randint(0, embeddings.weight.shape[0], shape, generator=gen)
        probe = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    elif isinstance(probe, Tensor):
        probe = {"input_ids": probe}
    if not isinstance(probe, Mapping) or not all(isinstance(v, Tensor) for v in probe.values()):
        raise GradLoraError(
            "probe must be a dict of tensors for model(**probe) or a tensor of input ids; got "
            f"{type(probe).__name__}"
        )
    return {k: v.to(device) for k, v in probe.items() if k != "labels"}


def logits_of(model: nn.Module, batch: Mapping[str, Tensor], what: str) -> Tensor:
    """The model's logits on ``batch`` as float64 on the CPU: eval mode (bitsandbytes layers in
    train mode, module doc), no grad; every module's mode and parameter's requires_grad are
    restored. A forward that fails is a GradLoraError naming ``what`` and the probe option."""
    flags = ModuleFlags(model)
    try:
        model.eval()
        for module in model.modules():
            if _is_bnb(module):
                module.train()
        with torch.no_grad():
            out = model(**batch)
    except Exception as e:
        raise GradLoraError(
            f"the {what} failed on the probe batch ({type(e).__name__}: {str(e)[:300]}); pass "
            "probe={...}, a batch of this model's inputs for model(**probe)"
        ) from e
    finally:
        flags.restore()
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out[0] if isinstance(out, tuple | list) else out
    if not isinstance(logits, Tensor):
        raise GradLoraError(f"the {what} returned no logits; pass a probe batch that gives some")
    return logits.detach().to("cpu", torch.float64)


def relative_error(got: Tensor, want: Tensor) -> float:
    """‖got - want‖_F / ‖want‖_F in float64 (inf for different shapes or non-finite values)."""
    if got.shape != want.shape:
        return float("inf")
    err = ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-300)).item()
    return err if err == err else float("inf")  # NaN -> inf


def shared_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters, buffers and tensor attributes (bitsandbytes'
    quantization states included) are the very tensors of ``module``: no tensor is copied."""
    memo: dict[int, object] = {}
    for t in itertools.chain(module.parameters(), module.buffers()):
        memo[id(t)] = t
    for m in module.modules():
        for value in vars(m).values():
            inner = vars(value).values() if hasattr(value, "__dict__") else ()
            for v in (value, *inner):
                if isinstance(v, Tensor):
                    memo[id(v)] = v
    return copy.deepcopy(module, memo)


def strip_peft(model: nn.Module, adapter: str, heads: str) -> None:
    """In a copy (``shared_copy``): each peft tuner layer becomes its base layer, each
    modules_to_save wrapper its original module (``heads="original"``) or the ``adapter``'s
    trained copy (``heads="trained"``); peft's attributes on the model are dropped."""
    for name, module in list(model.named_modules()):
        if not name:
            continue
        if isinstance(module, BaseTunerLayer):
            replacement = module.get_base_layer()
        elif isinstance(module, ModulesToSaveWrapper):
            trained = heads == "trained" and adapter in module.modules_to_save
            replacement = module.modules_to_save[adapter] if trained else module.original_module
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        if getattr(parent, child, None) is module:
            setattr(parent, child, replacement)
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        model.__dict__.pop(attr, None)


def _add_back(A0: Tensor, B0: Tensor, scaling: float, module, args, output):
    """Forward hook: output + s B0 A0 x (the weight offset undone), in A0's dtype."""
    x = args[0]
    term = (x.to(A0.dtype) @ A0.T) @ B0.T
    return output + (scaling * term).to(output.dtype)


def original_base(inner: nn.Module, adapter: str, targets: list[LoraTarget]) -> nn.Module:
    """The base model before any offset (module doc), sharing every tensor with ``inner`` (the
    PeftModel's wrapped model): LoRA layers and modules_to_save wrappers stripped, and the
    layers whose weight is offset, W' = W - s B0 A0, computing W x again through a hook."""
    ref = shared_copy(inner)
    strip_peft(ref, adapter, heads="original")
    for t in targets:
        if offset_mode(t) == "weight":
            A0, B0 = t.init_factors()
            ref.get_submodule(t.name).register_forward_hook(partial(_add_back, A0, B0, t.scaling))
    return ref


def model_to_export(model: nn.Module, what: str) -> PeftModel:
    """The PeftModel inside ``model`` (through DDP, DataParallel, torch.compile), with its LoRA
    layers read (``lora_layers``' hard errors); an FSDP2-sharded one is refused."""
    peft_model = unwrap(model)
    if not isinstance(peft_model, PeftModel):
        raise GradLoraError(
            f"{what} needs a peft.PeftModel with a LoRA adapter, got {type(peft_model).__name__}"
        )
    targets, _ = lora_layers(peft_model)
    if any(t.sharded for t in targets):
        raise GradLoraError(
            f"{what} does not support an FSDP2-sharded model yet: save the adapter with "
            "gradlora.save_adapter (a collective, call it on every rank), then in one process "
            f"load it onto the original base with gradlora.load_adapter and call {what} there"
        )
    return peft_model


def check_destination(path: str | os.PathLike, overwrite: bool) -> Path:
    """``path`` as a Path; an existing non-empty folder (or a file) is refused unless
    ``overwrite`` (then the export replaces the folder once it is complete and checked)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise GradLoraError(f"{path} is a file; pass a folder path for the export")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise GradLoraError(
            f"{path} exists and is not empty; pass overwrite=True to replace it (only once the "
            "new export is written and checked), or choose another folder"
        )
    return path
