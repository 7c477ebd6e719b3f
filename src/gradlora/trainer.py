"""Hugging Face ``Trainer`` integration: gradient-based LoRA init inside ``Trainer.train()``.

``GradLoraCallback`` runs ``gradlora.initialize`` in ``on_train_begin``: in transformers' training
loop that event fires after the model is wrapped, the optimizer and LR scheduler are created and
the train dataloader is built, and before the first forward pass. The optimizer already holds
the LoRA parameters then; the init writes A and B in place (``Tensor.copy_``), so those
references stay valid and the first step starts from the gradient-based init.

LoRA-GA offsets the frozen base weights (W' = W - s B0 A0), so the rank-r adapter the Trainer
would save is wrong on the original model. For such a model the callback makes the PeftModel's
``save_pretrained`` write ``gradlora.save_adapter``'s portable rank-2r form (this is what
``trainer.save_model()`` and every checkpoint call), and its ``load_adapter`` read that form back
into the trainable rank-r adapter plus the offset (this is what ``resume_from_checkpoint`` and
``load_best_model_at_end`` call). Checkpoints and final saves therefore load with plain peft on
the original base model, and resuming restores exactly the trained state without a second init.
"""

from __future__ import annotations

import json
import logging
import os
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn
from torch.optim import Optimizer
from transformers import TrainerCallback

from .api import InitReport, initialize
from .capture import LossFn
from .errors import GradLoraError
from .inits import make_method
from .optim import create_lora_pro_optimizer, create_preconditioned_optimizer
from .peft_bridge import SIDECAR, find_targets, save_adapter, split_converted, write_factors

logger = logging.getLogger(__name__)


def unwrap_peft_model(model: nn.Module | None) -> PeftModel:
    """The PeftModel inside whatever wraps it (DDP / DataParallel ``.module``, torch.compile
    ``._orig_mod``); a GradLoraError if there is none."""
    current = model
    while not isinstance(current, PeftModel):
        inner = getattr(current, "_orig_mod", None) or getattr(current, "module", None)
        if not isinstance(inner, nn.Module):
            raise GradLoraError(
                f"GradLoraCallback needs the Trainer's model to be a peft.PeftModel with a LoRA "
                f"adapter, got {type(model).__name__}; wrap it first with "
                "peft.get_peft_model(model, LoraConfig(...)) (or pass peft_config to TRL's SFTTrainer)"
            )
        current = inner
    return current


def _is_offset(model: PeftModel) -> bool:
    return any(t.init_factors() is not None for t in find_targets(model))


def _is_converted(path: Any) -> bool:
    sidecar = Path(os.fspath(path)) / SIDECAR if isinstance(path, str | os.PathLike) else None
    return bool(sidecar and sidecar.is_file() and json.loads(sidecar.read_text()).get("converted"))


def load_converted_into(model: PeftModel, path: str | os.PathLike) -> None:
    """Load a rank-2r adapter written by ``save_adapter`` into ``model``'s active rank-r adapter,
    in place (tensors keep their identity, so an optimizer's references stay valid).

    A, B (and modules_to_save such as a classifier head) get the trained values; the base
    weights are offset by the saved A0, B0 unless the model is already offset by the same
    factors (``load_best_model_at_end`` within one run). ``model`` must otherwise be a PeftModel
    of the ORIGINAL base weights.
    """
    path = Path(path)
    targets = find_targets(model)
    saved = load_file(str(path / "adapter_model.safetensors"))
    state, factors = split_converted(saved, targets, path)
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
    with torch.no_grad():
        result = set_peft_model_state_dict(model, state, adapter_name=targets[0].adapter)
    unexpected = [k for k in result.unexpected_keys if "lora_" in k or targets[0].adapter in k]
    if unexpected:
        raise GradLoraError(f"the adapter at {path} has weights the model lacks: {unexpected[:5]}")
    if all(s is None for s in stored):
        write_factors(targets, factors, offset_base=True, set_adapter_weights=False)


def _save_pretrained(self: PeftModel, save_directory: str, *args: Any, **kwargs: Any) -> None:
    """PeftModel.save_pretrained, writing the portable rank-2r form once the base is offset."""
    if not _is_offset(self):
        return type(self).save_pretrained(self, save_directory, *args, **kwargs)
    selected = kwargs.get("selected_adapters")
    if selected is not None and list(selected) != [find_targets(self)[0].adapter]:
        raise GradLoraError(
            f"selected_adapters={selected}: a LoRA-GA model saves its active adapter only "
            "(gradlora.save_adapter); save other adapters from a model without the offset"
        )
    if kwargs.get("is_main_process", True):
        save_adapter(self, save_directory)
    return None


def _load_adapter(self: PeftModel, model_id: Any, adapter_name: str, *args: Any, **kwargs: Any):
    """PeftModel.load_adapter, reading gradlora's converted form into the active adapter."""
    if not _is_converted(model_id):
        return type(self).load_adapter(self, model_id, adapter_name, *args, **kwargs)
    if adapter_name != find_targets(self)[0].adapter:
        raise GradLoraError(
            f"the converted adapter at {model_id} can only be loaded into the active adapter, "
            f"not into {adapter_name!r}"
        )
    load_converted_into(self, model_id)
    return None


