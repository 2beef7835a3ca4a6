"""Basis Sharing's PEFT tuner: groups planned (:mod:`.grouping`), each group factorised once by the shared
whitened factorisation (:func:`peft_basis.linalg.factorize_group`), ranks within the exact budget, and the
factors injected as :class:`~.layer.SharedBasisLayer` (shared bases stored once, on the tuner).

Each group is factorised once: under uniform allocation at its largest possible rank and truncated after
allocation; under global allocation the spectra come from ``eigvalsh`` alone, then each group is factorised
at its rank. ``group_size="auto"`` compares groupings per matrix type by the model's loss on calibration
tokens (see :class:`~.config.SharedBasisConfig`).
"""

from __future__ import annotations

import warnings
from contextlib import closing

import torch
from torch import nn
from tqdm.auto import tqdm

from ...budget import greedy_allocate
from ...calibration.pipelines.whole_model import model_loss
from ...calibration.fisher import FisherPlan
from ...calibration.statistics import with_held_apart_grams
from ...linalg import (
    GroupFactors,
    factorize_group,
    group_spectrum,
    member_errors,
    normalised_spectrum,
)
from ...parallel import map_decompositions
from ...modules import in_out_features, linear_weight
from ..base import PeftBasisTuner, warn_no_calibration
from ..factorized import dense_is_dropped, drop_dense_weight, factorized_forward
from .config import SharedBasisConfig
from .grouping import (
    Group,
    allocate_ranks,
    by_type,
    chunk,
    group_gram,
    output_gram_members,
    output_scales,
    plan_groups,
    rank_bounds,
    record_groups,
    split_dense,
    uniform_rank,
)
from .anchored import AnchoredCompressor, held_apart_batches
from .auto import keep_selection_tokens, selection_batches
from .layer import SharedBasisLayer, in_layer_layout, saved_basis_name, saved_coefficient_name
from .scores import fisher_plan, needs_fisher
from .sequential import AdapterSink, SharedBasisLayerCompressor, StatisticsSink


