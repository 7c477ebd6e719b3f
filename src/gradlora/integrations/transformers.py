"""Hugging Face ``Trainer`` integration: gradient-based LoRA init inside ``Trainer.train()``.

``GradLoraCallback`` runs ``gradlora.initialize`` in ``on_train_begin``: in transformers' training
loop that event fires after the model is wrapped (DDP in a multi-process run), the optimizer and
LR scheduler are created and the train dataloader is built, and before the first forward pass.
The optimizer already holds the LoRA parameters then; the init writes A and B in place
(``Tensor.copy_``), so those references stay valid and the first step starts from the
gradient-based init.

In a multi-process run (torchrun / accelerate launch, DDP) every rank runs the callback, so
every rank calls ``initialize`` (a collective) on its own shard of the Trainer's batches: G is
the mean over all ranks' batches and the ranks end bit-identical (``gradlora.parallel.collectives``).

LoRA-GA offsets the frozen base weights (W' = W - s B0 A0), so the rank-r adapter the Trainer
would save is wrong on the original model. For such a model the callback makes the PeftModel's
``save_pretrained`` write ``gradlora.save_adapter``'s portable rank-2r form (this is what
``trainer.save_model()`` and every checkpoint call, on the main process only), and its
``load_adapter`` read that form back into the trainable rank-r adapter plus the offset (this is
what ``resume_from_checkpoint`` and ``load_best_model_at_end`` call, on every rank). Checkpoints
and final saves therefore load with plain peft on the original base model, and resuming restores
exactly the trained state without a second init.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.integrations import is_deepspeed_zero3_enabled

from ..adapter.portable_save import install_portable_save
from ..errors import GradLoraError
from ..init.capture import LossFn
from ..init.formulas import make_method
from ..init.initialize import InitReport, initialize
from ..parallel.sharding import ZERO3_FIX, is_zero3_partitioned
from ..peft_view import lora_layers, offset_layers, peft_model_of

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
    defaults to ``not args.disable_tqdm``; bars show on the local main process only.

    Works with the ``Trainer`` given a PeftModel, and with a Trainer that builds the PeftModel
    itself (TRL's ``SFTTrainer(..., peft_config=LoraConfig(...))``).

    Multi-process runs (torchrun / accelerate launch, DDP): every rank initializes on its own
    first ``num_batches`` batches (its shard of the dataloader, as it will train on them), G is
    the mean over all ranks' batches, and A, B and the offset base weights end bit-identical on
    every rank; ``num_batches`` is per rank. Checkpoints and ``trainer.save_model()`` are
    written by the main process only; ``resume_from_checkpoint`` loads the converted adapter and
    re-applies the offset on every rank. DeepSpeed ZeRO-3 (partitioned weights) is refused with
    a GradLoraError: shard with FSDP2 instead.

    After the init, ``callback.report`` holds the ``InitReport`` (on every rank) and a one-line
    summary is logged at WARNING by the main process (logger
    ``gradlora.integrations.transformers``). The init runs once: not again on a second
    ``train()`` call, and not on ``resume_from_checkpoint`` (the checkpoint's trained adapter is
    loaded instead; for LoRA-GA the base weights are offset again from the factors saved with
    it). For LoRA-GA, ``trainer.save_model()`` and checkpoints write a plain rank-2r peft adapter
    that loads on the ORIGINAL base model. Pass the callback in ``Trainer(callbacks=[...])``: the
    load hook must be installed before a resume loads a checkpoint.
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
        """Trainer built: refuse ZeRO-3, install the save/load hooks before a resume loads a
        checkpoint."""
        refuse_zero3(args, model)
        if model is not None:
            self._install(peft_model_of(model, "GradLoraCallback"))

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        """Run the init on this rank's train batches (fresh run), or check a resumed model."""
        refuse_zero3(args, model)
        peft_model = peft_model_of(model, "GradLoraCallback")
        self._install(peft_model)
        main = state.is_world_process_zero
        if state.global_step > 0:
            self.resumed_at = state.global_step
            if self.spec.offsets_base and not offset_layers(lora_layers(peft_model)[0]):
                raise GradLoraError(
                    f"resumed at step {state.global_step} with {self.method}, but the checkpoint's "
                    "adapter is not gradlora's converted LoRA-GA form, so the base weights were not "
                    "offset and training on would be wrong; resume from a checkpoint saved with "
                    "GradLoraCallback attached, on a fresh PeftModel of the original base model"
                )
            if main:
                logger.info("gradlora: resumed at step %d, not re-initializing", state.global_step)
            return
        if self.report is not None:
            if main:
                logger.warning(
                    "gradlora: adapter already initialized by this callback; not re-running"
                )
            return
        if train_dataloader is None:
            raise GradLoraError("the Trainer has no train dataloader to estimate the gradient on")
        progress = self.progress if self.progress is not None else not args.disable_tqdm
        with own_batches(train_dataloader, args.world_size) as batches:
            # every rank gets here (the Trainer runs callbacks on all processes): a collective
            self.report = initialize(
                peft_model,
                batches,
                method=self.method,
                num_batches=self.num_batches,
                loss_fn=self.loss_fn,
                progress=progress and state.is_local_process_zero,
                skip_unsupported=self.skip_unsupported,
                **self.options,
            )
        if main:  # WARNING: the level transformers users see by default (its own INFO is hidden)
            logger.warning("gradlora: %s", self.report.summary())


