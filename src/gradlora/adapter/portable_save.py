"""One PeftModel's own ``save_pretrained`` and ``load_adapter``, made portable after an offset.

peft's ``save_pretrained`` (which ``Trainer.save_model`` and every checkpoint call) would write
the rank-r adapter relative to the offset base; ``install_portable_save`` makes that one
instance write ``adapter.io.save_adapter``'s portable rank-2r form once its base is offset, and
its ``load_adapter`` (``resume_from_checkpoint``, ``load_best_model_at_end``) read it back.
On an FSDP2-sharded model ``save_pretrained`` is always ``save_adapter``'s collective (peft's
own would write DTensor shards): every rank must call it, ``is_main_process`` picks the writer.
``initialize`` installs it after a LoRA-GA init, and ``GradLoraCallback`` before a resume.
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

from peft import PeftModel

from ..errors import GradLoraError
from ..peft_view import active_adapter, lora_layers, offset_layers
from .format import SIDECAR, is_converted
from .io import load_converted_into, save_adapter
from .offset import refuse_foreign_weight_offset


def _save_pretrained(self: PeftModel, save_directory: str, *args: Any, **kwargs: Any) -> None:
    """PeftModel.save_pretrained in peft's layout (the "default" adapter at the root, any other
    in a subfolder of its name), each offset adapter in the portable rank-2r form."""
    names = list(kwargs.pop("selected_adapters", None) or self.peft_config)
    offset = [n for n in names if offset_layers(lora_layers(self, n)[0])]
    state_dict = kwargs.pop("state_dict", None)  # the Trainer's, gathered (FSDP2, ZeRO-3)
    # a collective on every rank when sharded, unless the gathered state dict is given
    sharded = state_dict is None and any(t.partitioned for t in lora_layers(self)[0])
    if sharded and names != [active_adapter(self)]:
        raise GradLoraError(
            f"a sharded (FSDP2 / ZeRO-3) model saves its active adapter only, not {names}: pass "
            "selected_adapters=[model.active_adapter], or save the others unsharded"
        )
    plain = [n for n in names if n not in offset and not sharded]
    for name in plain:  # peft's own save would write them relative to a rewritten base
        refuse_foreign_weight_offset(lora_layers(self, name)[0], f"saving adapter {name!r}")
    for name in plain if kwargs.get("is_main_process", True) else []:
        folder = Path(save_directory) if name == "default" else Path(save_directory) / name
        (folder / SIDECAR).unlink(missing_ok=True)  # a stale one would make it read as converted
    if plain:
        type(self).save_pretrained(
            self, save_directory, *args, selected_adapters=plain, state_dict=state_dict, **kwargs
        )
    main = kwargs.get("is_main_process")
    for name in names if sharded else offset:  # FSDP2: a collective on every rank
        folder = Path(save_directory) if name == "default" else Path(save_directory) / name
        if sharded or main is not False:
            save_adapter(
                self, folder, is_main_process=main, adapter_name=name, state_dict=state_dict
            )


def _load_adapter(self: PeftModel, model_id: Any, adapter_name: str, *args: Any, **kwargs: Any):
    """PeftModel.load_adapter, reading gradlora's converted form into the active adapter."""
    if not is_converted(model_id):
        return type(self).load_adapter(self, model_id, adapter_name, *args, **kwargs)
    if adapter_name != active_adapter(self):
        raise GradLoraError(
            f"the converted adapter at {model_id} can only be loaded into the active adapter, "
            f"not into {adapter_name!r}"
        )
    load_converted_into(self, model_id)
    return None


def install_portable_save(model: PeftModel) -> None:
    """Make this PeftModel instance's ``save_pretrained`` write ``save_adapter``'s portable form
    once its base is offset, and its ``load_adapter`` read that form back (trained A, B, heads
    and the offset). Other instances and the class are untouched; idempotent."""
    model.save_pretrained = types.MethodType(_save_pretrained, model)
    model.load_adapter = types.MethodType(_load_adapter, model)
