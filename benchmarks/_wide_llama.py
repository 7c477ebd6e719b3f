"""The synthetic wide Llama several benchmarks measure on (init_cost, offset_cost, fsdp_init):
hidden 1024, intermediate 2816, 16 heads, random weights, and random token batches."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 2048


def wide_llama(layers: int, max_positions: int = 512, seed: int = 0) -> LlamaForCausalLM:
    """The wide Llama with ``layers`` decoder layers, weights drawn after manual_seed(seed)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=max_positions,
    )
    return LlamaForCausalLM(cfg)


def random_batches(n: int, batch: int, seq: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """``n`` causal-LM batches of (batch, seq) uniform random tokens from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (batch, seq), generator=gen)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out
