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
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, NoMatchingPeftModuleError, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..atomic import write_files
from ..errors import GradLoraError
from ..flags import ModuleFlags
from ..parallel.collective_save import any_sharded, whole, write_once
from ..peft_view import (
    WEIGHT0,
    LoraTarget,
    SkippedLayer,
    active_adapter,
    lora_layers,
    offset_layers,
    unwrap,
)
from .offset import resolve_offset, weight_signature, write_factors

SIDECAR = "gradlora.json"  # written beside adapter_config.json; plain peft ignores it
WEIGHTS = "adapter_model.safetensors"
# weight signatures further apart than this (relative Frobenius distance) are different bases: a
# cast to bf16 moves a signature by about 0.4%, a LoRA-GA offset (gamma 16 to 64) by 5-30%
MAX_RELATIVE_DIFFERENCE = 0.01


def relative_difference(saved: list[float], current: list[float]) -> float:
    """Estimated ‖W_current - W_saved‖_F / ‖W_saved‖_F from two ``weight_signature``s of one
    layer (the root mean square of the probe differences over ‖W_saved‖_F); infinite when they
    do not describe the same probe set."""
    if len(saved) != len(current) or len(saved) < 2:
        return math.inf
    diffs = [a - b for a, b in zip(saved[1:], current[1:], strict=True)]
    rms = math.sqrt(sum(d * d for d in diffs) / len(diffs))
    return rms / max(saved[0], 1e-30)


def _alpha_factor(config: LoraConfig) -> float:
    """alpha' / alpha when the rank doubles and s' = s must hold: 2, or sqrt(2) with rsLoRA."""
    return math.sqrt(2.0) if config.use_rslora else 2.0


def _resize_config(config: LoraConfig, rank_factor: float, alpha_factor: float) -> LoraConfig:
    cfg = copy.deepcopy(config)
    cfg.r = round(cfg.r * rank_factor)
    cfg.lora_alpha = cfg.lora_alpha * alpha_factor
    cfg.rank_pattern = {k: round(v * rank_factor) for k, v in (cfg.rank_pattern or {}).items()}
    cfg.alpha_pattern = {k: v * alpha_factor for k, v in (cfg.alpha_pattern or {}).items()}
    cfg.init_lora_weights = True  # loading must not re-run any data-driven init
    return cfg


def _lora_keys(target: LoraTarget | SkippedLayer) -> tuple[str, str]:
    """Keys of A and B in peft's saved state dict (adapter name removed)."""
    if isinstance(target, SkippedLayer) and target.adapter in target.layer.lora_embedding_A:
        return f"{target.module_name}.lora_embedding_A", f"{target.module_name}.lora_embedding_B"
    return f"{target.module_name}.lora_A.weight", f"{target.module_name}.lora_B.weight"


def _keys_in(
    state: Mapping[str, Tensor], layer: LoraTarget | SkippedLayer, path: Any = None
) -> tuple[str, str]:
    """``_lora_keys(layer)``, checked to be in ``state`` (read from ``path``; None: saving)."""
    key_a, key_b = _lora_keys(layer)
    if key_a not in state or key_b not in state:
        if path is None:
            raise GradLoraError(f"peft's state dict has no entry for {layer.module_name!r}")
        raise GradLoraError(
            f"adapter at {path} has no weights for layer {layer.name!r}: it was saved from a "
            "different model or target_modules; load it on the base model it was trained on"
        )
    return key_a, key_b


