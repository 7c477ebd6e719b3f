"""``export_adapter``: a plain LoRA adapter that every reader applies right (docs/serving.md).

peft applies a scale per module (alpha / r, alpha / sqrt(r) with rsLoRA, per-module ranks and
alphas from ``rank_pattern`` / ``alpha_pattern``); vLLM applies one lora_alpha / r to every
module, llama.cpp's converter reads lora_alpha only. So each scale is folded into B: for a LoRA
layer with A (r, n), B (m, r) and scale s,

  after a LoRA-GA offset (``save_adapter``'s rank-2r form):  A' = [A; A0] (2r, n),
                                                             B' = s [B, -B0] (m, 2r),
  otherwise:                                                 A' = A, B' = s B,

so B' A' = s (B A - B0 A0) relative to the ORIGINAL base weight W, then every layer is
zero-padded to the largest rank R over the layers: A'' = [A'; 0] (R, n), B'' = [B', 0] (m, R),
B'' A'' = B' A'. The config has r = lora_alpha = R, use_rslora false, no rank or alpha pattern
and ``init_lora_weights=True``: every reader's scale is 1 and W + B'' A'' is the trained layer.

Whole-layer copies trained beside LoRA (``modules_to_save``: a classification head, an
lm_head) are refused (vLLM rejects them, llama.cpp's converter drops them), or with
``modules_to_save="separate"`` written to ``modules_to_save.safetensors`` under the base model's
names (``classifier.weight``), to be loaded into the base model before the adapter.

Before the folder appears, what was written is read back and checked: the config's fields;
each layer's s_file B_file A_file X against s (B A X - B0 A0 X) of the live layer on a random
probe X (n, 4); and the whole model: plain ``PeftModel.from_pretrained`` on the original base
(``reference.original_base``: no weight copied) against the live model's logits on a probe
batch. Any mismatch is a GradLoraError and no folder is left.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from math import inf
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..atomic import replace_dir
from ..errors import GradLoraError
from ..flags import ModuleFlags
from ..peft_view import WEIGHT0, LoraTarget, SkippedLayer, active_adapter, lora_layers
from .format import WEIGHTS, keys_in
from .reference import (
    RTOL,
    check_destination,
    check_dtype,
    compute_dtype,
    logits_of,
    model_to_export,
    original_base,
    probe_batch,
    relative_error,
)

HEADS = "modules_to_save.safetensors"
HEAD_OPTIONS = ("refuse", "separate")
HEAD_TASKS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")  # peft adds their heads to modules_to_save
# peft inits that rewrite the base weights (W_res = W - s B0 A0 and the like): the live base is
# then not the original, and peft converts such adapters only with the initial adapter at hand
REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
LAYER_PROBES = 4  # columns of the per-layer probe X
LAYER_RTOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def check_plain_config(config: LoraConfig, what: str) -> None:
    """Refuse LoRA options a plain adapter cannot carry (each message names the fix)."""
    init = config.init_lora_weights
    if isinstance(init, str) and init.lower().startswith(REWRITING_INITS):
        raise GradLoraError(
            f"the adapter was initialized with init_lora_weights={init!r}, which rewrote the base "
            "weights, so the live base is not the original: save it with peft's save_pretrained("
            "path, path_initial_model_for_weight_conversion=...), load that onto the original "
            f"base with PeftModel.from_pretrained and call {what} on it (or use export_merged)"
        )
    if config.bias != "none":
        raise GradLoraError(
            f"bias={config.bias!r} trains the base layers' biases, which a plain LoRA adapter "
            "does not carry; use gradlora.export_merged, or train with bias='none'"
        )
    for field in ("trainable_token_indices", "layer_replication", "alora_invocation_tokens"):
        if getattr(config, field, None):
            raise GradLoraError(
                f"the adapter sets {field}, which vLLM and llama.cpp do not read; use "
                "gradlora.export_merged, or train without it"
            )


def _pad(A: Tensor, B: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """A (r, ...) and B (m, r, ...) zero-padded to ``rank``: [A; 0], [B, 0]."""
    r = A.shape[0]
    A = torch.cat([A, A.new_zeros((rank - r, *A.shape[1:]))], dim=0)
    B = torch.cat([B, B.new_zeros((B.shape[0], rank - r, *B.shape[2:]))], dim=1)
    return A, B


def plain_factors(
    state: Mapping[str, Tensor], targets: list[LoraTarget], skipped: list[SkippedLayer]
) -> tuple[dict[str, Tensor], int]:
    """({key: A'' or B''} in float32 or wider, R): the module doc's formulas for every layer."""
    factors: list[tuple[str, str, Tensor, Tensor]] = []
    for layer in [*targets, *skipped]:
        key_a, key_b = keys_in(state, layer)
        A, B = state[key_a], state[key_b]
        dtype = torch.promote_types(A.dtype, torch.float32)
        A, B = A.to(dtype), B.to(dtype)
        stored = layer.init_factors() if isinstance(layer, LoraTarget) else None
        if stored is not None:
            A0, B0 = (f.detach().to(A) for f in stored)
            A, B = torch.cat([A, A0], dim=0), torch.cat([B, -B0], dim=1)
        factors.append((key_a, key_b, A, B * float(layer.layer.scaling[layer.adapter])))
    rank = max(A.shape[0] for _, _, A, _ in factors)
    out = {}
    for key_a, key_b, A, B in factors:
        out[key_a], out[key_b] = _pad(A, B, rank)
    return out, rank


