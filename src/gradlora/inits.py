"""LoRA-GA and LoRA-One initializations as pure functions on tensors (docs/algorithms.md, sections 2 and 3).

Shapes follow peft: a layer's weight W is (m, n) = (out, in), ``A`` is (r, n), ``B`` is (m, r),
and the adapter adds ``s * B @ A``. ``G`` (m, n) is dL/dW at the pre-trained weights.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .errors import GradLoraError
from .precision import math_dtype
from .spectral import RANDOMIZED_NITER, SvdMethod, top_svd

Direction = Literal["ArB2r", "A2rBr", "ArBr"]
Scale = Literal["stable", "unit", "matched"]


@dataclass(frozen=True)
class LoraGA:
    """LoRA-GA (Wang et al., NeurIPS 2024): A0, B0 from the top-2r singular vectors of G."""

    direction: Direction = "ArB2r"  # which singular vectors go to A and which to B
    scale: Scale = "stable"  # "stable": c = m^(1/4)/sqrt(gamma); "unit": 1; "matched": see below
    gamma: float = 16.0  # the paper's stable_gamma; larger -> smaller init, smaller offset
    svd: SvdMethod = "auto"  # "exact", "randomized" (q = 4r + 64, niter iterations) or "auto"
    svd_niter: int = RANDOMIZED_NITER  # power iterations of the randomized SVD
    seed: int = 0  # seed of the randomized SVD's private generator

    name = "lora-ga"
    offsets_base = True  # W' = W - s B0 A0 keeps the model's function at init

    def __post_init__(self):
        _check_choice("direction", self.direction, ("ArB2r", "A2rBr", "ArBr"))
        _check_choice("scale", self.scale, ("stable", "unit", "matched"))
        _check_common(self)

    def svd_rank(self, r: int) -> int:
        return 2 * r

    def scale_factor(self, m: int, n: int) -> float:
        """c for a layer of shape (m, n): "stable" m^(1/4) / sqrt(gamma), "unit" 1, and
        "matched" sqrt(m / (3 (m + n))), the c at which the first AdamW step moves the effective
        weight as far (Frobenius norm) as vanilla LoRA's first step at the same rate:

        AdamW's first bias-corrected step is -lr sign(g) entrywise. Vanilla LoRA (B = 0, A from
        peft's kaiming-uniform, entries U(-1/sqrt(n), 1/sqrt(n)), variance 1/(3n)) moves only B,
        so dW = s dB A with ||dW||^2 ~ s^2 lr^2 m r n / (3n) = s^2 lr^2 m r / 3. LoRA-GA moves
        both: dW ~ s (dB A0 + B0 dA) (the lr^2 term dropped), A0 and B0 orthonormal up to c, so
        ||dB A0|| = c lr sqrt(m r), ||B0 dA|| = c lr sqrt(r n), and the two are orthogonal in
        expectation: ||dW||^2 ~ s^2 c^2 lr^2 r (m + n). Equal norms: c^2 = m / (3 (m + n)),
        independent of r, s and gamma; the directions stay those of ``direction``.
        """
        if self.scale == "stable":
            return m**0.25 / math.sqrt(self.gamma)
        if self.scale == "matched":
            return math.sqrt(m / (3 * (m + n)))
        return 1.0

    def factors(self, U: Tensor, S: Tensor, V: Tensor, r: int) -> tuple[Tensor, Tensor]:
        """A0 (r, n), B0 (m, r) from the top-2r triplets U (m, 2r), S, V (n, 2r).

        ArB2r: A0 = c V[:, :r]^T, B0 = c U[:, r:2r];  A2rBr: A0 = c V[:, r:2r]^T, B0 = c U[:, :r];
        ArBr: A0 = c V[:, 1:2r:2]^T, B0 = c U[:, 0:2r:2].  c from ``scale_factor``.
        """
        c = self.scale_factor(U.shape[0], V.shape[0])
        if self.direction == "ArB2r":
            a_cols, b_cols = slice(0, r), slice(r, 2 * r)
        elif self.direction == "A2rBr":
            a_cols, b_cols = slice(r, 2 * r), slice(0, r)
        else:
            a_cols, b_cols = slice(1, 2 * r, 2), slice(0, 2 * r, 2)
        return c * V[:, a_cols].T.contiguous(), c * U[:, b_cols].contiguous()


@dataclass(frozen=True)
class LoraOne:
    """LoRA-One (2025): B0 A0 = -[G]_r / (gamma sigma_1), split as U sqrt(S) and sqrt(S) V^T."""

    gamma: float = 128.0  # step normalizer: the model starts at W - s/(gamma sigma_1) [G]_r
    svd: SvdMethod = "auto"  # "exact", "randomized" or "auto"
    svd_niter: int = RANDOMIZED_NITER  # power iterations of the randomized SVD
    seed: int = 0  # seed of the randomized SVD's private generator

    name = "lora-one"
    offsets_base = False  # by design: the model starts one normalized gradient step away

    def __post_init__(self):
        _check_common(self)

    def svd_rank(self, r: int) -> int:
        return r

    def factors(self, U: Tensor, S: Tensor, V: Tensor, r: int) -> tuple[Tensor, Tensor]:
        """From the top-r triplets of G (so -G = (-U) S V^T):
        B0 = -U diag(sqrt S) / sqrt(sigma_1 gamma),  A0 = diag(sqrt S) V^T / sqrt(sigma_1 gamma).
        """
        root = S[:r].sqrt() / torch.sqrt(S[0] * self.gamma)
        return (root[:, None] * V[:, :r].T).contiguous(), (-U[:, :r] * root).contiguous()


INIT_METHODS = {cls.name: cls for cls in (LoraGA, LoraOne)}


def _check_choice(field: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise GradLoraError(f"unknown {field}={value!r}; choose one of {', '.join(allowed)}")


def _check_common(opts) -> None:
    if not (isinstance(opts.gamma, int | float) and opts.gamma > 0 and math.isfinite(opts.gamma)):
        raise GradLoraError(f"gamma must be a positive number, got {opts.gamma!r}")
    _check_choice("svd", opts.svd, ("auto", "exact", "randomized"))


def make_method(method: str, **options) -> LoraGA | LoraOne:
    """Parse ``initialize``'s method name and options into a frozen options object."""
    cls = INIT_METHODS.get(method)
    if cls is None:
        raise GradLoraError(f"unknown method {method!r}; choose one of {', '.join(INIT_METHODS)}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise GradLoraError(
            f"unknown option(s) {', '.join(unknown)} for method {method!r}; "
            f"its options are {', '.join(sorted(known))}"
        )
    return cls(**options)


