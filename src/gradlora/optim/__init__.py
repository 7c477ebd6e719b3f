"""Optimizers for LoRA pairs: LoRA-One's preconditioned AdamW and LoRA-Pro's adjusted AdamW."""

from .lora_pro import LoraProAdamW, create_lora_pro_optimizer, lora_pro_adjust
from .pairing import LoraPair, find_lora_pairs, split_trainable
from .preconditioned import PreconditionedAdamW, create_preconditioned_optimizer, precondition

__all__ = [
    "LoraPair",
    "LoraProAdamW",
    "PreconditionedAdamW",
    "create_lora_pro_optimizer",
    "create_preconditioned_optimizer",
    "find_lora_pairs",
    "lora_pro_adjust",
    "precondition",
    "split_trainable",
]