@contextlib.contextmanager
def own_batches(loader: Iterable[Any], world_size: int = 1) -> Iterator[Iterable[Any]]:
    """The batches this rank trains on first, to iterate for the init without leaving a trace.

    The Trainer's train dataloader is accelerate's ``DataLoaderShard``: under DDP its wrapped
    ``base_dataloader`` holds this rank's shard already (a ``BatchSamplerShard``, or an
    ``IterableDatasetShard``), while iterating the shard itself registers it with accelerate's
    gradient state, syncs and advances the sampler's generator, and counts epochs. So the init
    iterates ``base_dataloader`` and restores the generator's state afterwards: training then
    sees the same batches, in the same order, as without the init. A ``DataLoaderDispatcher``
    (accelerate's default for an IterableDataset in a multi-process run; rank 0 reads and
    scatters every batch) is iterated itself, in step on every rank, and taken out of the
    gradient state afterwards. Anything else is iterated as it is.
    """
    if type(loader).__name__ == "DataLoaderDispatcher" and world_size > 1:
        try:
            yield loader
        finally:
            loader.end()  # an init that stops early never reaches the dispatcher's own end()
        return
    generator = getattr(loader, "synchronized_generator", None)
    saved = generator.get_state() if isinstance(generator, torch.Generator) else None
    try:
        yield getattr(loader, "base_dataloader", loader)
    finally:
        if saved is not None:
            generator.set_state(saved)


def refuse_zero3(args: Any, model: Any = None) -> None:
    """A GradLoraError if the Trainer runs DeepSpeed ZeRO-3 (its arguments, accelerate's
    DeepSpeed plugin, or parameters that ZeRO-3 partitioned)."""
    plugin = getattr(args, "deepspeed_plugin", None)
    hf_config = getattr(args, "hf_deepspeed_config", None)
    zero3 = (
        getattr(plugin, "zero_stage", None) == 3
        or (hf_config is not None and bool(hf_config.is_zero3()))
        or is_deepspeed_zero3_enabled()
    )
    params = model.parameters() if isinstance(model, nn.Module) else ()
    if zero3 or any(is_zero3_partitioned(p) for p in params):
        raise GradLoraError(
            "GradLoraCallback does not support DeepSpeed ZeRO-3, which partitions the model's "
            f"weights across ranks: {ZERO3_FIX}"
        )
