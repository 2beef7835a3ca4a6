"""The two ways to build bases from the ``T x T`` Gram of the task vectors.

Both end as a *mixing* matrix ``P`` (``T x M``): basis ``s_m = sum_j P[j, m] v_j``, so the bases are
built by one more streaming pass over the task vectors (:func:`build_bases`), and a coefficient
matrix ``C`` (``M x T``) with ``v_t ~ mu + sum_m C[m, t] s_m`` (``mu = 0`` for AE).

- AE (Gram / autoencoder): ``P = softmax(A / tau, dim=0)``, ``C = W``, learned with Adam on
  ``tr(E^T G E) / T^2``, ``E = P W - I``: the reconstruction error ``||V P W - V||_F^2 / T^2``.
- PCA: centre V (``mu = V 1 / T``), eigh of the centred Gram ``Gc = J G J`` (``J = I - 11^T/T``):
  ``Gc = Q L Q^T``. Then ``U_m S_m = V J Q_m``, so ``P = J Q_M`` and ``C = Q_M^T`` -- exactly the
  original's ``U S`` basis and ``Vh`` coefficients, without stacking ``V`` (``D x T``) in memory.
"""

from __future__ import annotations

import math

import torch

from .sources import DeltaReader, row_blocks

DEFAULT_CHUNK = 4_000_000  # elements per task per block: T x 16 MB of float32


@torch.no_grad()
def accumulate_gram(reader: DeltaReader, chunk_elements: int = DEFAULT_CHUNK) -> torch.Tensor:
    """``G = V^T V`` in float64, one key (and one row block) at a time."""
    T = len(reader.tasks)
    G = torch.zeros(T, T, dtype=torch.float64)
    for key in reader.keys:
        for rows in row_blocks(reader.shapes[key], chunk_elements):
            X = reader.block(key, rows).double()  # T x n
            G += X @ X.T
    return G


def ae_factors(G: torch.Tensor, num_bases: int, steps: int = 6000, lr: float = 0.01, tau: float = 5.0,
               weight_decay: float = 1e-6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Learn ``A`` (``T x M``) and ``W`` (``M x T``) on the Gram; returns ``(P, W, info)``."""
    T = G.shape[0]
    # Scale-free loss: dividing G by its trace changes the optimum not at all and keeps Adam's eps
    # negligible whatever the size of the task vectors.
    scale = float(torch.trace(G)) / T or 1.0
    Gn = (G / scale).float()
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(T, num_bases, generator=gen).requires_grad_(True)
    W = torch.zeros(num_bases, T, requires_grad=True)
    opt = torch.optim.Adam([A, W], lr=lr, weight_decay=weight_decay)
    eye = torch.eye(T)
    for _ in range(steps):
        E = torch.softmax(A / tau, dim=0) @ W - eye
        loss = (E * (Gn @ E)).sum() / (T * T)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        P = torch.softmax(A / tau, dim=0)
        E = P @ W - eye
        loss = float((E * (Gn @ E)).sum() / (T * T))
        W = W.detach()
    return P.detach().double(), W.detach().double(), {"final_loss": loss * scale, "relative_error": _rel(G, P.detach(), W.detach())}


def pca_factors(G: torch.Tensor, num_bases: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """``(P, C, mean_weights, info)`` of PCA from the (uncentred) Gram; ``mu = V @ mean_weights``."""
    T = G.shape[0]
    J = torch.eye(T, dtype=torch.float64) - 1.0 / T
    Gc = J @ G.double() @ J
    evals, Q = torch.linalg.eigh((Gc + Gc.T) / 2)
    order = torch.argsort(evals, descending=True)[:num_bases]
    Q = Q[:, order]
    # Deterministic signs (eigh's are arbitrary): the largest coefficient of each component is positive.
    sign = torch.sign(Q.gather(0, Q.abs().argmax(0, keepdim=True))).squeeze(0)
    sign[sign == 0] = 1
    Q = Q * sign
    evals = evals[order].clamp_min(0)
    P = J @ Q
    mean_w = torch.full((T,), 1.0 / T, dtype=torch.float64)
    total = float(torch.trace(G))
    resid = float(torch.trace(Gc)) - float(evals.sum())
    return P, Q.T.contiguous(), mean_w, {"singular_values": evals.sqrt().tolist(),
                                         "relative_error": math.sqrt(max(resid, 0.0) / total) if total else 0.0}


def _rel(G, P, C, mean_w=None) -> float:
    """``||V_hat - V||_F / ||V||_F`` from the Gram alone."""
    T = G.shape[0]
    R = P.double() @ C.double()
    if mean_w is not None:
        R = R + mean_w.double()[:, None] @ torch.ones(1, T, dtype=torch.float64)
    E = R - torch.eye(T, dtype=torch.float64)
    total = float(torch.trace(G))
    return math.sqrt(max(float((E * (G.double() @ E)).sum()), 0.0) / total) if total else 0.0


@torch.no_grad()
def build_bases(reader: DeltaReader, mixing: torch.Tensor, dtype: torch.dtype = torch.float32,
                chunk_elements: int = DEFAULT_CHUNK) -> dict[str, torch.Tensor]:
    """``{key: (K x *shape)}`` with ``K = mixing.shape[1]`` stacked bases: ``V_key^T @ mixing`` per block."""
    K = mixing.shape[1]
    Pm = mixing.float()
    out: dict[str, torch.Tensor] = {}
    for key in reader.keys:
        shape = reader.shapes[key]
        dest = torch.empty((K, *shape), dtype=dtype)
        flat = dest.view(K, -1)
        width = max(1, math.prod(shape[1:])) if len(shape) > 1 else 1
        for rows in row_blocks(shape, chunk_elements):
            X = reader.block(key, rows)  # T x n
            sl = slice(None) if rows is None else slice(rows.start * width, rows.stop * width)
            flat[:, sl] = (Pm.T @ X).to(dtype)
        out[key] = dest
    return out
