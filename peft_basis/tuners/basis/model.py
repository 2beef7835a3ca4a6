"""BASIS: the calibration-aware bases, the global rank allocation, and the PEFT tuner.

What is computed, per target ``W`` (``d_out x d_in``; GPT-2's Conv1D is read transposed):

1. ``C = G / N``, the uncentred input covariance streamed by ``calibrate`` (one per distinct input: q/k/v
   share one). ``C = Q diag(lam) Q^T`` by :func:`~peft_basis.linalg.robust_eigh` in float64, eigenvalues
   below ``damping * mean(lam)`` raised to that floor, so a singular covariance never fails.
2. SVD of the scaled weight ``W S^T = U diag(sigma) V^T`` with ``S = diag(lam)^1/2 Q^T`` (``S^T S = C``);
   ``R = V^T S^-T = V^T diag(lam)^-1/2 Q^T`` (``k x d_in``). Then ``W = U diag(sigma) R`` exactly, ``U^T U = I``
   and ``R C R^T = I``. Signs are fixed (largest entry of each ``U`` column positive) so the bases are
   reproducible. Without statistics ``C = I`` (plain SVD; warned).
3. Allocation (:func:`basis_allocation`): ranks under one budget of trainable parameters (see
   :class:`~peft_basis.tuners.basis.config.BasisConfig`), with :func:`peft_basis.budget.greedy_allocate`.
4. The adapter stores ``U_r``, ``R_r`` (frozen) and the zero core ``M``; ``y = x W^T + ((x R_r^T) M^T) U_r^T``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, _ExcludedModule, check_target_module_exists
from torch import nn

from ...budget import greedy_allocate
from ...calibration.fisher import FisherPlan, fisher_key
from ...errors import CalibrationError
from ...linalg import WhitenerCache, canonical_signs, whitened_svd
from ...modules import find_linear_names, in_out_features, is_linear, layer_index, linear_weight, module_type
from ..base import PeftBasisTuner, _with_targets, warn_no_calibration
from ..guard import guarded_creation
from .config import BasisConfig
from .layer import BasisLayer


# ---- bases -------------------------------------------------------------------------------------------
@dataclass
class ModuleBasis:
    """The leading ``k`` directions of one module: ``U`` (``d_out x k``), ``R`` (``k x d_in``), float32, and the
    module's whole whitened spectrum ``sigma2`` (squared singular values, descending, float64)."""

    U: torch.Tensor
    R: torch.Tensor
    sigma2: torch.Tensor


