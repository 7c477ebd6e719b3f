"""``gradlora train --fsdp``: the model sharded with FSDP2 over torchrun's processes.

``shard`` applies ``torch.distributed.fsdp.fully_shard`` to every decoder (or encoder) layer,
found generically from the model's ``_no_split_modules`` (the transformers classes that must
not be split across devices: ``LlamaDecoderLayer``, ``BertLayer``, ...), then to the root, on a
1-D mesh of all processes. It runs after ``get_peft_model`` and before the gradient init and
the optimizer, so both see FSDP2's DTensor parameters (gradlora's init and optimizers work on
them; ``save_adapter`` gathers the adapter and rank 0 writes it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from ..errors import GradLoraError


def layer_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of the classes any submodule lists in ``_no_split_modules``, outermost only."""
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    found, inside = [], set()
    for module in model.modules():
        if id(module) in inside or type(module).__name__ not in names:
            continue
        found.append(module)
        inside.update(id(m) for m in module.modules())
    return found


def shard(model: nn.Module, device: torch.device) -> int:
    """FSDP2 on each layer of ``model`` and its root, over all processes; the number of layers."""
    layers = layer_modules(model)
    if not layers:
        raise GradLoraError(
            f"--fsdp: {type(model).__name__} names no layer classes (_no_split_modules) to shard "
            "one by one; train it without --fsdp (data-parallel under torchrun)"
        )
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return len(layers)
