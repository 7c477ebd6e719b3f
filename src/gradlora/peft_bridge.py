"""Where gradlora meets peft: find (A, B, W) per LoRA layer, write inits atomically, save/load.

A LoRA-GA-style init offsets the frozen base weight (W' = W - s B0 A0). The exact A0, B0 are
kept on the adapter as non-persistent buffers ``lora_A[name].gradlora_weight0`` and
``lora_B[name].gradlora_weight0``; ``save_adapter`` folds them into a plain rank-2r peft
adapter relative to the original weights (ALGORITHMS.md 5), and ``load_adapter`` splits such
an adapter back into the trainable rank-r form.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, NoMatchingPeftModuleError, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from . import inits
from .distributed import unwrap_model
from .errors import GradLoraError

WEIGHT0 = "gradlora_weight0"  # buffer name of the init factors A0 / B0 on lora_A / lora_B
SIDECAR = "gradlora.json"  # written beside adapter_config.json; plain peft ignores it
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraTarget:
    """One LoRA-adapted linear layer of the active adapter."""

    name: str  # module name in the base model, e.g. "bert.encoder.layer.0.attention.self.query"
    module_name: str  # module name in the wrapped model, as in model.named_modules()
    layer: LoraLinear
    adapter: str

    @property
    def weight(self) -> nn.Parameter:
        """The frozen base weight as stored: (m, n), or (n, m) for Conv1D."""
        return self.layer.get_base_layer().weight

    @property
    def transposed(self) -> bool:
        return isinstance(self.layer.get_base_layer(), Conv1D) or bool(self.layer.fan_in_fan_out)

    @property
    def A(self) -> nn.Parameter:  # (r, n)
        return self.layer.lora_A[self.adapter].weight

    @property
    def B(self) -> nn.Parameter:  # (m, r)
        return self.layer.lora_B[self.adapter].weight

    @property
    def rank(self) -> int:
        return int(self.layer.r[self.adapter])

    @property
    def scaling(self) -> float:
        return float(self.layer.scaling[self.adapter])

    @property
    def shape(self) -> tuple[int, int]:
        """(m, n) = (out_features, in_features) of the effective weight."""
        return self.B.shape[0], self.A.shape[1]

    def weight_mn(self) -> Tensor:
        """The base weight as an (m, n) view, whatever its storage."""
        return self.weight.T if self.transposed else self.weight

    def init_factors(self) -> tuple[Tensor, Tensor] | None:
        """(A0, B0) stored at init, or None if this layer's base weight was never offset."""
        a0 = getattr(self.layer.lora_A[self.adapter], WEIGHT0, None)
        b0 = getattr(self.layer.lora_B[self.adapter], WEIGHT0, None)
        return None if a0 is None or b0 is None else (a0, b0)


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


def find_targets(model: nn.Module) -> list[LoraTarget]:
    """Every LoRA layer of the active adapter, with its base-model name; errors name the fix.

    Accepts a PeftModel or any module into which peft injected LoRA layers, also wrapped in
    DistributedDataParallel (the wrapper is looked through).
    """
    model = unwrap_model(model)
    if isinstance(model, PeftModel) and not isinstance(
        model.peft_config.get(model.active_adapter), LoraConfig
    ):
        kind = type(model.peft_config.get(model.active_adapter)).__name__
        raise GradLoraError(
            f"the active adapter is a {kind}, not LoRA; gradlora needs a LoraConfig adapter"
        )
    lora_modules = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    if not lora_modules:
        raise GradLoraError(
            "the model has no LoRA adapters: wrap it first with "
            "peft.get_peft_model(model, LoraConfig(target_modules=[...]))"
        )
    adapter = active_adapter(model)
    targets = []
    for module_name, layer in lora_modules:
        if adapter not in layer.lora_A and adapter not in getattr(layer, "lora_embedding_A", {}):
            continue  # the active adapter does not target this layer
        _check_supported(module_name, layer, adapter)
        name = (
            module_name[len(_PEFT_PREFIX) :]
            if module_name.startswith(_PEFT_PREFIX)
            else module_name
        )
        targets.append(LoraTarget(name=name, module_name=module_name, layer=layer, adapter=adapter))
    if not targets:
        raise GradLoraError(f"no LoRA layer belongs to the active adapter {adapter!r}")
    return targets


def check_trainable(targets: list[LoraTarget]) -> None:
    """Refuse an adapter whose LoRA weights are all frozen: its init would never be trained."""
    if targets and not any(t.A.requires_grad or t.B.requires_grad for t in targets):
        raise GradLoraError(
            f"no LoRA weight of adapter {targets[0].adapter!r} is trainable (requires_grad=False "
            "everywhere, e.g. PeftModel.from_pretrained without is_trainable=True, or "
            "LoraConfig(inference_mode=True)); load it with is_trainable=True or call "
            "requires_grad_(True) on the lora_A / lora_B weights before initializing"
        )


