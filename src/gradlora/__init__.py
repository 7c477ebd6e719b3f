"""gradlora: gradient-informed LoRA (LoRA-GA, LoRA-One, LoRA-Pro) on any Hugging Face model through peft."""

from ._version import __version__
from .api import InitReport, LayerReport, initialize
from .capture import estimate_gradients
from .errors import GradLoraError
from .optim import (
    LoraProAdamW,
    PreconditionedAdamW,
    create_lora_pro_optimizer,
    create_preconditioned_optimizer,
)
from .peft_bridge import load_adapter, save_adapter
from .trainer import GradLoraCallback, create_optimizer

__all__ = [
    "GradLoraCallback",
    "GradLoraError",
    "InitReport",
    "LayerReport",
    "LoraProAdamW",
    "PreconditionedAdamW",
    "__version__",
    "create_lora_pro_optimizer",
    "create_optimizer",
    "create_preconditioned_optimizer",
    "estimate_gradients",
    "initialize",
    "load_adapter",
    "save_adapter",
]
