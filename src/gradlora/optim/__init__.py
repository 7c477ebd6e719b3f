"""Optimizers for LoRA pairs: the preconditioned (scaled / Riemannian) AdamW of LoRA-One."""

from .pairing import LoraPair, find_lora_pairs, split_trainable
from .preconditioned import PreconditionedAdamW, create_preconditioned_optimizer, precondition

__all__ = [
    "LoraPair",
    "PreconditionedAdamW",
    "create_preconditioned_optimizer",
    "find_lora_pairs",
    "precondition",
    "split_trainable",
]