def save_adapter(
    model: PeftModel, path: str | os.PathLike, *, is_main_process: bool | None = None
) -> Path:
    """Save the active adapter so that plain peft loads it on the ORIGINAL base model.

    If the init offset the base weights (LoRA-GA), each layer is written as a rank-2r LoRA
    A' = [A; A0] (2r, n), B' = [B, -B0] (m, 2r) with alpha' = 2 alpha (sqrt(2) alpha with
    rsLoRA), so s' B' A' = s (B A - B0 A0). Otherwise (LoRA-One, vanilla) the adapter is written
    as it is. Files are written to a temporary folder and moved into ``path`` when complete.
    Returns the folder. On an FSDP2-sharded model this is a collective: every rank calls it,
    the weights are gathered, the rank with ``is_main_process`` (None: rank 0) writes, and all
    return after it (``collective_save``); on one process ``is_main_process`` is ignored.
    """
    model = unwrap(model)
    if not isinstance(model, PeftModel):
        raise GradLoraError(
            "save_adapter needs a peft.PeftModel (it writes the adapter's LoraConfig)"
        )
    targets, skipped = lora_layers(model)
    adapter = active_adapter(model)
    stored = [t.init_factors() for t in targets]
    converted = bool(offset_layers(targets))
    if any((s is not None) != converted for s in stored):
        bad = [t.name for t, s in zip(targets, stored, strict=True) if (s is not None) != converted]
        raise GradLoraError(
            f"layers {bad} disagree with the others on whether the base weight was offset"
        )
    state = get_peft_model_state_dict(model, adapter_name=adapter)
    state = {k: v for k, v in state.items() if not k.endswith("." + WEIGHT0)}  # folded in below
    sharded = any_sharded(state) or any(t.sharded for t in targets)
    state = whole(state)  # FSDP2: an all-gather per tensor, on every rank
    config = model.peft_config[adapter]
    if converted:
        config = _resize_config(config, 2, _alpha_factor(config))
        for t, (A0, B0) in zip(targets, stored, strict=True):
            key_a, key_b = _keys_in(state, t)
            state[key_a] = torch.cat([state[key_a], A0.to(state[key_a])], dim=0)
            state[key_b] = torch.cat([state[key_b], -B0.to(state[key_b])], dim=1)
        for layer in skipped:  # skip_unsupported: never offset; zero-padded to rank 2r, s' = s
            key_a, key_b = _keys_in(state, layer)
            state[key_a] = torch.cat([state[key_a], torch.zeros_like(state[key_a])], dim=0)
            state[key_b] = torch.cat([state[key_b], torch.zeros_like(state[key_b])], dim=1)
    else:
        config = copy.deepcopy(config)
        config.init_lora_weights = True
    state = {k: v.detach().contiguous().cpu().clone() for k, v in state.items()}
    sidecar = {
        "format": 1,
        "converted": converted,
        "rank_factor": 2 if converted else 1,
        # the weights the adapter is relative to: the originals (before any offset); a sharded
        # weight's signature is a collective (weight_signature), taken on every rank
        "base": {
            t.name: t.original_signature() or weight_signature(t.weight_mn(), t.name)
            for t in targets
        },
    }

    def write(tmp: Path) -> None:
        config.save_pretrained(str(tmp))
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2))

    names = [WEIGHTS, "adapter_config.json", SIDECAR]
    return write_once(path, lambda: write_files(path, write, names), sharded, is_main_process)


