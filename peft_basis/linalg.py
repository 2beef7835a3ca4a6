"""The linear algebra every method shares, once: robust whitening, the whitened factorisation of a
weight (or of a group of weights sharing one input basis), canonical signs, calibration errors.

Conventions: ``W`` is a weight as ``nn.Linear`` stores it, ``d_out x d_in`` (y = x W^T);
``G = X^T X`` is the Gram of the calibration inputs (``d_in x d_in``). Factorisations run in
float64 (the Grams of real models span many orders of magnitude; ``factorize_group`` optionally float32) and return float32.

The factorisation of a group (:func:`factorize_group`) works on the SMALL side of the problem. With
``W`` the members' weights stacked (``m x d_in``, ``m = n * d_out``) and ``G`` the group's input Gram,
the whitened SVD of Basis Sharing / SVD-LLM (``W S^T = U Sigma V^T`` with ``S^T S = G``) has left
singular vectors ``U`` that are the eigenvectors of ``W G W^T`` and the optimal rank-``k``
approximation is the projection ``U_k U_k^T W``. So:

- ``m <= d_in``: one ``eigh`` of ``W G W^T`` (``m x m``); no whitener, no inverse.
- ``m > d_in``: a Cholesky factor ``G = L L^T`` (damped; robust eigendecomposition if Cholesky still
  fails), one ``eigh`` of ``(W L)^T (W L)`` (``d_in x d_in``), ``U_k`` = orthonormalised ``W L V_k``.

Either way the shared basis is ``U_k^T W`` (``k x d_in``, carries the scale) and each member's
coefficient is its block of rows of ``U_k`` (orthonormal columns over the group).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import torch

from .errors import CalibrationError
from .validation import all_finite

__all__ = [
    "DEFAULT_DAMPING", "CalibrationError", "GroupFactors", "OutputGram", "Whitener", "WhitenerCache", "anchored_error",
    "anchored_factorize", "anchored_target", "canonical_signs",
    "check_finite_gram", "decomposition_threads", "factorize_group", "group_spectrum", "member_error",
    "member_errors", "normalised_spectrum", "robust_eigh", "warn_if_rank_deficient", "whitened_svd",
]

# Eigenvalues of a Gram below DAMPING * mean(eigenvalue) are clamped up to it. Scale-free, so the
# same value works for fp16 models, 100 or 10^6 tokens, and dead features (a zero row/column):
# the whitener's condition number is at most 1/DAMPING and the directions we clamp carry (almost)
# no calibration energy, so truncation drops them anyway. SVD-LLM's fixed "add eps*I and retry"
# fails on exactly the Grams users hit (SVD-LLM issues #6, #7, #24, #52); eigh never does.
DEFAULT_DAMPING = 1e-6


@contextlib.contextmanager
def decomposition_threads():
    """Run CPU eigendecompositions/SVDs on ``PEFT_BASIS_DECOMPOSITION_THREADS`` threads (default 1).

    Why: MKL's multi-threaded ``eigh``/``svd`` scale poorly at the sizes we decompose (a few thousand
    rows) and collapse when anything else uses the cores. Measured on 2 cores with a second process
    busy, a 1536 x 1536 float64 ``eigh`` took 0.48 s on 1 thread and 5.6-15 s on 2 (the forward
    passes around it keep their threads: matmuls do scale)."""
    n = int(os.environ.get("PEFT_BASIS_DECOMPOSITION_THREADS", "1"))
    before = torch.get_num_threads()
    if n <= 0 or n >= before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_finite_gram(gram: torch.Tensor, name: str = "module") -> None:
    if not all_finite(gram):
        raise CalibrationError(
            f"The calibration Gram of {name} contains NaN or Inf. The model produced non-finite activations on the "
            "calibration data (often fp16 overflow): calibrate in float32 or bfloat16, or remove the offending samples."
        )


@dataclass
class Whitener:
    """``S`` with ``S^T S = G`` (damped), from a robust eigendecomposition ``G = Q diag(lam) Q^T``.

    ``matrix = diag(sqrt(lam)) Q^T`` and ``inverse = Q diag(1/sqrt(lam))``. ``clamped`` counts the
    eigenvalues raised to the damping floor (rank deficiency of the calibration data).
    """

    eigenvalues: torch.Tensor  # float64, ascending, already clamped
    eigenvectors: torch.Tensor  # float64 Q
    clamped: int

    @property
    def matrix(self) -> torch.Tensor:
        return self.eigenvalues.sqrt()[:, None] * self.eigenvectors.T

    @property
    def inverse(self) -> torch.Tensor:
        return self.eigenvectors * self.eigenvalues.rsqrt()[None, :]


def robust_eigh(gram: torch.Tensor, damping: float = DEFAULT_DAMPING, name: str = "module") -> Whitener:
    """Symmetric eigendecomposition that never fails on singular or badly conditioned Grams."""
    check_finite_gram(gram, name)
    g = gram.detach().to(torch.float64)
    g = 0.5 * (g + g.T)
    if g.abs().max() == 0:
        raise CalibrationError(
            f"The calibration Gram of {name} is all zeros: no calibration token reached it. Check that the dataloader "
            "yields non-empty `input_ids` and that the module is used in the forward pass."
        )
    try:
        with decomposition_threads():
            lam, q = torch.linalg.eigh(g)
    except RuntimeError:  # LAPACK did not converge: a tiny relative shift always cures it
        shift = 1e-10 * g.diagonal().abs().mean()
        with decomposition_threads():
            lam, q = torch.linalg.eigh(g + shift * torch.eye(g.shape[0], dtype=g.dtype, device=g.device))
    floor = damping * lam.clamp_min(0).mean()
    clamped = int((lam < floor).sum())
    return Whitener(lam.clamp_min(floor), q, clamped)


class WhitenerCache:
    """One :func:`robust_eigh` per distinct input of ``stats`` (q/k/v of a layer share one), computed when first
    asked for. ``covariance=True`` whitens ``X^T X / N`` (BASIS's scale) instead of the Gram itself; ``warn``
    says when the calibration tokens span less than half of an input's dimensions."""

    def __init__(self, stats, damping: float = DEFAULT_DAMPING, covariance: bool = False, warn: bool = False):
        self.stats, self.damping, self.covariance, self.warn = stats, damping, covariance, warn
        self._cache: dict[str, Whitener] = {}

    def __call__(self, module_name: str) -> Whitener:
        key = self.stats.sources[module_name]
        if key not in self._cache:
            gram = self.stats.covariance(module_name) if self.covariance else self.stats.grams[key]
            self._cache[key] = robust_eigh(gram, self.damping, name=module_name)
            if self.warn:
                warn_if_rank_deficient(self._cache[key], module_name, self.stats.num_tokens(module_name))
        return self._cache[key]


def canonical_signs(u: torch.Tensor) -> torch.Tensor:
    """Per column of ``u``, the sign that makes its largest-magnitude entry positive (zero columns: +1), so the
    same inputs give the same factors on any path."""
    idx = u.abs().argmax(dim=0)
    sign = torch.sign(u[idx, torch.arange(u.shape[1], device=u.device)])
    sign[sign == 0] = 1
    return sign


def whitened_svd(weight: torch.Tensor, whitener: Whitener | None, rank: int | None = None):
    """``W = U diag(s) R`` with ``U^T U = I`` and ``R G R^T = I`` (``G`` the whitener's Gram): the SVD of
    ``W S^T`` with the input side un-whitened. Returns ``U[:, :rank]``, the whole spectrum ``s`` and
    ``R[:rank]``, float64; ``whitener=None``: the plain SVD of ``W``."""
    w = weight.detach().to(torch.float64)
    with decomposition_threads():
        u, s, vh = torch.linalg.svd(w if whitener is None else w @ whitener.matrix.T, full_matrices=False)
    rank = len(s) if rank is None else rank
    r = vh[:rank] if whitener is None else vh[:rank] @ whitener.inverse.T
    return u[:, :rank], s, r


def warn_if_rank_deficient(whitener: Whitener, name: str, tokens: int) -> None:
    n = whitener.eigenvalues.numel()
    if whitener.clamped > n // 2:
        warnings.warn(
            f"{name}: the calibration inputs span only {n - whitener.clamped} of {n} dimensions ({tokens} tokens). "
            "The factors will be fitted to too little data and generalise poorly; calibrate on more tokens "
            f"(at least {4 * n} for this module).",
            stacklevel=3,
        )


# ---- the whitened factorisation of a group of weights sharing one input basis ------------------------
@dataclass
class OutputGram:
    """What the whitened factorisation of one module whose output is no wider than its input reads, streamed
    instead of its input Gram: ``matrix = Y^T Y`` of its outputs (bias removed; ``= W G W^T``), ``d_out x d_out``
    instead of ``d_in x d_in``, and ``input_trace = tr(G)`` (the damping's scale)."""

    matrix: torch.Tensor
    input_trace: float
    d_in: int


@dataclass
class GroupFactors:
    """``W_i ~ coefficients[i] @ basis`` for every member. ``eigenvalues``: the whole whitened spectrum
    (squared singular values of ``W S^T``, descending, float64), for rank decisions and errors."""

    basis: torch.Tensor  # k x d_in, float32
    coefficients: list[torch.Tensor]  # d_out_i x k, float32
    eigenvalues: torch.Tensor

    def truncate(self, rank: int) -> "GroupFactors":
        """The first ``rank`` components, as views: truncated by a rank or so, a copy would cost more (``memory``)."""
        if rank == self.basis.shape[0]:
            return self
        return GroupFactors(self.basis[:rank], [c[:, :rank] for c in self.coefficients], self.eigenvalues)


def _damped_gram(gram: torch.Tensor, damping: float, name: str) -> torch.Tensor:
    """``G + damping * mean(eigenvalue) * I`` in float64 (the mean eigenvalue is ``trace / d``)."""
    check_finite_gram(gram, name)
    g = gram.detach().to(torch.float64)  # symmetric: the engine mirrors the triangle it accumulates
    if g is gram:
        g = g.clone()
    floor = damping * float(g.diagonal().sum()) / g.shape[0]
    if floor <= 0:
        raise CalibrationError(
            f"The calibration Gram of {name} is all zeros: no calibration token reached it. Check that the dataloader "
            "yields non-empty `input_ids` and that the module is used in the forward pass."
        )
    g.diagonal().add_(floor)
    return g


def _input_factor(gram64: torch.Tensor, damping: float, name: str) -> torch.Tensor:
    """``L`` with ``L L^T = G`` (damped): Cholesky, or the robust eigendecomposition where Cholesky fails
    (fp32 accumulation can leave eigenvalues below the damping floor negative)."""
    with decomposition_threads():
        chol, info = torch.linalg.cholesky_ex(gram64)
    if int(info) == 0:
        return chol
    w = robust_eigh(gram64, damping, name=name)
    return w.eigenvectors * w.eigenvalues.sqrt()[None, :]  # Q diag(sqrt(lam)): L L^T = G (clamped)


def _small_side(stacked: torch.Tensor, gram: torch.Tensor | OutputGram | None, damping: float, name: str,
                scales: torch.Tensor | None = None):
    """(side, matrix, L): the symmetric matrix whose eigenvectors give the factors (``scales``: the output
    scales ``stacked``'s rows carry, which an :class:`OutputGram` does not)."""
    m, d = stacked.shape
    if gram is None:  # data-free: plain SVD of the stacked weights
        return ("out", stacked @ stacked.T, None) if m <= d else ("in", stacked.T @ stacked, None)
    if isinstance(gram, OutputGram):  # S W (G + floor I) W^T S = S Y^T Y S + floor (S W)(S W)^T
        if m > d or gram.matrix.shape[0] != m:
            raise ValueError(f"{name}: an output Gram serves one module whose output is no wider than its input.")
        check_finite_gram(gram.matrix, name)
        mat = gram.matrix.detach().to(stacked.dtype)
        if scales is not None:
            mat = scales[:, None] * mat * scales[None, :]
        floor = damping * gram.input_trace / gram.d_in  # what _damped_gram adds; tr(G) = 0: no token reached it
        return "out", torch.addmm(mat, stacked, stacked.T, alpha=floor), None
    g = _damped_gram(gram, damping, name)
    if m <= d:
        return "out", (stacked @ g.to(stacked.dtype)) @ stacked.T, None
    L = _input_factor(g, damping, name).to(stacked.dtype)  # the factor itself in float64: G may be ill-conditioned
    t = stacked @ L
    return "in", t.T @ t, t


def group_spectrum(weights: list[torch.Tensor], gram: torch.Tensor | OutputGram | None, damping: float = DEFAULT_DAMPING,
                   name: str = "module", output_scales: list[torch.Tensor] | None = None,
                   dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The whitened spectrum of a group (squared singular values of ``[W_1; ...; W_n] S^T``, descending,
    float64), from ``eigvalsh`` alone (of the rows scaled by ``output_scales``, as :func:`factorize_group`)."""
    stacked = _scaled_rows(weights, output_scales, dtype)
    _, mat, _ = _small_side(stacked, gram, damping, name, _joined(output_scales, dtype))
    with decomposition_threads():
        return torch.linalg.eigvalsh(mat).flip(0).clamp_min(0).to(torch.float64)


def _joined(scales: list[torch.Tensor] | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if scales is None else torch.cat([s.to(dtype) for s in scales])


def _scaled_rows(weights: list[torch.Tensor], output_scales: list[torch.Tensor] | None, dtype) -> torch.Tensor:
    """The members stacked in ``dtype``, each row times its output scale (when given)."""
    if output_scales is None:
        return torch.cat([w.detach().to(dtype) for w in weights], dim=0)
    return torch.cat([w.detach().to(dtype) * s.to(dtype)[:, None] for w, s in zip(weights, output_scales)], dim=0)


def factorize_group(weights: list[torch.Tensor], gram: torch.Tensor | OutputGram | None, rank: int,
                    damping: float = DEFAULT_DAMPING, name: str = "module",
                    output_scales: list[torch.Tensor] | None = None, dtype: torch.dtype = torch.float64) -> GroupFactors:
    """Rank-``rank`` factors with one input-side basis shared by ``weights`` (each ``d_out x d_in``),
    minimising ``sum_i ||(W_i - C_i B) X^T||_F^2`` where ``X^T X = gram`` (the group's summed input Gram, or
    one member's :class:`OutputGram`; ``None``: plain SVD). Deterministic signs (each basis direction's largest
    coefficient entry is positive), so the same inputs give the same tensors on any path.

    ``output_scales`` (one positive ``d_out_i`` vector per member): minimise ``sum_i ||S_i (W_i - C_i B)
    X^T||_F^2`` instead (``S_i`` diagonal): output rows that matter more are fitted better. Exact: the
    weighted problem is the plain one for ``S_i W_i``, whose coefficients are scaled back by ``S_i^-1``;
    ``eigenvalues`` are then the weighted spectrum. ``dtype``: the precision of the products and the
    eigendecomposition (``float32``: about twice as fast; the Gram's Cholesky factor is made in float64)."""
    stacked = _scaled_rows(weights, output_scales, dtype)
    max_rank = min(stacked.shape)
    if not 0 < rank <= max_rank:
        raise ValueError(f"rank {rank} is outside [1, {max_rank}] for a stacked weight of shape {tuple(stacked.shape)}")
    side, mat, t = _small_side(stacked, gram, damping, name, _joined(output_scales, dtype))
    with decomposition_threads():
        lam, vec = torch.linalg.eigh(mat)  # reads one triangle: no symmetrising needed
    lam, vec = lam.flip(0).clamp_min(0).to(torch.float64), vec.flip(1)
    if side == "out":
        u = vec[:, :rank]
    else:
        # U_k Sigma_k = (W L) V_k; directions with sigma ~ 0 carry nothing and get a zero column
        sigma = lam[:rank].sqrt().to(dtype)
        keep = sigma > sigma[0] * (1e-12 if dtype == torch.float64 else 1e-6) if rank else sigma > 0
        u = ((stacked if t is None else t) @ vec[:, :rank]) / torch.where(keep, sigma, torch.ones_like(sigma))
        u = u * keep
    u = u * canonical_signs(u)[None, :]
    basis = u.T @ stacked
    coefficients = list(torch.split(u, [w.shape[0] for w in weights], dim=0))
    if output_scales is not None:
        coefficients = [c / s.to(dtype)[:, None] for c, s in zip(coefficients, output_scales)]
    return GroupFactors(basis.to(torch.float32), [c.to(torch.float32).contiguous() for c in coefficients], lam)


def member_error(weight: torch.Tensor, coefficient: torch.Tensor, basis: torch.Tensor, gram: torch.Tensor,
                 relative: bool = True) -> float:
    """Calibration output error ``tr(D G D^T)`` of one member (``D = W - C B``), relative to ``tr(W G W^T)``."""
    w = weight.detach().to(torch.float64)
    g = gram.detach().to(torch.float64)
    d = w - coefficient.to(torch.float64) @ basis.to(torch.float64)
    num = float(((d @ g) * d).sum())
    if not relative:
        return num
    return num / max(float(((w @ g) * w).sum()), 1e-300)


def member_errors(weight: torch.Tensor, coefficient: torch.Tensor, basis: torch.Tensor, gram: torch.Tensor | None,
                  ranks: list[int]) -> tuple[list[float], float]:
    """Absolute calibration output errors ``tr(D_k G D_k^T)`` of one member at each rank ``k`` in ``ranks``
    (``D_k = W - C[:, :k] B[:k]``; ``gram=None``: Frobenius), and the reference ``tr(W G W^T)``. One
    ``D G`` product at the lowest rank; each further direction is a rank-one update."""
    w = weight.detach().to(torch.float64)
    c, b = coefficient.to(torch.float64), basis.to(torch.float64)
    g = None if gram is None else gram.detach().to(torch.float64)
    lo = min(ranks)
    wg = w if g is None else w @ g
    bg = b[:lo] if g is None else b[:lo] @ g
    dg = wg - c[:, :lo] @ bg  # (W - C B) G without a second d_out x d_in x d_in product
    d = w - c[:, :lo] @ b[:lo]
    err = float((dg * d).sum())
    out = {lo: err}
    for k in range(lo, max(ranks)):
        u, v = c[:, k], b[k]
        vg = v if g is None else g @ v
        # D' = D - u v^T: tr(D' G D'^T) = tr(D G D^T) - 2 u^T D G v + |u|^2 v^T G v;  D' G = D G - u (G v)^T
        err = err - 2 * float(u @ (dg @ v)) + float(u @ u) * float(v @ vg)
        dg = dg - torch.outer(u, vg)
        out[k + 1] = err
    ref = float((wg * w).sum())
    return [max(out[k], 0.0) for k in ranks], ref


def normalised_spectrum(eigenvalues: torch.Tensor) -> torch.Tensor:
    """The relative calibration error each direction removes (the whitened spectrum summing to 1)."""
    return eigenvalues / eigenvalues.sum().clamp_min(1e-300)


# ---- the anchored factorisation: fit the dense outputs from the compressed model's inputs -------------
def anchored_target(weight: torch.Tensor, gram_s: torch.Tensor, cross: torch.Tensor, anchor: float,
                    damping: float = DEFAULT_DAMPING, name: str = "module") -> torch.Tensor:
    """The full-rank least-squares fit ``W* = W (b C + (1 - b) Gs) Gs^-1 = (1 - b) W + b W C Gs^-1`` (float64).

    ``X`` (tokens x d_in): the module's inputs in the dense model, ``Xs``: in the model compressed so far;
    ``gram_s = Xs^T Xs``, ``cross = X^T Xs``. ``W*`` minimises ``||X_b W^T - Xs W*^T||`` with the target inputs
    ``X_b = b X + (1 - b) Xs``: ``b = 1`` reproduces the dense outputs from the compressed inputs (fully
    anchored), ``b = 0`` is the plain fit on the compressed inputs (``W* = W``). ``Gs`` is damped as every Gram
    here (``damping * mean eigenvalue``) and inverted by a Cholesky solve, never explicitly."""
    w = weight.detach().to(torch.float64)
    if anchor == 0:
        return w
    gs = _damped_gram(gram_s, damping, name)
    wc = w @ cross.detach().to(torch.float64)
    return (1 - anchor) * w + anchor * _solve_gram(gs, wc.T.contiguous(), damping, name).T  # W C Gs^-1


def _solve_gram(gram64: torch.Tensor, rhs: torch.Tensor, damping: float, name: str) -> torch.Tensor:
    """``G^-1 rhs`` for a damped symmetric Gram: a Cholesky solve, or (where fp32 accumulation left it not
    positive definite) the robust eigendecomposition's clamped inverse."""
    with decomposition_threads():
        chol, info = torch.linalg.cholesky_ex(gram64)
        if int(info) == 0:
            return torch.cholesky_solve(rhs, chol)
        w = robust_eigh(gram64, damping, name=name)
        return w.eigenvectors @ ((w.eigenvectors.T @ rhs) / w.eigenvalues[:, None])


def anchored_factorize(weights: list[torch.Tensor], grams_s: list[torch.Tensor], crosses: list[torch.Tensor],
                       rank: int, anchor: float, damping: float = DEFAULT_DAMPING, name: str = "module",
                       output_scales: list[torch.Tensor] | None = None) -> GroupFactors:
    """Rank-``rank`` factors ``W_i ~ C_i B`` (one basis ``B`` shared by the members) minimising
    ``sum_i ||X_b,i W_i^T - Xs_i (C_i B)^T||^2``: each member's output on its anchored target inputs,
    reproduced from its compressed inputs (:func:`anchored_target`).

    One member: reduced-rank regression, exact: truncate ``W*`` in the ``Gs`` norm (the whitened
    factorisation of ``W*`` with ``Gs``). Several members (a shared basis, each with its own ``Gs_i``): the
    basis from the stacked ``W*_i`` in the summed ``Gs`` norm (exact when the ``Gs_i`` are equal), then each
    member's coefficient refitted exactly for that basis in its own norm,
    ``C_i = W*_i Gs_i B^T (B Gs_i B^T)^-1``. ``output_scales``: each member's output error weighted per row, as
    in :func:`factorize_group` (exact for one member; for several it weights the shared basis's choice, and
    the refit, row by row, is unchanged by it)."""
    targets = [anchored_target(w, g, c, anchor, damping, name) for w, g, c in zip(weights, grams_s, crosses)]
    if len(targets) == 1:
        return factorize_group(targets, grams_s[0], rank, damping, name, output_scales)
    f = factorize_group(targets, sum(g.to(torch.float64) for g in grams_s), rank, damping, name, output_scales)
    basis = f.basis.to(torch.float64)
    coefficients = []
    for t, g in zip(targets, grams_s):
        gb = _damped_gram(g, damping, name) @ basis.T  # Gs_i B^T
        with decomposition_threads():
            coef = torch.linalg.solve(basis @ gb, (t @ gb).T).T  # (W* Gs B^T)(B Gs B^T)^-1
        coefficients.append(coef.to(torch.float32).contiguous())
    return GroupFactors(f.basis, coefficients, f.eigenvalues)


def anchored_error(weight: torch.Tensor, coefficient: torch.Tensor, basis: torch.Tensor, gram: torch.Tensor,
                   cross: torch.Tensor, gram_s: torch.Tensor) -> float:
    """``||X W^T - Xs (C B)^T||^2 / ||X W^T||^2``: how far the factorised module, fed the compressed model's inputs,
    is from the dense module's outputs, from the statistics alone (``gram = X^T X``, ``cross = X^T Xs``,
    ``gram_s = Xs^T Xs``; for instance on calibration tokens held apart from the fitted ones)."""
    w = weight.detach().to(torch.float64)
    approx = coefficient.to(torch.float64) @ basis.to(torch.float64)
    dense = float(((w @ gram.to(torch.float64)) * w).sum())
    mixed = float(((w @ cross.to(torch.float64)) * approx).sum())
    compressed = float(((approx @ gram_s.to(torch.float64)) * approx).sum())
    return max(dense - 2 * mixed + compressed, 0.0) / max(dense, 1e-300)
