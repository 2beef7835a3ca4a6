"""Basel's tuner: SVD reparametrisation, scheduled pruning to an exact parameter budget, consolidation
to a factorised model, and the 8-bit path for the factors."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ...budget import greedy_allocate
from ...linalg import WhitenerCache, whitened_svd
from ...modules import in_out_features, linear_weight
from ..base import PeftBasisTuner, warn_no_calibration
from ..factorized import factorized_forward
from .config import BaselConfig
from .layer import BaselLayer
from .schedule import BaselSchedule


def _unwrap_optimizer(optimizer):
    """The torch optimizer under accelerate's / Trainer's wrappers (whose ``state`` we slice)."""
    seen = 0
    while optimizer is not None and hasattr(optimizer, "optimizer") and seen < 4:
        optimizer = optimizer.optimizer
        seen += 1
    return optimizer


class BaselModel(PeftBasisTuner):
    """PEFT tuner for :class:`BaselConfig`.

    Per step of training call ``basel_step(step, total_steps, optimizer)`` after ``optimizer.step()``
    (``step`` = optimizer steps completed, 1-based), or use :class:`BaselCallback` in ``Trainer``. At
    ``step == total_steps`` the model is consolidated into its factorised form. ``history`` records every
    pruning event; ``kept_fraction()`` the stored fraction of the targeted dense parameters.
    """

    prefix = "basel_"
    tuner_layer_cls = BaselLayer

    def _check_new_adapter_config(self, config) -> None:
        super()._check_new_adapter_config(config)
        if sum(isinstance(c, BaselConfig) for c in self.peft_config.values()) > 1:
            raise ValueError(
                "A model holds one Basel adapter: it replaces the dense weights. Compress fresh copies of the base "
                "model to compare settings."
            )

    # ---- building the reparametrisation -----------------------------------------------------------
    def _pre_injection_hook(self, model: nn.Module, config: BaselConfig, adapter_name: str) -> None:
        names = self.resolve_target_names(model, config)
        modules = dict(model.named_modules())
        shapes = {n: in_out_features(modules[n]) for n in names}
        self._pending: dict[str, dict] = {}
        if not hasattr(self, "history"):
            self.history: list[dict] = []
            self._events_done: dict[str, int] = {}
        if config.rank_pattern:  # loading: shapes from the config, values from the checkpoint; no SVD
            self.check_rank_pattern_targets("Basel", config.rank_pattern, shapes)
            for n, r in config.rank_pattern.items():
                d_in, d_out = shapes[n]
                dtype = modules[n].weight.dtype
                spec = {"A": torch.zeros(r, d_in, dtype=dtype), "B": torch.zeros(d_out, r, dtype=dtype)}
                if config.phase == "train":
                    r_add = min(config.extra_rank, d_in, d_out)
                    spec.update(w=torch.zeros(r, dtype=dtype), A_add=torch.zeros(r_add, d_in, dtype=dtype),
                                B_add=torch.zeros(d_out, r_add, dtype=dtype))
                self._pending[n] = spec
            return
        if config.phase != "train":
            raise ValueError("A new Basel adapter starts in phase 'train'; `phase` is filled by the tuner, leave it.")
        names = self._profitable(names, shapes, config)
        stats = config.calibration_statistics
        whitened = config.init == "whitened" or (config.init == "auto" and stats is not None)
        if config.init == "whitened" and stats is None:
            raise ValueError(
                "BaselConfig(init='whitened') needs calibration statistics: call "
                "`peft_basis.calibrate(model, config, task_dataloader)` first, or use init='svd'."
            )
        if config.init == "auto" and stats is None:
            warn_no_calibration("BaselConfig")
        whitener = WhitenerCache(stats, config.damping) if whitened else None
        gen = torch.Generator().manual_seed(0)
        dense = stored = 0
        for n in tqdm(names, desc="Basel SVD", unit="module", disable=len(names) < 20):
            d_in, d_out = shapes[n]
            u, s, vh = whitened_svd(linear_weight(modules[n]), whitener(n) if whitened else None)
            # The paper's rule drops numerically-zero directions of W itself. Applied to the whitened spectrum it
            # would also drop directions the calibration text happens not to excite, and change the model; so the
            # whitened init keeps every direction (the first pruning event removes the weak ones) and the rule is
            # applied at consolidation, to W_eff's own spectrum.
            r = len(s) if whitened else max(1, int((s >= config.svd_threshold * s.mean()).sum()))
            r_add = min(config.extra_rank, d_in, d_out)
            dtype = modules[n].weight.dtype
            self._pending[n] = {
                "A": vh[:r].to(dtype).contiguous(),
                "B": u[:, :r].to(dtype).contiguous(),
                "w": s[:r].sqrt().to(dtype),
                "A_add": (torch.randn(r_add, d_in, generator=gen) / max(r_add, 1) ** 0.5).to(dtype),
                "B_add": torch.zeros(d_out, r_add, dtype=dtype),
            }
            config.rank_pattern[n] = r
            dense += d_in * d_out
            stored += r * (d_in + d_out)
        config.initial_fraction = stored / dense

    @staticmethod
    def _profitable(names: list[str], shapes: dict, config: BaselConfig) -> list[str]:
        """Targets whose share of the budget holds at least ``min_rank`` (a rank step costs d_in + d_out)."""
        too_small = [
            n for n in names
            if config.keep_ratio * shapes[n][0] * shapes[n][1] < config.min_rank * (shapes[n][0] + shapes[n][1])
        ]
        if len(too_small) == len(names):
            n = too_small[0]
            d_in, d_out = shapes[n]
            raise ValueError(
                f"No target can be factorised profitably at keep_ratio={config.keep_ratio}: e.g. {n} ({d_out}x{d_in}) "
                f"has {d_in * d_out} parameters, its share is {config.keep_ratio * d_in * d_out:.0f}, but one rank of "
                f"factors costs d_in + d_out = {d_in + d_out}. Target larger modules, or raise keep_ratio."
            )
        if too_small:
            warnings.warn(
                f"Basel leaves {len(too_small)} targets dense (e.g. {too_small[:3]}): at keep_ratio={config.keep_ratio} "
                "their share of the budget is below one rank of factors (d_in + d_out parameters).",
                stacklevel=4,
            )
        return [n for n in names if n not in too_small]

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, BaselLayer):
            raise ValueError(f"{current_key} already carries a Basel adapter.")
        spec = self._pending.pop(current_key, None)
        if spec is None:
            return  # left dense (too small to factorise at this keep ratio)
        layer = BaselLayer(target, keep_dense_weight=config.keep_dense_weight)
        layer.update_layer(adapter_name, **spec)
        self._replace_module(parent, target_name, layer, target)

    def _post_injection_hook(self, model, config, adapter_name) -> None:
        self._pending = {}

    # ---- sizes -------------------------------------------------------------------------------------
    def basel_layers(self, adapter_name: str = "default") -> dict[str, BaselLayer]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, BaselLayer) and adapter_name in m.basel_A}

    def dense_parameters(self, adapter_name: str = "default") -> int:
        """Dense parameters of the factorised targets (the base of ``keep_ratio``)."""
        return sum(m.in_features * m.out_features for m in self.basel_layers(adapter_name).values())

    def kept_parameters(self, adapter_name: str = "default") -> int:
        """Parameters the factors hold at the current ranks, ``sum r (d_in + d_out)``."""
        return sum(m.rank(adapter_name) * (m.in_features + m.out_features) for m in self.basel_layers(adapter_name).values())

    def kept_fraction(self, adapter_name: str = "default") -> float:
        return self.kept_parameters(adapter_name) / self.dense_parameters(adapter_name)

    def ranks(self, adapter_name: str = "default") -> dict[str, int]:
        return {n: m.rank(adapter_name) for n, m in self.basel_layers(adapter_name).items()}

    # ---- the schedule ----------------------------------------------------------------------------
    def basel_step(self, step: int, total_steps: int, optimizer=None, adapter_name: str = "default") -> None:
        """Call after every ``optimizer.step()``. Prunes when the schedule says so (pass the optimizer so
        its state shrinks with the parameters) and consolidates at ``step >= total_steps``."""
        config = self.peft_config[adapter_name]
        if config.phase == "factorized":
            return
        schedule = BaselSchedule.from_config(config, total_steps)
        due = schedule.events_done(step)
        if due > self._events_done.get(adapter_name, 0):
            frac = schedule.target_fraction(due, schedule.events, config.initial_fraction or 1.0, config.keep_ratio)
            budget = int(frac * self.dense_parameters(adapter_name))
            if due == schedule.events:
                budget = int(config.keep_ratio * self.dense_parameters(adapter_name))
            self.prune_to(budget, optimizer=optimizer, adapter_name=adapter_name, step=step)
            self._events_done[adapter_name] = due
        if step >= total_steps:
            self.consolidate(adapter_name)

    @torch.no_grad()
    def prune_to(self, budget: int, optimizer=None, adapter_name: str = "default", step: Optional[int] = None) -> None:
        """Keep the bases with the highest relative relearned energy per parameter, ``(w_i^2)^2 / sum_j (w_j^2)^2``
        (the squared error removing basis ``i`` costs, relative to the module's total), within ``budget``
        stored parameters; ranks only go down."""
        config = self.peft_config[adapter_name]
        layers = [(n, m) for n, m in self.basel_layers(adapter_name).items() if m.phase(adapter_name) == "train"]
        orders, scores, costs, r_max = [], [], [], []
        for _, m in layers:
            energy = m.basel_w[adapter_name].detach().double() ** 4
            order = torch.argsort(energy, descending=True)
            orders.append(order)
            scores.append(energy[order] / energy.sum().clamp_min(1e-300))
            costs.append(m.in_features + m.out_features)
            r_max.append(m.rank(adapter_name))
        r_min = [min(config.min_rank, r) for r in r_max]
        try:
            ranks = greedy_allocate(scores, costs, budget, r_min=r_min, r_max=r_max)
        except ValueError as e:
            raise ValueError(
                f"Basel cannot reach {budget:,} parameters with min_rank={config.min_rank} on every module ({e}). Raise "
                "keep_ratio or lower min_rank."
            ) from None
        optimizer = _unwrap_optimizer(optimizer)
        threshold = 1.0
        for (name, m), order, score, r in zip(layers, orders, scores, ranks):
            if r > 0:
                threshold = min(threshold, float(score[r - 1]))
            if r < m.rank(adapter_name):
                m.prune(adapter_name, torch.sort(order[:r]).values, optimizer)
            config.rank_pattern[name] = r
        self.history.append({
            "step": step, "budget": budget, "kept_parameters": self.kept_parameters(adapter_name),
            "kept_fraction": self.kept_fraction(adapter_name), "energy_threshold": threshold,
        })

    @torch.no_grad()
    def consolidate(self, adapter_name: str = "default") -> None:
        """Re-factorise every target to its current rank (``W_eff ~ B A``) and drop the training-phase
        parameters: afterwards the model holds exactly the factors that ``save_pretrained`` writes.
        Uses the task's whitening when calibration statistics are attached (the truncation then minimises
        the task's output error), plain SVD otherwise."""
        config = self.peft_config[adapter_name]
        if config.phase == "factorized":
            return
        stats = config.calibration_statistics
        whitener = None if stats is None else WhitenerCache(stats, config.damping)
        for name, m in self.basel_layers(adapter_name).items():
            wh = whitener(name) if whitener is not None and name in stats else None
            config.rank_pattern[name] = m.consolidate(adapter_name, wh, config.svd_threshold)
        config.phase = "factorized"
        frac = self.kept_fraction(adapter_name)
        if frac > config.keep_ratio + 1e-9 and self.basel_layers(adapter_name):
            warnings.warn(
                f"Basel consolidated at {frac:.3f} of the targeted parameters, above keep_ratio={config.keep_ratio}: "
                "training stopped before the pruning schedule ended. Call `prune_to(budget)` before consolidating, or "
                "train to the end of the schedule.",
                stacklevel=2,
            )


# ---- 8-bit -------------------------------------------------------------------------------------------
class FactorizedLinear(nn.Sequential):
    """Basel's exported pair of Linears: ``down`` (``d_in -> r``, ``A``) then ``up`` (``r -> d_out``, ``B``, bias)."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, bias: Optional[torch.Tensor]):
        r, d_in = A.shape
        d_out = B.shape[0]
        down = nn.Linear(d_in, r, bias=False)
        up = nn.Linear(r, d_out, bias=bias is not None)
        down.weight = nn.Parameter(A.detach().clone(), requires_grad=False)
        up.weight = nn.Parameter(B.detach().clone(), requires_grad=False)
        if bias is not None:
            up.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        super().__init__(down, up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self[0], self[1]
        if type(down) is nn.Linear and type(up) is nn.Linear:  # the Basel layer's own arithmetic: equal outputs
            return factorized_forward(x, down.weight, up.weight, up.bias)
        return super().forward(x)  # e.g. dynamically quantised Linears


def export_factorized(peft_model, adapter_name: str = "default") -> nn.Module:
    """The plain transformers model with every consolidated Basel target replaced by a
    :class:`FactorizedLinear` (two ``nn.Linear``: Basel's export format). No PEFT wrapper left."""
    tuner = peft_model.base_model if hasattr(peft_model, "base_model") else peft_model
    config = tuner.peft_config[adapter_name]
    if config.phase != "factorized":
        raise ValueError("export_factorized needs a consolidated model: call `consolidate()` (or finish training) first.")
    model = tuner.model
    for name, m in list(tuner.basel_layers(adapter_name).items()):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FactorizedLinear(m.basel_A[adapter_name], m.basel_B[adapter_name], m.base_layer.bias))
    return model


def quantize_factors_8bit(model: nn.Module) -> nn.Module:
    """Int8 weights for every factor Linear (PyTorch's own dynamic quantisation,
    ``torch.ao.quantization.quantize_dynamic``: per-tensor int8 weights, activations quantised on the
    fly; CPU inference). Pass the output of :func:`export_factorized`. Only the factors are quantised;
    embeddings and the LM head stay in float."""
    from torch.ao.quantization import quantize_dynamic

    names = {f"{n}.{c}" for n, m in model.named_modules() if isinstance(m, FactorizedLinear) for c in ("0", "1")}
    if not names:
        raise ValueError("No FactorizedLinear in this model: call `export_factorized(peft_model)` first.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(model, qconfig_spec=names, dtype=torch.qint8, inplace=False)