class SharedBasisModel(PeftBasisTuner):
    """PEFT tuner for :class:`SharedBasisConfig`. After creation ``compression_report`` lists every
    group: members, rank, stored parameters and relative calibration output error."""

    prefix = "sb_"
    tuner_layer_cls = SharedBasisLayer
    uses_shared_state = True
    method_label = "Basis Sharing"

    @classmethod
    def is_loading(cls, config) -> bool:
        return bool(config.groups)

    @classmethod
    def saved_keys(cls, config) -> set[str]:
        keys = {saved_basis_name(g) for g in config.groups}
        return keys | {saved_coefficient_name(m) for members in config.groups.values() for m in members}

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """No upcast: the factors ARE the model's weights now (PEFT would upcast the per-layer coefficients of an
        fp16/bf16 model to fp32 but not the shared bases, which live on the tuner). They stay in the model's dtype."""

    @classmethod
    def layer_compressor(cls, config, output_dir: str, *, statistics=None, inputs: str | None = None, **options):
        """Layer-by-layer compression (``peft_basis.compress_sequential``): ``inputs`` (default: the config's)
        ``"dense"`` / ``"compressed"`` (:mod:`.sequential`) or ``"anchored"`` (:mod:`.anchored`)."""
        inputs = inputs or config.inputs
        if inputs == "anchored":
            if options:
                raise TypeError(f"inputs='anchored' takes no {sorted(options)}.")
            return AnchoredCompressor(config, AdapterSink(output_dir), statistics=statistics)
        if config.output_weights != "none":
            raise ValueError("compress_sequential with output_weights='fisher' needs inputs='anchored'; for dense inputs "
                             "use calibrate + get_peft_model (the whole model in memory).")
        if config.rank_allocation == "loss":
            raise ValueError("compress_sequential with rank_allocation='loss' needs inputs='anchored'; for dense "
                             "inputs use calibrate + get_peft_model (the whole model in memory).")
        return SharedBasisLayerCompressor(config, output_dir, inputs=inputs, **options)

    @classmethod
    def layer_calibrator(cls, config, statistics=None):
        """``inputs="anchored"``: the factors themselves are the statistics (``get_peft_model`` injects them)."""
        if isinstance(config, SharedBasisConfig) and config.inputs == "anchored":
            return AnchoredCompressor(config, StatisticsSink(), statistics=statistics)
        return None

    # ---- calibration: Fisher scores of each module's directions, for rank_allocation="loss" --------------
    @classmethod
    def needs_fisher(cls, config) -> bool:
        return isinstance(config, SharedBasisConfig) and needs_fisher(config)

    @classmethod
    def fisher_plan(cls, model, config, names: list[str], stats, *, progress: bool = False) -> FisherPlan | None:
        """What the backward passes score (:func:`.scores.fisher_plan`): each module's whitened directions for
        loss-aware ranks, its output Fisher for output weights."""
        if not cls.needs_fisher(config):
            return None
        return fisher_plan(model, config, names, stats, progress)

    def _check_new_adapter_config(self, config) -> None:
        super()._check_new_adapter_config(config)
        if sum(isinstance(c, SharedBasisConfig) for c in self.peft_config.values()) > 1:
            raise ValueError(
                "A model holds one Basis Sharing adapter: it replaces the dense weights. To compare settings, compress "
                "fresh copies of the base model; to fine-tune the compressed model, stack a LoRA on the merged model."
            )

    @classmethod
    def output_gram_modules(cls, model, config, names: list[str]) -> list[str]:
        if not isinstance(config, SharedBasisConfig):
            return []
        shapes = {n: in_out_features(model.get_submodule(n)) for n in names}
        return output_gram_members(getattr(getattr(model, "config", None), "model_type", None), names, config, shapes)

    # ---- calibration: what group_size="auto" scores on (see .auto) -------------------------------------
    @classmethod
    def extra_calibration(cls, model, config: SharedBasisConfig, stats, dataloader, *, max_batches=None,
                          progress=True):
        """Called by ``calibrate`` after the Gram pass: for ``group_size="auto"``, keep the held-apart
        calibration tokens the grouping is chosen on."""
        if config.group_size == "auto" and config.auto_selection_tokens > 0:
            keep_selection_tokens(stats, dataloader, config.auto_selection_tokens, max_batches)

    @classmethod
    def held_apart_batches(cls, config, n_batches: int) -> list[int]:
        """``group_size="auto"`` chooses groupings by the model's loss on calibration batches the Grams never saw
        (the last ``holdout_fraction`` of them; their Grams are added back once the choice is made)."""
        if isinstance(config, SharedBasisConfig) and config.group_size == "auto" and config.auto_selection_tokens > 0:
            return held_apart_batches(n_batches, config.holdout_fraction)
        return []

    def _model_loss(self, modules: dict, overrides: dict, batches: list[dict]) -> float:
        """Mean token loss of the model on ``batches`` with the modules in ``overrides``
        (name -> (basis, coefficient)) computing through those factors instead of their dense weights."""
        forwards = {}
        for m, (basis, coef) in overrides.items():
            bias = getattr(modules[m], "bias", None)
            forwards[modules[m]] = lambda x, b=basis, c=coef, bb=bias: factorized_forward(x, b, c, bb)
        return model_loss(self.model, batches, forwards)

    # ---- building the factors --------------------------------------------------------------------
    def _pre_injection_hook(self, model: nn.Module, config: SharedBasisConfig, adapter_name: str) -> None:
        if not hasattr(self, "sb_bases"):
            self.sb_bases = nn.ModuleDict()
        names = self.resolve_target_names(model, config)
        modules = dict(model.named_modules())
        shapes = {n: in_out_features(modules[n]) for n in names}
        self._pending: dict[str, torch.Tensor] = {}
        self._member_group: dict[str, str] = {}
        bases = nn.ParameterDict()
        if config.groups:  # loading: shapes from the config, values from the checkpoint; no SVD
            self.check_rank_pattern_targets("Basis Sharing", {m: 0 for ms in config.groups.values() for m in ms}, shapes)
            missing = [n for n in names if not any(n in m for m in config.groups.values())
                       and n not in config.dense_modules]
            if missing:
                raise ValueError(
                    f"This Basis Sharing adapter was made for another model: it has no factors for {missing[:3]}. Load "
                    "it onto the base model it was created from."
                )
            for key, members in config.groups.items():
                rank = config.rank_pattern[members[0]]
                d_in, d_out = shapes[members[0]]
                dtype = modules[members[0]].weight.dtype
                bases[key] = nn.Parameter(torch.zeros(rank, d_in, dtype=dtype))
                for m in members:
                    self._member_group[m] = key
                    self._pending[m] = torch.zeros(d_out, rank, dtype=dtype)
        elif config.calibration_statistics is not None and "factors" in config.calibration_statistics.meta:
            self.compression_report = self._inject_fitted(modules, names, config, bases)
        else:
            self.compression_report = self._compress(modules, names, shapes, config, bases)
        self.sb_bases[adapter_name] = bases

    def _inject_fitted(self, modules, names, config: SharedBasisConfig, bases: nn.ParameterDict) -> list[dict]:
        """Factors fitted by the layer-sequential pipeline (``inputs="anchored"``), injected as they are."""
        stats = config.calibration_statistics
        fitted = stats.meta["factors"]
        kept_dense = list(fitted.get("dense", []))  # dense_at_break_even: no factors, the base model's weights
        missing = [n for n in names if not any(n in ms for ms in fitted["groups"].values()) and n not in kept_dense]
        if missing:
            raise ValueError(f"The attached statistics hold no fitted factors for {missing[:3]}: they were made for "
                             "other target modules. Run `calibrate(model, config, dataloader)` with this config.")
        for key, members in fitted["groups"].items():  # copies: training must not edit the attached statistics
            dtype = modules[members[0]].weight.dtype
            bases[key] = nn.Parameter(stats.extra[f"factors/basis/{key}"].to(dtype, copy=True))
            for m in members:
                self._member_group[m] = key
                self._pending[m] = stats.extra[f"factors/coefficient/{m}"].to(dtype, copy=True)
            config.groups[key] = list(members)
            config.rank_pattern.update({m: int(fitted["ranks"][key]) for m in members})
        config.dense_modules = sorted(kept_dense)
        if not config.keep_dense_weight:
            for m in self._member_group:
                if isinstance(modules[m], nn.Linear) and not dense_is_dropped(modules[m]):
                    drop_dense_weight(modules[m])
        return [dict(r) for r in fitted["report"]]

    def _plan(self, types: dict, config: SharedBasisConfig, shapes: dict) -> list[Group]:
        return plan_groups(getattr(getattr(self.model, "config", None), "model_type", None), types, config, shapes)

    def _compress(self, modules, names, shapes, config: SharedBasisConfig, bases: nn.ParameterDict) -> list[dict]:
        stats = config.calibration_statistics
        if stats is None:
            warn_no_calibration("SharedBasisConfig")
        warned: set = set()
        precision = getattr(torch, config.decomposition_dtype)

        def weights(g: Group) -> list[torch.Tensor]:
            return [linear_weight(modules[m]).detach() for m in g.members]

        def scales(g: Group) -> list[torch.Tensor] | None:  # output_weights="fisher": each output row's weight
            return output_scales(stats, g.members, config)

        def gram(members: list[str]) -> torch.Tensor | None:
            if stats is None:
                return None
            keys = tuple(sorted({stats.sources[m] for m in members}))
            tokens = sum(stats.tokens[k] for k in keys)
            d = shapes[members[0]][0]
            if tokens < d // 2 and keys not in warned:
                warned.add(keys)
                warnings.warn(
                    f"{members[0]}: the calibration inputs span at most {tokens} of {d} dimensions ({tokens} tokens). "
                    f"The factors will be fitted to too little data and generalise poorly; calibrate on more tokens "
                    f"(at least {4 * d} for this module).",
                    stacklevel=4,
                )
            return group_gram(stats, members)

        def own_gram(m: str) -> torch.Tensor | None:
            return None if stats is None else stats.gram(m)

        def factorise(g: Group, rank: int, eval_ranks: list[int], f: GroupFactors | None = None, g_gram=None, final=False):
            """Factors at ``rank`` and the absolute member errors at each of ``eval_ranks`` (each member on its OWN
            Gram: the summed group Gram would flatter sharing); ``final``: in the layers' layout, made in the worker."""
            if f is None:
                g_gram = gram(g.members) if g_gram is None else g_gram
                f = factorize_group(weights(g), g_gram, rank, config.damping, g.members[0], scales(g), precision)
            errs: dict[int, list[float]] = {k: [] for k in eval_ranks}
            refs = []
            if len(g.members) == 1:  # the member's Gram is the group's: errors are the discarded spectrum
                tail = torch.cat([f.eigenvalues.flip(0).cumsum(0).flip(0), f.eigenvalues.new_zeros(1)])
                for k in eval_ranks:
                    errs[k].append(float(tail[k]))
                refs.append(float(tail[0]))
            else:
                for m, coef in zip(g.members, f.coefficients):
                    e, ref = member_errors(linear_weight(modules[m]), coef, f.basis, own_gram(m), eval_ranks)
                    for k, v in zip(eval_ranks, e):
                        errs[k].append(v)
                    refs.append(ref)
            return (in_layer_layout(f, modules[g.members[0]].weight.dtype) if final else f), errs, refs

        def release(g: Group) -> None:
            # The dense weights are not needed once a group's factors are final: drop them now, so the peak
            # memory is not the dense model plus all the factors. (Conv1D keeps its weight until injection:
            # its shape is read from the weight.)
            if config.keep_dense_weight:
                return
            for m in g.members:
                mod = modules[m]
                if isinstance(mod, nn.Linear) and not dense_is_dropped(mod):
                    drop_dense_weight(mod)

        types = by_type(names)
        kept_dense: list[Group] = []
        factors: dict[str, GroupFactors] = {}
        errors: dict[str, dict[int, list[float]]] = {}
        refs: dict[str, list[float]] = {}
        spectra: dict[str, torch.Tensor] = {}

        if config.group_size == "auto":
            if config.rank_allocation == "loss":
                raise ValueError("rank_allocation='loss' needs private factors: pass group_size=1 (not 'auto').")
            for type_name, members in types.items():  # every plan's budget, before any work (raises if impossible)
                for n in sorted({n for n in config.auto_group_sizes if n <= len(members)} | {1}):
                    rank_bounds(chunk(type_name, members, n, shapes), config)
            groups, ranks = [], []
            selection = selection_batches(stats)
            held_apart = stats is not None and bool(stats.meta.get("held_apart_batches"))
            chosen_factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # member -> (basis, coefficient)
            self.auto_selection = {}
            for type_name, members in tqdm(types.items(), desc="choosing groups", unit="type"):
                candidates = sorted({n for n in config.auto_group_sizes if n <= len(members)} | {1})
                best = None
                for n in candidates:
                    plan = chunk(type_name, members, n, shapes)
                    _, caps = rank_bounds(plan, config)
                    pre: dict[str, GroupFactors] = {}
                    for g, cap in zip(plan, caps):
                        if config.rank_allocation == "uniform":  # ranks <= cap: factorise once, at the cap
                            pre[g.key] = factorize_group(weights(g), gram(g.members), cap, config.damping, g.members[0],
                                                            scales(g), precision)
                            spectra[g.key] = normalised_spectrum(pre[g.key].eigenvalues)
                        elif g.key not in spectra:
                            lam = group_spectrum(weights(g), gram(g.members), config.damping, g.members[0], scales(g),
                                                 precision)
                            spectra[g.key] = normalised_spectrum(lam)
                    plan_ranks = allocate_ranks(plan, config, lambda g: spectra[g.key], allow_dense=False)
                    total, found = 0.0, {}
                    for g, r, cap in zip(plan, plan_ranks, caps):
                        stored = cap if g.key in pre else min(r + 1, cap)  # headroom for the final top-up
                        f, errs, rf = factorise(g, stored, sorted({r, stored}), pre.pop(g.key, None))
                        found[g.key] = (f, errs, rf)
                        total += sum(errs[r])
                    if selection:  # end to end: the model's loss with this type compressed this way
                        trial = {m: (found[g.key][0].basis[:r], c[:, :r]) for g, r in zip(plan, plan_ranks)
                                 for m, c in zip(g.members, found[g.key][0].coefficients)}
                        total = self._model_loss(modules, {**chosen_factors, **trial}, selection)
                    self.auto_selection.setdefault(type_name, {})[n] = total
                    if best is None or total < best[0]:
                        best = (total, plan, plan_ranks, found)
                _, plan, plan_ranks, found = best
                for g, r in zip(plan, plan_ranks):
                    factors[g.key], errors[g.key], refs[g.key] = found[g.key]
                    for m, c in zip(g.members, factors[g.key].coefficients):
                        chosen_factors[m] = (factors[g.key].basis[:r], c[:, :r])
                    if not held_apart:
                        release(g)
                groups += plan
                ranks += plan_ranks
            if held_apart:  # chosen on tokens the Grams never saw; now the chosen groups fitted on every token
                stats = with_held_apart_grams(stats)
                for g, r in zip(tqdm(groups, desc="refitting", unit="group"), ranks):
                    stored = factors[g.key].basis.shape[0]
                    factors[g.key], errors[g.key], refs[g.key] = factorise(g, stored, sorted({r, stored}))
                    spectra[g.key] = normalised_spectrum(factors[g.key].eigenvalues)
                    release(g)
            # what the per-type plans left of the budget (less than one rank step per type) is spent here,
            # by the same score; never below any plan's rank, so never worse than the plans compared
            budget, _ = rank_bounds(groups, config)
            scores = [spectra[g.key] * len(g.members) for g in groups]
            stored = [factors[g.key].basis.shape[0] for g in groups]
            ranks = greedy_allocate(scores, [g.cost for g in groups], budget, r_min=ranks, r_max=stored)
        else:
            groups = self._plan(types, config, shapes)
            budget, caps = rank_bounds(groups, config)  # raises before any work if the ratio is impossible
            if config.rank_allocation == "uniform":
                # one pass: ranks are floor or floor + 1, so factorise at the cap and truncate after allocation
                # side by side on the idle cores; the Grams are read (and warned about) in this thread
                jobs = ((g, cap, sorted({min(uniform_rank(g, config), cap), cap}), gram(g.members))
                        for g, cap in zip(groups, caps))
                with closing(map_decompositions(lambda job: factorise(*job[:3], g_gram=job[3], final=True), jobs)) as done:
                    for g, (f, errs, rf) in zip(tqdm(groups, desc="factorising", unit="group"), done):
                        factors[g.key], errors[g.key], refs[g.key] = f, errs, rf
                        spectra[g.key] = normalised_spectrum(f.eigenvalues)
                        release(g)
                ranks = allocate_ranks(groups, config, lambda g: spectra[g.key])
            else:
                jobs = ((weights(g), gram(g.members), config.damping, g.members[0], scales(g), precision) for g in groups)
                with closing(map_decompositions(lambda job: group_spectrum(*job), jobs)) as done:
                    for g, lam in zip(tqdm(groups, desc="spectra", unit="group"), done):
                        spectra[g.key] = normalised_spectrum(lam)
                ranks = allocate_ranks(groups, config, lambda g: spectra[g.key], stats)
                groups, ranks, kept_dense = split_dense(groups, ranks)  # dense_at_break_even: no factors
                jobs = ((g, r, [r], gram(g.members)) for g, r in zip(groups, ranks))
                with closing(map_decompositions(lambda job: factorise(*job[:3], g_gram=job[3], final=True), jobs)) as done:
                    for g, result in zip(tqdm(groups, desc="factorising", unit="group"), done):
                        factors[g.key], errors[g.key], refs[g.key] = result
                        release(g)

        report = []
        for g, rank in zip(groups, ranks):
            f = factors.pop(g.key).truncate(rank)
            dtype = modules[g.members[0]].weight.dtype
            bases[g.key] = nn.Parameter(f.basis.to(dtype))
            for m, coef in zip(g.members, f.coefficients):
                self._member_group[m] = g.key
                self._pending[m] = coef.to(dtype)
            record_groups(config, [g], [rank])
            rel = [e / max(r, 1e-300) for e, r in zip(errors[g.key][rank], refs[g.key])]
            report.append(g.report(rank, sum(rel) / len(rel) if stats is not None else None))
        config.dense_modules = sorted(m for g in kept_dense for m in g.members)
        report += [g.dense_report() for g in kept_dense]
        return report

    # ---- injection --------------------------------------------------------------------------------
    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, SharedBasisLayer):
            raise ValueError(f"{current_key} already carries a Basis Sharing adapter.")
        group = self._member_group.get(current_key)
        if group is None:
            return
        layer = SharedBasisLayer(target, keep_dense_weight=config.keep_dense_weight)
        layer.update_layer(adapter_name, self.sb_bases[adapter_name], group, self._pending.pop(current_key))
        self._replace_module(parent, target_name, layer, target)

    def _post_injection_hook(self, model, config, adapter_name) -> None:
        self._pending = {}
        device = next((p.device for p in model.parameters() if p.device.type != "meta"), None)
        bases = self.sb_bases[adapter_name]
        if device is not None and not any(p.device.type == "meta" for p in bases.parameters()):
            bases.to(device)

    # ---- sizes -------------------------------------------------------------------------------------
    def stored_parameters(self, adapter_name: str = "default") -> int:
        """Parameters stored for the targeted modules (shared bases once, coefficients per layer, and the weights
        of the targets kept dense by ``dense_at_break_even``)."""
        n = sum(p.numel() for p in self.sb_bases[adapter_name].values())
        n += sum(self.model.get_submodule(m).weight.numel() for m in self.peft_config[adapter_name].dense_modules)
        for m in self.model.modules():
            if isinstance(m, SharedBasisLayer) and adapter_name in m.sb_coefficient:
                n += m.sb_coefficient[adapter_name].numel()
        return n