def _check_supported(module_name: str, layer: LoraLayer, adapter: str) -> None:
    base = layer.get_base_layer()
    if not isinstance(layer, LoraLinear) or not isinstance(base, nn.Linear | Conv1D):
        raise GradLoraError(
            f"target module {module_name!r} is a {type(base).__name__} wrapped by "
            f"{type(layer).__name__}; gradlora supports torch.nn.Linear and transformers' Conv1D "
            "only: remove it from LoraConfig.target_modules"
        )
    if not base.weight.is_floating_point():
        raise GradLoraError(
            f"target module {module_name!r} has a quantized {base.weight.dtype} weight; the gradient "
            "estimate needs a floating-point base weight: load the model unquantized for the init"
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


def write_factors(
    targets: list[LoraTarget],
    factors: Mapping[str, tuple[Tensor, Tensor]],
    *,
    offset_base: bool,
    set_adapter_weights: bool = True,
) -> None:
    """Write init factors into the model, all layers or none.

    For each target, (A0 (r, n), B0 (m, r)) = factors[target.name] is cast to the adapter's dtype;
    with ``set_adapter_weights`` A and B are set to it; with ``offset_base`` the base weight
    becomes W - s B0 A0 (fp32 math, see inits.offset_weight) and A0, B0 are kept as buffers.
    If anything fails midway (out of memory, interrupt) every layer is put back as it was.
    """
    missing = [t.name for t in targets if t.name not in factors]
    if missing:
        raise GradLoraError(f"no init factors for layer(s) {missing}")
    undo: list[tuple[LoraTarget, Tensor, Tensor, Tensor | None]] = []
    try:
        with torch.no_grad():
            for t in targets:
                A0 = factors[t.name][0].to(device=t.A.device, dtype=t.A.dtype)
                B0 = factors[t.name][1].to(device=t.B.device, dtype=t.B.dtype)
                if A0.shape != t.A.shape or B0.shape != t.B.shape:
                    raise GradLoraError(
                        f"init factors for {t.name!r} have shapes {tuple(A0.shape)}, {tuple(B0.shape)}; "
                        f"the adapter needs {tuple(t.A.shape)}, {tuple(t.B.shape)}"
                    )
                old_w = t.weight.detach().clone() if offset_base else None
                undo.append((t, t.A.detach().clone(), t.B.detach().clone(), old_w))
                if offset_base:
                    new_w = inits.offset_weight(t.weight_mn(), A0, B0, t.scaling)
                    t.weight.copy_(new_w.T if t.transposed else new_w)
                    t.layer.lora_A[t.adapter].register_buffer(WEIGHT0, A0.clone(), persistent=False)
                    t.layer.lora_B[t.adapter].register_buffer(WEIGHT0, B0.clone(), persistent=False)
                if set_adapter_weights:
                    t.A.copy_(A0)
                    t.B.copy_(B0)
    except BaseException:
        with torch.no_grad():
            for t, old_a, old_b, old_w in reversed(undo):
                t.A.copy_(old_a)
                t.B.copy_(old_b)
                if old_w is not None:
                    t.weight.copy_(old_w)
                    for module in (t.layer.lora_A[t.adapter], t.layer.lora_B[t.adapter]):
                        module._buffers.pop(WEIGHT0, None)
        raise


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


def _lora_keys(target: LoraTarget) -> tuple[str, str]:
    """Keys of A and B in peft's saved state dict (adapter name removed)."""
    return f"{target.module_name}.lora_A.weight", f"{target.module_name}.lora_B.weight"


def save_adapter(model: PeftModel, path: str | os.PathLike) -> Path:
    """Save the active adapter so that plain peft loads it on the ORIGINAL base model.

    If the init offset the base weights (LoRA-GA), each layer is written as a rank-2r LoRA
    A' = [A; A0] (2r, n), B' = [B, -B0] (m, 2r) with alpha' = 2 alpha (sqrt(2) alpha with
    rsLoRA), so s' B' A' = s (B A - B0 A0). Otherwise (LoRA-One, vanilla) the adapter is written
    as it is. Files are written to a temporary folder and moved into ``path`` when complete.
    Returns the folder.
    """
    model = unwrap_model(model)
    if not isinstance(model, PeftModel):
        raise GradLoraError(
            "save_adapter needs a peft.PeftModel (it writes the adapter's LoraConfig)"
        )
    targets = find_targets(model)
    adapter = targets[0].adapter
    stored = [t.init_factors() for t in targets]
    converted = stored[0] is not None
    if any((s is not None) != converted for s in stored):
        bad = [t.name for t, s in zip(targets, stored, strict=True) if (s is not None) != converted]
        raise GradLoraError(
            f"layers {bad} disagree with the others on whether the base weight was offset"
        )
    state = get_peft_model_state_dict(model, adapter_name=adapter)
    config = model.peft_config[adapter]
    if converted:
        config = _resize_config(config, 2, _alpha_factor(config))
        for t, (A0, B0) in zip(targets, stored, strict=True):
            key_a, key_b = _lora_keys(t)
            if key_a not in state or key_b not in state:
                raise GradLoraError(f"peft's state dict has no entry for {t.module_name!r}")
            state[key_a] = torch.cat([t.A.detach(), A0.to(t.A)], dim=0)
            state[key_b] = torch.cat([t.B.detach(), -B0.to(t.B)], dim=1)
    else:
        config = copy.deepcopy(config)
        config.init_lora_weights = True
    state = {k: v.detach().contiguous().cpu().clone() for k, v in state.items()}
    sidecar = {"format": 1, "converted": converted, "rank_factor": 2 if converted else 1}

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path, prefix=".gradlora-tmp-") as tmp:
        config.save_pretrained(tmp)
        save_file(state, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
        Path(tmp, SIDECAR).write_text(json.dumps(sidecar, indent=2))
        for name in ("adapter_model.safetensors", "adapter_config.json", SIDECAR):
            os.replace(os.path.join(tmp, name), path / name)
    return path


def split_converted(
    saved: Mapping[str, Tensor], targets: list[LoraTarget], path: str | os.PathLike
) -> tuple[dict[str, Tensor], dict[str, tuple[Tensor, Tensor]]]:
    """Split a converted rank-2r state dict (A' = [A; A0], B' = [B, -B0]) into peft's rank-r
    state dict and the init factors {layer: (A0, B0)}; errors name the mismatching layer."""
    state, factors = dict(saved), {}
    for t in targets:
        key_a, key_b = _lora_keys(t)
        if key_a not in saved or key_b not in saved:
            raise GradLoraError(
                f"adapter at {path} has no weights for layer {t.name!r}: it was saved from a "
                "different model or target_modules; load it on the base model it was trained on"
            )
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


def load_adapter(
    base_model: nn.Module,
    path: str | os.PathLike,
    *,
    adapter_name: str = "default",
    is_trainable: bool = True,
) -> PeftModel:
    """Load an adapter written by ``save_adapter`` onto the ORIGINAL base model, ready to train on.

    A converted (rank-2r) adapter is split back into the rank-r trainable A, B and the frozen
    A0, B0, and the base weight is offset again (W' = W - s B0 A0), so training resumes exactly
    where it stopped. Any other adapter (gradlora's unconverted ones, or a plain peft adapter
    without gradlora's sidecar) is loaded as it is with ``PeftModel.from_pretrained``.
    A missing, truncated or foreign checkpoint raises GradLoraError and leaves ``base_model``
    exactly as it was (no LoRA layers injected, flags and modes restored).
    """
    path = Path(path)
    sidecar = _read_sidecar(path)
    weights_file = path / "adapter_model.safetensors"
    saved = _read_weights(weights_file) if weights_file.exists() else None
    with _restored_on_error(base_model, path):
        if not sidecar.get("converted"):
            return PeftModel.from_pretrained(
                base_model, str(path), adapter_name=adapter_name, is_trainable=is_trainable
            )
        if saved is None:
            raise GradLoraError(f"adapter at {path} has no adapter_model.safetensors")
        return _load_converted(base_model, path, saved, adapter_name, is_trainable)


def _read_sidecar(path: Path) -> dict:
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


def _read_weights(file: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(file))
    except Exception as e:  # safetensors raises its own SafetensorError, or OSError
        raise GradLoraError(
            f"cannot read {file} ({type(e).__name__}: {e}); the file is truncated or not a "
            "safetensors file: copy it again or save the adapter again"
        ) from e


@contextlib.contextmanager
def _restored_on_error(base_model: nn.Module, path: Path):
    """On any error, take injected LoRA layers out of ``base_model`` again and restore its
    requires_grad flags and train/eval modes; peft's own errors become GradLoraError."""
    flags = [(p, p.requires_grad) for p in base_model.parameters()]
    modes = [(m, m.training) for m in base_model.modules()]
    had_config = hasattr(base_model, "peft_config")
    try:
        yield
    except BaseException as e:
        _remove_tuner_layers(base_model)
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, flag in modes:
            m.training = flag
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


def _load_converted(
    base_model: nn.Module,
    path: Path,
    saved: dict[str, Tensor],
    adapter_name: str,
    is_trainable: bool,
) -> PeftModel:
    """The converted (rank-2r) adapter split back into rank-r A, B plus the offset A0, B0."""
    saved_config = LoraConfig.from_pretrained(str(path))
    config = _resize_config(saved_config, 0.5, 1 / _alpha_factor(saved_config))
    config.inference_mode = not is_trainable
    model = get_peft_model(base_model, config, adapter_name=adapter_name)
    targets = find_targets(model)
    state, factors = split_converted(saved, targets, path)
    result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    unexpected = [k for k in result.unexpected_keys if adapter_name in k or "lora_" in k]
    if unexpected:
        raise GradLoraError(f"adapter at {path} has weights the model lacks: {unexpected[:5]}")
    write_factors(targets, factors, offset_base=True, set_adapter_weights=False)
    return model


@contextlib.contextmanager
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
