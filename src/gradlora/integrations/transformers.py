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
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..adapter.format import SIDECAR
from ..adapter.io import load_converted_into
from ..adapter.portable_save import install_portable_save
from ..errors import GradLoraError
from ..init.capture import LossFn
from ..init.formulas import make_method
from ..init.initialize import InitReport, initialize
from ..optim.transform import PairTransform, attach_pair_transform, refuse_pair_optimizer_inside
from ..peft_view import lora_layers, offset_layers, peft_model_of
from ..rates import warn_if_far

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
    re-applies the offset on every rank. FSDP2 and DeepSpeed ZeRO-1/2/3 work alike (the init
    gathers what it needs; docs/distributed.md).

    ``transform="lora-pro"`` (LoRA-Pro, efficient mode) or ``"preconditioned"`` (LoRA-One's
    preconditioner; ``transform_damping`` its λ) adjusts each LoRA pair's gradients before every
    step of the Trainer's own AdamW (``gradlora.attach_pair_transform``): the way to use either
    under DeepSpeed, whose optimizer steps flattened partitions; a gradlora pair optimizer given
    to DeepSpeed as its client optimizer is refused.

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
        transform: str | None = None,
        transform_damping: float | None = None,
        **options: Any,
    ):
        self.spec = make_method(method, **options)  # fail at construction on a bad method/option
        self.method, self.num_batches, self.loss_fn = method, num_batches, loss_fn
        self.skip_unsupported = skip_unsupported
        self.progress, self.options = progress, options
        self.transform_spec = (transform, transform_damping)
        self.transform: PairTransform | None = None  # attached in on_train_begin
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

    def _attach(self, peft_model, optimizer) -> None:
        """Refuse a pair optimizer inside DeepSpeed; attach the pair transform (once)."""
        if optimizer is not None:
            refuse_pair_optimizer_inside(optimizer)
        name, damping = self.transform_spec
        if name is None or self.transform is not None:
            return
        if optimizer is None:
            raise GradLoraError("GradLoraCallback(transform=...) found no optimizer in the Trainer")
        self.transform = attach_pair_transform(
            optimizer, name, model=peft_model, damping=damping,
            skip_unsupported=self.skip_unsupported,
        )  # fmt: skip

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        """Run the init on this rank's train batches (fresh run), or check a resumed model;
        attach the pair transform to the Trainer's optimizer."""
        peft_model = peft_model_of(model, "GradLoraCallback")
        self._install(peft_model)
        self._attach(peft_model, kwargs.get("optimizer"))
        main = state.is_world_process_zero
        if state.global_step > 0:
            self.resumed_at = state.global_step
            if self.spec.offsets_base and not offset_layers(lora_layers(peft_model)[0]):
                self._restore_offset(peft_model, args, state.global_step)
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
            warn_if_far(peft_model, args.learning_rate, "the Trainer")  # rates.py

    def _restore_offset(self, peft_model, args, step: int) -> None:
        """A resume whose loader skipped peft's load_adapter (DeepSpeed restores A and B from its
        own checkpoint, and leaves out the init factors): the offset from the portable adapter
        the same checkpoint holds (``save_model`` wrote it), on every rank."""
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        if not (folder / SIDECAR).is_file():
            raise GradLoraError(
                f"resumed at step {step} with {self.method}, but the checkpoint's adapter is not "
                f"gradlora's converted LoRA-GA form ({folder / SIDECAR} is missing), so the base "
                "weights were not offset and training on would be wrong; resume from a "
                "checkpoint saved with GradLoraCallback attached, on a fresh PeftModel of the "
                "original base model"
            )
        load_converted_into(peft_model, folder, factors_only=True)


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