def plain_config(config: LoraConfig, rank: int, heads_apart: bool) -> LoraConfig:
    """A fresh LoraConfig with the targets of ``config`` and scale 1: r = lora_alpha = rank.
    With the heads written apart (``heads_apart``) a classification task_type is dropped: peft's
    wrappers for it would look for the head in the adapter file and fail."""
    task_type = config.task_type
    if heads_apart and task_type in HEAD_TASKS:
        task_type = None
    return LoraConfig(
        r=rank,
        lora_alpha=rank,
        use_rslora=False,
        target_modules=config.target_modules,
        exclude_modules=config.exclude_modules,
        layers_to_transform=config.layers_to_transform,
        layers_pattern=config.layers_pattern,
        fan_in_fan_out=config.fan_in_fan_out,
        lora_dropout=config.lora_dropout,
        bias="none",
        modules_to_save=None,
        init_lora_weights=True,
        task_type=task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
        inference_mode=True,
    )


def export_adapter(
    model: torch.nn.Module,
    path: str | os.PathLike,
    *,
    probe: Mapping[str, Tensor] | Tensor | None = None,
    modules_to_save: str = "refuse",
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    rtol: float | None = None,
) -> Path:
    """Write the active LoRA adapter of ``model`` as a plain adapter (module doc) to ``path``.

    The weights are written in ``dtype`` (float32: the folded B = s B loses nothing). ``probe``:
    the batch of the whole-model check (dict for ``model(**probe)``, or input ids; default
    2 x 16 seeded random tokens). ``modules_to_save``: "refuse" (default) or "separate" (module
    doc). ``overwrite``: replace an existing non-empty folder. ``rtol``: the logits check's
    relative tolerance (default by the model's compute dtype: 1e-5 in float32, 5e-2 in bf16,
    1e-2 in fp16). The model is not modified. Returns the folder.
    """
    what = "export_adapter"
    peft_model = model_to_export(model, what)
    check_dtype(dtype, what)
    if modules_to_save not in HEAD_OPTIONS:
        raise GradLoraError(f"modules_to_save={modules_to_save!r}: choose 'refuse' or 'separate'")
    targets, skipped = lora_layers(peft_model)
    adapter = active_adapter(peft_model)
    config = peft_model.peft_config[adapter]
    check_plain_config(config, what)
    path = check_destination(path, overwrite)
    state = get_peft_model_state_dict(peft_model, adapter_name=adapter, save_embedding_layers=False)
    state = {k: v.detach() for k, v in state.items() if not k.endswith("." + WEIGHT0)}
    tensors, rank = plain_factors(state, targets, skipped)
    heads = {k: v for k, v in state.items() if k not in tensors}
    if heads and modules_to_save == "refuse":
        names = sorted(config.modules_to_save or []) or sorted(heads)[:3]
        raise GradLoraError(
            f"the adapter trains whole copies of {names} (modules_to_save), which vLLM refuses "
            "and llama.cpp's converter drops; pass modules_to_save='separate' to write them to "
            f"{HEADS} beside the adapter (load them into the base model first), or use "
            "gradlora.export_merged"
        )
    tensors = {k: v.to("cpu", dtype).contiguous() for k, v in tensors.items()}
    heads = {_base_name(k): v.to("cpu").contiguous().clone() for k, v in heads.items()}
    batch = probe_batch(peft_model.get_base_model(), probe)
    live = logits_of(peft_model, batch, "live model")
    tol = rtol if rtol is not None else RTOL[compute_dtype(peft_model)]
    out_config = plain_config(config, rank, bool(heads))

    def write(tmp: Path) -> None:
        out_config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if heads:
            save_file(heads, str(tmp / HEADS), metadata={"format": "pt"})
        check_layers(tmp, state, targets, skipped, rank, dtype)
        check_model(peft_model, tmp, targets, batch, live, tol)

    return replace_dir(path, write)


