"""Pair each LoRA A with its B from the PeftModel's module structure, never from parameter order."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ..errors import GradLoraError
from ..peft_view import LoraTarget, supported_layers

_LORA_PARAM_MARKERS = (
    ".lora_A.",
    ".lora_B.",
    ".lora_embedding_A.",
    ".lora_embedding_B.",
    ".lora_magnitude_vector.",
)


@dataclass(frozen=True)
class LoraPair:
    name: str  # module name in the base model
    A: nn.Parameter  # lora_A weight, (r, n)
    B: nn.Parameter  # lora_B weight, (m, r)
    scaling: float  # s = alpha / r (alpha / sqrt(r) with rsLoRA)


def _pairs(targets: list[LoraTarget]) -> list[LoraPair]:
    return [LoraPair(t.name, t.A, t.B, t.scaling) for t in targets]


def find_lora_pairs(model: nn.Module, skip_unsupported: bool = False) -> list[LoraPair]:
    """The (A, B) pair of every supported LoRA layer of the active adapter (see
    ``gradlora.peft_view.supported_layers`` for ``skip_unsupported``)."""
    return _pairs(supported_layers(model, skip_unsupported)[0])


def group_by_rank(params: list[Tensor]) -> list[list[int]]:
    """Pair indices of a flat A1, B1, A2, B2, ... list grouped by (rank, device, dtype) of A,
    so that each group's r x r work runs as one batched call."""
    groups: dict[tuple, list[int]] = {}
    for i, A in enumerate(params[0::2]):
        groups.setdefault((A.shape[0], A.device, A.dtype), []).append(i)
    return list(groups.values())


def split_trainable(
    model: nn.Module, skip_unsupported: bool = False
) -> tuple[list[LoraPair], list[nn.Parameter]]:
    """(pairs of the active adapter, every other trainable parameter).

    A trainable LoRA parameter outside the active adapter would silently get unpaired updates,
    so it is an error. With ``skip_unsupported=True`` the LoRA parameters of the active
    adapter's unsupported layers (nn.Embedding, convolutions) are "other" parameters (plain
    AdamW) instead of an error.
    """
    targets, skipped = supported_layers(model, skip_unsupported)
    pairs = _pairs(targets)
    paired = {id(p) for pair in pairs for p in (pair.A, pair.B)}
    unpaired = {id(p) for layer in skipped for p in layer.lora_parameters()}
    others = []
    for name, p in model.named_parameters():
        if id(p) in paired or not p.requires_grad:
            continue
        if id(p) not in unpaired and any(marker in name for marker in _LORA_PARAM_MARKERS):
            raise GradLoraError(
                f"trainable LoRA parameter {name!r} is not part of the active adapter's (A, B) "
                "pairs; freeze it (requires_grad_(False)) or make its adapter the active one"
            )
        others.append(p)
    return pairs, others


def require_pair_groups(params: Iterable[Any], optimizer: str, name: str) -> list[Any]:
    """``params`` as a list, refused unless some group states ``lora_pairs`` (True or False).

    Groups that never mention it are what ``Trainer(optimizer_cls_and_kwargs=(cls, kw))`` and
    other generic builders pass: plain parameters, with no way to pair A with B, so the
    optimizer would silently be AdamW. Build it from the model instead.
    """
    params = list(params)
    if not any(isinstance(g, Mapping) and "lora_pairs" in g for g in params):
        raise GradLoraError(
            f"{optimizer} got plain parameter groups (as Trainer(optimizer_cls_and_kwargs=...) "
            "passes them), so it cannot pair each LoRA A with its B and would silently be plain "
            f"AdamW. Build it from the model: gradlora.create_optimizer(model, {name!r}, lr=...) "
            "with Trainer(optimizers=(opt, None)), or let the Trainer build it with "
            f"Trainer(optimizer_cls_and_kwargs=(gradlora.OptimizerFactory({name!r}), "
            '{"lr": ...})); for parameters that are deliberately unpaired, pass a group with '
            '"lora_pairs": False'
        )
    return params


def check_pair_group(params: list[Tensor], factory: str) -> None:
    """Raise unless ``params`` reads A1, B1, A2, B2, ... with A (r, n) and B (m, r)."""
    if len(params) % 2:
        raise GradLoraError("a lora_pairs group needs parameters in (A, B) order: A1, B1, A2, ...")
    for A, B in zip(params[0::2], params[1::2], strict=True):
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise GradLoraError(
                f"parameters of shapes {tuple(A.shape)} and {tuple(B.shape)} are not a LoRA "
                f"(A (r, n), B (m, r)) pair; build the optimizer with {factory}(model, ...)"
            )


def pair_param_groups(pairs: list[LoraPair], others: list[nn.Parameter], **pair_options) -> list:
    """Optimizer groups: the pairs as A1, B1, A2, B2, ... (``lora_pairs=True``, plus
    ``pair_options``) and, if any, the other trainable parameters (plain AdamW)."""
    groups = [
        {
            "params": [p for pair in pairs for p in (pair.A, pair.B)],
            "lora_pairs": True,
            **pair_options,
        }
    ]
    if others:
        groups.append({"params": others, "lora_pairs": False})
    return groups
