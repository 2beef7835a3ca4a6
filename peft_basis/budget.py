"""Rank budgets: from a compression ratio to ranks, and greedy allocation of one global budget.

A *unit* is anything that owns a rank: one module (BASIS, Basel) or one group of modules sharing a
basis (Basis Sharing). Each rank step of a unit costs ``cost`` parameters (``d_in + n * d_out`` for a
factorised group) and buys a score (a squared singular value, an explained variance, a Fisher
score): allocation spends the budget where the score per parameter is highest.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

import torch


def max_profitable_rank(d_in: int, d_out: int, n: int = 1) -> int:
    """Largest rank at which factors ``k (d_in + n d_out)`` are still smaller than ``n d_in d_out``."""
    return (n * d_in * d_out - 1) // (d_in + n * d_out)


def rank_for_ratio(d_in: int, d_out: int, ratio: float, n: int = 1) -> int:
    """``k = floor(n d_in d_out (1 - ratio) / (d_in + n d_out))``: ratio is the fraction REMOVED."""
    return math.floor(n * d_in * d_out * (1 - ratio) / (d_in + n * d_out))


def greedy_allocate(
    scores: Sequence[torch.Tensor],
    costs: Sequence[int | Sequence[int]],
    budget: int,
    r_min: Sequence[int] | int = 0,
    r_max: Sequence[int] | int | None = None,
) -> list[int]:
    """Ranks maximising the summed score of the kept directions within ``budget`` parameters.

    ``scores[u]`` are unit ``u``'s per-direction scores in the order directions are added (sorted
    descending for spectra). Every unit first gets ``r_min``; then, repeatedly, the next direction
    with the best ``score / cost`` that still fits is added. Stops when nothing fits, so the spend is
    within one rank step of ``budget`` unless every unit is at ``r_max``.

    ``costs[u]`` is either one int (every rank step of the unit costs the same) or a sequence whose
    ``i``-th entry is the cost of the unit's ``i``-th direction (BASIS's ``r x r`` core: ``2 i + 1``).
    With growing step costs, pass scores sorted descending so the score per parameter falls.
    """
    n = len(scores)
    r_min = [r_min] * n if isinstance(r_min, int) else list(r_min)
    if r_max is None:
        r_max = [len(s) for s in scores]
    elif isinstance(r_max, int):
        r_max = [min(r_max, len(s)) for s in scores]
    else:
        r_max = [min(m, len(s)) for m, s in zip(r_max, scores)]
    ranks = [min(lo, hi) for lo, hi in zip(r_min, r_max)]

    def step_cost(u: int, i: int) -> int:
        c = costs[u]
        return int(c) if isinstance(c, int) else int(c[i])

    spent = sum(sum(step_cost(u, i) for i in range(ranks[u])) for u in range(n))
    if spent > budget:
        raise ValueError(
            f"The budget of {budget:,} parameters cannot give every module its minimum rank (that needs {spent:,}). "
            "Lower `r_min`, target fewer modules, or raise the budget."
        )
    heap = [(-float(scores[u][ranks[u]]) / step_cost(u, ranks[u]), u) for u in range(n) if ranks[u] < r_max[u]]
    heapq.heapify(heap)
    while heap:
        _, u = heapq.heappop(heap)
        cost = step_cost(u, ranks[u])
        if spent + cost > budget:
            continue  # this unit no longer fits; a cheaper one still might
        ranks[u] += 1
        spent += cost
        if ranks[u] < r_max[u]:
            heapq.heappush(heap, (-float(scores[u][ranks[u]]) / step_cost(u, ranks[u]), u))
    return ranks
