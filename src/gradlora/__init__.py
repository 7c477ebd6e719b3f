"""gradlora: gradient-informed LoRA (LoRA-GA, LoRA-One, LoRA-Pro) on any Hugging Face model through peft."""

from ._version import __version__
from .adapter_io import load_adapter, save_adapter
from .capture import estimate_gradients
from .errors import GradLoraError
from .initialization import InitReport, LayerReport, initialize
from .integrations.transformers import GradLoraCallback
from .optim import (
    LoraProAdamW,
    OptimizerFactory,
    PreconditionedAdamW,
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
    "create_lora_pro_optimizer",
    "create_optimizer",
    "create_preconditioned_optimizer",
    "estimate_gradients",
    "initialize",
    "load_adapter",
    "save_adapter",
]
