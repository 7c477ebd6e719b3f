"""The portable adapter's format: the rank-2r layout that plain peft loads on the original
base after an offset (docs/algorithms.md, section 5), its sidecar ``gradlora.json``, reading
the files, and the base-signature distance (``adapter.io`` saves and loads with them).
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from safetensors.torch import load_file
from torch import Tensor

from ..errors import GradLoraError
from ..peft_view import LoraTarget, SkippedLayer

SIDECAR = "gradlora.json"  # written beside adapter_config.json; plain peft ignores it
WEIGHTS = "adapter_model.safetensors"
EXACT = "gradlora_factors.safetensors"  # A0 and the trained B exactly, for an exact resume
FORMATS = (1, 2)  # 1: A' = [A; A0], B' = [B, -B0]; 2: A' = [A; A - A0], B' = [B - B0, B0]
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


def alpha_factor(config: LoraConfig) -> float:
    """alpha' / alpha when the rank doubles and s' = s must hold: 2, or sqrt(2) with rsLoRA."""
    return math.sqrt(2.0) if config.use_rslora else 2.0


def resize_config(config: LoraConfig, rank_factor: float, alpha_scale: float) -> LoraConfig:
    cfg = copy.deepcopy(config)
    cfg.r = round(cfg.r * rank_factor)
    cfg.lora_alpha = cfg.lora_alpha * alpha_scale
    cfg.rank_pattern = {k: round(v * rank_factor) for k, v in (cfg.rank_pattern or {}).items()}
    cfg.alpha_pattern = {k: v * alpha_scale for k, v in (cfg.alpha_pattern or {}).items()}
    cfg.init_lora_weights = True  # loading must not re-run any data-driven init
    return cfg


def lora_keys(target: LoraTarget | SkippedLayer) -> tuple[str, str]:
    """Keys of A and B in peft's saved state dict (adapter name removed)."""
    if isinstance(target, SkippedLayer) and target.adapter in target.layer.lora_embedding_A:
        return f"{target.module_name}.lora_embedding_A", f"{target.module_name}.lora_embedding_B"
    return f"{target.module_name}.lora_A.weight", f"{target.module_name}.lora_B.weight"


def keys_in(
    state: Mapping[str, Tensor], layer: LoraTarget | SkippedLayer, path: Any = None
) -> tuple[str, str]:
    """``lora_keys(layer)``, checked to be in ``state`` (read from ``path``; None: saving)."""
    key_a, key_b = lora_keys(layer)
    if key_a not in state or key_b not in state:
        if path is None:
            raise GradLoraError(f"peft's state dict has no entry for {layer.module_name!r}")
        raise GradLoraError(
            f"adapter at {path} has no weights for layer {layer.name!r}: it was saved from a "
            "different model or target_modules; load it on the base model it was trained on"
        )
    return key_a, key_b


def to_portable(
    state: dict[str, Tensor],
    targets: list[LoraTarget],
    stored: list[tuple[Tensor, Tensor]],
    skipped: Sequence[SkippedLayer] = (),
) -> dict[str, Tensor]:
    """Rewrite peft's rank-r ``state`` in place into format 2 and return the exact factors.

    Per offset layer A' = [A; A - A0] (2r, n), B' = [B - B0, B0] (m, 2r): s B' A' = s [(B - B0)
    A + B0 (A - A0)] = s (B A - B0 A0), whose two terms stay small as training moves A, B away
    from A0, B0 (format 1's [A; A0], [B, -B0] cancels two large products, which costs accuracy
    in bf16). ``skipped`` layers are zero-padded, A' = [A; 0], B' = [B, 0]. Returns {key + ".A0":
    A0, key + ".B": B}, the two factors the differences do not give back exactly."""
    exact = {}
    for t, (A0, B0) in zip(targets, stored, strict=True):
        key_a, key_b = keys_in(state, t)
        A, B = state[key_a], state[key_b]
        A0, B0 = A0.to(A), B0.to(B)
        state[key_a] = torch.cat([A, A - A0], dim=0)
        state[key_b] = torch.cat([B - B0, B0], dim=1)
        exact[f"{key_a}.A0"], exact[f"{key_b}.B"] = A0, B
    for layer in skipped:  # skip_unsupported: never offset; s' = s
        key_a, key_b = keys_in(state, layer)
        state[key_a] = torch.cat([state[key_a], torch.zeros_like(state[key_a])], dim=0)
        state[key_b] = torch.cat([state[key_b], torch.zeros_like(state[key_b])], dim=1)
    return exact


