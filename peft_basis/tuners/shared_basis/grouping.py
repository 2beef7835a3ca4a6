"""Basis Sharing's groups and rank budget: which modules share a basis, and how many directions each group keeps.

A group is the same matrix type (``q_proj``) in ``n`` consecutive layers sharing one input basis; each
rank step of a group costs ``d_in + n * d_out`` parameters. Used by the whole-model tuner and the
layer-by-layer compressor alike, so both form the same groups, in the same order, with the same ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...budget import greedy_allocate, max_profitable_rank, rank_for_ratio
from ...calibration.fisher import output_fisher_key
from ...errors import ConfigError
from ...modules import layer_index, module_type
from .config import DEFAULT_SHARED_MODULES, SharedBasisConfig

__all__ = ["DENSE", "GLOBAL_MIN_FRACTION", "Group", "allocate_ranks", "by_type", "chunk", "group_gram", "loss_scores",
           "output_gram_members", "plan_groups", "rank_bounds", "record_groups", "scored_rank", "split_dense", "uniform_rank"]

# Global allocation: every group first gets this fraction of its uniform rank, so that no module is
# starved (a module with a flat whitened spectrum scores low per parameter everywhere, yet a
# rank-1 o_proj breaks the model); the rest of the budget goes where it removes most relative error.
GLOBAL_MIN_FRACTION = 0.25


@dataclass
class Group:
    key: str
    members: list[str]
    d_in: int
    d_out: int  # per member

    @property
    def cost(self) -> int:  # parameters per rank step
        return self.d_in + len(self.members) * self.d_out

    @property
    def dense_params(self) -> int:
        return len(self.members) * self.d_in * self.d_out

    def report(self, rank: int, relative_error: float | None) -> dict:
        """One row of ``compression_report`` (what the model card and benchmarks read)."""
        return {"group": self.key, "members": self.members, "rank": rank, "params": rank * self.cost,
                "dense_params": self.dense_params, "relative_error": relative_error}

    def dense_report(self) -> dict:
        """The row of a module kept dense (``dense_at_break_even``): its full rank, all its parameters, exact."""
        return {"group": self.key, "members": self.members, "rank": min(self.d_in, self.d_out),
                "params": self.dense_params, "dense_params": self.dense_params, "relative_error": 0.0, "dense": True}


def _group_key(type_name: str, members: list[str]) -> str:
    leaf = type_name.split("*.", 1)[-1].replace(".", "_")
    first, last = layer_index(members[0]), layer_index(members[-1])
    return f"{leaf}__{first}" if first == last else f"{leaf}__{first}-{last}"


def by_type(names: list[str]) -> dict[str, list[str]]:
    types: dict[str, list[str]] = {}
    for n in names:
        types.setdefault(module_type(n), []).append(n)
    for members in types.values():
        members.sort(key=lambda n: layer_index(n) or 0)
    return types


def chunk(type_name: str, members: list[str], n: int, shapes: dict) -> list[Group]:
    groups = []
    for i in range(0, len(members), n):
        chunk = members[i : i + n]
        d_in, d_out = shapes[chunk[0]]
        groups.append(Group(_group_key(type_name, chunk), chunk, d_in, d_out))
    return groups


def plan_groups(model_type: str | None, types: dict[str, list[str]], config: SharedBasisConfig,
                shapes: dict) -> list[Group]:
    """The groups for an integer ``group_size``: shared matrix types in chunks of ``group_size``
    consecutive layers, the others private (one layer each). Used by the whole-model and the
    layer-sequential paths alike, so both form the same groups in the same order."""
    shared = config.shared_modules
    if shared is None:
        shared = DEFAULT_SHARED_MODULES.get(model_type, [])
    else:
        unknown = [s for s in shared if not any(t == s or t.endswith("." + s) for t in types)]
        if unknown:
            leaves = sorted({t.split("*.", 1)[-1] for t in types})
            raise ConfigError(
                f"SharedBasisConfig(shared_modules={list(shared)!r}): {unknown} name no targeted matrix of this model, "
                f"so nothing would be shared for them. The targeted matrices are {leaves}; name some of those (the "
                "last part of the name is enough, e.g. 'q_proj'), or pass shared_modules=[] to share nothing."
            )
    groups = []
    for type_name, members in types.items():
        is_shared = any(type_name == s or type_name.endswith("." + s) for s in shared)
        groups += chunk(type_name, members, config.group_size if is_shared else 1, shapes)
    return groups


def group_gram(stats, members: list[str]):
    """The input Gram of a group: its members' distinct inputs (q/k/v of one layer share one), summed once; a
    one-member group streamed with its output Gram: that (:meth:`CalibrationStatistics.factorization_gram`)."""
    if len(members) == 1:
        return stats.factorization_gram(members[0])
    readers = {stats.sources[m]: m for m in members}  # one member per distinct input (stats.gram: clear errors)
    grams = [stats.gram(readers[k]) for k in sorted(readers)]
    return grams[0] if len(grams) == 1 else sum(grams)


def output_gram_members(model_type: str | None, names: list[str], config: SharedBasisConfig, shapes: dict) -> list[str]:
    """The targets ``calibrate`` may stream output Grams for (``config.output_grams``): private modules (a group of
    one), fitted on the dense inputs, whose output is narrower than their input (``W G W^T = Y^T Y`` is then the
    smaller statistic, and all their whitened factorisation reads)."""
    if not config.output_grams or config.inputs != "dense" or config.group_size == "auto":
        return []
    groups = plan_groups(model_type, by_type(names), config, shapes)
    return [g.members[0] for g in groups if len(g.members) == 1 and g.d_out < g.d_in]


def record_groups(config: SharedBasisConfig, groups: list[Group], ranks: list[int]) -> None:
    """Write the groups and ranks into the config, so ``PeftModel.from_pretrained`` rebuilds the exact shapes.
    ``rank_pattern`` is keyed by module, as PEFT expects (it warns about keys matching no target)."""
    for g, rank in zip(groups, ranks):
        config.groups[g.key] = g.members
        config.rank_pattern.update({m: rank for m in g.members})


# ---- the rank budget -----------------------------------------------------------------------------------
def uniform_rank(g: Group, config: SharedBasisConfig) -> int:
    """The group's own ratio's rank (at least 1, at most its full rank)."""
    r_max = min(g.d_in, len(g.members) * g.d_out)
    return max(1, min(rank_for_ratio(g.d_in, g.d_out, config.compression_ratio, len(g.members)), r_max))


def rank_bounds(groups: list[Group], config: SharedBasisConfig) -> tuple[int, list[int]]:
    """The budget, and the largest rank each group may get (uniform: its own ratio's rank + 1)."""
    budget = int((1 - config.compression_ratio) * sum(g.dense_params for g in groups))
    floors = [uniform_rank(g, config) for g in groups]
    if sum(f * g.cost for f, g in zip(floors, groups)) > budget:
        worst = min(groups, key=lambda g: g.dense_params)
        raise ValueError(
            f"compression_ratio={config.compression_ratio} leaves less than one rank for {worst.members[0]} "
            f"({worst.d_out}x{worst.d_in}); lower the ratio or exclude the smallest modules."
        )
    r_max = [min(g.d_in, len(g.members) * g.d_out) for g in groups]
    if config.rank_allocation == "uniform":
        return budget, [min(f + 1, m) for f, m in zip(floors, r_max)]
    return budget, r_max


# The rank ``allocate_ranks`` gives a module that stays dense (``SharedBasisConfig.dense_at_break_even``)
DENSE = 0


def allocate_ranks(groups: list[Group], config: SharedBasisConfig, spectrum, stats=None,
                   allow_dense: bool = True) -> list[int]:
    """Ranks within ``(1 - ratio)`` of the targeted dense parameters and within one rank step of it.

    ``spectrum(group)``: the group's whitened spectrum normalised to sum 1 (the relative error each
    direction removes). ``uniform``: every group at its own ratio's rank, plus at most one step where
    the leftover removes most error. ``global``: every group gets at least ``GLOBAL_MIN_FRACTION`` of
    its uniform rank; the rest goes to the directions removing the most relative error per parameter,
    a group counting once per member (so a shared group's error weighs as much as its members').
    ``loss``: the same floor, the rest by the estimated increase of the model's loss each direction's
    removal causes (:func:`loss_scores`, from the Fisher scores in ``stats``). With ``dense_at_break_even`` (and
    ``allow_dense``), private groups allocated their break-even rank get :data:`DENSE` (they keep their dense
    weight, which the budget counts whole)."""
    budget, caps = rank_bounds(groups, config)
    floors = [uniform_rank(g, config) for g in groups]
    if config.rank_allocation == "uniform":
        r_min = floors
    else:
        r_min = [max(1, int(GLOBAL_MIN_FRACTION * f)) for f in floors]
    if config.rank_allocation == "loss":
        scores = loss_scores(groups, stats)
        caps = [min(c, len(s)) for c, s in zip(caps, scores)]
    else:
        scores = [spectrum(g) * len(g.members) for g in groups]
    ranks = greedy_allocate(scores, [g.cost for g in groups], budget, r_min=r_min, r_max=caps)
    if not (allow_dense and config.dense_at_break_even and config.rank_allocation != "uniform"):
        return ranks
    # A private module allocated its break-even rank keeps its dense weight instead (a few parameters more, exact,
    # one product instead of two); the others share what is left, which may push more of them there: repeat.
    while True:  # ranks holds DENSE for the modules already kept dense
        dense = {i for i, (g, r) in enumerate(zip(groups, ranks))
                 if r == DENSE or (len(g.members) == 1 and r >= scored_rank(g))}
        rest = [i for i in range(len(groups)) if i not in dense]
        if all(ranks[i] == DENSE for i in dense):  # no module newly at break-even
            return ranks
        left = budget - sum(groups[i].dense_params for i in dense)
        try:
            again = greedy_allocate([scores[i] for i in rest], [groups[i].cost for i in rest], left,
                                    r_min=[r_min[i] for i in rest], r_max=[caps[i] for i in rest])
        except ValueError:  # the others' minimum ranks would not fit: stop at the last allocation that did
            return ranks
        ranks = [DENSE] * len(groups)
        for i, r in zip(rest, again):
            ranks[i] = r


def split_dense(groups: list[Group], ranks: list[int]) -> tuple[list[Group], list[int], list[Group]]:
    """An allocation split into the factorised groups with their ranks, and the groups kept :data:`DENSE`."""
    kept = [(g, r) for g, r in zip(groups, ranks) if r != DENSE]
    return [g for g, _ in kept], [r for _, r in kept], [g for g, r in zip(groups, ranks) if r == DENSE]


def scored_rank(g: Group) -> int:
    """How many leading directions of a group ``rank_allocation="loss"`` scores: up to the rank at which the
    factors stop saving parameters."""
    return max(1, min(g.d_in, g.d_out, max_profitable_rank(g.d_in, g.d_out)))


def loss_scores(groups: list[Group], stats) -> list[torch.Tensor]:
    """Per group, the estimated increase of the loss when each direction (in spectrum order) is dropped:
    ``0.5 sigma_i^2 F_i`` (``F_i`` the empirical Fisher of the direction's scale, ``sigma_i`` its whitened
    singular value; second-order Taylor around the dense model). The greedy allocation adds directions in
    spectrum order (a truncation keeps the leading ones), so each group's scores are replaced by the slopes
    of the upper concave hull of their running sum: non-increasing, and a run of directions is bought as a
    whole when a later one makes it worth it."""
    if stats is None:
        raise ValueError("rank_allocation='loss' needs Fisher scores: call `peft_basis.calibrate(model, config, "
                         "dataloader)` with this config first (it runs the backward passes).")
    out = []
    for g in groups:
        if len(g.members) != 1:
            raise ValueError(f"rank_allocation='loss' scores private factors; {g.key} shares a basis across "
                             f"{len(g.members)} layers. Pass group_size=1 (or shared_modules=[]).")
        (m,) = g.members
        key, sig = f"fisher/{m}", f"sigma2/{m}"
        if key not in stats.extra or sig not in stats.extra:
            raise ValueError(f"No Fisher scores for {m} in these statistics: calibrate with rank_allocation='loss' "
                             "(the backward passes compute them).")
        out.append(_concave_steps(0.5 * stats.extra[sig].double() * stats.extra[key].double().clamp_min(0)))
    return out


def output_scales(stats, members: list[str], config: SharedBasisConfig) -> list[torch.Tensor] | None:
    """Per member, the row scales of ``output_weights="fisher"`` (``None`` when off): ``F ** (power / 2)``, so the
    squared error of output ``j`` is weighted by ``F_j ** power``. ``F`` is floored at 1e-3 of its mean (an output
    the calibration never moved still counts a little) and the scales are normalised to mean 1."""
    if config.output_weights == "none" or config.output_weight_power == 0:
        return None
    scales = []
    for m in members:
        key = output_fisher_key(m)
        if stats is None or key not in stats.extra:
            raise ValueError(f"output_weights='fisher' needs the dense model's output Fisher of {m}: call "
                             "`peft_basis.calibrate(model, config, dataloader)` with this config (it runs the backward "
                             "passes).")
        f = stats.extra[key].double().clamp_min(0)
        f = f + 1e-3 * f.mean().clamp_min(1e-300)
        s = f.pow(config.output_weight_power / 2)
        scales.append(s / s.mean())
    return scales


def _concave_steps(scores: torch.Tensor) -> torch.Tensor:
    """The slopes of the least concave majorant of ``cumsum(scores)``: the best average gain per step of any
    prefix extension, non-increasing."""
    cum = torch.cat([scores.new_zeros(1), scores.cumsum(0)]).tolist()
    hull = [0]
    for i in range(1, len(cum)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (cum[b] - cum[a]) * (i - a) <= (cum[i] - cum[a]) * (b - a):
                hull.pop()
            else:
                break
        hull.append(i)
    steps = torch.empty(len(scores), dtype=torch.float64)
    for a, b in zip(hull, hull[1:]):
        steps[a:b] = (cum[b] - cum[a]) / (b - a)
    return steps
