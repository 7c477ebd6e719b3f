"""gradlora: gradient-informed LoRA (LoRA-GA, LoRA-One, LoRA-Pro) on any Hugging Face model through peft."""

from ._version import __version__
from .adapter.export import export_adapter
from .adapter.io import load_adapter, save_adapter
from .adapter.merged import export_merged
from .errors import GradLoraError
from .init.initialize import InitReport, LayerReport, estimate_gradients, initialize
from .integrations.transformers import GradLoraCallback
from .optim import (
    LoraProAdamW,
    OptimizerFactory,
    PreconditionedAdamW,
    attach_pair_transform,
    create_lora_pro_optimizer,
    create_optimizer,
    create_preconditioned_optimizer,
)

__all__ = [
    "GradLoraCallback",
    "GradLoraError",
    "InitReport",
    "LayerReport",
    "LoraProAdamW",
    "OptimizerFactory",
    "PreconditionedAdamW",
    "__version__",
    "attach_pair_transform",
    "create_lora_pro_optimizer",
    "create_optimizer",
    "create_preconditioned_optimizer",
    "estimate_gradients",
    "export_adapter",
    "export_merged",
    "initialize",
    "load_adapter",
    "save_adapter",
]
