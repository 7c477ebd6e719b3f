"""The one precision rule of gradlora's math: fp32, or the input's precision where it is wider.

Gradients are accumulated, SVDs and r x r inverses computed, Adam moments kept and base-weight
offsets formed in ``math_dtype`` of their inputs, so bf16 / fp16 models get fp32 math and fp64
inputs stay fp64 (the property tests run in fp64).
"""

from __future__ import annotations

import torch
from torch import Tensor


def math_dtype(x: Tensor | torch.dtype) -> torch.dtype:
    """torch.promote_types(dtype, float32): float32 for 16- and 32-bit floats, float64 for float64."""
    return torch.promote_types(x if isinstance(x, torch.dtype) else x.dtype, torch.float32)