def split_converted(
    saved: Mapping[str, Tensor],
    targets: list[LoraTarget],
    path: str | os.PathLike,
    skipped: Sequence[SkippedLayer] = (),
) -> tuple[dict[str, Tensor], dict[str, tuple[Tensor, Tensor]]]:
    """Split a converted rank-2r state dict (A' = [A; A0], B' = [B, -B0]) into peft's rank-r
    state dict and the init factors {layer: (A0, B0)}; the ``skipped`` layers' zero padding is
    dropped. Errors name the mismatching layer."""
    state, factors = dict(saved), {}
    for layer in skipped:
        key_a, key_b = _keys_in(saved, layer, path)
        a2, b2, r = saved[key_a], saved[key_b], int(layer.layer.r[layer.adapter])
        if a2.shape[0] != 2 * r or b2.shape[1] != 2 * r or (a2[r:].any() and b2[:, r:].any()):
            raise GradLoraError(
                f"adapter at {path} has shapes {tuple(a2.shape)}, {tuple(b2.shape)} for the "
                f"skipped layer {layer.name!r}, not gradlora's zero-padded rank-{2 * r} form; "
                "load it on the base model and target_modules it was trained with"
            )
        state[key_a], state[key_b] = a2[:r], b2[:, :r]
    for t in targets:
        key_a, key_b = _keys_in(saved, t, path)
        a2, b2 = saved[key_a], saved[key_b]
        r = t.rank
        if a2.shape != (2 * r, t.shape[1]) or b2.shape != (t.shape[0], 2 * r):
            raise GradLoraError(
                f"adapter at {path} has shapes {tuple(a2.shape)}, {tuple(b2.shape)} for layer "
                f"{t.name!r}; a converted rank-{r} adapter of this model needs "
                f"{(2 * r, t.shape[1])}, {(t.shape[0], 2 * r)}"
            )
        state[key_a], state[key_b] = a2[:r], b2[:, :r]
        factors[t.name] = (a2[r:], -b2[:, r:])
    return state, factors


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    """gradlora's sidecar of the adapter folder ``path``; {"converted": False} for a plain peft
    adapter. A missing adapter or an unreadable sidecar is a GradLoraError."""
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise GradLoraError(
            f"no adapter at {path}: adapter_config.json is missing; pass the folder written by "
            "gradlora.save_adapter (or peft's save_pretrained)"
        )
    sidecar_path = path / SIDECAR
    if not sidecar_path.exists():
        return {"converted": False}  # a plain peft adapter: loaded as it is
    try:
        sidecar = json.loads(sidecar_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GradLoraError(
            f"{sidecar_path} is not valid JSON ({e}); save the adapter again with "
            "gradlora.save_adapter"
        ) from e
    if not isinstance(sidecar, dict) or sidecar.get("format") != 1:
        raise GradLoraError(
            f"{sidecar_path} has format {sidecar.get('format') if isinstance(sidecar, dict) else sidecar!r}; "
            "this gradlora reads format 1: upgrade gradlora or save the adapter again"
        )
    return sidecar


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


def is_converted(path: Any) -> bool:
    """Whether ``path`` is a folder holding an adapter that ``save_adapter`` converted."""
    if (
        not isinstance(path, str | os.PathLike)
        or not (Path(path) / "adapter_config.json").is_file()
    ):
        return False
    return bool(read_sidecar(path).get("converted"))


def _read_weights(file: Path) -> dict[str, Tensor]:
    if not file.exists():
        raise GradLoraError(f"adapter at {file.parent} has no {file.name}")
    try:
        return load_file(str(file))
    except Exception as e:  # safetensors raises its own SafetensorError, or OSError
        raise GradLoraError(
            f"cannot read {file} ({type(e).__name__}: {e}); the file is truncated or not a "
            "safetensors file: copy it again or save the adapter again"
        ) from e


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
    "adapter" keeps W and subtracts s B0 A0 x in the layer, "auto" picks "adapter" for
    quantized bases), so training resumes exactly where it stopped. Any other adapter (gradlora's unconverted ones, or a plain peft adapter
    without gradlora's sidecar) is loaded as it is with ``PeftModel.from_pretrained``.
    A missing, truncated or foreign checkpoint raises GradLoraError and leaves ``base_model``
    exactly as it was (no LoRA layers injected, flags and modes restored). With ``check_base``
    the base's target weights must be the ones the adapter was saved against (within 1% in
    Frobenius norm, ``relative_difference``): loading onto an already-offset base would offset twice.
    """
    path = Path(path)
    sidecar = read_sidecar(path)
    converted = sidecar.get("converted")
    # read whenever present, so a truncated file is one clear error for every kind of adapter
    saved = _read_weights(path / WEIGHTS) if (path / WEIGHTS).exists() else None
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
        config = _resize_config(saved_config, 0.5, 1 / _alpha_factor(saved_config))
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
) -> None:
    """Load a rank-2r adapter written by ``save_adapter`` (``saved``: its weights, read from
    ``path`` if None) into ``model``'s active rank-r adapter, in place (tensors keep their
    identity, so an optimizer's references stay valid).

    A, B (and modules_to_save such as a classifier head) get the trained values; the base
    weights are offset by the saved A0, B0 unless the model is already offset by the same
    factors (``load_best_model_at_end`` within one run). ``model`` must otherwise be a PeftModel
    of the ORIGINAL base weights.
    """
    path = Path(path)
    targets, skipped = lora_layers(model)
    if saved is None:
        saved = _read_weights(path / WEIGHTS)
    state, factors = split_converted(saved, targets, path, skipped)
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
        _check_base_of(model, read_sidecar(path), path)  # before anything is written
    with torch.no_grad():
        adapter = active_adapter(unwrap(model))
        result = set_peft_model_state_dict(model, state, adapter_name=adapter)
    unexpected = [k for k in result.unexpected_keys if "lora_" in k or adapter in k]
    if unexpected:
        raise GradLoraError(f"adapter at {path} has weights the model lacks: {unexpected[:5]}")
    if all(s is None for s in stored):
        mode = resolve_offset(offset, targets)
        write_factors(targets, factors, offset_base=True, mode=mode, set_adapter_weights=False)


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
