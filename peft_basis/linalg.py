"""The linear algebra every method shares: robust whitening, eigh, truncated (whitened) SVD.

Conventions: ``W`` is a weight as ``nn.Linear`` stores it, ``d_out x d_in`` (y = x W^T);
``G = X^T X`` is the Gram of the calibration inputs (``d_in x d_in``). All factorisations
run in float64 (the Grams of real models span many orders of magnitude) and return float32.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass

import torch

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


class CalibrationError(ValueError):
    """Calibration statistics are missing, empty or not finite."""


def check_finite_gram(gram: torch.Tensor, name: str = "module") -> None:
    if not torch.isfinite(gram).all():
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


def truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD ``U S Vh`` in float64."""
    with decomposition_threads():
        u, s, vh = torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]


@dataclass
class WhitenedFactors:
    """``W_i ~ coefficients_i @ basis`` for every weight in a group.

    ``basis`` is ``k x d_in`` (shared input-side basis, the paper's ``B^T``), each coefficient
    ``d_out_i x k`` (the paper's ``C_i^T``), ``singular_values`` the whitened spectrum (all of it,
    for rank decisions), ``errors`` each weight's calibration output error
    ``||(W_i - W_i_hat) S^T||_F^2`` measured with the group whitener.
    """

    basis: torch.Tensor
    coefficients: list[torch.Tensor]
    singular_values: torch.Tensor


def whitened_svd(weights: list[torch.Tensor], whitener: Whitener | None, rank: int) -> WhitenedFactors:
    """Truncated SVD of ``[W_1; ...; W_n] S^T`` (one basis shared by all the weights).

    With ``whitener=None`` this is plain SVD of the stacked weights (the data-free fallback).
    Minimises ``sum_i ||(W_i - W_i_hat) X^T||_F^2`` over rank-``rank`` factorisations whose
    input side is shared, where ``X^T X`` is the Gram behind the whitener.
    """
    stacked = torch.cat([w.detach().to(torch.float64) for w in weights], dim=0)
    max_rank = min(stacked.shape)
    if not 0 < rank <= max_rank:
        raise ValueError(f"rank {rank} is outside [1, {max_rank}] for a stacked weight of shape {tuple(stacked.shape)}")
    target = stacked if whitener is None else stacked @ whitener.matrix.T
    with decomposition_threads():
        u, s, vh = torch.linalg.svd(target, full_matrices=False)
    basis = vh[:rank] if whitener is None else vh[:rank] @ whitener.inverse.T
    left = u[:, :rank] * s[:rank]
    coefficients = list(torch.split(left, [w.shape[0] for w in weights], dim=0))
    return WhitenedFactors(
        basis=basis.to(torch.float32),
        coefficients=[c.to(torch.float32).contiguous() for c in coefficients],
        singular_values=s.to(torch.float32),
    )


def output_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    """Calibration output error ``tr((W - W_hat) G (W - W_hat)^T)``, relative to ``tr(W G W^T)``."""
    d = weight.detach().to(torch.float64) - approx.detach().to(torch.float64)
    g = gram.detach().to(torch.float64)
    w = weight.detach().to(torch.float64)
    num = torch.einsum("oi,ij,oj->", d, g, d)
    den = torch.einsum("oi,ij,oj->", w, g, w)
    return float(num / den.clamp_min(1e-300))


def warn_if_rank_deficient(whitener: Whitener, name: str, tokens: int) -> None:
    n = whitener.eigenvalues.numel()
    if whitener.clamped > n // 2:
        warnings.warn(
            f"{name}: the calibration inputs span only {n - whitener.clamped} of {n} dimensions ({tokens} tokens). "
            "The factors will be fitted to too little data and generalise poorly; calibrate on more tokens "
            f"(at least {4 * n} for this module).",
            stacklevel=3,
        )
