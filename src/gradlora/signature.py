"""A small signature of a base weight, to tell whether an adapter is loaded onto the base it
was trained against.

For an (m, n) weight W the signature is [‖W‖_F, u_1ᵀ W z_1, ..., u_k^T W z_k] in fp64, with
standard Gaussian u_i (m,), z_i (n,) drawn from a CPU generator seeded by the layer's name.
For two weights W, W', E[(u_iᵀ (W - W') z_i)²] = ‖W - W'‖_F², so the root mean square of the
probe differences estimates ‖W - W'‖_F: ``relative_difference`` divides it by ‖W‖_F. A cast
to bf16 moves that by about 0.4%; a LoRA-GA offset W - s B0 A0 moves it by 5-30% (γ = 16 to
64), so the threshold of 1% tells the original base from an offset one, or from another model.

An FSDP2-sharded W (a DTensor, its stored rows sharded) is never gathered: each rank sums
its rows' terms of ‖W‖_F² and of u_iᵀ W z_i, and one small all-reduce adds them (a collective).
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import Tensor

from .sharding import is_sharded, local, local_rows, require_row_layout, sum_over_shards

PROBES = 8  # k: the estimate's relative spread is about 1/sqrt(2k) = 25%
MAX_RELATIVE_DIFFERENCE = 0.01
CHUNK = 1 << 18  # entries of W converted to fp64 at once (2 MiB: a small transient on any layer)


def weight_signature(W: Tensor, name: str, probes: int = PROBES) -> list[float]:
    """[‖W‖_F, u_1ᵀ W z_1, ..., u_kᵀ W z_k] of the (m, n) weight W (module doc), in fp64. W may
    be a DTensor whose stored rows are sharded (FSDP2; W itself or its transpose): then every
    rank of its mesh calls this, and all get the same numbers."""
    m, n = W.shape
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    U = torch.randn(probes, m, generator=gen, dtype=torch.float64)
    Z = torch.randn(n, probes, generator=gen, dtype=torch.float64)
    if not is_sharded(W):
        return _terms(W, U, Z, None).tolist()
    stored, left, right = W, U, Z  # u^T W z with W's rows sharded, or z^T W^T u with its columns
    if not all(getattr(p, "dim", 0) == 0 for p in W.placements):
        stored, left, right = W.T, Z.T, U.T
    require_row_layout(stored)
    rows = local_rows(stored).cpu()
    total = sum_over_shards(_terms(local(stored), left, right, rows), stored).cpu()
    return [math.sqrt(total[0].item()), *total[1:].tolist()]


def _terms(W: Tensor, U: Tensor, Z: Tensor, rows: Tensor | None) -> Tensor:
    """[‖W‖_F, u_iᵀ W z_i] of the rows ``rows`` (None: all) of the whole weight, whose rows
    ``W`` holds: the norm as a sum of squares for a shard, its square root for a whole W."""
    probes = U.shape[0]
    Z = Z.to(W.device)
    WZ = torch.empty(W.shape[0], probes, dtype=torch.float64)  # (rows, k): one column per probe
    squares = torch.zeros((), dtype=torch.float64)
    step = max(1, CHUNK // max(1, W.shape[1]))  # an fp64 copy of at most CHUNK entries at a time
    for start in range(0, W.shape[0], step):
        block = W[start : start + step].detach().to(torch.float64)
        WZ[start : start + step] = (block @ Z).cpu()
        squares += block.square().sum().cpu()
    U = U if rows is None else U[:, rows]
    projections = (U * WZ.T).sum(dim=1)
    if rows is None:
        return torch.cat([squares.sqrt().reshape(1), projections])
    return torch.cat([squares.reshape(1), projections]).to(W.device)


def relative_difference(saved: list[float], current: list[float]) -> float:
    """Estimated ‖W_current - W_saved‖_F / ‖W_saved‖_F from two signatures of one layer;
    infinite when they do not describe the same shape of probe set."""
    if len(saved) != len(current) or len(saved) < 2:
        return math.inf
    diffs = [a - b for a, b in zip(saved[1:], current[1:], strict=True)]
    rms = math.sqrt(sum(d * d for d in diffs) / len(diffs))
    return rms / max(saved[0], 1e-30)