def _base_name(key: str) -> str:
    """peft's state-dict key of a saved module -> its name in the base model."""
    return key.removeprefix("base_model.model.")


def check_layers(
    folder: Path,
    state: Mapping[str, Tensor],
    targets: list[LoraTarget],
    skipped: list[SkippedLayer],
    rank: int,
    dtype: torch.dtype,
) -> None:
    """Read the export back: the config is plain (r = lora_alpha = ``rank``, no rsLoRA, no
    patterns) and each layer's s_file B_file A_file X equals s (B A X - B0 A0 X) of the live
    layer (``state``: its A, B) on a seeded random X (n, 4), within LAYER_RTOL[dtype] of the
    terms' size ‖s B A X‖ + ‖s B0 A0 X‖ (the difference is 0 right after a LoRA-GA init)."""
    cfg = LoraConfig.from_pretrained(str(folder))
    plain = cfg.r == rank and cfg.lora_alpha == rank and not cfg.use_rslora
    if not plain or cfg.rank_pattern or cfg.alpha_pattern or cfg.init_lora_weights is not True:
        raise GradLoraError(f"the exported config at {folder} is not plain: {cfg.to_dict()}")
    saved = load_file(str(folder / WEIGHTS))
    scale = cfg.lora_alpha / cfg.r
    gen = torch.Generator().manual_seed(1)
    for layer in [*targets, *skipped]:
        key_a, key_b = keys_in(state, layer)
        if key_a not in saved or key_b not in saved:
            raise GradLoraError(f"the export at {folder} lacks the weights of {layer.name!r}")
        A, B = (state[k].detach().cpu().double().flatten(1) for k in (key_a, key_b))
        X = torch.randn(A.shape[1], LAYER_PROBES, generator=gen, dtype=torch.float64)
        want = float(layer.layer.scaling[layer.adapter]) * (B @ (A @ X))
        size = want.norm()  # the error is relative to the terms: s B A - s B0 A0 may be 0
        stored = layer.init_factors() if isinstance(layer, LoraTarget) else None
        if stored is not None:
            A0, B0 = (f.detach().cpu().double() for f in stored)
            counter = layer.scaling * (B0 @ (A0 @ X))
            want, size = want - counter, size + counter.norm()
        A_f, B_f = saved[key_a].double().flatten(1), saved[key_b].double().flatten(1)
        got = scale * (B_f @ (A_f @ X))
        err = (
            ((got - want).norm() / size.clamp_min(1e-30)).item() if got.shape == want.shape else inf
        )
        err = err if err == err else inf  # NaN
        if not err <= LAYER_RTOL[dtype] or A_f.shape[0] != rank:
            raise GradLoraError(
                f"the exported layer {layer.name!r} does not reproduce the trained one: "
                f"relative error {err:.2e} (at most {LAYER_RTOL[dtype]:.0e}), rank "
                f"{A_f.shape[0]} (want {rank}); the export was not written"
            )


def check_model(
    peft_model: PeftModel,
    folder: Path,
    targets: list[LoraTarget],
    batch: Mapping[str, Tensor],
    live: Tensor,
    tol: float,
) -> None:
    """Plain peft loads ``folder`` onto the original base (``original_base``; the separate
    modules_to_save file loaded into the base first) and its logits on ``batch`` are within
    ``tol`` (relative) of ``live``. The live model is left as it was."""
    flags = ModuleFlags(peft_model)  # peft freezes the shared base weights of the copy
    adapter = active_adapter(peft_model)
    try:
        cuda = sorted({p.device.index or 0 for p in peft_model.parameters() if p.is_cuda})
        with torch.random.fork_rng(devices=cuda):  # peft draws A before loading it
            ref = original_base(peft_model.get_base_model(), adapter, targets)
            if (folder / HEADS).exists():
                for key, value in load_file(str(folder / HEADS)).items():
                    module_name, _, name = key.rpartition(".")
                    module = ref.get_submodule(module_name)
                    old = module._parameters[name]
                    module._parameters[name] = torch.nn.Parameter(
                        value.to(old.device, old.dtype), requires_grad=False
                    )
            plain = PeftModel.from_pretrained(ref, str(folder))
            got = logits_of(plain, batch, "exported adapter on the original base")
    finally:
        flags.restore()
    err = relative_error(got, live)
    if not err <= tol:
        raise GradLoraError(
            f"the exported adapter, loaded with plain peft on the original base, gives logits "
            f"{err:.2e} (relative) away from the trained model's (at most {tol:.0e}); the export "
            "was not written. Report this as a gradlora bug, with the model and LoraConfig"
        )
