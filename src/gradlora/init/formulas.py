"""The math of the gradient inits, as pure functions on tensors (docs/algorithms.md, sections
1-3): truncated SVDs of G (exact, randomized, or from sketches; fixed signs, own RNG) and the
LoRA-GA / LoRA-One factors (A0, B0) from them.

Shapes follow peft: a layer's weight W is (m, n) = (out, in), ``A`` is (r, n), ``B`` is (m, r),
and the adapter adds ``s * B @ A``. ``G`` (m, n) is dL/dW at the pre-trained weights. SVDs
return the top-k triplets as ``U`` (m, k), ``S`` (k,), ``V`` (n, k) with
``M ~= U @ diag(S) @ V.T``, computed in fp32 (fp64 when given fp64) on the matrix's device.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ..errors import GradLoraError
from ..precision import math_dtype

SvdMethod = Literal["auto", "exact", "randomized"]

# "auto" uses the exact SVD up to this many rows/columns on the short side.
EXACT_SVD_MAX_DIM = 512
# Power iterations of the randomized SVD. With q = 2k + 64 and 8 iterations the top-k
# reconstruction of a 1024 x 640 matrix with sigma_i ~ i^-0.5 is within 3e-6 relative of the
# exact one for k = 8, 16, 32 (fp32 floor 1.5e-6); with the reference's q = 2k and 4 iterations
# it is off by 1-3e-2 (benchmarks/svd_accuracy.py --synthetic).
RANDOMIZED_NITER = 8


def fix_signs(U: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    """Flip each singular pair (u_i, v_i) so that u_i's entry of largest magnitude is positive.

    The SVD is unique only up to the sign of each pair; fixing it makes the init reproducible
    across devices and LAPACK/cuSOLVER versions. ``U`` (m, k), ``V`` (n, k).
    """
    idx = U.abs().argmax(dim=0, keepdim=True)
    signs = torch.sign(U.gather(0, idx))
    signs[signs == 0] = 1
    return U * signs, V * signs


def exact_svd(matrix: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k triplets of ``matrix`` (m, n) from the full thin SVD (LAPACK / cuSOLVER)."""
    M = matrix.to(math_dtype(matrix))
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    U, V = fix_signs(U[:, :k], Vh[:k].T)
    return U.contiguous(), S[:k].contiguous(), V.contiguous()


