"""Basis Sharing: grouping, the rank budget, and the joint whitened SVD of each group."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ...budget import greedy_allocate, rank_for_ratio
from ...linalg import output_error, robust_eigh, warn_if_rank_deficient, whitened_svd
from ...modules import in_out_features, layer_index, linear_weight, module_type
from ..base import BasisTunerBase, warn_no_calibration
from .config import DEFAULT_SHARED_MODULES, SharedBasisConfig
from .layer import SharedBasisLayer


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


def _group_key(type_name: str, members: list[str]) -> str:
    leaf = type_name.split("*.", 1)[-1].replace(".", "_")
    first, last = layer_index(members[0]), layer_index(members[-1])
    return f"{leaf}__{first}" if first == last else f"{leaf}__{first}-{last}"


def _by_type(names: list[str]) -> dict[str, list[str]]:
    types: dict[str, list[str]] = {}
    for n in names:
        types.setdefault(module_type(n), []).append(n)
    for members in types.values():
        members.sort(key=lambda n: layer_index(n) or 0)
    return types


def _chunk(type_name: str, members: list[str], n: int, shapes: dict) -> list[Group]:
    groups = []
    for i in range(0, len(members), n):
        chunk = members[i : i + n]
        d_in, d_out = shapes[chunk[0]]
        groups.append(Group(_group_key(type_name, chunk), chunk, d_in, d_out))
    return groups


class SharedBasisModel(BasisTunerBase):
    """PEFT tuner for :class:`SharedBasisConfig`. After creation ``compression_report`` lists every
    group: members, rank, stored parameters and relative calibration output error."""

    prefix = "sb_"
    tuner_layer_cls = SharedBasisLayer
    uses_shared_state = True

    def _check_new_adapter_config(self, config) -> None:
        super()._check_new_adapter_config(config)
        if sum(isinstance(c, SharedBasisConfig) for c in self.peft_config.values()) > 1:
            raise ValueError(
                "A model holds one Basis Sharing adapter: it replaces the dense weights. To compare settings, compress "
                "fresh copies of the base model; to fine-tune the compressed model, stack a LoRA on the merged model."
            )

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
            missing = [n for n in names if not any(n in m for m in config.groups.values())]
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
        else:
            self.compression_report = self._compress(modules, names, shapes, config, bases)
        self.sb_bases[adapter_name] = bases

    def _compress(self, modules, names, shapes, config: SharedBasisConfig, bases: nn.ParameterDict) -> list[dict]:
        stats = config.calibration_statistics
        if stats is None:
            warn_no_calibration("SharedBasisConfig")
        weights = {n: linear_weight(modules[n]).detach() for n in names}
        whiteners: dict[tuple, object] = {}

        def whitener(members):
            if stats is None:
                return None
            keys = tuple(sorted({stats.sources[m] for m in members}))
            if keys not in whiteners:
                gram = sum(stats.grams[k] for k in keys)
                w = robust_eigh(gram, config.damping, name=members[0])
                warn_if_rank_deficient(w, members[0], sum(stats.tokens[k] for k in keys))
                whiteners[keys] = w
            return whiteners[keys]

        spectra: dict[str, torch.Tensor] = {}

        def spectrum(group: Group) -> torch.Tensor:
            if group.key not in spectra:
                f = whitened_svd([weights[m] for m in group.members], whitener(group.members), 1)
                s2 = f.singular_values.double() ** 2
                spectra[group.key] = s2 / s2.sum()  # relative error removed per direction: comparable across groups
            return spectra[group.key]

        types = _by_type(names)
        model_type = getattr(getattr(self.model, "config", None), "model_type", None)
        shared = config.shared_modules
        if shared is None:
            shared = DEFAULT_SHARED_MODULES.get(model_type, [])

        def plan(type_name: str, members: list[str], n: int) -> list[Group]:
            return _chunk(type_name, members, n, shapes)

        groups: list[Group] = []
        type_iter = tqdm(types.items(), desc="choosing groups", disable=config.group_size != "auto")
        for type_name, members in type_iter:
            if config.group_size == "auto":
                candidates = sorted({n for n in config.auto_group_sizes if n <= len(members)} | {1})
                best = min(
                    candidates,
                    key=lambda n: self._plan_error(plan(type_name, members, n), weights, whitener, stats, config, spectrum),
                )
                groups += plan(type_name, members, best)
            else:
                is_shared = any(type_name == s or type_name.endswith("." + s) for s in shared)
                groups += plan(type_name, members, config.group_size if is_shared else 1)

        ranks = self._allocate(groups, config, spectrum)
        report = []
        for group, rank in tqdm(list(zip(groups, ranks)), desc="factorising", unit="group"):
            f = whitened_svd([weights[m] for m in group.members], whitener(group.members), rank)
            dtype = weights[group.members[0]].dtype
            bases[group.key] = nn.Parameter(f.basis.to(dtype))
            errors = []
            for m, coef in zip(group.members, f.coefficients):
                self._member_group[m] = group.key
                self._pending[m] = coef.to(dtype)
                if stats is not None:
                    errors.append(output_error(weights[m], coef @ f.basis, stats.gram(m)))
            config.groups[group.key] = group.members
            # keyed by module, as PEFT expects of rank_pattern (it warns about keys matching no target)
            config.rank_pattern.update({m: rank for m in group.members})
            report.append(
                {
                    "group": group.key,
                    "members": group.members,
                    "rank": rank,
                    "params": rank * group.cost,
                    "dense_params": group.dense_params,
                    "relative_error": sum(errors) / len(errors) if errors else None,
                }
            )
        return report

    def _plan_error(self, groups, weights, whitener, stats, config, spectrum) -> float:
        """Summed calibration output error of a plan at this matrix type's budget, each layer measured
        with its OWN Gram (the group whitener uses the summed Gram, so its spectrum alone would flatter
        sharing). Absolute errors: every plan covers the same layers, so they compare directly."""
        total = 0.0
        for g, rank in zip(groups, self._allocate(groups, config, spectrum)):
            f = whitened_svd([weights[m] for m in g.members], whitener(g.members), rank)
            for m, coef in zip(g.members, f.coefficients):
                gram = stats.gram(m).double() if stats is not None else torch.eye(g.d_in, dtype=torch.float64)
                d = weights[m].double() - (coef @ f.basis).double()
                total += float(torch.einsum("oi,ij,oj->", d, gram, d))
        return total

    @staticmethod
    def _allocate(groups: list[Group], config: SharedBasisConfig, spectrum) -> list[int]:
        """Ranks within ``(1 - ratio)`` of the targeted dense parameters and within one rank step of it."""
        budget = int((1 - config.compression_ratio) * sum(g.dense_params for g in groups))
        r_max = [min(g.d_in, len(g.members) * g.d_out) for g in groups]
        if config.rank_allocation == "uniform":
            floor = [
                max(1, min(rank_for_ratio(g.d_in, g.d_out, config.compression_ratio, len(g.members)), m))
                for g, m in zip(groups, r_max)
            ]
        else:
            floor = [1] * len(groups)
        if sum(f * g.cost for f, g in zip(floor, groups)) > budget:
            worst = min(groups, key=lambda g: g.dense_params)
            raise ValueError(
                f"compression_ratio={config.compression_ratio} leaves less than one rank for {worst.members[0]} "
                f"({worst.d_out}x{worst.d_in}); lower the ratio or exclude the smallest modules."
            )
        # Spend what the floors leave (up to one rank step per group) where it removes the most error.
        spectra = [spectrum(g) for g in tqdm(groups, desc="spectra", unit="group", leave=False)]
        return greedy_allocate(spectra, [g.cost for g in groups], budget, r_min=floor, r_max=r_max)

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

    def _replace_module(self, parent, child_name, new_module, child):
        setattr(parent, child_name, new_module)
        if not hasattr(new_module, "base_layer"):
            return
        device = next((p.device for p in child.parameters() if p.device.type != "meta"), None)
        # low_cpu_mem_usage: new parameters sit on meta until the checkpoint is assigned; leave them there
        if device is not None and not any(p.device.type == "meta" for p in new_module.parameters()):
            new_module.to(device)

    def _post_injection_hook(self, model, config, adapter_name) -> None:
        self._pending = {}
        device = next((p.device for p in model.parameters() if p.device.type != "meta"), None)
        bases = self.sb_bases[adapter_name]
        if device is not None and not any(p.device.type == "meta" for p in bases.parameters()):
            bases.to(device)

    # ---- sizes -------------------------------------------------------------------------------------
    def stored_parameters(self, adapter_name: str = "default") -> int:
        """Parameters stored for the targeted modules (shared bases once, coefficients per layer)."""
        n = sum(p.numel() for p in self.sb_bases[adapter_name].values())
        for m in self.model.modules():
            if isinstance(m, SharedBasisLayer) and adapter_name in m.sb_coefficient:
                n += m.sb_coefficient[adapter_name].numel()
        return n
