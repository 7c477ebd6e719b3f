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

import logging
from typing import Any

from transformers import TrainerCallback

from ..capture import LossFn
from ..errors import GradLoraError
from ..initialization import InitReport, initialize
from ..inits import make_method
from ..portable_save import install_portable_save
from ..targets import is_offset, peft_model_of, scan_layers

logger = logging.getLogger(__name__)


class GradLoraCallback(TrainerCallback):
    """Initialize the LoRA adapter from gradients inside ``Trainer.train()``, before step one.

    ``GradLoraCallback(method="lora-ga" | "lora-one", num_batches=8, loss_fn=None, progress=None,
    skip_unsupported=False, **options)``; the options are ``gradlora.initialize``'s
    (``skip_unsupported=True``: LoRA on nn.Embedding / nn.Conv2d layers stays at peft's init;
    build the optimizer with the same option). The gradient is averaged over the
    first ``num_batches`` batches of the Trainer's own train dataloader (per-device micro-batches,
    so gradient accumulation does not change it); batches are the collated dicts the model gets
    (with labels), or anything ``loss_fn(model, batch)`` turns into a scalar loss. ``progress``
    defaults to ``not args.disable_tqdm``.

    After the init, ``callback.report`` holds the ``InitReport`` and a one-line summary is logged at WARNING
    (logger ``gradlora.integrations.transformers``). The init runs once: not again on a second ``train()`` call, and
    not on ``resume_from_checkpoint`` (the checkpoint's trained adapter is loaded instead; for
    LoRA-GA the base weights are offset again from the factors saved with it). For LoRA-GA,
    ``trainer.save_model()`` and checkpoints write a plain rank-2r peft adapter that loads on the
    ORIGINAL base model. Single process only for now (no torchrun / DDP): in a data-parallel run,
    call ``gradlora.initialize`` on every rank (a collective), or initialize in one process and
    ``gradlora.load_adapter`` the saved adapter on every rank.
    """

    def __init__(
        self,
        method: str = "lora-ga",
        num_batches: int = 8,
        loss_fn: LossFn | None = None,
        progress: bool | None = None,
        skip_unsupported: bool = False,
        **options: Any,
    ):
        self.spec = make_method(method, **options)  # fail at construction on a bad method/option
        self.method, self.num_batches, self.loss_fn = method, num_batches, loss_fn
        self.skip_unsupported = skip_unsupported
        self.progress, self.options = progress, options
        self.report: InitReport | None = None
        self.resumed_at: int | None = None  # global step a resumed run started from

    def _install(self, model) -> None:
        """Make save_pretrained / load_adapter of this PeftModel instance gradlora-aware."""
        if self.spec.offsets_base:
            install_portable_save(model)

    def on_init_end(self, args, state, control, model=None, **kwargs):
        """Trainer built: install the save/load hooks before a resume loads a checkpoint."""
        if model is not None:
            self._install(peft_model_of(model, "GradLoraCallback"))

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        """Run the init on the train dataloader (fresh run), or check a resumed model."""
        peft_model = peft_model_of(model, "GradLoraCallback")
        self._install(peft_model)
        if state.global_step > 0:
            self.resumed_at = state.global_step
            if self.spec.offsets_base and not is_offset(scan_layers(peft_model)[0]):
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
                "GradLoraCallback runs in a single process for now, but "
                f"world_size={args.world_size}. For a data-parallel run, drop the callback and "
                "either call gradlora.initialize yourself on EVERY rank with that rank's batches "
                "(it is a collective: called on one rank only it stops with an error; then save "
                "with gradlora.save_adapter from rank 0), or run the init in a single process "
                "beforehand, save it with gradlora.save_adapter and load it with "
                "gradlora.load_adapter on every rank"
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
            skip_unsupported=self.skip_unsupported,
            **self.options,
        )
        # WARNING: the level transformers users see by default (its own INFO is hidden)
        logger.warning("gradlora: %s", self.report.summary())
