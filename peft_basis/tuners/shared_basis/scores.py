"""What Basis Sharing's backward passes score (``rank_allocation="loss"``, ``output_weights="fisher"``).

Loss-aware ranks need, per module, the Fisher of each whitened direction's scale; output weights need the output
Fisher per output dimension. Both come from one pass (:mod:`peft_basis.calibration.fisher`); this module says
which directions it scores.
"""

from __future__ import annotations

from contextlib import closing

import torch
from tqdm.auto import tqdm

from ...calibration.fisher import FisherPlan
from ...linalg import factorize_group
from ...modules import in_out_features, linear_weight
from ...parallel import map_decompositions
from .grouping import Group, scored_rank

__all__ = ["fisher_plan", "needs_fisher"]


def needs_fisher(config) -> bool:
    """Whether ``config``'s fit reads the dense model's Fisher pass: loss-aware ranks or output weights."""
    return config.rank_allocation == "loss" or config.output_weights != "none"


def fisher_plan(model, config, names: list[str], stats, progress: bool = False) -> FisherPlan:
    """Loss-aware ranks: each module's leading whitened directions (``W = U diag(sigma) R``, dense-input Grams),
    as many as can be kept profitably (the Fisher of each direction's scale is what dropping it costs in loss).
    Output weights: each module's output moments (with the directions, or alone)."""
    moments = config.output_weights != "none"  # the output Fisher, per output dimension
    if config.rank_allocation != "loss":
        return FisherPlan({n: (None, None) for n in names}, "outputs", "fisher", output_moments=True)
    # W = U diag(sigma) R (R G R^T = I) from the small side's eigendecomposition, as the factors themselves are
    # computed: no whitener of the (large) input side, independent modules side by side
    modules = {n: model.get_submodule(n) for n in names}

    def directions_of(n: str):
        d_in, d_out = in_out_features(modules[n])
        k = scored_rank(Group(n, [n], d_in, d_out))
        f = factorize_group([linear_weight(modules[n])], stats.factorization_gram(n), k, config.damping, n)
        sigma2 = f.eigenvalues[:k]
        sigma = sigma2.sqrt()
        r = f.basis.double() / torch.where(sigma > 0, sigma, torch.ones_like(sigma))[:, None]
        return f.coefficients[0].contiguous(), r.float().contiguous(), sigma2.float()

    directions, extra = {}, {}
    with closing(map_decompositions(directions_of, names)) as done:
        for n, (u, r, sigma2) in zip(tqdm(names, desc="fisher directions", unit="module", disable=not progress),
                                     done):
            directions[n] = (u, r)
            extra[f"sigma2/{n}"] = sigma2
    return FisherPlan(directions, "diagonal", "fisher", extra=extra, output_moments=moments)
