"""A small signature of a base weight, to tell whether an adapter is loaded onto the base it
was trained against.

For an (m, n) weight W the signature is [‖W‖_F, u_1ᵀ W z_1, ..., u_k^T W z_k] in fp64, with
standard Gaussian u_i (m,), z_i (n,) drawn from a CPU generator seeded by the layer's name.
For two weights W, W', E[(u_iᵀ (W - W') z_i)²] = ‖W - W'‖_F², so the root mean square of the
probe differences estimates ‖W - W'‖_F: ``relative_difference`` divides it by ‖W‖_F. A cast
to bf16 moves that by about 0.4%; a LoRA-GA offset W - s B0 A0 moves it by 5-30% (γ = 16 to
64), so the threshold of 1% tells the original base from an offset one, or from another model.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import Tensor

PROBES = 8  # k: the estimate's relative spread is about 1/sqrt(2k) = 25%
MAX_RELATIVE_DIFFERENCE = 0.01
CHUNK = 1 << 22  # entries of W converted to fp64 at once (32 MiB)


def weight_signature(W: Tensor, name: str, probes: int = PROBES) -> list[float]:
    """[‖W‖_F, u_1ᵀ W z_1, ..., u_kᵀ W z_k] of the (m, n) weight W (module doc), in fp64."""
    m, n = W.shape
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    U = torch.randn(probes, m, generator=gen, dtype=torch.float64)
    Z = torch.randn(n, probes, generator=gen, dtype=torch.float64)
    Z = Z.to(W.device)
    WZ = torch.empty(m, probes, dtype=torch.float64)  # (m, k): one column per probe
    squares = 0.0
    rows = max(1, CHUNK // n)  # an fp64 copy of at most CHUNK entries at a time
    for start in range(0, m, rows):
        block = W[start : start + rows].detach().to(torch.float64)
        WZ[start : start + rows] = (block @ Z).cpu()
        squares += block.square().sum().item()
    projections = (U * WZ.T).sum(dim=1)
    return [math.sqrt(squares), *projections.tolist()]


def relative_difference(saved: list[float], current: list[float]) -> float:
    """Estimated ‖W_current - W_saved‖_F / ‖W_saved‖_F from two signatures of one layer;
    infinite when they do not describe the same shape of probe set."""
    if len(saved) != len(current) or len(saved) < 2:
        return math.inf
    diffs = [a - b for a, b in zip(saved[1:], current[1:], strict=True)]
    rms = math.sqrt(sum(d * d for d in diffs) / len(diffs))
    return rms / max(saved[0], 1e-30)