def _base(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def module_bases(model: nn.Module, names: list[str], stats, damping: float, k: dict[str, int] | int,
                 ) -> dict[str, ModuleBasis]:
    """The BASIS directions of every module in ``names`` (see the module docstring), ``k`` per module."""
    modules = dict(model.named_modules())
    whitener = None if stats is None else WhitenerCache(stats, damping, covariance=True, warn=True)
    out = {}
    for n in names:
        layer = _base(modules[n])
        kn = k[n] if isinstance(k, dict) else k
        kn = min(kn, *in_out_features(layer))
        if stats is not None and n in stats and stats.sources[n] not in stats.grams:
            out[n] = _stored_basis(stats, n, kn)  # statistics that keep the directions instead of the Gram
            continue
        if stats is not None and n not in stats:
            stats.gram(n)  # raises the engine's "no statistics for this module" error
        u, s, r = whitened_svd(linear_weight(layer), None if whitener is None else whitener(n), kn)
        sign = canonical_signs(u)
        out[n] = ModuleBasis(U=(u * sign).float().contiguous(), R=(r * sign[:, None]).float().contiguous(),
                             sigma2=(s**2))
    return out


def bases_as_statistics(bases: dict[str, ModuleBasis]) -> dict[str, torch.Tensor]:
    """``CalibrationStatistics.extra`` entries that stand in for the Grams (what ``calibrate_sequential(...,
    keep_grams=False)`` keeps): each module's leading directions and its whitened spectrum."""
    extra = {}
    for n, b in bases.items():
        extra[f"basis_U/{n}"], extra[f"basis_R/{n}"], extra[f"basis_sigma2/{n}"] = b.U, b.R, b.sigma2
    return extra


def _stored_basis(stats, n: str, k: int) -> ModuleBasis:
    if f"basis_R/{n}" not in stats.extra:
        stats.gram(n)  # neither a Gram nor stored directions: the engine's "no statistics for this module" error
    U, R = stats.extra[f"basis_U/{n}"], stats.extra[f"basis_R/{n}"]
    if R.shape[0] < k:
        raise CalibrationError(
            f"These statistics keep {R.shape[0]} BASIS directions of {n} instead of its Gram (calibrate_sequential "
            f"with keep_grams=False, for another config), but this config needs {k}. Rerun calibrate_sequential with "
            "this config, or with keep_grams=True."
        )
    return ModuleBasis(U=U[:, :k].float(), R=R[:k].float(), sigma2=stats.extra[f"basis_sigma2/{n}"].double())


# ---- allocation --------------------------------------------------------------------------------------
@dataclass
class BasisAllocation:
    """Where BASIS spends its budget.

    ``ranks``: module -> rank. ``scores``: module -> per-direction scores (``eigen``: share of the module's
    calibration output energy; ``fisher``: empirical Fisher; ``uniform``: the energy shares, for reference),
    indexed in spectrum order (direction 0 = largest ``sigma``). ``selected``: module -> the kept direction
    indices, in the order they were added. ``budget``/``spent``: trainable parameters allowed and used.
    """

    method: str
    ranks: dict[str, int]
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    selected: dict[str, torch.Tensor] = field(default_factory=dict)
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    budget: int = 0
    spent: int = 0

    def rows(self) -> list[dict]:
        """One dict per module: name, layer index, module type (e.g. ``self_attn.q_proj``), rank, d_in, d_out."""
        out = []
        for n, r in self.ranks.items():
            t = module_type(n).split("*.", 1)[-1]
            d_in, d_out = self.shapes.get(n, (None, None))
            out.append({"module": n, "layer": layer_index(n), "type": t, "rank": r, "d_in": d_in, "d_out": d_out})
        return out

    def by_type(self) -> dict[str, dict[int, int]]:
        """``{module type: {layer: rank}}`` (what the docs plot)."""
        table: dict[str, dict[int, int]] = {}
        for row in self.rows():
            table.setdefault(row["type"], {})[row["layer"]] = row["rank"]
        return table


def _fisher_key(config: BasisConfig) -> str:
    """Where the Fisher scores live in the statistics: they depend on the trainable shape (see ``calibrate``)."""
    return "fisher" if config.trainable in ("core", "diagonal") else f"fisher_{config.trainable}"


def _fisher_scores(stats, n: str, config: BasisConfig) -> torch.Tensor:
    key = fisher_key(n, _fisher_key(config))
    if stats is None or key not in stats.extra:
        pipeline = "" if stats is None else stats.meta.get("pipeline", "")
        hint = (" These statistics come from calibrate_sequential with a config that needed no Fisher scores; rerun "
                "it with this config (it adds them layer by layer), or pass them to "
                "`calibrate(model, config, dataloader, statistics=...)` to add them on the whole model."
                if pipeline == "sequential" else "")
        raise CalibrationError(
            f"rank_allocation='fisher' with trainable={config.trainable!r} needs Fisher scores for {n}, which `calibrate(model, config, dataloader)` "
            f"computes with backward passes when the config says rank_allocation='fisher'.{hint}"
        )
    return stats.extra[key].double()


def _allocate(config: BasisConfig, names: list[str], shapes: dict[str, tuple[int, int]],
              bases: dict[str, ModuleBasis], stats) -> BasisAllocation:
    too_big = [n for n in names if config.r > min(shapes[n])]
    if too_big and not config.rank_pattern:
        n = too_big[0]
        raise ValueError(
            f"r={config.r} is above the size of {n} ({shapes[n][1]}x{shapes[n][0]}: at most rank "
            f"{min(shapes[n])}). Lower r, or exclude the small modules with `exclude_modules`."
        )
    energy = {n: bases[n].sigma2 / bases[n].sigma2.sum().clamp_min(1e-300) for n in names}
    if config.rank_pattern:  # an explicit allocation
        bad = {n: r for n, r in config.rank_pattern.items() if n in shapes and r > min(shapes[n])}
        if bad:
            n, r = next(iter(bad.items()))
            raise ValueError(f"rank_pattern gives {n} rank {r}, above its size (at most {min(shapes[n])}).")
        ranks = {n: int(config.rank_pattern.get(n, 0)) for n in names}
    elif config.rank_allocation == "uniform":
        if config.budget is not None:
            raise ValueError("`budget` applies to rank_allocation='eigen' or 'fisher'; uniform allocation spends r "
                             "everywhere. Leave budget=None or pick another allocation.")
        ranks = {n: config.r for n in names}
    else:
        budget = config.budget if config.budget is not None else sum(config.rank_cost(config.r, *shapes[n]) for n in names)
        caps, scores, orders = [], [], []
        for n in names:
            cap = min(config.max_rank, *shapes[n])
            if config.rank_allocation == "eigen":
                s = energy[n][:cap]
                order = torch.arange(len(s))
            else:
                f = _fisher_scores(stats, n, config).clamp_min(0) ** config.fisher_power
                cap = min(cap, len(f))
                order = torch.argsort(f[:cap], descending=True, stable=True)
                s = f[order]
            caps.append(cap)
            scores.append(s)
            orders.append(order)
        r_min = [min(config.r_min, c) for c in caps]
        needed = sum(config.rank_cost(r, *shapes[n]) for n, r in zip(names, r_min))
        if needed > budget:
            raise ValueError(
                f"The budget of {budget:,} trainable parameters cannot give every one of the {len(names)} modules its "
                f"r_min={config.r_min} (that needs {needed:,}). Lower r_min, target fewer modules, or raise the budget."
            )
        step_costs = [[config.step_cost(i, *shapes[n]) for i in range(c)] for n, c in zip(names, caps)]
        alloc = greedy_allocate(scores, step_costs, budget, r_min=r_min, r_max=caps)
        ranks = dict(zip(names, alloc))
        result = BasisAllocation(config.rank_allocation, ranks, budget=budget,
                                 shapes={n: shapes[n] for n in names})
        for n, order, r in zip(names, orders, alloc):
            result.selected[n] = order[:r]
            result.scores[n] = (energy[n] if config.rank_allocation == "eigen" else _fisher_scores(stats, n, config)).float()
        result.spent = sum(config.rank_cost(r, *shapes[n]) for n, r in zip(names, alloc))
        return result
    method = "explicit" if config.rank_pattern else "uniform"
    result = BasisAllocation(method, ranks, shapes={n: shapes[n] for n in names})
    for n in names:
        if config.rank_allocation == "fisher" and stats is not None and fisher_key(n, _fisher_key(config)) in stats.extra:
            f = _fisher_scores(stats, n, config)
            result.selected[n] = torch.argsort(f, descending=True, stable=True)[: ranks[n]]
            result.scores[n] = f.float()
        else:
            result.selected[n] = torch.arange(ranks[n])
            result.scores[n] = energy[n].float()
    result.spent = result.budget = sum(config.rank_cost(r, *shapes[n]) for n, r in ranks.items())
    return result


def _score_depth(config: BasisConfig, shapes: dict[str, tuple[int, int]]) -> dict[str, int]:
    """How many leading directions each module needs bases (and Fisher scores) for."""
    if config.rank_pattern:
        return {n: max(1, min(config.rank_pattern.get(n, 1), *s)) for n, s in shapes.items()}
    if config.rank_allocation == "uniform":
        return {n: min(config.r, *s) for n, s in shapes.items()}
    return {n: min(max(config.max_rank, config.r), *s) for n, s in shapes.items()}


def _config_bases(model: nn.Module, config: BasisConfig, names: list[str], stats) -> dict[str, ModuleBasis]:
    """The bases of ``names`` as deep as ``config`` can use them (what calibration scores and keeps)."""
    modules = dict(model.named_modules())
    shapes = {n: in_out_features(_base(modules[n])) for n in names}
    return module_bases(model, names, stats, config.damping, _score_depth(config, shapes))


def basis_allocation(model: nn.Module, config: BasisConfig, statistics=None) -> BasisAllocation:
    """The ranks (and scores) ``get_peft_model(model, config)`` would use, without building the adapter.
    ``statistics`` defaults to the ones ``calibrate`` attached to ``config``."""
    stats = statistics if statistics is not None else config.calibration_statistics
    names = BasisModel.resolve_target_names(model, config)
    modules = dict(model.named_modules())
    shapes = {n: in_out_features(_base(modules[n])) for n in names}
    if stats is None:
        warn_no_calibration("BasisConfig")
    depth = _score_depth(config, shapes)
    if config.rank_allocation == "fisher" and not config.rank_pattern:
        depth = {n: max(depth[n], len(_fisher_scores(stats, n, config))) for n in names}
    bases = module_bases(model, names, stats, config.damping, depth)
    return _allocate(config, names, shapes, bases, stats)


# ---- the tuner ---------------------------------------------------------------------------------------
class BasisModel(PeftBasisTuner):
    """PEFT tuner for :class:`BasisConfig`. ``allocations[adapter_name]`` holds each adapter's
    :class:`BasisAllocation` (ranks and scores; only ranks for an adapter loaded from disk)."""

    prefix = "basis_"
    tuner_layer_cls = BasisLayer
    method_label = "BASIS"

    @classmethod
    def saved_keys(cls, config) -> set[str]:
        parts = ["basis_core"] + ["basis_U"] * (config.trainable != "output") + ["basis_R"] * (config.trainable != "input")
        return {f"base_model.model.{n}.{p}" for n, r in config.rank_pattern.items() if r > 0 for p in parts}

    # ---- targets (also on a model that already carries BASIS adapters) ---------------------------------
    def _prepare_adapter_config(self, peft_config, model_config):
        if peft_config.target_modules is None:
            peft_config.target_modules = _default_targets(self.model)
        return peft_config

    @classmethod
    def resolve_target_names(cls, model: nn.Module, config) -> list[str]:
        if not any(isinstance(m, BaseTunerLayer) for m in model.modules()):
            return super().resolve_target_names(model, config)
        if config.target_modules is None:
            config = _with_targets(config, _default_targets(model))
        names = []
        for name, module in model.named_modules():
            if not name or ".base_layer" in name:
                continue
            match = check_target_module_exists(config, name)
            if match and not isinstance(match, _ExcludedModule) and is_linear(_base(module)):
                names.append(name)
        if not names:
            raise ValueError(f"target_modules={config.target_modules!r} matched no Linear layer in this model.")
        return names

    # ---- calibration: Fisher scores ------------------------------------------------------------------
    has_layer_summary = True

    @classmethod
    def needs_fisher(cls, config: BasisConfig) -> bool:
        return config.rank_allocation == "fisher"

    @classmethod
    def layer_summary(cls, model: nn.Module, config: BasisConfig, names: list[str], stats) -> dict[str, torch.Tensor]:
        """What ``get_peft_model`` needs of these modules' Grams, computed while their layer is loaded: the
        directions (as many as this config can use) and spectra. ``calibrate_sequential(..., keep_grams=False)``
        keeps these instead of the Grams (``r_max x (d_in + d_out)`` floats per module instead of ``d_in^2``)."""
        return bases_as_statistics(_config_bases(model, config, names, stats))

    @classmethod
    def fisher_plan(cls, model: nn.Module, config: BasisConfig, names: list[str], stats, *,
                    progress: bool = False) -> FisherPlan | None:
        """For ``rank_allocation='fisher'``: the directions of ``names`` whose empirical Fisher the allocation
        scores (``min(r_max, d_in, d_out)`` per module), from their input covariances in ``stats``. Used by
        ``calibrate`` (whole model: one forward and one backward pass per batch) and ``calibrate_sequential``
        (layer by layer, ``names`` one layer's; the pipeline's backward sweep)."""
        if not cls.needs_fisher(config):
            return None
        bases = _config_bases(model, config, names, stats)
        if config.trainable in ("core", "diagonal"):
            return FisherPlan({n: (b.U, b.R) for n, b in bases.items()}, "diagonal", "fisher",
                              meta={"fisher_max_rank": config.max_rank})
        # a whole trainable column (output) / row (input) per direction: the Fisher summed over the free side
        side = 0 if config.trainable == "output" else 1
        return FisherPlan({n: (None, b.R) if side == 0 else (b.U, None) for n, b in bases.items()}, "full",
                          _fisher_key(config), reduce_dim=side, meta={"fisher_max_rank": config.max_rank})

    # ---- building ------------------------------------------------------------------------------------
    def inject_adapter(self, model, adapter_name, autocast_adapter_dtype=True, low_cpu_mem_usage=False,
                       state_dict=None):
        # Prepared here rather than in _pre_injection_hook, which PEFT does not call for add_adapter.
        with guarded_creation(type(self), model, self.peft_config, adapter_name) as config:
            if config.target_modules is None:
                config.target_modules = _default_targets(model)
            self._prepare(model, config, adapter_name)
            try:
                super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                                       low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
            finally:
                self._pending = {}

    def _prepare(self, model: nn.Module, config: BasisConfig, adapter_name: str) -> None:
        if not hasattr(self, "allocations"):
            self.allocations: dict[str, BasisAllocation] = {}
        names = self.resolve_target_names(model, config)
        modules = dict(model.named_modules())
        shapes = {n: in_out_features(_base(modules[n])) for n in names}
        stats = config.calibration_statistics
        self._pending: dict[str, dict] = {}
        if config.rank_pattern and stats is None:  # loading: shapes from the config, values from the checkpoint
            self.check_rank_pattern_targets("BASIS", config.rank_pattern, shapes)
            for n, r in config.rank_pattern.items():
                d_in, d_out = shapes[n]
                if r > min(d_in, d_out):
                    raise ValueError(f"rank_pattern gives {n} rank {r}, above its size (at most {min(d_in, d_out)}).")
                if r > 0:
                    self._pending[n] = self._spec(modules[n], torch.zeros(d_out, r), torch.zeros(r, d_in), config)
            self.allocations[adapter_name] = BasisAllocation("loaded", dict(config.rank_pattern), shapes=shapes,
                                                             budget=config.budget or 0,
                                                             spent=sum(config.rank_cost(r, *shapes[n]) for n, r in config.rank_pattern.items()))
            return
        if stats is None:
            if config.rank_allocation == "fisher":
                _fisher_scores(None, names[0], config)
            warn_no_calibration("BasisConfig")
        depth = _score_depth(config, shapes)
        if config.rank_allocation == "fisher" and stats is not None:
            depth = {n: max(depth[n], len(_fisher_scores(stats, n, config))) for n in names}
        bases = module_bases(model, names, stats, config.damping, depth)
        alloc = _allocate(config, names, shapes, bases, stats)
        for n in names:
            idx = alloc.selected[n]
            if len(idx) == 0:
                continue
            b = bases[n]
            self._pending[n] = self._spec(modules[n], b.U[:, idx], b.R[idx], config)
        config.rank_pattern = {n: int(r) for n, r in alloc.ranks.items()}
        config.budget = alloc.budget
        self.allocations[adapter_name] = alloc

    @staticmethod
    def _spec(module: nn.Module, U: torch.Tensor, R: torch.Tensor, config: BasisConfig) -> dict:
        dtype = _base(module).weight.dtype
        r = R.shape[0]
        d_out, d_in = U.shape[0], R.shape[1]
        shape = {"output": (d_out, r), "input": (r, d_in), "core": (r, r), "diagonal": (r,)}[config.trainable]
        return {"U": None if config.trainable == "output" else U.to(dtype).contiguous(),
                "R": None if config.trainable == "input" else R.to(dtype).contiguous(),
                "core": torch.zeros(shape, dtype=dtype),
                "scaling": config.alpha / r if config.trainable in ("output", "input") else 1.0}

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        spec = self._pending.pop(current_key, None)
        if spec is None:
            return  # rank 0: this module is left as it is
        if isinstance(target, BasisLayer):
            target.update_layer(adapter_name, **spec)
            return
        if isinstance(target, BaseTunerLayer):
            raise ValueError(f"{current_key} already carries a {type(target).__name__}; BASIS wraps plain Linears.")
        layer = BasisLayer(target)
        layer.update_layer(adapter_name, **spec)
        self._replace_module(parent, target_name, layer, target)

    # ---- sizes ---------------------------------------------------------------------------------------
    def basis_layers(self, adapter_name: str = "default") -> dict[str, BasisLayer]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, BasisLayer) and adapter_name in m.basis_core}

    def ranks(self, adapter_name: str = "default") -> dict[str, int]:
        return {n: m.rank(adapter_name) for n, m in self.basis_layers(adapter_name).items()}

    def trainable_parameters(self, adapter_name: str = "default") -> int:
        return sum(m.basis_core[adapter_name].numel() for m in self.basis_layers(adapter_name).values())

    def stored_parameters(self, adapter_name: str = "default") -> int:
        """Everything the adapter file holds: cores plus the frozen ``U``, ``R``."""
        return sum(m.basis_core[adapter_name].numel()
                   + sum(store[adapter_name].numel() for store in (m.basis_U, m.basis_R) if adapter_name in store)
                   for m in self.basis_layers(adapter_name).values())


def _default_targets(model: nn.Module) -> set[str]:
    names = [n.removesuffix(".base_layer") for n in find_linear_names(model)]
    if not names:
        raise ValueError("BasisConfig: found no nn.Linear / Conv1D inside repeated blocks of this model; pass "
                         "`target_modules` explicitly.")
    return {n.rsplit(".", 1)[-1] for n in names}

