"""Optimizers for LoRA pairs: LoRA-One's preconditioned AdamW, LoRA-Pro's adjusted AdamW, and
the registry that builds any of gradlora's optimizers by name."""

from .lora_pro import LoraProAdamW, create_lora_pro_optimizer, lora_pro_adjust
from .pairing import LoraPair, find_lora_pairs, split_trainable
from .preconditioned import PreconditionedAdamW, create_preconditioned_optimizer, precondition
from .registry import OPTIMIZERS, OptimizerFactory, create_optimizer
from .transform import PairTransform, attach_pair_transform

__all__ = [
    "OPTIMIZERS",
    "LoraPair",
    "OptimizerFactory",
    "LoraProAdamW",
    "PairTransform",
    "PreconditionedAdamW",
    "attach_pair_transform",
    "create_lora_pro_optimizer",
    "create_optimizer",
    "create_preconditioned_optimizer",
    "find_lora_pairs",
    "lora_pro_adjust",
    "precondition",
    "split_trainable",
]