def check_rank(method: LoraGA | LoraOne, r: int, shape: tuple[int, int], layer: str) -> None:
    """Raise if the layer (m, n) cannot hold the method's SVD rank (2r for LoRA-GA, r for LoRA-One)."""
    k = method.svd_rank(r)
    if k > min(shape):
        raise GradLoraError(
            f"{method.name} needs {k} singular vectors at rank r={r}, but layer {layer!r} has "
            f"shape {shape} (min {min(shape)}). Lower r for this layer (LoraConfig.rank_pattern) "
            f"or leave it out of target_modules."
        )


def init_from_gradient(
    G: Tensor, r: int, method: LoraGA | LoraOne
) -> tuple[Tensor, Tensor, Tensor]:
    """The method's (A0 (r, n), B0 (m, r), S (k,)) from G (m, n); fp32 (fp64 for fp64 G).

    S holds the top k = method.svd_rank(r) singular values of G, for reporting.
    """
    check_rank(method, r, tuple(G.shape), "<matrix>")
    U, S, V = top_svd(
        G, method.svd_rank(r), method=method.svd, niter=method.svd_niter, seed=method.seed
    )
    A0, B0 = init_from_svd(U, S, V, r, method)
    return A0, B0, S


def init_from_svd(
    U: Tensor, S: Tensor, V: Tensor, r: int, method: LoraGA | LoraOne
) -> tuple[Tensor, Tensor]:
    """The method's (A0 (r, n), B0 (m, r)) from G's top-k triplets U (m, k), S (k,), V (n, k),
    k >= method.svd_rank(r), however they were obtained (exact, randomized or sketched SVD)."""
    k = method.svd_rank(r)
    if U.shape[1] < k or V.shape[1] < k or S.shape[0] < k:
        raise GradLoraError(
            f"{method.name} at rank r={r} needs {k} singular triplets, got {S.shape[0]}"
        )
    if not S[0] > 0:  # also false for NaN
        raise GradLoraError(
            f"the gradient matrix has largest singular value {S[0].item()}: it is zero or not "
            "finite, so it gives no direction to initialize from; check the loss and the data"
        )
    return method.factors(U, S, V, r)


def offset_weight(W: Tensor, A0: Tensor, B0: Tensor, scaling: float) -> Tensor:
    """W' = W - s * B0 @ A0, computed in fp32 (or W's precision if higher), cast back to W's dtype.

    W (m, n), A0 (r, n), B0 (m, r). Pass the A0, B0 exactly as stored in the adapter (after
    casting to its dtype) so that W' + s B0 A0 reproduces W up to W's rounding.
    """
    dtype = math_dtype(W)
    delta = B0.to(dtype) @ A0.to(dtype)
    return (W.to(dtype) - scaling * delta).to(W.dtype)