def randomized_svd(
    matrix: Tensor,
    k: int,
    *,
    oversample: int | None = None,
    niter: int = RANDOMIZED_NITER,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k triplets by randomized subspace iteration (Halko, Martinsson, Tropp 2011).

    Sketch width q = min(k + oversample, min(m, n)), default oversample = k + 64, so q = 2k + 64
    (the reference code's q = 2k, i.e. 4r, leaves B0 A0 off by 1e-2 relative on slowly decaying
    spectra, sigma_i ~ i^-0.5; see RANDOMIZED_NITER). ``niter`` power iterations, re-orthonormalized
    with QR each time. The Gaussian test matrix comes from a private generator seeded with
    ``seed``, so the global RNG is never touched.
    """
    M = matrix.to(math_dtype(matrix))
    m, n = M.shape
    q = min(k + (k + 64 if oversample is None else oversample), m, n)
    gen = torch.Generator(device=M.device).manual_seed(seed)
    omega = torch.randn(n, q, generator=gen, device=M.device, dtype=M.dtype)
    Q = torch.linalg.qr(M @ omega).Q
    for _ in range(niter):
        Q = torch.linalg.qr(M.T @ Q).Q
        Q = torch.linalg.qr(M @ Q).Q
    Ub, S, Vh = torch.linalg.svd(Q.T @ M, full_matrices=False)
    U, V = fix_signs((Q @ Ub)[:, :k], Vh[:k].T)
    return U.contiguous(), S[:k].contiguous(), V.contiguous()


def top_svd(
    matrix: Tensor,
    k: int,
    *,
    method: SvdMethod = "auto",
    niter: int = RANDOMIZED_NITER,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k singular triplets of ``matrix`` (m, n): ``U`` (m, k), ``S`` (k,), ``V`` (n, k).

    ``method="auto"`` is exact when min(m, n) <= EXACT_SVD_MAX_DIM or when k is more than a
    quarter of min(m, n) (a sketch would not save work), randomized otherwise.
    """
    if matrix.ndim != 2:
        raise ValueError(f"top_svd expects a 2-D matrix, got shape {tuple(matrix.shape)}")
    short = min(matrix.shape)
    if not 1 <= k <= short:
        raise ValueError(f"k={k} singular triplets requested from a {tuple(matrix.shape)} matrix")
    if method == "auto":
        method = "exact" if short <= EXACT_SVD_MAX_DIM or 4 * k > short else "randomized"
    if method == "exact":
        return exact_svd(matrix, k)
    if method == "randomized":
        return randomized_svd(matrix, k, niter=niter, seed=seed)
    raise ValueError(f"unknown SVD method {method!r}; use 'auto', 'exact' or 'randomized'")


def best_rank_approx(matrix: Tensor, k: int) -> Tensor:
    """[M]_k, the best rank-k approximation of ``matrix`` (m, n) in Frobenius norm (exact SVD)."""
    U, S, V = exact_svd(matrix, k)
    return (U * S) @ V.T


# --- low-rank reconstruction from sketches (docs/algorithms.md, section 1, sketch mode) ---


def gaussian_test_matrix(
    rows: int, cols: int, seed: int, device: torch.device | str = "cpu"
) -> Tensor:
    """A (rows, cols) fp32 standard Gaussian matrix from a private CPU generator seeded with
    ``seed``, then moved to ``device``: the same numbers on every device, global RNG untouched."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=gen, dtype=torch.float32).to(device)


@dataclass(frozen=True)
class SeededGaussian:
    """A seeded Gaussian test matrix held as its recipe: ``tm()`` makes the (rows, cols) fp32
    tensor (``gaussian_test_matrix``), bit-identical every call, so a sketch need not keep it."""

    rows: int
    cols: int
    seed: int
    device: torch.device | str = "cpu"

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows, self.cols

    def __call__(self) -> Tensor:
        return gaussian_test_matrix(self.rows, self.cols, self.seed, self.device)


def materialize(M: Tensor | SeededGaussian) -> Tensor:
    """The tensor of ``M``: itself, or a SeededGaussian made for this use."""
    return M() if isinstance(M, SeededGaussian) else M


def orthonormal_basis(Y: Tensor) -> Tensor:
    """Q (m, k) with orthonormal columns and range(Q) containing range(Y), Y (m, k), k <= m.

    Householder QR: Q stays orthonormal even when Y is rank-deficient.
    """
    return torch.linalg.qr(Y.to(math_dtype(Y))).Q


def factored_svd(L: Tensor, R: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k triplets of the product M = L R^T, L (m, p), R (n, p), without forming M (m, n).

    L = Q_L T_L, R = Q_R T_R (thin QR); T_L T_R^T = u diag(S) v^T (p, p);
    then M = (Q_L u) diag(S) (Q_R v)^T. Cost O((m + n) p^2). Returns U (m, k), S (k,), V (n, k)
    with deterministic signs (``fix_signs``); requires k <= p.
    """
    dtype = torch.promote_types(math_dtype(L), math_dtype(R))
    QL, TL = torch.linalg.qr(L.to(dtype))
    QR, TR = torch.linalg.qr(R.to(dtype))
    u, S, vh = torch.linalg.svd(TL @ TR.T)
    U, V = fix_signs(QL @ u[:, :k], QR @ vh[:k].T)
    return U.contiguous(), S[:k].contiguous(), V.contiguous()


def sketch_svd(Y: Tensor, Z: Tensor, Psi: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k triplets of G (m, n) from its single-pass sketches (Tropp, Yurtsever, Udell,
    Cevher 2017): range sketch Y = G Omega (m, s), co-range sketch Z = Psi G (l, n), with the
    co-range test matrix Psi (l, m), l >= s >= k (Omega itself is not needed).

    Q = orth(Y) (m, s); X = argmin_X ||(Psi Q) X - Z||_F = (Psi Q)^+ Z (s, n), solved by QR of
    Psi Q; G ~= Q X, whose top-k SVD is ``factored_svd(Q, X^T, k)``. Exact (up to rounding)
    when rank(G) <= s: then Q Q^T G = G and Z = (Psi Q)(Q^T G).
    """
    Q = orthonormal_basis(Y)
    Qp, Tp = torch.linalg.qr(Psi.to(Q.dtype) @ Q)
    X = torch.linalg.solve_triangular(Tp, Qp.T @ Z.to(Q.dtype), upper=True)
    return factored_svd(Q, X.T, k)


def captured_energy(G: Tensor, U: Tensor, V: Tensor) -> tuple[float, float]:
    """How much of G's best rank-k energy the subspaces (U (m, k), V (n, k)) hold, k = U.shape[1].

    Returns (left, both): left = ||U^T G||_F^2 / sum_{i<=k} sigma_i(G)^2 and
    both = ||U^T G V||_F^2 / sum_{i<=k} sigma_i(G)^2, each in [0, 1] for orthonormal U, V
    (Ky Fan), 1 exactly when U (and V) span G's top-k singular subspaces. ``both`` is the one an
    init that uses U and V together (LoRA-GA, LoRA-One) depends on.
    """
    G = G.double()
    k = U.shape[1]
    top = torch.linalg.svdvals(G)[:k].square().sum()
    UtG = U.double().T @ G
    left = UtG.square().sum() / top
    both = (UtG @ V.double()).square().sum() / top
    return left.item(), both.item()


# ---- the inits: (A0, B0) from the top singular triplets of G

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