class GradLoraCallback(TrainerCallback):
    """Initialize the LoRA adapter from gradients inside ``Trainer.train()``, before step one.

    ``GradLoraCallback(method="lora-ga" | "lora-one", num_batches=8, loss_fn=None, progress=None,
    **options)``; the options are ``gradlora.initialize``'s. The gradient is averaged over the
    first ``num_batches`` batches of the Trainer's own train dataloader (per-device micro-batches,
    so gradient accumulation does not change it); batches are the collated dicts the model gets
    (with labels), or anything ``loss_fn(model, batch)`` turns into a scalar loss. ``progress``
    defaults to ``not args.disable_tqdm``.

    After the init, ``callback.report`` holds the ``InitReport`` and a one-line summary is logged
    (logger ``gradlora.trainer``). The init runs once: not again on a second ``train()`` call, and
    not on ``resume_from_checkpoint`` (the checkpoint's trained adapter is loaded instead; for
    LoRA-GA the base weights are offset again from the factors saved with it). For LoRA-GA,
    ``trainer.save_model()`` and checkpoints write a plain rank-2r peft adapter that loads on the
    ORIGINAL base model. Single process only (no torchrun / DDP yet).
    """

    def __init__(
        self,
        method: str = "lora-ga",
        num_batches: int = 8,
        loss_fn: LossFn | None = None,
        progress: bool | None = None,
        **options: Any,
    ):
        self.spec = make_method(method, **options)  # fail at construction on a bad method/option
        self.method, self.num_batches, self.loss_fn = method, num_batches, loss_fn
        self.progress, self.options = progress, options
        self.report: InitReport | None = None
        self.resumed_at: int | None = None  # global step a resumed run started from

    def _install(self, model: PeftModel) -> None:
        """Make save_pretrained / load_adapter of this PeftModel instance gradlora-aware."""
        if self.spec.offsets_base:
            model.save_pretrained = types.MethodType(_save_pretrained, model)
            model.load_adapter = types.MethodType(_load_adapter, model)

    def on_init_end(self, args, state, control, model=None, **kwargs):
        """Trainer built: install the save/load hooks before a resume loads a checkpoint."""
        if model is not None:
            self._install(unwrap_peft_model(model))

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        """Run the init on the train dataloader (fresh run), or check a resumed model."""
        peft_model = unwrap_peft_model(model)
        self._install(peft_model)
        if state.global_step > 0:
            self.resumed_at = state.global_step
            if self.spec.offsets_base and not _is_offset(peft_model):
                raise GradLoraError(
                    f"resumed at step {state.global_step} with {self.method}, but the checkpoint's "
                    "adapter is not gradlora's converted LoRA-GA form, so the base weights were not "
                    "offset and training on would be wrong; resume from a checkpoint saved with "
                    "GradLoraCallback attached, on a fresh PeftModel of the original base model"
                )
            logger.info("gradlora: resumed at step %d, not re-initializing", state.global_step)
            return
        if self.report is not None:
            logger.warning("gradlora: adapter already initialized by this callback; not re-running")
            return
        if args.world_size > 1:
            raise GradLoraError(
                f"GradLoraCallback runs in a single process, but world_size={args.world_size}: "
                "initialize once with gradlora.initialize, save with gradlora.save_adapter and load "
                "it in every rank with gradlora.load_adapter"
            )
        if train_dataloader is None:
            raise GradLoraError("the Trainer has no train dataloader to estimate the gradient on")
        # accelerate's DataLoaderShard registers itself with the gradient state while iterated;
        # iterate the plain DataLoader it wraps so that stopping after num_batches leaves no trace.
        batches = getattr(train_dataloader, "base_dataloader", train_dataloader)
        progress = self.progress if self.progress is not None else not args.disable_tqdm
        self.report = initialize(
            peft_model,
            batches,
            method=self.method,
            num_batches=self.num_batches,
            loss_fn=self.loss_fn,
            progress=progress,
            **self.options,
        )
        logger.info("gradlora: %s", self.report.summary())


def _adamw(model: nn.Module, lr: float, **kwargs: Any) -> Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, **kwargs)


# name -> factory(model, lr, **kwargs)
OPTIMIZERS: dict[str, Callable[..., Optimizer]] = {
    "adamw": _adamw,
    "preconditioned": create_preconditioned_optimizer,
    "lora-pro": create_lora_pro_optimizer,
}


def create_optimizer(model: nn.Module, name: str, lr: float, **kwargs: Any) -> Optimizer:
    """An optimizer over ``model``'s trainable parameters, by name, for
    ``Trainer(optimizers=(create_optimizer(model, name, lr), None))``.

    "adamw": torch AdamW (LoRA-GA's choice); "preconditioned": gradlora's preconditioned AdamW
    for LoRA pairs (LoRA-One's choice; kwargs damping, betas, eps, weight_decay,
    bias_correction); "lora-pro": LoRA-Pro's adjusted AdamW (kwargs mode="efficient"|"full",
    damping, betas, eps, weight_decay). Build it on the PeftModel before creating the Trainer; the callback's init
    writes A and B in place, so the optimizer keeps pointing at the right tensors.
    """
    if name not in OPTIMIZERS:
        raise GradLoraError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name](unwrap_peft_model(model), lr, **kwargs)