def split_converted(
    saved: Mapping[str, Tensor],
    targets: list[LoraTarget],
    path: str | os.PathLike,
    skipped: Sequence[SkippedLayer] = (),
    exact: Mapping[str, Tensor] | None = None,
) -> tuple[dict[str, Tensor], dict[str, tuple[Tensor, Tensor]]]:
    """Split a converted rank-2r state dict into peft's rank-r state dict and the init factors
    {layer: (A0, B0)}: format 2 (``exact``: the ``to_portable`` factors) or format 1
    (``exact`` None: A' = [A; A0], B' = [B, -B0]); the ``skipped`` layers' zero padding is
    dropped. A format-2 adapter whose differences disagree with its exact factors (files from
    two saves) is refused. Errors name the mismatching layer."""
    state, factors = dict(saved), {}
    for layer in skipped:
        key_a, key_b = keys_in(saved, layer, path)
        a2, b2, r = saved[key_a], saved[key_b], int(layer.layer.r[layer.adapter])
        if a2.shape[0] != 2 * r or b2.shape[1] != 2 * r or (a2[r:].any() and b2[:, r:].any()):
            raise GradLoraError(
                f"adapter at {path} has shapes {tuple(a2.shape)}, {tuple(b2.shape)} for the "
                f"skipped layer {layer.name!r}, not gradlora's zero-padded rank-{2 * r} form; "
                "load it on the base model and target_modules it was trained with"
            )
        state[key_a], state[key_b] = a2[:r], b2[:, :r]
    for t in targets:
        key_a, key_b = keys_in(saved, t, path)
        a2, b2 = saved[key_a], saved[key_b]
        r = t.rank
        if a2.shape != (2 * r, t.shape[1]) or b2.shape != (t.shape[0], 2 * r):
            raise GradLoraError(
                f"adapter at {path} has shapes {tuple(a2.shape)}, {tuple(b2.shape)} for layer "
                f"{t.name!r}; a converted rank-{r} adapter of this model needs "
                f"{(2 * r, t.shape[1])}, {(t.shape[0], 2 * r)}"
            )
        if exact is None:
            state[key_a], state[key_b] = a2[:r], b2[:, :r]
            factors[t.name] = (a2[r:], -b2[:, r:])
            continue
        A, B0 = a2[:r], b2[:, r:]
        A0, B = exact.get(f"{key_a}.A0"), exact.get(f"{key_b}.B")
        if (
            A0 is None
            or B is None
            or not (
                A0.shape == A.shape
                and torch.equal(a2[r:], A - A0)
                and torch.equal(b2[:, :r], B - B0)
            )
        ):
            raise GradLoraError(
                f"adapter at {path}: {EXACT} does not match {WEIGHTS} for layer {t.name!r} (the "
                "files come from different saves, or one was edited); save the adapter again"
            )
        state[key_a], state[key_b] = A, B
        factors[t.name] = (A0, B0)
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
    if not isinstance(sidecar, dict) or sidecar.get("format") not in FORMATS:
        raise GradLoraError(
            f"{sidecar_path} has format {sidecar.get('format') if isinstance(sidecar, dict) else sidecar!r}; "
            f"this gradlora reads formats {FORMATS}: upgrade gradlora or save the adapter again"
        )
    return sidecar


def is_converted(path: Any) -> bool:
    """Whether ``path`` is a folder holding an adapter that ``save_adapter`` converted."""
    if (
        not isinstance(path, str | os.PathLike)
        or not (Path(path) / "adapter_config.json").is_file()
    ):
        return False
    return bool(read_sidecar(path).get("converted"))


def read_weights(file: Path) -> dict[str, Tensor]:
    if not file.exists():
        raise GradLoraError(f"adapter at {file.parent} has no {file.name}")
    try:
        return load_file(str(file))
    except Exception as e:  # safetensors raises its own SafetensorError, or OSError
        raise GradLoraError(
            f"cannot read {file} ({type(e).__name__}: {e}); the file is truncated or not a "
            "safetensors file: copy it again or save the adapter again"
        ) from e
