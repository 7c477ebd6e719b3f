"""Portable adapters: save and load a LoRA adapter whose init offset the base weights.

After a LoRA-GA init the base weight is W' = W - s B0 A0, so peft's own rank-r adapter is
relative to W' and wrong on the original model. ``save_adapter`` writes each layer as a
rank-2r LoRA A' = [A; A0] (2r, n), B' = [B, -B0] (m, 2r) with alpha' = 2 alpha (sqrt(2) alpha
with rsLoRA), so s' B' A' = s (B A - B0 A0) on the ORIGINAL weights (docs/algorithms.md,
section 5); plain peft loads it. A sidecar ``gradlora.json`` marks it, and
``load_adapter`` / ``load_converted_into`` split it back into the trainable rank-r adapter
plus the offset. ``portable_save.install_portable_save`` makes one PeftModel's own
``save_pretrained`` and ``load_adapter`` do the same.
LoRA layers an init skipped (``skip_unsupported=True``: nn.Embedding, nn.Conv2d) are never
offset; in the rank-2r form their A and B are zero-padded, A' = [A; 0], B' = [B, 0], so that
s' B' A' = s B A, and loading drops the padding again.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, NoMatchingPeftModuleError, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file
from torch import Tensor, nn

from ..atomic import write_files
from ..errors import GradLoraError
from ..flags import ModuleFlags
from ..parallel.collective_save import any_sharded, whole, write_once
from ..parallel.sharding import full
from ..parallel.zero import gathered
from ..peft_view import (
    WEIGHT0,
    LoraTarget,
    active_adapter,
    lora_layers,
    offset_layers,
    unwrap,
)
from .format import (
    EXACT,
    MAX_RELATIVE_DIFFERENCE,
    SIDECAR,
    WEIGHTS,
    alpha_factor,
    keys_in,
    read_sidecar,
    read_weights,
    relative_difference,
    resize_config,
    split_converted,
    to_portable,
)
from .offset import (
    offset_mode,
    refuse_foreign_weight_offset,
    resolve_offset,
    weight_signature,
    write_factors,
)


def save_adapter(
    model: PeftModel,
    path: str | os.PathLike,
    *,
    is_main_process: bool | None = None,
    adapter_name: str | None = None,
    state_dict: Mapping[str, Tensor] | None = None,
) -> Path:
    """Save the active adapter (or ``adapter_name``) so that plain peft loads it on the
    ORIGINAL base model.

    If the init offset the base weights (LoRA-GA), each layer is written as a rank-2r LoRA
    A' = [A; A0] (2r, n), B' = [B, -B0] (m, 2r) with alpha' = 2 alpha (sqrt(2) alpha with
    rsLoRA), so s' B' A' = s (B A - B0 A0). Otherwise (LoRA-One, vanilla) the adapter is written
    as it is. Files are written to a temporary folder and moved into ``path`` when complete.
    Returns the folder. On an FSDP2-sharded model this is a collective: every rank calls it,
    the weights are gathered, the rank with ``is_main_process`` (None: rank 0) writes, and all
    return after it (``collective_save``); on one process ``is_main_process`` is ignored. So is
    it under DeepSpeed ZeRO-3. Given ``state_dict``, the model's whole state dict gathered
    already (the Trainer's ``save_model`` passes it on the writing rank only), the adapter is
    written from it with no communication.
    """
    model = unwrap(model)
    if not isinstance(model, PeftModel):
        raise GradLoraError(
            "save_adapter needs a peft.PeftModel (it writes the adapter's LoraConfig)"
        )
    adapter = adapter_name or active_adapter(model)
    targets, skipped = lora_layers(model, adapter)
    refuse_foreign_weight_offset(targets, f"saving adapter {adapter!r}")
    stored = [t.init_factors() for t in targets]
    exact: dict[str, Tensor] = {}  # format 2's exact factors (converted adapters only)
    converted = bool(offset_layers(targets))
    if any((s is not None) != converted for s in stored):
        bad = [t.name for t, s in zip(targets, stored, strict=True) if (s is not None) != converted]
        raise GradLoraError(
            f"layers {bad} disagree with the others on whether the base weight was offset"
        )
    zero3 = any(t.zero3 for t in targets) and state_dict is None  # gather: a collective
    trainable = [p for n, p in model.named_parameters() if p.requires_grad or "lora_" in n]
    with gathered(trainable if zero3 else []):
        state = get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=adapter)
        state = {k: v.detach().clone() if zero3 else v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.endswith("." + WEIGHT0)}  # folded in below
    given = state_dict is not None  # gathered already (on the writing rank only): no collective
    sharded = not given and (any_sharded(state) or any(t.partitioned for t in targets))
    state = whole(state)  # FSDP2: an all-gather per tensor, on every rank
    config = model.peft_config[adapter]
    if converted:
        config = resize_config(config, 2, alpha_factor(config))
        exact = to_portable(state, targets, stored, skipped)
    else:
        config = copy.deepcopy(config)
        config.init_lora_weights = True
    state = {k: v.detach().contiguous().cpu().clone() for k, v in state.items()}
    exact = {k: v.detach().contiguous().cpu().clone() for k, v in exact.items()}
    sidecar = {
        "format": 2,
        "converted": converted,
        "rank_factor": 2 if converted else 1,
        # where the offset was kept: load_adapter(offset="auto") keeps it there again
        "offset": offset_mode(targets[0]) if converted else None,
        # the weights the adapter is relative to: the originals (before any offset); a sharded
        # weight's signature is a collective (weight_signature), taken on every rank
        "base": {
            t.name: t.original_signature() or weight_signature(t.weight_mn(), t.name)
            for t in targets
            # a partitioned W given with state_dict (one rank) cannot be gathered: not checked
            if t.original_signature() or not (t.partitioned and given)
        },
    }

    def write(tmp: Path) -> None:
        config.save_pretrained(str(tmp))
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if converted:
            save_file(exact, str(tmp / EXACT), metadata={"format": "pt"})
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2))

    names = [WEIGHTS, "adapter_config.json", SIDECAR] + ([EXACT] if converted else [])
    return write_once(path, lambda: write_files(path, write, names), sharded, is_main_process)


def _check_base_of(model: nn.Module, sidecar: Mapping[str, Any], path: Path) -> None:
    """Refuse a base whose target weights are not the ones the adapter at ``path`` is relative
    to (``relative_difference``: more than 1% apart in Frobenius norm), e.g. a base already offset by
    a LoRA-GA init. Sidecars written before signatures existed are not checked."""
    saved = sidecar.get("base")
    if not saved:
        return
    for t in lora_layers(model)[0]:  # skipped layers are never offset
        if t.name not in saved:
            continue  # the layer set itself is checked by the loaders
        current = t.original_signature() or weight_signature(t.weight_mn(), t.name)
        diff = relative_difference(saved[t.name], current)
        if diff > MAX_RELATIVE_DIFFERENCE:
            raise GradLoraError(
                f"the base model does not match the adapter at {path}: layer {t.name!r} differs "
                f"from the weights the adapter was trained against by about {diff:.1%} of their "
                f"norm (at most {MAX_RELATIVE_DIFFERENCE:.0%} allowed). A base already offset by "
                "a gradlora LoRA-GA init (e.g. model.unload() after initialize) or another "
                "checkpoint differs like this: load onto a freshly loaded original base model, "
                "or pass check_base=False to load anyway"
            )


def load_adapter(
    base_model: nn.Module,
    path: str | os.PathLike,
    *,
    adapter_name: str = "default",
    is_trainable: bool = True,
    check_base: bool = True,
    offset: str = "auto",
) -> PeftModel:
    """Load an adapter written by ``save_adapter`` onto the ORIGINAL base model, ready to train on.

    A converted (rank-2r) adapter is split back into the rank-r trainable A, B and the frozen
    A0, B0, and the offset is applied again (``offset``: "weight" rewrites W' = W - s B0 A0,
    "adapter" keeps W and subtracts s B0 A0 x in the layer, "auto" keeps it where it was when
    saved, if this base allows), so training resumes exactly where it stopped. Any other
    adapter (unconverted, or plain peft's) is loaded as it is with ``PeftModel.from_pretrained``.
    A missing, truncated or foreign checkpoint raises GradLoraError and leaves ``base_model``
    exactly as it was (no LoRA layers injected, flags and modes restored). With ``check_base``
    the base's target weights must be the ones the adapter was saved against (within 1% in
    Frobenius norm, ``relative_difference``): loading onto an already-offset base would offset twice.
    """
    if any(isinstance(m, PeftModel | BaseTunerLayer) for m in base_model.modules()):
        raise GradLoraError(
            "load_adapter loads onto the original base model, but it was given a model that "
            "already has LoRA layers (a PeftModel); pass a freshly loaded base model, or add the "
            "adapter to this PeftModel with model.load_adapter(path, adapter_name=...)"
        )
    path = Path(path)
    sidecar = read_sidecar(path)
    converted = sidecar.get("converted")
    # read whenever present, so a truncated file is one clear error for every kind of adapter
    saved = read_weights(path / WEIGHTS) if (path / WEIGHTS).exists() else None
    with _restored_on_error(base_model, path):
        if not converted:
            model = PeftModel.from_pretrained(
                base_model, str(path), adapter_name=adapter_name, is_trainable=is_trainable
            )
            if check_base:
                _check_base_of(model, sidecar, path)
            return model
        if saved is None:
            raise GradLoraError(f"adapter at {path} has no {WEIGHTS}")
        saved_config = LoraConfig.from_pretrained(str(path))
        config = resize_config(saved_config, 0.5, 1 / alpha_factor(saved_config))
        config.inference_mode = not is_trainable
        model = get_peft_model(base_model, config, adapter_name=adapter_name)
        load_converted_into(model, path, saved, check_base=check_base, offset=offset)
        return model


def load_converted_into(
    model: PeftModel,
    path: str | os.PathLike,
    saved: Mapping[str, Tensor] | None = None,
    check_base: bool = True,
    offset: str = "auto",
    factors_only: bool = False,
) -> None:
    """Load a rank-2r adapter written by ``save_adapter`` (``saved``: its weights, read from
    ``path`` if None) into ``model``'s active rank-r adapter, in place (tensors keep their
    identity, so an optimizer's references stay valid). ``factors_only``: the offset only, A and
    B left as they are (a DeepSpeed resume restores them from its own checkpoint).

    A, B (and modules_to_save such as a classifier head) get the trained values; the base
    weights are offset by the saved A0, B0 unless the model is already offset by the same
    factors (``load_best_model_at_end`` within one run). ``model`` must otherwise be a PeftModel
    of the ORIGINAL base weights.
    """
    path = Path(path)
    targets, skipped = lora_layers(model)
    if saved is None:
        saved = read_weights(path / WEIGHTS)
    sidecar = read_sidecar(path)
    exact = read_weights(path / EXACT) if sidecar.get("format") == 2 else None
    state, factors = split_converted(saved, targets, path, skipped, exact)
    stored = [t.init_factors() for t in targets]
    if any(s is not None for s in stored):
        same = all(
            s is not None
            and torch.equal(s[0].cpu(), factors[t.name][0].to(s[0]).cpu())
            and torch.equal(s[1].cpu(), factors[t.name][1].to(s[1]).cpu())
            for t, s in zip(targets, stored, strict=True)
        )
        if not same:
            raise GradLoraError(
                f"the model's base weights are already offset by a different LoRA-GA init than the "
                f"adapter at {path}; load it on a fresh PeftModel of the original base model"
            )
    if check_base:
        _check_base_of(model, sidecar, path)  # before anything is written
    if factors_only:
        _check_holds_trained_factors(targets, state, path)
    else:
        with torch.no_grad():
            adapter = active_adapter(unwrap(model))
            result = set_peft_model_state_dict(model, state, adapter_name=adapter)
        unexpected = [k for k in result.unexpected_keys if "lora_" in k or adapter in k]
        if unexpected:
            raise GradLoraError(f"adapter at {path} has weights the model lacks: {unexpected[:5]}")
    if all(s is None for s in stored):
        mode = _load_offset_mode(offset, targets, sidecar.get("offset"))
        write_factors(targets, factors, offset_base=True, mode=mode, set_adapter_weights=False)


def _check_holds_trained_factors(targets: list[LoraTarget], state: Mapping, path: Path) -> None:
    """``factors_only``: refuse a folder whose A, B are not the model's own (relative Frobenius
    difference above 1e-3): its offset would belong to another run, e.g. a stale checkpoint of
    the same step number. A, B of a ZeRO-3 or FSDP2 model are gathered (a collective)."""
    for t in targets:
        for key, param in zip(keys_in(state, t, path), (t.A, t.B), strict=True):
            saved, current = state[key].float().cpu(), full(param).detach().float().cpu()
            if (saved - current).norm() > 1e-3 * max(saved.norm(), current.norm()):
                raise GradLoraError(
                    f"the adapter at {path} does not hold this model's trained weights (layer "
                    f"{t.name!r} differs), so its offset belongs to another run; resume from the "
                    "checkpoint folder this run wrote, and keep it under the output_dir"
                )


def _load_offset_mode(offset: str, targets: list[LoraTarget], recorded: str | None) -> str:
    """``offset`` for a load: "auto" keeps the offset where it was kept when the adapter was
    saved (the sidecar's "offset") if this base allows it, else resolves "auto" afresh (a weight
    offset saved from a float base, loaded onto a 4-bit one: the same function either way)."""
    if offset == "auto" and recorded in ("weight", "adapter"):
        try:
            return resolve_offset(recorded, targets)
        except GradLoraError:
            return resolve_offset("auto", targets)
    return resolve_offset(offset, targets)


@contextlib.contextmanager
def _restored_on_error(base_model: nn.Module, path: Path):
    """On any error, take injected LoRA layers out of ``base_model`` again and restore its
    requires_grad flags and train/eval modes; peft's own errors become GradLoraError."""
    flags = ModuleFlags(base_model)
    had_config = hasattr(base_model, "peft_config")
    try:
        yield
    except BaseException as e:
        _remove_tuner_layers(base_model)
        flags.restore()
        if not had_config and hasattr(base_model, "peft_config"):
            del base_model.peft_config
        if isinstance(e, NoMatchingPeftModuleError) or (
            isinstance(e, RuntimeError) and "size mismatch" in str(e)
        ):
            raise GradLoraError(
                f"adapter at {path} does not fit this model ({str(e).strip()[:300]}); load it on "
                "the base model it was trained on"
            ) from e
        raise


def _remove_tuner_layers(model: nn.Module) -> None:
    """Put each peft tuner layer's original base layer back in its parent module."""
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer) and name:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            if getattr(parent, child, None) is module:
                setattr(parent, child, module.get_base_layer())
